"""Long runs: the step counter, bias correction at any count, and a million quiet steps.

Expected values come from the recurrences evaluated in float64 NumPy (or from the
bound of Kingma & Ba, section 7.1), never from our own outputs. Long trajectories
run inside one ``jit`` with ``lax.fori_loop``: a million steps take well under a
second on a CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax
from tests._reference import step_bound

INT32_MAX = int(np.iinfo(np.int32).max)
# The largest float32 below 1: the most extreme b1 the constructor accepts.
B1_MAX = float(np.nextafter(np.float32(1), np.float32(0)))


# --- the step counter -------------------------------------------------------------------


def test_count_saturates_at_int32_max():
    tx = ax.scale_by_adamax()
    g = jnp.array([0.3, -2.0, 0.0])
    state = tx.init(g)._replace(count=jnp.asarray(INT32_MAX - 2, jnp.int32))
    update = jax.jit(tx.update)
    counts = []
    for _ in range(4):
        direction, state = update(g, state)
        counts.append(int(state.count))
        assert state.count.dtype == jnp.int32
        assert np.all(np.isfinite(direction)) and np.all(np.abs(direction) <= 1.0)
    assert counts == [INT32_MAX - 1, INT32_MAX, INT32_MAX, INT32_MAX]


def test_every_counter_in_the_optimizer_saturates():
    """Inside inject_hyperparams and a schedule, no count wraps to a negative step."""
    tx = optax.inject_hyperparams(ax.adamax)(learning_rate=optax.linear_schedule(0.1, 0.01, 100))
    params = jnp.ones(2)

    def near_max(path, leaf):
        is_count = getattr(path[-1], "name", None) == "count"
        return jnp.asarray(INT32_MAX - 1, jnp.int32) if is_count else leaf

    state = jax.tree_util.tree_map_with_path(near_max, tx.init(params))
    update = jax.jit(tx.update)
    for _ in range(3):
        updates, state = update(jnp.ones(2), state, params)
        assert np.all(np.isfinite(updates))
    found = optax.tree_utils.tree_get_all_with_path(state, "count")
    counts = [int(c) for _, c in found]
    assert len(counts) == 3  # inject_hyperparams', the schedule's and Adamax's
    assert all(c == INT32_MAX for c in counts)


# --- bias correction at any count ---------------------------------------------------------

COUNTS = np.array([0, 1, 2, 9, 999, 2**24, 2**24 + 1, 2**30, INT32_MAX - 1, INT32_MAX])
B1S = np.array([0.0, 0.5, 0.9, 0.999, B1_MAX], np.float32)


@functools.partial(jax.jit, static_argnames="nesterov")
def _first_directions(counts, b1s, g, nesterov):
    """The direction from zero moments, with the counter at each of ``counts``."""

    def one(count, b1):
        tx = ax.scale_by_adamax(b1, 0.999, 1e-8, nesterov=nesterov)
        state = tx.init(g)._replace(count=count)
        return tx.update(g, state)[0]

    return jax.vmap(jax.vmap(one, (None, 0)), (0, None))(counts, b1s)


@pytest.mark.parametrize("nesterov", [False, True])
def test_bias_correction_is_finite_and_right_for_any_count(nesterov):
    # Magnitudes up to 1e37: XLA may divide by a broadcast divisor through its
    # reciprocal, which flushes to zero above 2**126 (see test_huge_gradients...).
    g = np.array([1.0, -1e-30, 1e37, 0.0, -0.25], np.float32)
    got = np.asarray(
        _first_directions(
            jnp.asarray(COUNTS, jnp.int32), jnp.asarray(B1S), jnp.asarray(g), nesterov
        ),
        np.float64,
    )
    assert np.all(np.isfinite(got))

    # float64 reference: m_t = (1 - b1) g, u_t = |g|, at step t = min(count + 1, max).
    t = np.minimum(COUNTS.astype(np.float64) + 1, INT32_MAX)[:, None, None]
    b1 = B1S.astype(np.float64)[None, :, None]
    g64 = g.astype(np.float64)[None, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        if nesterov:
            scale = b1 * (1 - b1) / (1 - b1 ** (t + 1)) + (1 - b1) / (1 - b1**t)
        else:
            scale = (1 - b1) / (1 - b1**t)
        want = scale * g64 / (np.abs(g64) + 1e-8)
    # 1 - b1**t in float32 loses relative precision eps/(1 - b1**t) for b1 near 1.
    rtol = 8 * np.finfo(np.float32).eps / (1 - b1**t) + 1e-6
    assert np.all(np.abs(got - want) <= rtol * np.abs(want) + 1e-37)


# With nesterov, b1 m / (1 - b1^2) + g would overflow for |g| > 2.3e38 if summed
# before the division.
@pytest.mark.parametrize("nesterov", [False, True])
def test_huge_gradients_give_a_bounded_step(nesterov):
    """Gradients at the float32 maximum: the step stays within its bound, no inf."""
    b1, b2 = 0.9, 0.999
    tx = ax.scale_by_adamax(b1, b2, nesterov=nesterov)
    g = jnp.array([3.4e38, -3e38, 1e38, 1.0])
    direction, state = jax.jit(tx.update)(g, tx.init(g))
    direction2, _ = jax.jit(tx.update)(-g, state)
    for t, d in ((1, direction), (2, direction2)):
        d = np.abs(np.asarray(d, np.float64))
        assert np.all(np.isfinite(d))
        assert np.all(d <= _bound(b1, b2, t, nesterov=nesterov) * (1 + 1e-6))


# --- a spike, then a million zero gradients ------------------------------------------------

N_QUIET = 1_000_000
SPIKE = [3e38, -1e30, 1.0, 1e-30, 0.0, -2.0, 5.0, 1e-45]
SPIKE_F16 = [6e4, -6e4, 1.0, 1e-7, 0.0, -2.0, 5.0, 1e-3]
AFTER = [0.5, -0.5, 1e-3, 1e3, 1.0, 0.0, 1e-30, 2.0]

LONG_CASES = {
    "default": ({}, "float32", SPIKE),
    "eps_in_max": ({"eps_placement": "max"}, "float32", SPIKE),
    "eps_zero": ({"eps": 0.0}, "float32", SPIKE),
    "nesterov": ({"nesterov": True}, "float32", SPIKE),
    "lazy_rows": ({"lazy_rows": True}, "float32", SPIKE),
    "bf16_state": ({"m_dtype": jnp.bfloat16, "u_dtype": jnp.bfloat16}, "float32", SPIKE),
    "bf16_params": ({}, "bfloat16", SPIKE),
    "f16_params": ({}, "float16", SPIKE_F16),
    # 8-bit state quantizes leaves of 4096 elements or more; a million steps of
    # those would take minutes, so this case runs 4,000 (b2**4000 = 0.018).
    "state_bits_8": ({"state_bits": 8}, "float32", SPIKE),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LONG_CASES))
def test_a_million_zero_gradients_after_a_spike(case):
    kwargs, dtype, spike = LONG_CASES[case]
    b1, b2 = 0.9, 0.999
    tx = ax.scale_by_adamax(b1, b2, **kwargs)
    quantized = "state_bits" in kwargs
    size = 4096 if quantized else len(spike)
    n_quiet = 4_000 if quantized else N_QUIET
    spike = jnp.asarray(np.resize(np.float32(spike), size), dtype)
    after = jnp.asarray(np.resize(np.float32(AFTER), size), dtype)
    zeros = jnp.zeros(size, dtype)

    @jax.jit
    def quiet(state, n):
        return jax.lax.fori_loop(0, n, lambda _, s: tx.update(zeros, s)[1], state)

    update = jax.jit(tx.update)
    state = update(spike, tx.init(zeros))[1]
    u_prev = _u_values(state)
    for _ in range(4):  # four chunks, so u can be seen to never grow
        state = quiet(state, n_quiet // 4)
        u = _u_values(state)
        assert np.all(np.isfinite(u)) and np.all(u >= 0), case
        assert np.all(u <= u_prev), case
        u_prev = u
    assert int(state.count) == n_quiet + 1
    assert all(np.all(np.isfinite(np.asarray(m, np.float64))) for m in _m_values(state))

    direction, state = update(after, state)
    d = np.abs(np.asarray(direction, np.float64))
    bound = _bound(b1, b2, n_quiet + 2, nesterov=bool(kwargs.get("nesterov")))
    # float32 maths, then the parameter dtype's rounding of the result.
    rtol = 1e-6 + float(jnp.finfo(dtype).eps)
    assert np.all(np.isfinite(d)) and np.all(d <= bound * (1 + rtol)), case


def test_float32_u_decays_as_the_formula_says():
    """In float32, b2**1e6 * |spike| underflows: u must reach exactly that value, 0."""
    b2 = 0.999
    tx = ax.scale_by_adamax(0.9, b2)
    spike = np.float32(SPIKE)
    zeros = jnp.zeros_like(spike)
    state = jax.jit(tx.update)(jnp.asarray(spike), tx.init(zeros))[1]
    state = jax.jit(
        lambda s: jax.lax.fori_loop(0, N_QUIET, lambda _, s: tx.update(zeros, s)[1], s)
    )(state)
    with np.errstate(divide="ignore", under="ignore"):
        log_u = np.log(np.abs(spike.astype(np.float64))) + N_QUIET * np.log(b2)
    want = np.exp(log_u).astype(np.float32)
    assert np.array_equal(np.asarray(state.u), want)


def _bound(b1: float, b2: float, t: int, *, nesterov: bool) -> float:
    """Bound of |direction_t| (section 7.1), also for the Nesterov numerator.

    Nesterov: b1 m_t / (1 - b1^(t+1)) + (1 - b1) g_t / (1 - b1^t), with
    |m_t| <= (1 - b1) u_t S_t and |g_t| <= u_t.
    """
    if not nesterov:
        return step_bound(b1, b2, t)
    r = b1 / b2
    s = (1 - r**t) / (1 - r)
    return b1 * (1 - b1) * s / (1 - b1 ** (t + 1)) + (1 - b1) / (1 - b1**t)


def _u_values(state: ax.AdamaxState) -> np.ndarray:
    """Every floating value stored for u (for 8-bit state: its float scales)."""
    leaves = [x for x in jax.tree.leaves(state.u) if jnp.issubdtype(x.dtype, jnp.floating)]
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])


def _m_values(state: ax.AdamaxState) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(state.m)]
