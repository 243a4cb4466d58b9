"""What the library reads off a leaf: an array, a ShapeDtypeStruct or a Python scalar.

Parameter trees may hold Python floats (``{"scale": 1.0}``) and abstract leaves
(``jax.ShapeDtypeStruct``), which have no ``.dtype`` or ``.shape`` of their own, or
ones that mean something else. These helpers answer the same way for all of them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer


def dtype_of(leaf: Any) -> jnp.dtype:
    """The dtype JAX gives ``leaf``: its own, or float32 for a Python float.

    ``jnp.result_type``, not ``np.asarray``: a Python float is float32 unless x64 is on.
    """
    dtype = getattr(leaf, "dtype", None)
    return jnp.dtype(jnp.result_type(leaf) if dtype is None else dtype)


def shape_of(leaf: Any) -> tuple[int, ...]:
    """The shape of ``leaf``; ``()`` for a Python scalar."""
    shape = getattr(leaf, "shape", None)
    return tuple(int(d) for d in (np.shape(leaf) if shape is None else shape))


def path_str(path: tuple[Any, ...]) -> str:
    """A leaf's path as in error messages: ``['dense']['w']``, or ``<root>`` for a bare leaf."""
    return jax.tree_util.keystr(path) or "<root>"


def tied_to(value: jax.Array, param: Any) -> jax.Array:
    """``value`` (a zero state) made to read ``param`` when it is traced, at no cost.

    Zeros that never read the parameter lose its sharding under ``jit`` (XLA puts them
    on one device), and inside ``shard_map`` they are invariant over the mesh axes
    while the updated state varies over them (``lax.scan`` and ``lax.cond`` then see
    two types of state). A select whose predicate reads the parameter, elementwise
    for a value of its shape and through a reduction otherwise, with the same value in
    both branches, ties them together and compiles to nothing.
    """
    if not isinstance(param, Tracer):
        return value
    same = param == param
    return jnp.where(same if value.shape == param.shape else jnp.all(same), value, value)
