"""Differentiating through optimizer steps (meta-learning, learned learning rates).

``jax.grad`` through two unrolled Adamax steps: the derivative of the second
update with respect to the first gradient, which reaches it only through the
state. Float32 state is checked against central finite differences of the
float64 NumPy transcription; bfloat16 state, whose dithered rounding works on bit
patterns, is differentiated straight through its rounding and must agree with
float32 state; 8-bit state, stored as integer codes, refuses with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax
from tests._reference import adamax_update

N = 64
LR = 0.01
RNG = np.random.default_rng(0)
PARAMS = RNG.standard_normal(N).astype(np.float32)
G1 = RNG.standard_normal(N).astype(np.float32)
G2 = RNG.standard_normal(N).astype(np.float32)
WEIGHTS = RNG.standard_normal(N).astype(np.float32)


def second_update_loss(opt: optax.GradientTransformation, params: np.ndarray) -> Callable:
    """g1 -> sum(weights * update_2): depends on g1 only through the state."""

    def loss(g1: jax.Array) -> jax.Array:
        state = opt.init(params)
        _, state = opt.update(g1, state, params)
        update, _ = opt.update(jnp.asarray(G2), state, params)
        return jnp.sum(jnp.asarray(WEIGHTS) * update)

    return loss


def reference_loss(g1: np.ndarray) -> float:
    p1, m, u = adamax_update(PARAMS, g1, np.zeros(N), np.zeros(N), 1, lr=LR)
    p2, _, _ = adamax_update(p1, G2, m, u, 2, lr=LR)
    return float(np.sum(WEIGHTS * (p2 - p1)))


def test_float32_state_matches_finite_differences_in_float64() -> None:
    grad = np.asarray(jax.grad(second_update_loss(ax.adamax(LR), PARAMS))(jnp.asarray(G1)))
    h = 1e-6
    fd = np.array(
        [(reference_loss(G1 + h * e) - reference_loss(G1 - h * e)) / (2 * h) for e in np.eye(N)]
    )
    assert np.abs(fd).max() > 1e-4  # the state really carries g1 into update_2
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: ax.adamax(LR, **kw),
        lambda **kw: ax.nadamax(LR, **kw),
        lambda **kw: ax.adamaxw(LR, weight_decay=0.1, **kw),
    ],
    ids=["adamax", "nadamax", "adamaxw"],
)
def test_bfloat16_state_differentiates_like_float32_state(make: Callable) -> None:
    g1 = jnp.asarray(G1)
    f32 = np.asarray(jax.grad(second_update_loss(make(), PARAMS))(g1))
    bf16 = make(m_dtype=jnp.bfloat16, u_dtype=jnp.bfloat16)
    low = np.asarray(jax.jit(jax.grad(second_update_loss(bf16, PARAMS)))(g1))
    assert np.abs(f32).max() > 1e-4
    # Within 5% as a whole: the forward values differ by bfloat16 rounding only.
    assert np.linalg.norm(low - f32) <= 0.05 * np.linalg.norm(f32), (low, f32)


def test_float16_state_differentiates_like_float32_state() -> None:
    g1 = jnp.asarray(G1)
    f32 = np.asarray(jax.grad(second_update_loss(ax.adamax(LR), PARAMS))(g1))
    f16 = ax.adamax(LR, m_dtype=jnp.float16, u_dtype=jnp.float16)
    low = np.asarray(jax.grad(second_update_loss(f16, PARAMS))(g1))
    assert np.linalg.norm(low - f32) <= 0.05 * np.linalg.norm(f32)


def test_8bit_state_refuses_to_be_differentiated_through() -> None:
    params = RNG.standard_normal(4096).astype(np.float32)  # large enough to quantize
    opt = ax.adamax(LR, state_bits=8)

    def loss(g1: jax.Array) -> jax.Array:
        state = opt.init(params)
        _, state = opt.update(g1, state, params)
        update, _ = opt.update(g1, state, params)
        return jnp.sum(update)

    g1 = jnp.asarray(params)
    assert np.isfinite(float(loss(g1)))  # the forward pass is fine
    with pytest.raises(TypeError, match=r"cannot differentiate through state_bits=8.*bfloat16"):
        jax.grad(loss)(g1)
