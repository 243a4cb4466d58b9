"""adamax_jax: the Adamax optimizer for JAX, as optax gradient transformations."""

from adamax_jax import (
    _export,  # noqa: F401  (registers the state types with jax.export)
    compat,
    sharding,
)
from adamax_jax._alias import adamax, adamaxw, nadamax
from adamax_jax._lazy import StampedRows
from adamax_jax._offload import offload
from adamax_jax._packed import PackedTree, packed
from adamax_jax._storage.codes8 import QuantizedM, QuantizedU
from adamax_jax._transform import AdamaxState, EpsPlacement, scale_by_adamax

# The one place the version is written: pyproject.toml reads it ([tool.hatch.version]).
__version__ = "0.1.0.dev0"

__all__ = [
    "AdamaxState",
    "EpsPlacement",
    "PackedTree",
    "QuantizedM",
    "QuantizedU",
    "StampedRows",
    "adamax",
    "adamaxw",
    "compat",
    "nadamax",
    "offload",
    "packed",
    "scale_by_adamax",
    "sharding",
]
