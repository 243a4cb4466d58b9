"""Property-based tests (hypothesis) over hyperparameters, dtypes and gradient sequences.

* Bounded step: every element of Adamax's direction satisfies
  ``|m_hat_t| / u_t <= bound(b1, b2, t)`` (Kingma & Ba 2015, section 7.1), derived
  here from the recurrences, not from our code.
* State dtype stability: ``update`` returns a state with exactly the dtypes and
  shapes ``init`` gave it, whatever the parameter, gradient and storage dtypes.
* ``jit`` and eager execution agree (to a few units in the last place: XLA may fuse
  a multiply-add, eager execution does not).
* The packed form (``packed(scale_by_adamax())``) equals the unpacked one.

Each trajectory runs under one ``jit`` with ``lax.scan``; the hyperparameters are
traced arguments, so a new example reuses the compiled function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import adamax_jax as ax
from tests._reference import step_bound

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
T, N = 8, 6  # steps per trajectory, elements per leaf


# --- strategies -------------------------------------------------------------------


@st.composite
def betas(draw: st.DrawFn) -> tuple[float, float]:
    """b1 in [0, 0.99], b2 in (b1, 1] with b1 < b2 also after float32 rounding."""
    b1 = draw(st.floats(0.0, 0.99))
    b2 = draw(st.floats(min(b1 + 1e-3, 1.0), 1.0))
    return float(np.float32(b1)), float(np.float32(b2))


def grad_sequences(max_abs: float) -> st.SearchStrategy[np.ndarray]:
    """T x N gradients mixing zeros, tiny, ordinary and huge magnitudes and signs."""
    max_abs = float(np.float32(max_abs))
    element = st.one_of(
        st.just(0.0),
        st.floats(-1.0, 1.0, width=32),
        st.floats(-max_abs, max_abs, width=32),
        st.sampled_from([1e-30, -1e-30, 1e-7, max_abs, -max_abs]),
    )
    return st.lists(element, min_size=T * N, max_size=T * N).map(
        lambda xs: np.asarray(xs, np.float32).reshape(T, N)
    )


# --- the bound, from the recurrences -------------------------------------------------


def direction_bound(
    b1: float, b2: float, t: np.ndarray, *, nesterov: bool, bias_correction: bool
) -> np.ndarray:
    """Upper bound of |direction_t| for each step number in ``t`` (float64).

    |m_t| <= (1 - b1) * u_t * S_t with S_t = sum_{j<t} (b1/b2)^j, because
    |g_k| <= u_t / b2^(t-k). The plain step divides by 1 - b1^t; the Nesterov step
    is b1 * m_t / (1 - b1^(t+1)) + (1 - b1) * g_t / (1 - b1^t) with |g_t| <= u_t.
    """
    t = np.asarray(t, np.float64)
    r = b1 / b2
    s = (1 - r**t) / (1 - r)  # b1 < b2, so r < 1
    if not bias_correction:
        plain = (1 - b1) * s
        return b1 * plain + (1 - b1) if nesterov else plain
    if not nesterov:
        return np.array([step_bound(b1, b2, int(k)) for k in t])
    return b1 * (1 - b1) * s / (1 - b1 ** (t + 1)) + (1 - b1) / (1 - b1**t)


@functools.cache
def _trajectory_fn(
    eps_placement: str,
    nesterov: bool,
    bias_correction: bool,
    param_dtype: str,
    state_dtype: str | None,
    extra: tuple[tuple[str, object], ...] = (),
):
    """A jitted (b1, b2, eps, grads[T, ...]) -> directions[T, ...] for one configuration."""

    def run(b1, b2, eps, grads):
        tx = ax.scale_by_adamax(
            b1,
            b2,
            eps,
            eps_placement=eps_placement,  # type: ignore[arg-type]
            nesterov=nesterov,
            bias_correction=bias_correction,
            m_dtype=state_dtype,
            u_dtype=state_dtype,
            **dict(extra),
        )
        state = tx.init(jnp.zeros(grads.shape[1:], param_dtype))

        def step(state, g):
            d, state = tx.update(g.astype(param_dtype), state)
            return state, d

        return jax.lax.scan(step, state, grads)[1]

    return jax.jit(run)


def _check_bound(
    directions: np.ndarray,
    b1: float,
    b2: float,
    *,
    nesterov: bool = False,
    bias_correction: bool = True,
    rtol: float,
) -> None:
    d = np.abs(np.asarray(directions, np.float64)).reshape(directions.shape[0], -1)
    assert np.all(np.isfinite(d))
    bound = direction_bound(
        b1, b2, np.arange(1, d.shape[0] + 1), nesterov=nesterov, bias_correction=bias_correction
    )
    excess = d.max(axis=1) / bound
    assert np.all(excess <= 1 + rtol), (excess.max(), bound)


# --- bounded step ---------------------------------------------------------------------


@SETTINGS
@given(
    bs=betas(),
    eps=st.sampled_from([0.0, 1e-8, 1e-3]),
    eps_placement=st.sampled_from(["denominator", "max"]),
    nesterov=st.booleans(),
    bias_correction=st.booleans(),
    grads=grad_sequences(1e30),
)
def test_step_is_bounded_float32(bs, eps, eps_placement, nesterov, bias_correction, grads):
    b1, b2 = bs
    fn = _trajectory_fn(eps_placement, nesterov, bias_correction, "float32", None)
    d = fn(b1, b2, eps, grads)
    # float32 arithmetic: a few ulps over the exact bound at most.
    _check_bound(d, b1, b2, nesterov=nesterov, bias_correction=bias_correction, rtol=1e-6)


# Storage rounding (round to nearest) can put a stored u up to half an ulp below the
# true max and m half an ulp off, every step: allow a few storage ulps over the bound.
DTYPE_CASES = [
    # (param dtype, state dtype, rtol, largest gradient the param dtype can hold)
    ("float32", None, 1e-6, 1e30),
    ("float32", "bfloat16", 2.0**-7, 1e30),
    ("bfloat16", None, 2.0**-7, 1e30),
    ("bfloat16", "float32", 2.0**-8, 1e30),
    ("float16", None, 2.0**-10, 6e4),
    ("float16", "float32", 2.0**-10, 6e4),
]


@pytest.mark.parametrize(("param_dtype", "state_dtype", "rtol", "max_abs"), DTYPE_CASES)
@SETTINGS
@given(data=st.data())
def test_step_is_bounded_across_dtypes(data, param_dtype, state_dtype, rtol, max_abs):
    b1, b2 = data.draw(betas())
    grads = data.draw(grad_sequences(max_abs))
    fn = _trajectory_fn("denominator", False, True, param_dtype, state_dtype)
    d = fn(b1, b2, 1e-8, grads)
    assert d.dtype == jnp.dtype(param_dtype)
    _check_bound(d, b1, b2, rtol=rtol)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(bs=betas(), grads=grad_sequences(1e30))
def test_step_is_bounded_with_8bit_state(bs, grads):
    b1, b2 = bs
    # 64 x 128 elements: large enough to be quantized (small tensors may stay 32-bit).
    tiled = np.stack([np.resize(g, (64, 128)) for g in grads])
    fn = _trajectory_fn("denominator", False, True, "float32", None, (("state_bits", 8),))
    d = fn(b1, b2, 1e-8, tiled)
    # The stored u is rounded up and m is coded relative to it, so the bound holds
    # by construction, up to the code's float32 slack (2**-18).
    _check_bound(d, b1, b2, rtol=1e-5)


@SETTINGS
@given(
    lr=st.floats(1e-4, 1.0),
    bs=betas(),
    grads=grad_sequences(1e30),
)
def test_learning_rate_scales_the_bounded_step(lr, bs, grads):
    """adamax's step is the direction times -lr, so |step| <= lr * bound."""
    b1, b2 = bs
    step = _adamax_steps(lr, b1, b2, grads)
    _check_bound(np.asarray(step) / np.float32(lr), b1, b2, rtol=1e-6)


@jax.jit
def _adamax_steps(lr, b1, b2, grads):
    tx = ax.adamax(lr, b1, b2)
    state = tx.init(jnp.zeros(grads.shape[1:]))

    def step(state, g):
        upd, state = tx.update(g, state)
        return state, upd

    return jax.lax.scan(step, state, grads)[1]


# --- state dtype stability ---------------------------------------------------------

FLOAT_DTYPES = ["float32", "bfloat16", "float16"]
ALL_PARAM_DTYPES = [*FLOAT_DTYPES, "complex64"]


@SETTINGS
@given(
    param_dtypes=st.lists(st.sampled_from(ALL_PARAM_DTYPES), min_size=1, max_size=4),
    grad_dtype=st.sampled_from([None, *FLOAT_DTYPES]),
    m_dtype=st.sampled_from([None, *FLOAT_DTYPES]),
    u_dtype=st.sampled_from([None, *FLOAT_DTYPES]),
    shapes=st.lists(
        st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple), min_size=4, max_size=4
    ),
    nesterov=st.booleans(),
    lazy_rows=st.sampled_from([False, True, "catch_up"]),
)
def test_state_keeps_the_dtypes_and_shapes_init_gave_it(
    param_dtypes, grad_dtype, m_dtype, u_dtype, shapes, nesterov, lazy_rows
):
    params = {
        f"p{i}": jax.ShapeDtypeStruct(shapes[i], jnp.dtype(dt)) for i, dt in enumerate(param_dtypes)
    }

    def grad_like(p):
        # A real gradient dtype for a complex parameter would not be a gradient of it.
        if grad_dtype is None or jnp.issubdtype(p.dtype, jnp.complexfloating):
            return p
        return jax.ShapeDtypeStruct(p.shape, jnp.dtype(grad_dtype))

    grads = jax.tree.map(grad_like, params)
    for tx in (
        ax.adamax(m_dtype=m_dtype, u_dtype=u_dtype, nesterov=nesterov, lazy_rows=lazy_rows),
        optax.apply_if_finite(ax.adamax(m_dtype=m_dtype, u_dtype=u_dtype), 3),
    ):
        state = jax.eval_shape(tx.init, params)
        updates, new_state = jax.eval_shape(tx.update, grads, state, params)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(new_state), strict=True):
            assert (old.shape, old.dtype) == (new.shape, new.dtype)
        # Updates come back in the gradients' dtypes.
        for g, upd in zip(jax.tree.leaves(grads), jax.tree.leaves(updates), strict=True):
            assert (g.shape, g.dtype) == (upd.shape, upd.dtype)


# --- jit == eager ------------------------------------------------------------------

JIT_CONFIGS = [
    {},
    {"eps_placement": "max"},
    {"nesterov": True},
    {"lazy_rows": True},
    {"lazy_rows": "catch_up", "eps_placement": "max"},
    {"bias_correction": False},
    {"m_dtype": jnp.bfloat16, "u_dtype": jnp.bfloat16},
]


@functools.cache
def _jitted(config_index: int, param_dtype: str):
    tx = ax.adamax(0.01, 0.87, 0.995, **JIT_CONFIGS[config_index])
    return tx, jax.jit(tx.update)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    config_index=st.integers(0, len(JIT_CONFIGS) - 1),
    param_dtype=st.sampled_from(FLOAT_DTYPES),
    grads=grad_sequences(1e4),
)
def test_jit_and_eager_agree(config_index, param_dtype, grads):
    tx, jitted = _jitted(config_index, param_dtype)
    params = jnp.zeros((2, N // 2), param_dtype)
    eager_state = jit_state = tx.init(params)
    for g in grads[:3]:
        g = jnp.asarray(g.reshape(2, N // 2), param_dtype)
        eager_upd, eager_state = tx.update(g, eager_state)
        jit_upd, jit_state = jitted(g, jit_state)
        for e, j in zip(
            jax.tree.leaves((eager_upd, eager_state)),
            jax.tree.leaves((jit_upd, jit_state)),
            strict=True,
        ):
            assert e.dtype == j.dtype
            if jnp.issubdtype(e.dtype, jnp.integer):
                assert np.array_equal(e, j)
                continue
            # XLA may contract a multiply-add under jit: a few ulps of the leaf dtype.
            ulp = float(jnp.finfo(e.dtype).eps)
            tiny = float(jnp.finfo(e.dtype).tiny)
            np.testing.assert_allclose(
                np.asarray(e, np.float64), np.asarray(j, np.float64), rtol=4 * ulp, atol=tiny
            )


# --- packed == unpacked ----------------------------------------------------------------


@functools.cache
def _packed_pair(max_leaf_size: int):
    plain = ax.adamax(0.01, 0.9, 0.99)
    packed = optax.chain(
        ax.packed(ax.scale_by_adamax(0.9, 0.99), max_leaf_size=max_leaf_size),
        optax.scale_by_learning_rate(0.01),
    )

    def run(tx, grads):
        params = jax.tree.map(lambda g: jnp.zeros_like(g[0]), grads)
        state = tx.init(params)

        def step(state, g):
            upd, state = tx.update(g, state, params)
            return state, upd

        return jax.lax.scan(step, state, grads)[1]

    return jax.jit(functools.partial(run, plain)), jax.jit(functools.partial(run, packed))


@settings(max_examples=20, deadline=None, derandomize=True)
@given(grads=grad_sequences(1e30), max_leaf_size=st.sampled_from([1, 4, 64]))
def test_packed_and_unpacked_agree(grads, max_leaf_size):
    tree = {
        "small": jnp.asarray(grads[:, :2]),
        "vec": jnp.asarray(grads[:, 2:]),
        "mat": jnp.asarray(np.tile(grads[:, :, None], (1, 1, 3))),
    }
    plain_fn, packed_fn = _packed_pair(max_leaf_size)
    plain, packed = plain_fn(tree), packed_fn(tree)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(packed), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=4e-7, atol=0)
