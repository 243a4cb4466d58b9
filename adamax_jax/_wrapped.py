"""Parameters that a framework wraps in a pytree node of its own.

Flax NNX keeps each parameter array in a ``Variable``: a pytree node with the array
as its only child, metadata (such as sharding annotations) as static data, and
``__jax_array__`` so that it stands for the array. Mapping over such a tree with
``jax.tree.map`` descends into the Variable, so a moment stored as a node of its own
(the 8-bit :class:`~adamax_jax.QuantizedM` and ``QuantizedU``) would end
up *inside* a Variable. That is the wrong place for it:

* ``nnx.Optimizer`` treats a Variable's value as one leaf and writes the new state
  back into it as a plain mapping, so the moment comes back without its type or its
  static ``block_size``, and the next update cannot read it.
* The Variable's metadata describes an array of the parameter's shape, not the
  per-block scales next to it.

So the state treats such wrappers as leaves and puts the wrapper around each
parameter-shaped array it stores (a float moment, or the codes of an 8-bit one),
with the wrapper's metadata, and never around a whole 8-bit moment. The maths works
on the unwrapped arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.core import Tracer

from adamax_jax import _lazy
from adamax_jax._storage import codes8


def is_wrapped(x: Any) -> bool:
    """Whether ``x`` is a pytree node that stands for the single array it holds.

    That is, its type implements ``__jax_array__`` (so ``jnp.asarray`` sees the
    array) and it flattens to exactly one leaf other than itself. Arrays and tracers
    are leaves, not wrappers.
    """
    if not hasattr(type(x), "__jax_array__") or isinstance(x, jax.Array | Tracer):
        return False
    leaves = jax.tree.leaves(x)
    return len(leaves) == 1 and leaves[0] is not x


def unwrap(x: Any) -> Any:
    """``x`` with every wrapper in it replaced by the array it holds."""
    return jax.tree.map(
        lambda w: jax.tree.leaves(w)[0] if is_wrapped(w) else w, x, is_leaf=is_wrapped
    )


def wrap_like(slot: Any, stored: Any) -> Any:
    """``stored`` (one leaf's state, unwrapped) with ``slot``'s wrapper, if it has one.

    The wrapper goes around the parameter-shaped array: the whole of a plain moment,
    the codes of an 8-bit one (whose scales have other shapes and stay unwrapped).
    """
    if not is_wrapped(slot):
        return stored

    def wrap(array: Any) -> Any:
        return jax.tree.map(lambda _: array, slot)

    if isinstance(stored, _lazy.StampedRows):  # the row stamps are not parameter-shaped
        return dataclasses.replace(stored, moment=wrap_like(slot, stored.moment))
    if isinstance(stored, codes8.QuantizedM | codes8.QuantizedU):
        return dataclasses.replace(stored, codes=wrap(stored.codes))
    return wrap(stored)
