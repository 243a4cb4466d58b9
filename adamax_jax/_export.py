"""Makes optimizer states serializable with ``jax.export``.

``Exported.serialize()`` stores the calling convention's pytree structure, and JAX
refuses any node type it has no serialization registered for. Every state an
adamax_jax optimizer builds is made of adamax_jax's own node types and a few of
optax's, none of them registered by their owners, so a jitted training step could be
exported for any platform but not saved. This module registers them at import.

Our own types are listed in :data:`_OWN_TYPES`; optax's NamedTuple states are found in
its loaded modules, so every optax transform a user wraps ours in is covered. A change
of how a type is made a pytree (a NamedTuple, ``register_dataclass``,
``register_pytree_node``) needs no change here: :func:`_register` picks the serializer
from the type itself.
"""

from __future__ import annotations

import ast
import sys
from typing import Any

import optax  # noqa: F401  (its modules must be loaded: their state types are registered)
from jax import export

from adamax_jax._lazy import StampedRows
from adamax_jax._packed import PackedTree
from adamax_jax._storage.codes8 import QuantizedM, QuantizedU
from adamax_jax._transform import AdamaxState

# The serialized names are part of saved artifacts: never rename one.
_OWN_TYPES: tuple[tuple[type, str], ...] = (
    (AdamaxState, "adamax_jax.AdamaxState"),
    (QuantizedM, "adamax_jax.QuantizedM"),
    (QuantizedU, "adamax_jax.QuantizedU"),
    (PackedTree, "adamax_jax.PackedTree"),
    (StampedRows, "adamax_jax.StampedRows"),
)

# optax's state types are NamedTuples that JAX flattens natively and optax does not
# register for serialization. Every one defined in a loaded optax module is
# registered: a user chains and wraps our optimizers with any of them (partition,
# schedule_free, ema, lookahead, ...), and a list kept by hand missed some.
_OPTAX_NOT_STATE = frozenset({"GradientTransformation", "GradientTransformationExtraArgs"})


def _is_namedtuple(nodetype: type) -> bool:
    # JAX flattens namedtuples natively, without an entry in the pytree registry, so
    # they need their own serializer.
    return issubclass(nodetype, tuple) and isinstance(getattr(nodetype, "_fields", None), tuple)


def _serialize_auxdata(aux_data: Any) -> bytes:
    """A node's static data as a Python literal, refusing what would not read back equal.

    ``repr`` and :func:`ast.literal_eval` keep tuples apart from lists, which JSON
    would not; the deserialized structure has to compare equal to the caller's.
    """
    text = repr(aux_data)
    try:
        same = ast.literal_eval(text) == aux_data
    except (ValueError, SyntaxError):
        same = False
    if not same:
        raise TypeError(
            "adamax_jax can serialize only pytree nodes whose static data is made of "
            f"Python literals (numbers, strings, None, tuples, lists, dicts); got {text}"
        )
    return text.encode("utf-8")


def _deserialize_auxdata(data: bytes) -> Any:
    return ast.literal_eval(data.decode("utf-8"))


def _register(nodetype: type, serialized_name: str, *, strict: bool) -> None:
    """Registers one node type with the serializer its kind needs.

    A type someone registered first (optax itself, one day, or the user) keeps its
    registration: JAX refuses a second one for the same type or name. Any other
    refusal is raised for our own types (``strict``) and ignored for optax's, whose
    registration is a courtesy that must never break ``import adamax_jax``.
    """
    try:
        if _is_namedtuple(nodetype):
            export.register_namedtuple_serialization(nodetype, serialized_name=serialized_name)
        else:
            # from_children defaults to the type's own pytree unflatten.
            export.register_pytree_node_serialization(
                nodetype,
                serialized_name=serialized_name,
                serialize_auxdata=_serialize_auxdata,
                deserialize_auxdata=_deserialize_auxdata,
            )
    except ValueError as error:
        if strict and "Duplicate serialization registration" not in str(error):
            raise


def _optax_types() -> list[tuple[type, str]]:
    """The NamedTuple types defined in optax's loaded modules, each with its
    serialized name (``adamax_jax.optax.`` and the class name, unique in optax)."""
    found = {}
    for module_name, module in sorted(sys.modules.items()):
        if module is None or not (module_name == "optax" or module_name.startswith("optax.")):
            continue
        for name, obj in vars(module).items():
            if (
                isinstance(obj, type)
                and obj.__module__ == module_name
                and _is_namedtuple(obj)
                and name not in _OPTAX_NOT_STATE
            ):
                found[obj] = f"adamax_jax.optax.{name}"
    return list(found.items())


def register_all() -> None:
    """Registers every node type of :data:`_OWN_TYPES` and optax's state types."""
    for nodetype, serialized_name in _OWN_TYPES:
        _register(nodetype, serialized_name, strict=True)
    for nodetype, serialized_name in _optax_types():
        _register(nodetype, serialized_name, strict=False)


register_all()
