"""Property-based tests (hypothesis) over hyperparameters, dtypes and gradient sequences.

* Bounded step: every element of Adamax's direction satisfies
  ``|m_hat_t| / u_t <= bound(b1, b2, t)`` (Kingma & Ba 2015, section 7.1), derived
  here from the recurrences, not from our code.
* State dtype stability: ``update`` returns a state with exactly the dtypes and
  shapes ``init`` gave it, whatever the parameter, gradient and storage dtypes.
* ``jit`` and eager execution agree (to a few units in the last place: XLA may fuse
  a multiply-add, eager execution does not).
* The packed form (``packed(scale_by_adamax())``) equals the unpacked one.

What must be covered (every combination of the options that change the recurrence,
the dtypes, the lazy-row modes) is parametrized; hypothesis draws only values:
gradients, which rows have one, and hyperparameters. Each trajectory runs under one
``jit`` with ``lax.scan``; the hyperparameters are traced arguments, so a new
example reuses the compiled function.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import adamax_jax as ax
from adamax_jax._storage import codes8
from tests._reference import direction_bound

T, ROWS, COLS = 8, 3, 2  # steps per trajectory; a leaf of ROWS rows (for lazy_rows)
N = ROWS * COLS


def _settings(examples: int) -> Any:
    return settings(max_examples=examples, deadline=None, derandomize=True)


def _id(config: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in config.items()) or "defaults"


# Every combination of the options that change the recurrence or which elements
# step. Optax's convention (eps in the max, plain numerator, bias correction) is
# one of them, and so are MLX's (no bias correction) and TensorFlow's sparse rows.
STRUCTURES = [
    {"eps_placement": e, "nesterov": n, "bias_correction": b, "lazy_rows": lazy}
    for e, n, b, lazy in itertools.product(
        ("denominator", "max"), (False, True), (True, False), (False, "freeze", "catch_up")
    )
]


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


def row_grads(max_abs: float) -> st.SearchStrategy[np.ndarray]:
    """T x ROWS x COLS gradients where whole rows are zero at some steps, as in a
    sparse embedding lookup (what ``lazy_rows`` acts on)."""
    touched = st.lists(st.booleans(), min_size=T * ROWS, max_size=T * ROWS)
    return st.tuples(grad_sequences(max_abs), touched).map(
        lambda gt: gt[0].reshape(T, ROWS, COLS) * np.asarray(gt[1], np.float32).reshape(T, ROWS, 1)
    )


# --- the bound, from the recurrences -------------------------------------------------


@functools.cache
def _trajectory_fn(
    config: tuple[tuple[str, Any], ...], param_dtype: str, state_dtype: str | None
) -> Any:
    """A jitted (b1, b2, eps, grads[T, ...]) -> directions[T, ...] for one configuration."""

    def run(b1, b2, eps, grads):
        tx = ax.scale_by_adamax(
            b1, b2, eps, m_dtype=state_dtype, u_dtype=state_dtype, **dict(config)
        )
        state = tx.init(jnp.zeros(grads.shape[1:], param_dtype))

        def step(state, g):
            d, state = tx.update(g.astype(param_dtype), state)
            return state, d

        return jax.lax.scan(step, state, grads)[1]

    return jax.jit(run)


def _directions(
    config: dict[str, Any], b1, b2, eps, grads, param_dtype="float32", state_dtype=None
):
    fn = _trajectory_fn(tuple(config.items()), param_dtype, state_dtype)
    return fn(b1, b2, eps, grads)


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


def _check_lazy(config: dict[str, Any], directions: np.ndarray, grads: np.ndarray) -> None:
    """With lazy rows, a row without gradient does not step."""
    if config.get("lazy_rows"):
        d = np.asarray(directions).reshape(grads.shape[0], grads.shape[1], -1)
        idle = ~np.any(grads.reshape(d.shape) != 0, axis=2)
        assert np.all(d[idle] == 0)


# --- bounded step ---------------------------------------------------------------------


@pytest.mark.parametrize("config", STRUCTURES, ids=_id)
@_settings(12)
@given(bs=betas(), eps=st.sampled_from([0.0, 1e-8, 1e-3]), grads=row_grads(1e30))
def test_step_is_bounded_float32(config, bs, eps, grads):
    b1, b2 = bs
    d = _directions(config, b1, b2, eps, grads)
    # float32 arithmetic: a few ulps over the exact bound at most.
    nesterov, bias_correction = config["nesterov"], config["bias_correction"]
    _check_bound(d, b1, b2, nesterov=nesterov, bias_correction=bias_correction, rtol=1e-6)
    _check_lazy(config, d, grads)


# Storage rounding (round to nearest) can put a stored u up to half an ulp below the
# true max and m half an ulp off, every step: allow a few storage ulps over the bound.
DTYPE_CASES = [
    # (param dtype, state dtype, rtol, largest gradient the param dtype can hold)
    ("float32", None, 1e-6, 1e30),
    ("float32", "bfloat16", 2.0**-7, 1e30),
    ("float32", "float16", 2.0**-10, 6e4),
    ("bfloat16", None, 2.0**-7, 1e30),
    ("bfloat16", "float32", 2.0**-8, 1e30),
    ("float16", None, 2.0**-10, 6e4),
    ("float16", "float32", 2.0**-10, 6e4),
]


@pytest.mark.parametrize(("param_dtype", "state_dtype", "rtol", "max_abs"), DTYPE_CASES)
@_settings(20)
@given(data=st.data())
def test_step_is_bounded_across_dtypes(data, param_dtype, state_dtype, rtol, max_abs):
    b1, b2 = data.draw(betas())
    grads = data.draw(grad_sequences(max_abs))
    d = _directions({}, b1, b2, 1e-8, grads, param_dtype, state_dtype)
    assert d.dtype == jnp.dtype(param_dtype)  # gradients of the parameters' dtype
    _check_bound(d, b1, b2, rtol=rtol)


# 8-bit state (one compile each, so a selection): the default, optax's convention,
# each numerator switch, and both lazy modes.
EIGHT_BIT_STRUCTURES = [
    # freeze needs rows that fill whole blocks: rows of 128 elements, blocks of 128.
    {"eps_placement": e, "nesterov": n, "bias_correction": b, "lazy_rows": lazy}
    | ({"block_size": 128} if lazy == "freeze" else {})
    for e, n, b, lazy in [
        ("denominator", False, True, False),
        ("max", False, True, False),
        ("denominator", True, True, False),
        ("max", True, False, False),
        ("denominator", False, True, "freeze"),
        ("max", True, True, "catch_up"),
    ]
]
BLOCKS, BLOCK = 32, 256  # 64 x 128 elements: large enough to be quantized


def _varied_blocks(grads: np.ndarray, seed: int) -> np.ndarray:
    """(T, 64, 128) gradients from the drawn values, every block different: its own
    scale over twelve decades, its own share of zeros, values resampled per element."""
    rng = np.random.default_rng(seed)
    size = BLOCKS * BLOCK
    values = np.stack([rng.choice(g, size) for g in grads]).astype(np.float64)
    scale = np.repeat(10.0 ** rng.uniform(-6, 6, BLOCKS), BLOCK)
    jitter = 10.0 ** rng.uniform(-2, 2, size)
    zero_share = np.repeat(rng.uniform(0, 0.9, BLOCKS), BLOCK)
    kept = rng.random((grads.shape[0], size)) >= zero_share
    out = (values * scale * jitter * kept).reshape(grads.shape[0], 64, 128)
    out[:, rng.random(64) < 0.2] = 0.0  # some rows never touched (lazy_rows)
    return out.astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("config", EIGHT_BIT_STRUCTURES, ids=_id)
@_settings(6)
@given(bs=betas(), grads=grad_sequences(1e22), seed=st.integers(0, 2**32 - 1))
def test_step_is_bounded_with_8bit_state(config, bs, grads, seed):
    b1, b2 = bs
    g = _varied_blocks(grads, seed)
    d = _directions({**config, "state_bits": 8}, b1, b2, 1e-8, g)
    # u is rounded to its nearest code, but m is coded as its ratio to the u the step
    # computed, so the direction read back keeps the float32 bound by construction,
    # up to the code's float32 slack (2**-18).
    nesterov, bias_correction = config["nesterov"], config["bias_correction"]
    _check_bound(d, b1, b2, nesterov=nesterov, bias_correction=bias_correction, rtol=1e-5)
    _check_lazy(config, d, g)


@_settings(30)
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
GRAD_DTYPES = [None, *FLOAT_DTYPES]  # None: the parameter's own dtype
# Each m_dtype and each u_dtype, in four pairs that are all different; every
# structure that changes what the state holds (lazy_rows="catch_up" stamps rows,
# 8-bit codes) with a mixed pair.
STATE_FORMS = [
    {"m_dtype": m, "u_dtype": u}
    for m, u in [
        (None, None),
        ("float32", "bfloat16"),
        ("bfloat16", "float16"),
        ("float16", "float32"),
    ]
]
STATE_FORMS += [
    {"m_dtype": "bfloat16", "u_dtype": "float16", "nesterov": n, "lazy_rows": lazy}
    for n, lazy in itertools.product((False, True), (False, "freeze", "catch_up"))
]
STATE_FORMS += [{"state_bits": 8}, {"state_bits": 8, "lazy_rows": "catch_up", "nesterov": True}]


@pytest.mark.parametrize("config", STATE_FORMS, ids=_id)
@_settings(2)
@given(
    shapes=st.lists(
        st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple), min_size=3, max_size=3
    ),
)
def test_state_keeps_the_dtypes_and_shapes_init_gave_it(config, shapes):
    # One leaf per (parameter dtype, gradient dtype) pair, in the drawn shapes; with
    # 8-bit state also one leaf large enough to be quantized per parameter dtype.
    params, grads = {}, {}
    for (i, p_dtype), g_dtype in itertools.product(enumerate(ALL_PARAM_DTYPES), GRAD_DTYPES):
        # A real gradient dtype for a complex parameter would not be a gradient of it.
        if jnp.issubdtype(p_dtype, jnp.complexfloating) and g_dtype is not None:
            continue
        leaves = {"": shapes[i % len(shapes)]}
        if config.get("state_bits") and g_dtype is None:
            leaves["/big"] = (64, 64)
        for suffix, shape in leaves.items():
            name = f"{p_dtype}/{g_dtype}{suffix}"
            params[name] = jax.ShapeDtypeStruct(shape, jnp.dtype(p_dtype))
            grads[name] = jax.ShapeDtypeStruct(shape, jnp.dtype(g_dtype or p_dtype))
    # optax's wrapper around the state (its dtypes do not depend on the inner options).
    wrapped = [optax.apply_if_finite(ax.adamax(**config), 3)] if config == STATE_FORMS[1] else []
    for tx in (ax.adamax(**config), *wrapped):
        state = jax.eval_shape(tx.init, params)
        updates, new_state = jax.eval_shape(tx.update, grads, state, params)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(new_state), strict=True):
            assert (old.shape, old.dtype) == (new.shape, new.dtype)
        # Updates come back in the gradients' dtypes promoted with the parameters'
        # (which the state records unless both storage dtypes are set).
        core = state[0] if isinstance(state[0], ax.AdamaxState) else state.inner_state[0]
        both_set = config.get("m_dtype") and config.get("u_dtype")
        for name, g in grads.items():
            coded = isinstance(core.m[name], codes8.QuantizedM)
            p_dtype = g.dtype if both_set and not coded else params[name].dtype
            want = jnp.promote_types(g.dtype, p_dtype)
            assert (g.shape, want) == (updates[name].shape, updates[name].dtype), name
        if config.get("state_bits"):  # the large leaves were quantized
            is_q = lambda x: isinstance(x, codes8.QuantizedU)
            assert sum(map(is_q, jax.tree.leaves(state, is_leaf=is_q))) == 3


# --- jit == eager ------------------------------------------------------------------

JIT_CONFIGS: list[dict[str, Any]] = [
    {},
    {"eps_placement": "max"},  # optax's convention
    {"nesterov": True},
    {"bias_correction": False},
    {"lazy_rows": "freeze"},
    {"lazy_rows": "catch_up"},
    {"lazy_rows": "catch_up", "eps_placement": "max", "nesterov": True},
    {"m_dtype": "bfloat16", "u_dtype": "bfloat16"},
    {"m_dtype": "float16", "u_dtype": "float16", "lazy_rows": "catch_up"},
]


@functools.cache
def _jitted(config_index: int) -> tuple[optax.GradientTransformation, Any]:
    tx = ax.adamax(0.01, 0.87, 0.995, **JIT_CONFIGS[config_index])
    return tx, jax.jit(tx.update)


# Every configuration with float32 parameters; the narrow parameter dtypes with the
# configurations whose arithmetic they change (rounding into narrow state, catch-up).
JIT_CASES = [(i, "float32") for i in range(len(JIT_CONFIGS))] + [
    (i, dtype) for i in (0, 1, 5, 7, 8) for dtype in ("bfloat16", "float16")
]


@pytest.mark.parametrize(
    ("config_index", "param_dtype"),
    JIT_CASES,
    ids=[f"{_id(JIT_CONFIGS[i])}-{d}" for i, d in JIT_CASES],
)
@_settings(2)
@given(grads=row_grads(1e4))
def test_jit_and_eager_agree(config_index, param_dtype, grads):
    tx, jitted = _jitted(config_index)
    params = jnp.zeros((ROWS, COLS), param_dtype)
    eager_state = jit_state = tx.init(params)
    for g in grads[:3]:
        g = jnp.asarray(g, param_dtype)
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
def _packed_pair(max_leaf_size: int) -> tuple[Any, Any]:
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


@pytest.mark.parametrize("max_leaf_size", [1, 4, 64])
@_settings(8)
@given(grads=grad_sequences(1e30))
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
