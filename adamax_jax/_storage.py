"""How Adamax keeps its moments in memory: zeros, read and write for one leaf.

The core transform never touches the stored form of ``m`` and ``u`` directly; it
reads both moments of a leaf into the compute dtype (at least float32), does the
maths, and writes them back in the same stored form. That keeps the state's dtypes
and shapes fixed through every update (``lax.cond``, ``optax.apply_if_finite`` and
``optax.MultiSteps`` need this) and gives one place for compact storage.

Stored forms:

* A plain array in the parameter's dtype or the requested ``m_dtype``/``u_dtype``.
  float32 and wider round to nearest. Narrower floats (bfloat16, float16) round
  with a deterministic dither keyed by (element, step, moment): unbiased like
  stochastic rounding, so ``b2 * u`` decays although ``b2 = 0.999`` moves ``u`` by
  less than half a bfloat16 unit (round-to-nearest would give back ``u`` forever),
  and ``b1 * m + (1 - b1) * g`` does not stall short of its target. A dithered
  value is at most one unit in the last place from the exact one, so ``u`` is never
  stored far below its value. In float16 (whose exponent range is short) a positive
  ``u`` never rounds to zero and ``m`` is kept within the bound ``|m| <= R_t u`` that
  exact moments satisfy (see :func:`~adamax_jax._quantize.ratio_bound`), so the
  step stays bounded among subnormals too.
* ``state_bits=8``: :class:`~adamax_jax._quantize.QuantizedM` and
  :class:`~adamax_jax._quantize.QuantizedU` (see :mod:`adamax_jax._quantize`) for
  real leaves of at least 4096 elements; other leaves use the plain form. ``m`` is
  stored relative to ``u``, so both moments of a leaf are read and written together.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from adamax_jax import _quantize

Moment = Literal["m", "u"]
# Dither salts: one per moment, so that m and u of an element round independently.
# Not per leaf: masking or partitioning a tree (optax.masked, optax.partition) then
# leaves every other leaf's rounding as it was, and leaves of one shape compile to
# one kernel (a constant per leaf made XLA compile a kernel per leaf: bf16 state
# compiled 4x slower than float32 state over 200 leaves).
MOMENT_SALT = {"m": 0x85EBCA6B, "u": 0xC2B2AE35}


def compute_dtype(*dtypes: Any) -> jnp.dtype:
    """The dtype the step is computed in: the widest input, at least float32.

    float16 would lose eps=1e-8 (it rounds to 0) and give 0/0 for a zero gradient;
    bfloat16 cannot resolve the 0.1% decay of b2. Real moments computed in float32 avoid
    both. Complex inputs promote to complex64 or wider.
    """
    dt = jnp.dtype(jnp.float32)
    for d in dtypes:
        dt = jnp.promote_types(dt, d)
    return dt


def real_dtype(dtype: Any) -> jnp.dtype:
    """The real dtype of the same precision (u of a complex parameter is real)."""
    return jnp.finfo(dtype).dtype


def zeros(
    param: Any,
    dtype: jnp.dtype,
    moment: Moment,
    *,
    state_bits: int | None = None,
    block_size: int = 256,
) -> Any:
    """The zero state of one moment for ``param`` (an array or ShapeDtypeStruct).

    With ``state_bits=8``, a large real ``param`` gets quantized state and ``dtype``
    is unused; any other leaf gets a plain array of ``dtype``.
    """
    if state_bits == 8 and _quantize.quantizable(param):
        z = _quantize.zeros_m(param) if moment == "m" else _quantize.zeros_u(param, block_size)
    else:
        # zeros_like (not zeros(shape)) lets a concrete parameter's sharding carry over.
        z = jnp.zeros_like(param, dtype=dtype)
    if isinstance(param, Tracer):
        # Under jit, zeros that never read the parameter lose its sharding (XLA puts
        # them on one device). A select whose predicate reads the parameter, with the
        # same value in both branches, ties the layouts together at no cost per step.
        same = param == param
        z = jax.tree.map(lambda a: jnp.where(same, a, a) if a.shape == param.shape else a, z)
    return z


def read(stored: Any, dtype: jnp.dtype) -> jax.Array:
    """A plain stored moment as an array of ``dtype``."""
    return stored.astype(dtype)


def read_moments(
    m_stored: Any, u_stored: Any, m_dtype: jnp.dtype, u_dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """Both moments of one leaf, as arrays of ``m_dtype`` and ``u_dtype``."""
    if isinstance(u_stored, _quantize.QuantizedU):
        u = _quantize.read_u(u_stored)
        return _quantize.read_m(m_stored, u).astype(m_dtype), u.astype(u_dtype)
    return read(m_stored, m_dtype), read(u_stored, u_dtype)


def write(value: jax.Array, like: Any, moment: Moment, *, step: jax.Array) -> Any:
    """Stores ``value`` in the same plain form as ``like`` (the moment's previous state).

    ``moment == "u"`` is never stored below ``value`` by more than one unit in the
    last place, because the bounded step relies on ``u >= |g|``. ``step`` and the
    moment key the dither of narrow floats.
    """
    dtype = jnp.dtype(like.dtype)
    if not _needs_dither(value.dtype, dtype):
        return value.astype(dtype)
    bits = _quantize.dither_bits(tuple(value.shape), step, MOMENT_SALT[moment])
    # The rounding works on bit patterns; straight_through (below) supplies its derivative.
    x = jax.lax.stop_gradient(value).astype(jnp.float32)
    if dtype == jnp.bfloat16:
        stored = _dithered_round_bf16(x, bits)
    else:
        theta = (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)
        stored = _dithered_round(x, dtype, theta)
    if moment == "u" and _narrow_range(dtype):
        # A positive u that rounded to zero would turn the next step into m / eps.
        tiny = jnp.asarray(jnp.finfo(dtype).smallest_subnormal, dtype)
        stored = jnp.where((value > 0) & (stored == 0), tiny, stored)
    return straight_through(value, stored)


@jax.custom_jvp
def _refuse_derivative(x: jax.Array) -> jax.Array:
    """``x``; differentiating through it is a TypeError that says why and what to do.

    8-bit moments are stored as integer codes, which carry no derivative. Without
    this, ``jax.grad`` through unrolled steps would silently see only the part of
    the state that flows through the float32 block scales.
    """
    return x


@_refuse_derivative.defjvp
def _refuse_derivative_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> Any:
    raise TypeError(
        "cannot differentiate through state_bits=8 state: its moments are "
        "integer codes, which carry no derivative. To differentiate through optimizer "
        "steps (meta-learning, learned learning rates), use float32 or bfloat16 moments "
        "(m_dtype=u_dtype=jnp.bfloat16 is differentiated straight through its rounding)"
    )


@jax.custom_jvp
def straight_through(exact: jax.Array, rounded: jax.Array) -> jax.Array:
    """``rounded``, differentiated as if it were ``exact`` (cast to its dtype).

    The dithered rounding works on bit patterns, which carry no derivative: without
    this, ``jax.grad`` through unrolled steps with bfloat16 or float16 moments would
    see every earlier gradient's influence on the state as exactly zero. Storing and
    reading back a moment is the identity up to rounding, so its derivative is taken
    to be the identity (the straight-through estimator).
    """
    del exact
    return rounded


@straight_through.defjvp
def _straight_through_jvp(
    primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    exact, rounded = primals
    return straight_through(exact, rounded), tangents[0].astype(rounded.dtype)


def write_moments(
    m: jax.Array,
    u: jax.Array,
    m_like: Any,
    u_like: Any,
    *,
    step: jax.Array,
    b1: jax.Array,
    b2: jax.Array,
    touched: jax.Array | None = None,
    grad: jax.Array | None = None,
    floor: jax.Array | float = 0.0,
) -> tuple[Any, Any]:
    """Stores both moments of one leaf in the forms of ``m_like`` and ``u_like``.

    ``b1`` and ``b2`` are the step's decay rates (quantized ``u`` keeps its decay
    in the block scales; quantized ``m`` is coded relative to the bound of |m| / u).
    ``touched`` (from ``lazy_rows`` and ``skip_nonfinite``, broadcastable to the
    leaf) is False where the step kept the previous ``m`` and ``u``.
    """
    if isinstance(u_like, _quantize.QuantizedU):
        m, u = _refuse_derivative(m), _refuse_derivative(u)
        return _quantize.write(
            m,
            u,
            m_like,
            u_like,
            step=step,
            b1=b1,
            b2=b2,
            touched=touched,
            grad=grad,
            floor=floor,
        )
    m_stored = write(m, m_like, "m", step=step)
    u_stored = write(u, u_like, "u", step=step)
    if _needs_dither(m.dtype, jnp.dtype(m_like.dtype)) and _narrow_range(m_stored.dtype):
        # Exact moments satisfy |m| <= R_t u. Rounded ones break it by at most a
        # unit in the last place, except among subnormals: in float16, an m of 1e-10
        # dithered up to 6e-8 over a u of 6e-8 would make the next step 5x too long.
        # So m is kept inside the bound where the exponent range is that short.
        limit = _quantize.ratio_bound(b1, b2, step) * u_stored.astype(jnp.float32)
        over = jnp.abs(m_stored.astype(jnp.float32)) > limit
        bound = jnp.sign(m.astype(jnp.float32)) * limit
        capped = _round_toward_zero(jax.lax.stop_gradient(bound), m_stored.dtype)
        m_stored = jnp.where(over, straight_through(m, capped), m_stored)
    return m_stored, u_stored


def _narrow_range(dtype: Any) -> bool:
    """Whether ``dtype`` is a real float whose exponent range is shorter than float32's."""
    return (
        jnp.issubdtype(dtype, jnp.floating)
        and jnp.finfo(dtype).minexp > jnp.finfo(jnp.float32).minexp
    )


def _needs_dither(value_dtype: Any, stored_dtype: jnp.dtype) -> bool:
    """Whether rounding to ``stored_dtype`` drops more bits than float32 keeps."""
    if jnp.issubdtype(stored_dtype, jnp.complexfloating) or not jnp.issubdtype(
        value_dtype, jnp.floating
    ):
        return False
    return jnp.finfo(stored_dtype).nmant < jnp.finfo(jnp.float32).nmant


def _round_toward_zero(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``x`` (float32) rounded to ``dtype`` towards zero."""
    if dtype == jnp.bfloat16:  # bfloat16 is the top half of a float32: truncate
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32) & np.uint32(0xFFFF0000)
        return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)
    near = x.astype(dtype)
    too_far = jnp.abs(near.astype(jnp.float32)) > jnp.abs(x)
    return jnp.where(too_far, jnp.nextafter(near, jnp.zeros_like(near)), near)


def _dithered_round_bf16(x: jax.Array, bits: jax.Array) -> jax.Array:
    """``x`` (float32) rounded to bfloat16, up with probability = its fraction.

    bfloat16 is the top 16 bits of a float32: adding 16 dither bits below them
    and truncating carries into the kept bits with exactly that probability (on the
    magnitude, so for either sign). Infinities and (quiet) NaN stay what they are.
    """
    xb = jax.lax.bitcast_convert_type(x, jnp.uint32)
    top = ((xb + (bits >> 16)) >> 16).astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(top, jnp.bfloat16)


def _dithered_round(x: jax.Array, dtype: jnp.dtype, theta: jax.Array) -> jax.Array:
    """``x`` (float32) rounded to a neighbour in ``dtype``: up with probability = its fraction.

    The two neighbours are the round-to-nearest value and the next one towards ``x``;
    ``x`` goes up where ``theta`` is below its fractional position between them.
    """
    near = x.astype(dtype)
    near32 = near.astype(jnp.float32)
    toward = jnp.where(near32 > x, -np.inf, np.inf).astype(dtype)
    other32 = jnp.nextafter(near, toward).astype(jnp.float32)
    lo = jnp.minimum(near32, other32)
    hi = jnp.maximum(near32, other32)
    gap = hi - lo
    frac = jnp.where(gap > 0, (x - lo) / jnp.where(gap > 0, gap, 1.0), 0.0)
    rounded = jnp.where(theta < frac, hi, lo).astype(dtype)
    # Exact values, infinities, NaN and overflow keep round-to-nearest.
    exact = (near32 == x) | ~jnp.isfinite(x) | ~jnp.isfinite(near32)
    return jnp.where(exact, near, rounded)


DEFAULT_BLOCK_SIZE = 256


def check_state_options(state_bits: Any, block_size: Any) -> int:
    """Validates ``state_bits`` and ``block_size`` at construction; returns the block size.

    ``block_size=None`` means :data:`DEFAULT_BLOCK_SIZE`: a default that is not a
    number stays out of ``optax.inject_hyperparams``' traced hyperparameters.
    """
    hint = (
        "; under optax.inject_hyperparams pass static_args=('state_bits', 'block_size') "
        "so that they stay Python ints"
    )
    if state_bits is not None and (
        isinstance(state_bits, bool) or not isinstance(state_bits, int | np.integer)
    ):
        raise TypeError(f"state_bits must be None or the int 8, got {state_bits!r}{hint}")
    if state_bits is not None and state_bits != 8:
        raise ValueError(f"state_bits must be None or 8, got {state_bits!r}")
    if block_size is None:
        return DEFAULT_BLOCK_SIZE
    if isinstance(block_size, int | np.integer) and not isinstance(block_size, bool):
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {block_size!r}")
        return int(block_size)
    if state_bits is not None:
        raise TypeError(f"block_size must be a Python int or None, got {block_size!r}{hint}")
    # Unused, and an array only because optax.inject_hyperparams made it one.
    return DEFAULT_BLOCK_SIZE
