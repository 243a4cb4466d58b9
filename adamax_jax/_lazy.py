r"""Lazy rows: which rows of a leaf step, and how skipped rows catch up.

``lazy_rows`` leaves a row (a slice along axis 0; an element of a 1-D leaf, the
whole of a 0-d one) without gradient untouched. ``"freeze"`` (or ``True``) is
TensorFlow's legacy sparse semantics: such a row keeps its ``m`` and ``u`` as they
are. ``"catch_up"`` makes the lazy step exact instead: with a zero gradient
Adamax's moments evolve in closed form,

.. math::

    m_{s+k} = \beta_1^k m_s, \qquad u_{s+k} = \beta_2^k u_s
    \quad (\max(\beta_2^k u_s, \epsilon) \text{ with } \epsilon \text{ in the max}),

so a row last brought up to date at step ``s`` that is touched again at step ``t``
first gets that decay with ``k = t - 1 - s``, then takes the ordinary step. Its
state and update are then dense Adamax's. The step ``s`` of each row is kept
next to ``u`` as a :class:`StampedRows` node: one ``int32`` per row.

With 8-bit state the scale of a block carries the decay of all its elements, so
a block's rows can only be brought up to date together. The bookkeeping then
covers groups of rows that fill whole blocks (one row when the row length is a
multiple of ``block_size``; ``block_size / row length`` rows when it divides
it); a group with a touched row brings all its rows up to date, those without
gradient by the dense step on a zero gradient, and only the touched rows take a
step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from adamax_jax import _leaves
from adamax_jax._storage import codes8

LazyRows = bool | Literal["freeze", "catch_up"]
Mode = Literal["freeze", "catch_up"] | None
MODES: tuple[str, ...] = ("freeze", "catch_up")


def check_mode(value: Any) -> Mode:
    """``lazy_rows`` as ``None`` (off), ``"freeze"`` or ``"catch_up"``.

    Raises:
      TypeError: For a value that is neither a bool nor a string (``1``, ``None``).
      ValueError: For an unknown string.
    """
    if isinstance(value, bool | np.bool_):
        return "freeze" if value else None
    if not isinstance(value, str):
        raise TypeError(
            f'lazy_rows must be False, True (also spelled "freeze") or "catch_up", got '
            f"{type(value).__name__} {value!r}"
        )
    if value not in MODES:
        raise ValueError(
            f'lazy_rows must be False, True, "freeze" or "catch_up", got the string {value!r}'
        )
    return value  # pyright: ignore[reportReturnType]


@dataclasses.dataclass(frozen=True)
class StampedRows:
    """A stored ``u`` with the step each row was last brought up to date at.

    The state of ``lazy_rows="catch_up"``: each leaf of ``AdamaxState.u`` is one.

    Attributes:
      moment: The stored ``u``, in the form it would have without ``catch_up`` (an
        array, or a ``QuantizedU`` with ``state_bits=8``).
      last_step: ``int32`` step count at which each row's ``m`` and ``u`` were last
        current (0: never touched), shaped ``(rows,)`` (``()`` for a 0-d leaf); with
        ``state_bits=8``, one per group of rows that fills whole blocks.
    """

    moment: Any
    last_step: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.moment.shape)

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.moment.dtype)


jax.tree_util.register_dataclass(StampedRows)


def split(u_stored: Any) -> tuple[Any, jax.Array | None]:
    """A stored ``u`` as ``(moment, last_step)``; ``last_step`` is None without catch_up."""
    if isinstance(u_stored, StampedRows):
        return u_stored.moment, u_stored.last_step
    return u_stored, None


def group_rows(shape: tuple[int, ...], u_stored: Any) -> int:
    """Rows per ``last_step`` entry: 1, or for 8-bit ``u`` the rows that fill whole blocks."""
    if not isinstance(u_stored, codes8.QuantizedU):
        return 1
    row = math.prod(shape[1:])  # 1 for a 1-D leaf: each element is a row
    return math.lcm(row, u_stored.block_size) // row


def zeros(param: Any, u_stored: Any) -> StampedRows:
    """``u_stored`` stamped with step 0 (never touched) for every row of ``param``."""
    shape = tuple(np.shape(param))
    n = -(-shape[0] // group_rows(shape, u_stored)) if shape else 0
    if not shape or n != shape[0] or not isinstance(param, jax.Array | Tracer):
        # The stamps follow the gradients from the first update on: so must their zeros.
        return StampedRows(
            u_stored, _leaves.tied_to(jnp.zeros([n] if shape else [], jnp.int32), param)
        )
    # Stamps that follow the layout of the parameter's axis 0: derived from a
    # reduction of the parameter (explicit sharding carries over), and under jit
    # tied to it by a select, as in _storage.zeros (zeros alone land on one device).
    same = param == param
    row = jnp.any(same, axis=tuple(range(1, len(shape)))) if len(shape) > 1 else same
    stamp = jnp.zeros_like(row, dtype=jnp.int32)
    if isinstance(param, Tracer):
        stamp = jnp.where(row, stamp, stamp)
    return StampedRows(u_stored, stamp)


def rows_with_gradient(g: jax.Array) -> jax.Array:
    """Where a row of ``g`` has a nonzero element, shaped to broadcast against ``g``."""
    if g.ndim <= 1:
        return g != 0
    rows = jnp.any(g != 0, axis=tuple(range(1, g.ndim)))
    return rows.reshape(rows.shape + (1,) * (g.ndim - 1))


class CaughtUp(NamedTuple):
    """The moments with every advanced row brought up to the step before this one."""

    m: jax.Array
    u: jax.Array
    last_step: jax.Array
    advanced: jax.Array  # the rows this step brings up to date, like ``touched``
    # b2**k for each row, k the steps it skipped (1 where none), like ``touched``:
    # 8-bit u carries its decay in the block scales, which need it as well.
    u_decay: jax.Array


def catch_up(
    touched: jax.Array,
    last_step: jax.Array,
    m: jax.Array,
    u: jax.Array,
    *,
    count: jax.Array,
    b1: jax.Array,
    b2: jax.Array,
    floor: jax.Array | None,
    rows_per_stamp: int,
) -> CaughtUp:
    """Applies the zero-gradient decay of the steps each advanced row skipped.

    ``touched`` (from :func:`rows_with_gradient`) marks the rows with gradient at
    step ``count``. Rows that are not advanced keep ``m`` and ``u`` bit for bit.
    ``floor`` is ``eps`` when it sits in the max: dense Adamax then keeps ``u`` at
    least ``eps`` after any step. The decay uses this step's ``b1`` and ``b2`` for
    all the skipped steps.
    """
    rows = touched.reshape(touched.shape[:1])
    grouped = rows_per_stamp > 1
    if grouped:
        n = rows.shape[0]
        padded = jnp.pad(rows, (0, last_step.shape[0] * rows_per_stamp - n))
        rows = jnp.any(padded.reshape(-1, rows_per_stamp), axis=1)
    # count saturates at the int32 maximum, where a row touched at that count would
    # otherwise get k = -1.
    skipped = jnp.where(rows, jnp.maximum(count - 1 - last_step, 0), 0)
    new_last = jnp.where(rows, count, last_step)
    if grouped:
        skipped = jnp.repeat(skipped, rows_per_stamp)[: touched.shape[0]]
        rows = jnp.repeat(rows, rows_per_stamp)[: touched.shape[0]]
    k = skipped.astype(b1.dtype).reshape(touched.shape)
    # Per row, then broadcast: b ** k costs nothing next to the leaf. Where k = 0 the
    # factor is exactly 1 (also for b = 0), so rows left as they were keep their bits.
    skipped_any = k > 0
    u_decay = jnp.where(skipped_any, b2**k, 1)
    m = m * jnp.where(skipped_any, b1**k, 1)
    u = u * u_decay
    if floor is not None:
        # max(b2 u, |0| + eps) at each zero step: after k >= 1 of them, max(b2**k u, eps).
        # (The step's own max(b2 u, |g| + eps) would give the same u without this
        # floor, as |g| + eps >= eps; it keeps the caught-up state dense Adamax's.)
        u = jnp.where(skipped_any, jnp.maximum(u, floor), u)
    advanced = rows.reshape(touched.shape) if grouped else touched
    return CaughtUp(m, u, new_last, advanced, u_decay)
