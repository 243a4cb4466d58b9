"""8-bit blockwise state (``state_bits=8``): memory, accuracy, bounded step, plumbing.

References are independent of the code under test: float32-state Adamax from the
same library (itself checked against a NumPy float64 transcription elsewhere), a
NumPy decoder of the documented code format written here, and properties that
follow from the recurrences (u only decays by b2 or jumps to |g|; |m| <= R_t u).
"""

from __future__ import annotations

import math
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax
from adamax_jax._storage import codes8

B1, B2 = 0.9, 0.999
BLOCK = 256


# --- an independent decoder of the documented format ----------------------------------


def _u_code_table() -> np.ndarray:
    """The 256 values of the documented u code, built from its description.

    Codes 0-7: multiples of 2**-15 (a positive value never gets 0). Codes 8-63:
    7 binades [2**-12, 2**-5), 8 values each (3 fraction bits). Codes 64-255:
    6 binades [2**-5, 2), 32 values each.
    """
    linear = [c * 2.0**-15 for c in range(8)]
    coarse = [2.0**e * (1 + f / 8) for e in range(-12, -5) for f in range(8)]
    fine = [2.0**e * (1 + f / 32) for e in range(-5, 1) for f in range(32)]
    table = np.array(linear + coarse + fine)
    assert table.size == 256
    return table


U_TABLE = _u_code_table()


def decode_u(codes: np.ndarray, scales: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """u from its codes and block scales, by table lookup."""
    c = np.asarray(codes, np.int64).ravel()
    s = np.repeat(np.asarray(scales, np.float64), block)[: c.size]
    return (U_TABLE[c] * s).reshape(np.shape(codes))


def nearest_u(x: np.ndarray) -> np.ndarray:
    """The table value nearest to each ``x`` (relative to the scale), by brute force;
    a positive ``x`` gets a nonzero value."""
    x = np.minimum(np.asarray(x, np.float64), U_TABLE[-1])
    nearest = U_TABLE[np.abs(x[..., None] - U_TABLE).argmin(-1)]
    return np.where(x > 0, np.maximum(nearest, U_TABLE[1]), nearest)


def _m_code_table() -> np.ndarray:
    """The 128 magnitudes of the documented m code (of m / (R_t u)), from its description.

    Code 0: zero. Codes 1-14: two per binade, 2**e * (1, 1.5) for e = -13..-7.
    Codes 15-127: linear from 2**-6 to 1 in steps of 9/1024.
    """
    pairs = [2.0**e * (1 + f / 2) for e in range(-13, -6) for f in range(2)]
    linear = [2.0**-6 + k * 9 / 1024 for k in range(113)]
    table = np.array([0.0, *pairs, *linear])
    assert table.size == 128 and table[-1] == 1.0
    return table


M_TABLE = _m_code_table()


def decode_m(codes: np.ndarray) -> np.ndarray:
    """m / (R_t u) from the int8 codes: sign and magnitude, by table lookup."""
    c = np.asarray(codes, np.int64)
    return np.sign(c) * M_TABLE[np.abs(c)]


def decode_state(state: ax.AdamaxState) -> tuple[np.ndarray, np.ndarray]:
    """(m, u) of a single quantized leaf, in float64."""
    u = decode_u(state.u.codes, state.u.scales, state.u.block_size)
    m = decode_m(state.m.codes) * float(state.m.scale) * u
    return m, u


def ratio_bound(t: int) -> float:
    """R_t = (1 - b1) sum_{j<t} (b1/b2)^j: |m_t| <= R_t u_t for exact moments."""
    r = B1 / B2
    return (1 - B1) * (1 - r**t) / (1 - r)


# --- the code --------------------------------------------------------------------------


def test_u_code_decodes_to_the_documented_table():
    assert np.all(np.diff(U_TABLE) > 0)
    got = np.asarray(codes8.decode_u_code(jnp.arange(256, dtype=jnp.uint8)), np.float64)
    np.testing.assert_array_equal(got, U_TABLE)


def test_u_code_rounds_to_the_nearest_code():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [10.0 ** rng.uniform(-7, np.log10(2.5), 20000), U_TABLE, [2.0**-16, 2.0, 3.0, 0.0]]
    ).astype(np.float32)
    codes = np.asarray(codes8.encode_u_code(jnp.asarray(x)), np.int64)
    got = U_TABLE[codes]
    want = nearest_u(x)
    # Equal, or a tie between two codes within float32 rounding.
    xs = np.minimum(x.astype(np.float64), U_TABLE[-1])
    assert np.all((got == want) | np.isclose(np.abs(got - xs), np.abs(want - xs), rtol=1e-6))
    # Relative error: half a step of the regime the value lies in.
    fine, coarse = xs >= 2.0**-5, (xs >= 2.0**-12) & (xs < 2.0**-5)
    assert np.all(np.abs(got - xs)[fine] <= xs[fine] * 2.0**-6 * (1 + 1e-6))
    assert np.all(np.abs(got - xs)[coarse] <= xs[coarse] * 2.0**-4 * (1 + 1e-6))
    tail = (xs < 2.0**-12) & (xs >= 2.0**-16)
    assert np.all(np.abs(got - xs)[tail] <= 2.0**-16 * (1 + 1e-6))
    assert np.all(got[(xs > 0) & (xs < 2.0**-16)] == 2.0**-15)  # positive: never zero
    assert got[xs == 0].size and np.all(got[xs == 0] == 0)


def test_m_code_decodes_to_the_documented_table():
    assert np.all(np.diff(M_TABLE) > 0)
    codes = jnp.arange(-127, 128, dtype=jnp.int32).astype(jnp.int8)
    got = np.asarray(codes8.decode_m_code(codes), np.float64)
    np.testing.assert_array_equal(got, decode_m(np.arange(-127, 128)))
    # The linear part's step is about the old linear code's 1/127 of the bound.
    assert np.diff(M_TABLE[15:]).max() <= 1 / 113


def test_m_code_rounds_between_its_neighbours_without_bias():
    """Each value goes to one of the two codes around it, up with probability equal to
    its position between them (unbiased in value, not in the code index); a threshold
    of 0.5 is the nearest code, and the code values themselves come back exactly."""
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [10.0 ** rng.uniform(-6, 0, 3000), rng.uniform(0, 1, 1000), [0.0, 1.0, 2.0**-14]]
    ).astype(np.float32)
    x = x * rng.choice([-1.0, 1.0], x.size).astype(np.float32)
    n_theta = 128
    theta = ((np.arange(n_theta) + 0.5) / n_theta).astype(np.float32)
    codes = codes8.encode_m_code(jnp.asarray(x)[:, None], jnp.asarray(theta)[None, :])
    got = decode_m(np.asarray(codes))
    ax_ = np.abs(x.astype(np.float64))
    hi_i = np.minimum(np.searchsorted(M_TABLE, ax_, side="right"), 127)
    lo, hi = M_TABLE[hi_i - 1], M_TABLE[hi_i]
    lo = np.where(ax_ >= 1, 1.0, lo)
    mag = np.abs(got)
    assert np.all((mag == lo[:, None]) | (mag == hi[:, None]))
    assert np.all((np.sign(got) == np.sign(x)[:, None]) | (got == 0))
    # Over evenly spread thresholds the mean is the value, to 1/n_theta of a code step.
    step = np.where(hi > lo, hi - lo, 1.0)
    assert np.all(np.abs(mag.mean(axis=1) - ax_) <= step / n_theta * (1 + 1e-3))
    # theta = 0.5: the nearest code.
    nearest = np.abs(decode_m(np.asarray(codes8.encode_m_code(jnp.asarray(x), 0.5))))
    assert np.all(np.abs(nearest - ax_) <= np.minimum(ax_ - lo, hi - ax_) + 1e-7 * ax_)
    # Every code value encodes to itself whatever the threshold.
    values = np.concatenate([-M_TABLE[::-1], M_TABLE[1:]]).astype(np.float32)
    for th in (0.0, 0.5, 0.9999):
        again = np.asarray(codes8.encode_m_code(jnp.asarray(values), th), np.int64)
        np.testing.assert_array_equal(again, np.arange(-127, 128))


def test_m_code_rounds_on_the_signed_axis_so_its_error_keeps_no_sign():
    """The threshold rounds the value up (towards +inf) whatever its sign, so the
    error is a function of the threshold and the position alone. Rounded in
    magnitude, the error is sign(m) times that function, and an m whose sign follows
    the dither's sequence is biased (by min(p, 1 - p) of a code step at position p):
    the valley drift of 8-bit state on a tiled Rosenbrock (issue 19)."""
    lo, hi = M_TABLE[40], M_TABLE[41]
    for p in (0.1, 0.3, 0.5, 0.8):
        a = np.float32(lo + p * (hi - lo))
        theta = np.linspace(0, 1, 64, endpoint=False, dtype=np.float32) + np.float32(0.5 / 64)
        for y, up in ((a, hi), (-a, -lo)):  # the code above y on the signed axis
            got = decode_m(np.asarray(codes8.encode_m_code(jnp.full(theta.shape, y), theta)))
            want = np.where(theta >= 1 - (y - (up - (hi - lo))) / (hi - lo), up, up - (hi - lo))
            np.testing.assert_array_equal(got, want)
    # One element over 4000 steps of the real dither sequence, m's sign set by it.
    steps = jnp.arange(1, 4001)
    theta = jax.vmap(lambda t: codes8.dither.dither((1,), t, codes8.dither.SALTS["m codes"]))(steps)
    sign = np.where(np.asarray(theta[:, 0]) >= 0.5, 1.0, -1.0).astype(np.float32)
    for p in (0.2, 0.5, 0.7):
        y = sign * np.float32(lo + p * (hi - lo))
        err = decode_m(np.asarray(codes8.encode_m_code(jnp.asarray(y), theta[:, 0]))) - y
        assert abs(err.mean()) <= 0.01 * (hi - lo), p


def test_decayed_codes_reencode_to_themselves():
    """decode -> times b2 -> encode against a scale times b2 gives the same code: no creep."""
    codes = jnp.arange(256, dtype=jnp.uint8)
    scale = jnp.float32(3.7)
    u = codes8.decode_u_code(codes) * scale * jnp.float32(B2)
    again = codes8.encode_u_code(u * (1 / (scale * jnp.float32(B2))))
    assert np.array_equal(np.asarray(again), np.asarray(codes))


# --- memory ----------------------------------------------------------------------------


def _state_bytes_per_param(tx: optax.GradientTransformation, n: int) -> float:
    state = jax.eval_shape(tx.init, jax.ShapeDtypeStruct((n,), jnp.float32))
    leaves = jax.tree.leaves((state.m, state.u))
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves) / n


def test_state_memory_per_parameter():
    n = 2**20
    assert _state_bytes_per_param(ax.scale_by_adamax(), n) == 8
    bf16 = ax.scale_by_adamax(m_dtype="bfloat16", u_dtype="bfloat16")
    assert _state_bytes_per_param(bf16, n) == 4
    eight = _state_bytes_per_param(ax.scale_by_adamax(state_bits=8), n)
    assert eight <= 2.1, eight
    assert eight == 2 + 4 / BLOCK + 4 / n


def test_small_and_complex_leaves_keep_float_state():
    params = {
        "small": jnp.zeros(4095),
        "complex": jnp.zeros(8192, jnp.complex64),
        "big": jnp.zeros((64, 65)),
    }
    state = ax.scale_by_adamax(state_bits=8).init(params)
    assert state.m["small"].dtype == jnp.float32 and state.u["small"].dtype == jnp.float32
    assert state.m["complex"].dtype == jnp.complex64 and state.u["complex"].dtype == jnp.float32
    assert isinstance(state.m["big"], codes8.QuantizedM)
    assert isinstance(state.u["big"], codes8.QuantizedU)
    assert state.u["big"].scales.shape == (math.ceil(64 * 65 / BLOCK),)


# --- u: decays exactly, is stored to its nearest code, and jumps only with the gradient --


def test_quiet_steps_decay_u_exactly_like_b2_power():
    n, steps = 8192, 1000
    u0 = jnp.asarray(10.0 ** np.random.default_rng(1).uniform(-4, 1, n), jnp.float32)
    tx = ax.scale_by_adamax(B1, B2, state_bits=8)

    @jax.jit
    def run(u0):
        first = tx.update(u0, tx.init(jnp.zeros(n)))[1]
        quiet = jax.lax.fori_loop(0, steps, lambda _, s: tx.update(jnp.zeros(n), s)[1], first)
        return first, quiet

    first, quiet = run(u0)
    assert np.array_equal(np.asarray(first.u.codes), np.asarray(quiet.u.codes))
    _, u_first = decode_state(first)
    _, u_quiet = decode_state(quiet)
    # Only the float32 scale moved: b2**1000 times, with float32 rounding each time.
    np.testing.assert_allclose(u_quiet, u_first * B2**steps, rtol=1e-4)
    # The first step stored each |g| as its nearest code against its block's scale.
    scales = np.repeat(np.asarray(first.u.scales, np.float64), BLOCK)
    u0 = np.asarray(u0, np.float64)
    np.testing.assert_allclose(u_first, nearest_u(u0 / scales) * scales, rtol=1e-6)


def test_u_follows_its_recurrence_to_the_nearest_code():
    """Each step: u_t is max(b2 u_{t-1}, |g_t|) to its nearest code, and b2 u_{t-1} exactly
    where g did not raise it; |m_t| <= R_t u_t throughout."""
    n, steps = 64 * BLOCK, 60
    rng = np.random.default_rng(2)
    scale = 10.0 ** rng.uniform(-3, 0, n)
    grads = (rng.standard_cauchy((steps, n)) * scale).astype(np.float32)
    grads[:, rng.random(n) < 0.3] *= 0.01  # quieter elements, whose u mostly decays
    tx = ax.scale_by_adamax(B1, B2, state_bits=8)

    @jax.jit
    def run(grads):
        def step(s, g):
            s = tx.update(g, s)[1]
            return s, s

        return jax.lax.scan(step, tx.init(jnp.zeros(n)), grads)[1]

    states = run(jnp.asarray(grads))
    u_prev, s_prev = np.zeros(n), np.zeros(n // BLOCK)
    checked = 0
    for t in range(steps):
        st = jax.tree.map(lambda x, t=t: x[t], states)
        m, u = decode_state(st)
        want = np.maximum(B2 * u_prev, np.abs(grads[t].astype(np.float64)))
        # u is the recurrence's value rounded to its nearest code: within half a
        # code step of the regime (relative to the block scale) it falls in.
        scales = np.asarray(st.u.scales, np.float64)
        s = np.repeat(scales, BLOCK)
        rel = want / s
        # (Positive values below half the tail's unit get the unit, not zero.)
        tail = np.where(rel >= 2.0**-16, 2.0**-16, 2.0**-15) * s
        half_step = np.where(
            rel >= 2.0**-5, 2.0**-6 * want, np.where(rel >= 2.0**-12, 2.0**-4 * want, tail)
        )
        assert np.all(np.abs(u - want) <= half_step * (1 + 1e-5)), t
        # The m code keeps the bounded step's invariant whatever u's rounding.
        assert np.all(np.abs(m) <= ratio_bound(t + 1) * u * (1 + 1e-5)), t
        # Where the gradient did not raise u and the block kept its decayed scale,
        # the code is unchanged: u is exactly b2 times its previous value.
        kept_scale = np.repeat(np.isclose(scales, B2 * s_prev, rtol=1e-6), BLOCK)
        quiet = (np.abs(grads[t]) < 0.5 * B2 * u_prev) & kept_scale
        np.testing.assert_allclose(u[quiet], B2 * u_prev[quiet], rtol=1e-5)
        checked += int(quiet.sum())
        u_prev, s_prev = u, scales
    assert checked > 0.1 * steps * n


# --- accuracy against float32 state ------------------------------------------------------

N_MIX, T_MIX = 64 * BLOCK, 1000
KINDS = ("constant sign", "biased noise", "zero-mean noise", "one spike")


def _mixture():
    """Elements of four kinds; magnitudes spread over five decades across the leaf.

    Each block of 256 (a row, in a real layer) has its own scale, log-uniform over
    1e-5..1, and its elements a further spread of one decade.
    """
    rng = np.random.default_rng(0)
    kind = rng.integers(0, 4, N_MIX)
    scale = np.repeat(10.0 ** rng.uniform(-5, 0, N_MIX // BLOCK), BLOCK)
    scale *= 10.0 ** rng.uniform(-1, 0, N_MIX)
    scale[kind == 3] *= 1e-2  # the spike is 100x the element's usual gradient
    mu = rng.uniform(-1, 1, N_MIX)
    spike_at = rng.integers(1, 300, N_MIX)
    sign = rng.choice([-1.0, 1.0], N_MIX)
    ints = tuple(jnp.asarray(a, jnp.int32) for a in (kind, spike_at))
    floats = tuple(jnp.asarray(a, jnp.float32) for a in (scale, mu, sign))
    return kind, (ints[0], floats[0], floats[1], ints[1], floats[2])


def _mixture_grad(t, data):
    kind, scale, mu, spike_at, sign = data
    xi = jax.random.normal(jax.random.fold_in(jax.random.key(1), t), scale.shape)
    g = jnp.select(
        [kind == 0, kind == 1, kind == 2],
        [sign * (1 + 0.05 * xi), mu + 0.5 * xi, xi],
        jnp.where(t == spike_at, 100.0 * sign, 0.3 * xi),
    )
    return g * scale


@jax.jit
def _mixture_directions(data):
    def run(tx):
        def step(state, t):
            d, state = tx.update(_mixture_grad(t, data), state)
            return state, d

        return jax.lax.scan(step, tx.init(jnp.zeros(N_MIX)), jnp.arange(1, T_MIX + 1))[1]

    return run(ax.scale_by_adamax(B1, B2)), run(ax.scale_by_adamax(B1, B2, state_bits=8))


@pytest.fixture(scope="module")
def mixture_errors():
    kind, data = _mixture()
    ref, got = (np.asarray(x, np.float64) for x in _mixture_directions(data))
    return kind, np.abs(got - ref), got


@pytest.mark.parametrize("t", [10, 300, 1000])
def test_8bit_directions_track_float32(mixture_errors, t):
    """|update_8bit - update_f32| / lr at the 99th percentile: the issue's 0.02, for the
    whole mix and for each kind of element on its own."""
    kind, err, _ = mixture_errors
    e = err[t - 1]
    assert np.percentile(e, 99) <= 0.02
    for k, name in enumerate(KINDS):
        assert np.percentile(e[kind == k], 99) <= 0.02, name


def test_8bit_directions_stay_bounded_on_the_mixture(mixture_errors):
    _, _, got = mixture_errors
    assert np.abs(got).max() <= 1.01


# --- after a gradient spike: |m| / u far below its bound ----------------------------------

N_SPIKE = 64 * BLOCK


def _after_spike_data():
    """Half the elements: one gradient of about 1 (either sign) at step 1, then a steady
    gradient 1e-4..1e-2 of either sign, so u stays near the spike and |m| / u is about
    1e-3 of its bound for thousands of steps. The other half, interleaved in the same
    blocks: gradients 1e-4..1e-2 alternating in sign."""
    rng = np.random.default_rng(5)
    kind = rng.integers(0, 2, N_SPIKE)
    spike = rng.choice([-1.0, 1.0], N_SPIKE) * 10.0 ** rng.uniform(-0.5, 0, N_SPIKE)
    steady = rng.choice([-1.0, 1.0], N_SPIKE) * 1e-3 * 10.0 ** rng.uniform(-1, 1, N_SPIKE)
    alternating = 1e-3 * 10.0 ** rng.uniform(-1, 1, N_SPIKE)
    arrays = tuple(jnp.asarray(a, jnp.float32) for a in (kind, spike, steady, alternating))
    return kind, arrays


@jax.jit
def _after_spike_runs(data):
    """Updates at step 300, and p_t = p_{t-1} - update_t and the path sum_t |update_t| of
    float32 state, for float32 and 8-bit state at steps 300 and 1000."""
    kind, spike, steady, alternating = data
    txs = (ax.scale_by_adamax(B1, B2), ax.scale_by_adamax(B1, B2, state_bits=8))

    def step(carry, t):
        states, ps, path, _ = carry
        after = jnp.where(t == 1, spike, steady)
        g = jnp.where(kind == 0, after, jnp.where(t % 2 == 0, alternating, -alternating))
        steps = [tx.update(g, st) for tx, st in zip(txs, states, strict=True)]
        ds, states = tuple(d for d, _ in steps), tuple(st for _, st in steps)
        ps = tuple(p - d for p, d in zip(ps, ds, strict=True))
        return (states, ps, path + jnp.abs(ds[0]), ds), None

    z = jnp.zeros(N_SPIKE)
    carry = (tuple(tx.init(z) for tx in txs), (z, z), z, (z, z))
    at_300 = jax.lax.scan(step, carry, jnp.arange(1, 301))[0]
    at_1000 = jax.lax.scan(step, at_300, jnp.arange(301, 1001))[0]
    return at_300[3], [(c[1], c[2]) for c in (at_300, at_1000)]


@pytest.fixture(scope="module")
def after_spike():
    kind, data = _after_spike_data()
    (d32, d8), trajectories = jax.tree.map(
        lambda x: np.asarray(x, np.float64), _after_spike_runs(data)
    )
    step_error = (np.abs(d8 - d32) / np.abs(d32))[kind == 0]
    drift = [np.abs(p8 - p32) / path for (p32, p8), path in trajectories]
    return step_error, drift


def test_8bit_steps_after_a_spike_keep_relative_precision(after_spike):
    """|m| / u about 1e-3 of its bound, where a linear code of m / u (steps of 1/127 of
    the bound) gets each step 0 or one code step: off by a median 90 % and a 99th
    percentile of 770 % against float32 state at step 300. The tapered code has two
    codes per binade there (measured 8.9 % and 33 %)."""
    step_error, _ = after_spike
    assert np.median(step_error) <= 0.12
    assert np.percentile(step_error, 99) <= 0.45


@pytest.mark.parametrize("i", [0, 1], ids=["step 300", "step 1000"])
def test_8bit_trajectories_after_a_spike_stay_near_float32(after_spike, i):
    """|p_8bit - p_f32| as a fraction of the path p_f32 walked (the ratio is free of the
    learning rate): the linear code drifted by a median 1.9-2.0 % and a 99th percentile
    of 7.2-9.8 % (steps 300, 1000); the tapered code 1.3-1.4 % and 4.1-5.3 %."""
    _, drift = after_spike
    assert np.median(drift[i]) <= 0.017
    assert np.percentile(drift[i], 99) <= 0.06


@pytest.mark.xfail(
    strict=True,
    reason="issue 13's targets for 8-bit m; one byte cannot hold both the linear part "
    "that keeps the mixture within 0.02 and 4+ codes per binade down to 1e-4",
)
def test_8bit_after_a_spike_meets_issue_13_targets(after_spike):
    step_error, drift = after_spike
    assert np.median(step_error) <= 0.05 and np.percentile(step_error, 99) <= 0.20
    for d in drift:
        assert np.median(d) <= 0.01 and np.percentile(d, 99) <= 0.05


def test_step_stays_bounded_on_heavy_tailed_gradients():
    n, steps = 64 * BLOCK, 300
    scale = jnp.asarray(10.0 ** np.random.default_rng(3).uniform(-6, 2, n), jnp.float32)
    tx = ax.scale_by_adamax(B1, B2, state_bits=8)

    @jax.jit
    def run(scale):
        def step(state, t):
            g = jax.random.cauchy(jax.random.fold_in(jax.random.key(4), t), (n,)) * scale
            d, state = tx.update(g, state)
            return state, jnp.max(jnp.abs(d))

        return jax.lax.scan(step, tx.init(jnp.zeros(n)), jnp.arange(steps))[1]

    assert float(run(scale).max()) <= 1.05


def _digits_mlp_losses() -> dict[tuple[float, str], float]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = jnp.asarray(x / 16.0, jnp.float32)
    labels = jax.nn.one_hot(y, 10)
    sizes = [(64, 256), (256, 256), (256, 10)]
    keys = jax.random.split(jax.random.key(0), len(sizes))
    params0 = [
        {"w": jax.random.normal(k, s) * jnp.sqrt(2.0 / s[0]), "b": jnp.zeros(s[1])}
        for k, s in zip(keys, sizes, strict=True)
    ]

    def loss(params):
        h = x
        for i, layer in enumerate(params):
            h = h @ layer["w"] + layer["b"]
            h = jax.nn.relu(h) if i < len(params) - 1 else h
        return optax.softmax_cross_entropy(h, labels).mean()

    def train(tx):
        def step(carry, _):
            params, state = carry
            grads = jax.grad(loss)(params)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        params, _ = jax.lax.scan(step, (params0, tx.init(params0)), None, length=300)[0]
        return loss(params)

    @jax.jit
    def both(lr):
        return train(ax.adamax(lr)), train(ax.adamax(lr, state_bits=8))

    out = {}
    for lr in (2e-4, 2e-3):
        f32, q8 = both(jnp.float32(lr))
        out[(lr, "f32")], out[(lr, "8bit")] = float(f32), float(q8)
    return out


def test_mlp_on_digits_ends_within_5_percent_of_float32_state():
    losses = _digits_mlp_losses()
    for lr in (2e-4, 2e-3):
        f32, q8 = losses[(lr, "f32")], losses[(lr, "8bit")]
        assert abs(q8 - f32) <= 0.05 * f32, (lr, f32, q8)


# --- determinism and plumbing -------------------------------------------------------------


def _params():
    return {"w": jnp.ones((64, 128)), "b": jnp.zeros(128)}


def _grads(seed=0):
    return jax.tree.map(lambda p: jax.random.normal(jax.random.key(seed), p.shape), _params())


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def _assert_trees_close(a, b):
    """Equal to float32 round-off: batching may change how XLA fuses the last division."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-9)


def test_resumed_run_is_bit_identical():
    tx = ax.adamax(1e-2, state_bits=8)
    grads = jax.random.normal(jax.random.key(5), (30, 64, 128))

    @jax.jit
    def run(state, gs):
        return jax.lax.scan(lambda s, g: (tx.update({"w": g}, s)[1], None), state, gs)[0]

    state0 = tx.init({"w": jnp.zeros((64, 128))})
    _assert_trees_equal(run(state0, grads), run(run(state0, grads[:11]), grads[11:]))


def test_state_structure_is_stable_through_update_and_lax_cond():
    tx = ax.adamaxw(1e-2, state_bits=8)
    params = _params()
    state = tx.init(params)
    new = jax.eval_shape(lambda s: tx.update(_grads(), s, params)[1], state)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new) == jax.tree.map(
        lambda x: (x.shape, x.dtype), state
    )
    guarded = optax.apply_if_finite(ax.adamax(1e-2, state_bits=8), max_consecutive_errors=3)
    gstate = guarded.init(params)
    bad = jax.tree.map(lambda g: g * jnp.nan, _grads())
    updates, gstate2 = jax.jit(guarded.update)(bad, gstate, params)
    assert int(gstate2.notfinite_count) == 1
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
    _assert_trees_equal(gstate2.inner_state, gstate.inner_state)
    multi = optax.MultiSteps(ax.nadamax(1e-2, state_bits=8), every_k_schedule=2)
    mstate = multi.init(params)
    for seed in range(2):
        _, mstate = jax.jit(multi.update)(_grads(seed), mstate, params)


def test_vmap_pmap_and_sharding_match_the_plain_step():
    tx = ax.adamax(1e-2, state_bits=8)
    params, grads = _params(), _grads()
    want_updates, want_state = jax.jit(tx.update)(grads, tx.init(params), params)

    stack = lambda t, n: jax.tree.map(lambda x: jnp.stack([x] * n), t)
    bu, bs = jax.jit(jax.vmap(tx.update))(stack(grads, 2), jax.vmap(tx.init)(stack(params, 2)))
    for i in range(2):  # every member of the batch: the state bit for bit, the updates
        _assert_trees_equal(jax.tree.map(lambda x, i=i: x[i], bs), want_state)
        _assert_trees_close(jax.tree.map(lambda x, i=i: x[i], bu), want_updates)

    n = jax.device_count()
    pu, ps = jax.pmap(tx.update)(stack(grads, n), jax.pmap(tx.init)(stack(params, n)))
    for i in (0, n - 1):
        _assert_trees_equal(jax.tree.map(lambda x, i=i: x[i], ps), want_state)
        _assert_trees_close(jax.tree.map(lambda x, i=i: x[i], pu), want_updates)

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    sp = jax.device_put(params, sharding)
    sstate = jax.jit(tx.init)(sp)
    su, sstate = jax.jit(tx.update)(jax.device_put(grads, sharding), sstate, sp)
    _assert_trees_equal(sstate, want_state)
    assert sstate[0].u["w"].codes.sharding.is_equivalent_to(sharding, 2)
    np.testing.assert_allclose(su["w"], want_updates["w"], rtol=1e-6)


def test_orbax_checkpoint_round_trip():
    ocp = pytest.importorskip("orbax.checkpoint")
    tx = ax.adamax(1e-2, state_bits=8)
    params = _params()
    update = jax.jit(tx.update)
    state = update(_grads(), tx.init(params), params)[1]
    with tempfile.TemporaryDirectory() as d, ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(d, "state"), state)
        ckpt.wait_until_finished()
        restored = ckpt.restore(os.path.join(d, "state"), jax.eval_shape(lambda: state))
    _assert_trees_equal(restored, state)
    _assert_trees_equal(update(_grads(1), restored, params), update(_grads(1), state, params))


def test_lazy_rows_keep_untouched_blocks_exactly():
    tx = ax.scale_by_adamax(B1, B2, lazy_rows=True, state_bits=8)
    params = jnp.zeros((64, 256))  # a row is one block
    update = jax.jit(tx.update)
    state = update(_grads()["w"].repeat(2, axis=1), tx.init(params))[1]
    g = jnp.ones((64, 256)).at[::2].set(0.0)  # even rows untouched
    direction, new = update(g, state)
    assert not np.any(np.asarray(direction)[::2])
    assert np.array_equal(np.asarray(state.u.codes)[::2], np.asarray(new.u.codes)[::2])
    assert np.array_equal(np.asarray(state.u.scales)[::2], np.asarray(new.u.scales)[::2])
    # m keeps its value; its code may move by half a step when R_t grows (early steps).
    (m_old, u_old), (m_new, _) = decode_state(state), decode_state(new)
    k = np.abs(np.asarray(new.m.codes, np.int64)[::2])
    gap = np.maximum(np.diff(M_TABLE, prepend=0.0)[k], np.diff(M_TABLE, append=1.0)[k])
    half_code = 0.5 * gap * float(new.m.scale) * u_old[::2]
    assert np.all(np.abs(m_new[::2] - m_old[::2]) <= half_code * (1 + 1e-5))


@pytest.mark.parametrize("shape", [(4099,), (65, 67), (3, 40, 50)])
def test_leaves_that_do_not_fill_their_last_block(shape):
    n = math.prod(shape)
    g = jax.random.normal(jax.random.key(7), shape)
    tx8, tx32 = ax.scale_by_adamax(state_bits=8), ax.scale_by_adamax()
    s8, s32 = tx8.init(jnp.zeros(shape)), tx32.init(jnp.zeros(shape))
    up8, up32 = jax.jit(tx8.update), jax.jit(tx32.update)
    for _ in range(3):
        d8, s8 = up8(g, s8)
        d32, s32 = up32(g, s32)
    assert s8.u.codes.shape == shape and s8.u.scales.shape == (math.ceil(n / BLOCK),)
    # A constant gradient: direction ~1, within u's code step (2**-4) plus m's code.
    np.testing.assert_allclose(d8, d32, atol=0.1)


# --- construction -------------------------------------------------------------------------


@pytest.mark.parametrize("make", [ax.scale_by_adamax, ax.adamax, ax.adamaxw, ax.nadamax])
def test_every_constructor_takes_state_bits(make):
    tx = make(state_bits=8, block_size=64)
    state = tx.init(_params())
    inner = state if isinstance(state, ax.AdamaxState) else state[0]
    assert isinstance(inner.u["w"], codes8.QuantizedU) and inner.u["w"].block_size == 64


@pytest.mark.parametrize("bits", [4, 16, 0])
def test_state_bits_other_than_8_is_a_value_error(bits):
    with pytest.raises(ValueError, match="state_bits"):
        ax.adamax(state_bits=bits)
    if bits == 4:  # says why, and what to do instead
        with pytest.raises(ValueError, match=r"no 4-bit layout.*ax\.offload"):
            ax.adamax(state_bits=bits)


@pytest.mark.parametrize("bits", ["8", 8.0, True])
def test_state_bits_of_another_type_is_a_type_error(bits):
    with pytest.raises(TypeError, match="state_bits"):
        ax.adamax(state_bits=bits)


@pytest.mark.parametrize("size", [0, -256, 100, 3])
def test_block_size_must_be_a_positive_power_of_two(size):
    with pytest.raises(ValueError, match="block_size"):
        ax.adamax(state_bits=8, block_size=size)


def test_inject_hyperparams_needs_static_state_bits():
    params = _params()
    with pytest.raises(TypeError, match="static_args"):
        optax.inject_hyperparams(ax.adamax)(learning_rate=1e-2, state_bits=8).init(params)
    tx = optax.inject_hyperparams(ax.adamax, static_args=("state_bits", "block_size"))(
        learning_rate=1e-2, state_bits=8
    )
    state = tx.init(params)
    _, state = jax.jit(tx.update)(_grads(), state, params)
    assert isinstance(state.inner_state[0].u["w"], codes8.QuantizedU)
    # Dtypes given as strings are not numbers, so inject_hyperparams leaves them alone.
    tx = optax.inject_hyperparams(ax.adamax)(learning_rate=1e-2, m_dtype="bfloat16")
    _, state = jax.jit(tx.update)(_grads(), tx.init(params), params)
    assert state.inner_state[0].m["w"].dtype == jnp.bfloat16


def test_a_nan_gradient_poisons_its_block_for_good_not_silently():
    # The block scale must carry the NaN forward: a block that quietly resumed with
    # its m wiped would train on garbage without any sign of it.
    opt = ax.adamax(0.01, state_bits=8)
    params = jnp.ones(8192)
    state = opt.init(params)
    bad = jnp.ones(8192).at[5].set(jnp.nan)
    _, state = opt.update(bad, state)
    for _ in range(3):
        updates, state = opt.update(jnp.ones(8192), state)
    assert bool(jnp.all(jnp.isnan(updates[:256])))  # the element's block of 256
    assert bool(jnp.all(jnp.isfinite(updates[256:])))  # and nothing else


def test_python_float_leaves_work_with_8bit_state():
    opt = ax.adamax(0.01, state_bits=8)
    params = {"w": jnp.ones(8192), "s": 1.0}
    state = opt.init(params)
    updates, _ = opt.update({"w": jnp.ones(8192), "s": 0.5}, state)
    np.testing.assert_allclose(float(updates["s"]), -0.01, rtol=1e-5)


@pytest.mark.parametrize(
    "options",
    [{}, {"eps_placement": "max"}, {"eps_placement": "max", "lazy_rows": "catch_up"}],
    ids=["denominator", "max", "max-catch_up"],
)
def test_float64_parameters_under_x64(options):
    # The codec works in float32 whatever the compute dtype: a float64 eps in the max
    # once reached its bit patterns as two int32 words per element and crashed.
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(5, 64, 128))
    grads[:, ::3] = 0.0  # rows without gradient, for catch_up

    def run(dtype):
        opt = ax.scale_by_adamax(state_bits=8, **options)
        p = jnp.zeros((64, 128), dtype)
        state = opt.init(p)
        out = []
        for g in grads:
            d, state = jax.jit(opt.update)(jnp.asarray(g, dtype), state)
            out.append(np.asarray(d, np.float64))
        return np.stack(out), d.dtype

    with jax.enable_x64(True):
        d64, dtype = run(jnp.float64)
    d32, _ = run(jnp.float32)
    assert dtype == jnp.float64
    # The same codes but where float64 arithmetic tips a rounding to the next code.
    assert np.mean(np.abs(d64 - d32) < 1e-6) > 0.999
    np.testing.assert_allclose(d64, d32, atol=0.02)


def test_a_block_larger_than_the_leaf_is_the_leaf():
    # One block either way, but a block of 32768 over a leaf of 4096 would pad the
    # leaf 8-fold on every step: the stored block size is the leaf's (as a power of two).
    params = jnp.zeros((64, 64))
    grads = jax.random.normal(jax.random.key(0), (3, 64, 64))
    runs = {}
    for block_size in (4096, 32768):
        opt = ax.scale_by_adamax(state_bits=8, block_size=block_size)
        state = opt.init(params)
        assert state.u.block_size == 4096 and state.u.scales.shape == (1,)
        runs[block_size] = [np.asarray(opt.update(g, state)[0]) for g in grads]
    np.testing.assert_array_equal(runs[4096], runs[32768])
    # A leaf between two powers of two gets the next one up: under 2x padding.
    state = ax.scale_by_adamax(state_bits=8, block_size=65536).init(jnp.zeros(5000))
    assert state.u.block_size == 8192


def test_an_element_below_the_code_range_follows_its_new_gradients():
    # One element 1e-6 of its block's largest u, below the u code's range (4.5
    # decades), so its u is rounded up to the smallest code, 30x too large. Its m must
    # not be scaled up with it: then the next gradients, of the other sign, would be
    # outweighed by that m for about 30 steps (float32 state turns within 3).
    n = 4096
    big = jnp.zeros(n).at[0].set(1e4)

    def run(**kw):
        opt = ax.scale_by_adamax(B1, B2, **kw)
        state = opt.init(jnp.zeros(n))
        out = []
        for g in [-1e-2] + [1e-2] * 8:
            d, state = opt.update(big.at[1].set(g), state)
            out.append(float(d[1]))
        return np.asarray(out)

    exact, coded = run(), run(state_bits=8)
    turned = exact > 0
    assert turned[3:].all()
    np.testing.assert_array_equal(np.sign(coded[turned]), 1.0)
    # Its steps shrink (its u is too large), never grow.
    assert np.all(np.abs(coded) <= np.abs(exact) * 1.001)
