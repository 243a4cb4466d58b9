"""Moments stored as plain float arrays: round to nearest, or dithered where narrow.

float32 and wider round to nearest. Narrower floats (bfloat16, float16) round with
the deterministic dither of :mod:`~adamax_jax._storage.dither`, keyed by (element,
step, moment): unbiased, so ``b2 * u`` decays although ``b2 = 0.999`` moves ``u``
by less than half a bfloat16 unit (round-to-nearest would give back ``u``
forever), and ``b1 * m + (1 - b1) * g`` does not stall short of its target. A
dithered value is at most one unit in the last place from the exact one, so ``u``
is never stored far below its value. In float16 (whose exponent range is short) a
positive ``u`` never rounds to zero and ``m`` is kept within the bound
``|m| <= R_t u`` that exact moments satisfy (see
:func:`~adamax_jax._storage.codes8.ratio_bound`), so the step stays bounded among
subnormals too. The rounding is differentiated straight through.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from adamax_jax._storage import codes8, dither

Moment = Literal["m", "u"]


def read(stored: Any, dtype: jnp.dtype) -> jax.Array:
    """A plain stored moment as an array of ``dtype``."""
    return stored.astype(dtype)


def write(value: jax.Array, like: Any, moment: Moment, *, step: jax.Array) -> Any:
    """Stores ``value`` in the same plain form as ``like`` (the moment's previous state).

    ``moment == "u"`` is never stored below ``value`` by more than one unit in the
    last place, because the bounded step relies on ``u >= |g|``. ``step`` and the
    moment key the dither of narrow floats.
    """
    dtype = jnp.dtype(like.dtype)
    if not _needs_dither(value.dtype, dtype):
        return value.astype(dtype)
    bits = dither.dither_bits(tuple(value.shape), step, dither.SALTS[moment])
    # The rounding works on bit patterns; straight_through (below) supplies its derivative.
    x = jax.lax.stop_gradient(value).astype(jnp.float32)
    if _narrow_range(dtype):
        # A finite moment beyond float16's largest value (65504) saturates instead
        # of becoming infinite: an infinite u would make every later step 0, an
        # infinite m every later step NaN. m is then kept within R_t u (write_pair),
        # so the step keeps its bound and direction. Infinities from non-finite
        # gradients stay infinite, visibly.
        top = float(jnp.finfo(dtype).max)
        x = jnp.where(jnp.isinf(x), x, jnp.clip(x, -top, top))
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


def write_pair(
    m: jax.Array, u: jax.Array, m_like: Any, u_like: Any, *, step: jax.Array, b1: Any, b2: Any
) -> tuple[Any, Any]:
    """Stores both plain moments of one leaf in the dtypes of ``m_like`` and ``u_like``."""
    m_stored = write(m, m_like, "m", step=step)
    u_stored = write(u, u_like, "u", step=step)
    if _needs_dither(m.dtype, jnp.dtype(m_like.dtype)) and _narrow_range(m_stored.dtype):
        # Exact moments satisfy |m| <= R_t u. Rounded ones break it by at most a
        # unit in the last place, except among subnormals: in float16, an m of 1e-10
        # dithered up to 6e-8 over a u of 6e-8 would make the next step 5x too long.
        # So m is kept inside the bound where the exponent range is that short.
        limit = codes8.ratio_bound(b1, b2, step) * u_stored.astype(jnp.float32)
        over = jnp.abs(m_stored.astype(jnp.float32)) > limit
        bound = jnp.sign(m.astype(jnp.float32)) * limit
        capped = _round_toward_zero(jax.lax.stop_gradient(bound), m_stored.dtype)
        m_stored = jnp.where(over, straight_through(m, capped), m_stored)
    return m_stored, u_stored


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
