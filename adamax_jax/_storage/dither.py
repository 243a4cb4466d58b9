"""The deterministic dither that rounds stored moments without bias.

Narrow floats (bfloat16, float16) and the 8-bit codes of ``m`` round each value up
or down between its two neighbours, up with a probability equal to its fractional
position, like stochastic rounding, but with thresholds drawn from a
low-discrepancy sequence instead of a random generator: element :math:`i` at step
:math:`t` uses :math:`\\{(i + c)\varphi + t\varphi\\}` (:math:`\varphi` the golden
ratio, :math:`c` a salt). The rounding is unbiased, its errors cancel over a few
consecutive steps instead of adding up as a random walk, and there is no RNG state:
the same step on the same state gives the same bits, so a resumed run is bit-exact.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

GOLDEN = 0x9E3779B9  # 2**32 / golden ratio

# One salt per stored quantity, so that an element's m and u round independently.
# Not per leaf: masking or partitioning a tree (optax.masked, optax.partition) then
# leaves every other leaf's rounding as it was, and leaves of one shape compile to
# one kernel (a constant per leaf made XLA compile a kernel per leaf: bf16 state
# compiled 4x slower than float32 state over 200 leaves).
SALTS = {"m": 0x85EBCA6B, "u": 0xC2B2AE35, "m codes": 0x5BD1E995}


def dither_bits(shape: tuple[int, ...], step: jax.Array, salt: int) -> jax.Array:
    """32 dither bits per element: ``(i + salt) * phi + step * phi`` modulo 2**32.

    Deterministic in (element, step, salt). Read as a fraction, consecutive steps of
    one element form the golden-ratio low-discrepancy sequence, so rounding errors
    cancel over a few steps instead of adding up like independent random ones;
    neighbouring elements get well-spread values too. One multiply per element.
    """
    idx = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    offset = jnp.asarray(step).astype(jnp.uint32) * np.uint32(GOLDEN) + np.uint32(
        (salt * GOLDEN) & 0xFFFFFFFF
    )
    return idx * np.uint32(GOLDEN) + offset


def dither(shape: tuple[int, ...], step: jax.Array, salt: int) -> jax.Array:
    """Rounding thresholds in [0, 1) from :func:`dither_bits`."""
    # 24 bits fit an int32 exactly; a signed conversion is a single vector instruction.
    top = jax.lax.bitcast_convert_type(dither_bits(shape, step, salt) >> 8, jnp.int32)
    return top.astype(jnp.float32) * np.float32(2.0**-24)
