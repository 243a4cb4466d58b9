"""nadamax, adamaxw (mask, schedules) and lazy rows against NumPy float64 references and optax."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax
from tests._reference import adamax_trajectory, adamax_update

STEPS = 300


def _p0() -> dict[str, np.ndarray]:
    return {
        "w": np.linspace(-1.5, 2.0, 6, dtype=np.float32).reshape(2, 3),
        "b": np.array([0.5, -1.0, 3.0], np.float32),
    }


def _grad(p, xp=jnp):
    """A nonconvex, state-dependent gradient, written once for jnp and np."""
    w, b = p["w"], p["b"]
    return {
        "w": xp.sin(3.0 * w) + 0.5 * w + 0.1 * xp.sum(b),
        "b": 0.01 * (b - 2.0) + 0.2 * xp.cos(b) * xp.mean(w),
    }


def _run(opt: optax.GradientTransformation, grad_fn: Callable = _grad, p0=None, steps=STEPS):
    """Jitted lax.scan trajectory; returns (params per step as NumPy, final state)."""

    def body(carry, _):
        p, s = carry
        updates, s = opt.update(grad_fn(p), s, p)
        p = optax.apply_updates(p, updates)
        return (p, s), p

    params = jax.tree.map(jnp.asarray, _p0() if p0 is None else p0)
    (_, state), path = jax.jit(lambda p: jax.lax.scan(body, (p, opt.init(p)), None, steps))(params)
    return jax.tree.map(np.asarray, path), state


def _max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# --------------------------------------------------------------------------- nadamax


def _numpy_path(**kw) -> dict[str, np.ndarray]:
    """The float64 reference trajectory (tests/_reference.py) on this file's problem."""
    return adamax_trajectory(_p0(), lambda p: _grad(p, np), STEPS, **kw)[0]


@pytest.mark.parametrize("eps_placement", ["denominator", "max"])
def test_nadamax_matches_numpy_transcription(eps_placement):
    lr, b1, b2, eps = 0.01, 0.85, 0.99, 1e-3
    ref = _numpy_path(
        lr=lr, beta1=b1, beta2=b2, epsilon=eps, eps_placement=eps_placement, nesterov=True
    )
    ours, _ = _run(ax.nadamax(lr, b1, b2, eps, eps_placement=eps_placement))
    diff = _max_diff(ours, ref)
    print(f"\nnadamax ({eps_placement}) vs float64 NumPy: max abs diff {diff:.2e}")
    assert diff < 1e-5
    # And it is not plain Adamax in disguise.
    plain, _ = _run(ax.adamax(lr, b1, b2, eps, eps_placement=eps_placement))
    assert _max_diff(plain, ref) > 1e-3


def test_nadamax_rejects_nesterov_keyword():
    with pytest.raises(TypeError, match="nesterov"):
        ax.nadamax(nesterov=False)


# --------------------------------------------------------------------------- adamaxw


def _decay_only_w(params):
    return {"w": True, "b": False}


@pytest.mark.parametrize(
    "mask",
    [None, {"w": True, "b": False}, _decay_only_w, lambda p: jax.tree.map(lambda x: x.ndim > 1, p)],
    ids=["none", "tree", "function", "function-of-shapes"],
)
def test_adamaxw_with_eps_in_max_equals_optax_adamaxw(mask):
    kw = {"learning_rate": 0.02, "b1": 0.9, "b2": 0.99, "eps": 1e-6, "weight_decay": 0.3}
    ours, _ = _run(ax.adamaxw(**kw, mask=mask, eps_placement="max"))
    ref, _ = _run(optax.adamaxw(**kw, mask=mask))
    assert _max_diff(ours, ref) < 1e-6
    if mask is not None:
        # With leaves that do not interact, the masked leaf moves exactly as with no
        # decay, and the decayed one does not.
        def uncoupled(p):
            return {"w": jnp.sin(3.0 * p["w"]), "b": 0.2 * jnp.cos(p["b"])}

        decayed, _ = _run(ax.adamaxw(**kw, mask=mask, eps_placement="max"), uncoupled)
        no_decay, _ = _run(ax.adamax(0.02, 0.9, 0.99, 1e-6, eps_placement="max"), uncoupled)
        np.testing.assert_array_equal(decayed["b"], no_decay["b"])
        assert _max_diff(decayed["w"], no_decay["w"]) > 1e-2


def test_adamaxw_decay_is_decoupled_and_scaled_by_learning_rate():
    # A zero gradient: only the decay acts, theta_t = (1 - lr*wd)**t exactly.
    opt = ax.adamaxw(learning_rate=0.1, weight_decay=0.1)
    path, _ = _run(opt, grad_fn=lambda p: jax.tree.map(jnp.zeros_like, p), steps=5)
    expected = np.float32(1.0) * (1 - 0.01) ** np.arange(1, 6)[:, None, None]
    np.testing.assert_allclose(path["w"], _p0()["w"] * expected, rtol=1e-6)


def test_adamaxw_learning_rate_and_weight_decay_schedules_match_numpy():
    def lr_np(c):  # linear warm-up over 20 steps, then cosine decay to 0 at 300
        if c < 20:
            return 0.05 * c / 20
        return 0.05 * 0.5 * (1 + np.cos(np.pi * (c - 20) / 280))

    def wd_np(c):
        return 0.2 * max(0.0, 1 - c / 150)

    lr = optax.warmup_cosine_decay_schedule(0.0, 0.05, 20, 300, end_value=0.0)
    wd = optax.linear_schedule(0.2, 0.0, 150)
    ours, _ = _run(ax.adamaxw(lr, 0.9, 0.999, 1e-8, weight_decay=wd))
    ref = _numpy_path(lr=lr_np, weight_decay=wd_np, beta1=0.9, beta2=0.999, epsilon=1e-8)
    diff = _max_diff(ours, ref)
    print(f"\nadamaxw with lr and wd schedules vs float64 NumPy: max abs diff {diff:.2e}")
    assert diff < 1e-5
    # The schedules matter here: constants at their initial values end elsewhere.
    const = _numpy_path(lr=0.05, weight_decay=0.2, beta1=0.9, beta2=0.999, epsilon=1e-8)
    assert _max_diff(const, ref) > 1e-2


def test_adamaxw_weight_decay_schedule_with_inject_hyperparams():
    opt = optax.inject_hyperparams(ax.adamaxw)(learning_rate=0.02, weight_decay=0.1)
    ours, _ = _run(opt, steps=50)
    ref, _ = _run(ax.adamaxw(0.02, weight_decay=0.1), steps=50)
    assert _max_diff(ours, ref) < 1e-6


# --------------------------------------------------------------------------- lazy rows

VOCAB, DIM = 10, 4


def _touched_rows(t: int) -> np.ndarray:
    """Rows of the table that appear in the batch at step t (1-based)."""
    rows = np.zeros(VOCAB, bool)
    rows[[t % 3, 3 + t % 2, 5]] = True  # rows 0-5 come and go; row 5 is in every batch
    if t % 7 == 0:
        rows[6] = True  # a rare token
    return rows  # rows 7-9 never appear


def _embedding_grads(steps: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    g = rng.normal(size=(steps, VOCAB, DIM)).astype(np.float32)
    g[:, 5, 0] = 0.0  # a touched row may still have zero elements
    for t in range(1, steps + 1):
        g[t - 1, ~_touched_rows(t)] = 0.0
    return g


def _lazy_numpy(table0, grads, lr, b1, b2, eps):
    """TensorFlow's sparse Adamax: only rows in the batch update; t is the global step."""
    p = table0.astype(np.float64)
    m = np.zeros_like(p)
    u = np.zeros_like(p)
    for t in range(1, grads.shape[0] + 1):
        p, m, u = adamax_update(p, grads[t - 1], m, u, t, lr, b1, b2, eps, rows=_touched_rows(t))
    return p, m, u


def _run_table(opt, table0, grads):
    def body(carry, g):
        p, s = carry
        updates, s = opt.update(g, s, p)
        return (optax.apply_updates(p, updates), s), None

    p0 = jnp.asarray(table0)
    (p, s), _ = jax.jit(lambda p, g: jax.lax.scan(body, (p, opt.init(p)), g))(p0, grads)
    return np.asarray(p), s


def test_lazy_rows_matches_sparse_numpy_reference_on_embedding_table():
    steps, lr, b1, b2, eps = 60, 0.01, 0.9, 0.95, 1e-8
    table0 = np.random.default_rng(0).normal(size=(VOCAB, DIM)).astype(np.float32)
    grads = _embedding_grads(steps)
    ours, state = _run_table(ax.adamax(lr, b1, b2, eps, lazy_rows=True), table0, grads)
    ref_p, ref_m, ref_u = _lazy_numpy(table0, grads, lr, b1, b2, eps)
    adamax_state = state[0]
    np.testing.assert_allclose(ours, ref_p, rtol=0, atol=1e-5)
    np.testing.assert_allclose(adamax_state.m, ref_m, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(adamax_state.u, ref_u, rtol=1e-5, atol=1e-7)
    # Rows never in a batch keep their value and zero moments, bit for bit.
    np.testing.assert_array_equal(ours[7:], table0[7:])
    np.testing.assert_array_equal(np.asarray(adamax_state.m)[7:], 0.0)
    np.testing.assert_array_equal(np.asarray(adamax_state.u)[7:], 0.0)
    # Dense Adamax is different here: absent rows keep moving on momentum.
    dense, _ = _run_table(ax.adamax(lr, b1, b2, eps), table0, grads)
    assert np.max(np.abs(dense[:7] - ours[:7])) > 1e-3


def test_lazy_rows_untouched_row_keeps_state_exactly_for_one_step():
    opt = ax.scale_by_adamax(lazy_rows=True)
    update = jax.jit(opt.update)
    table = jnp.ones((3, 2))
    _, state = update(jnp.array([[1.0, -2.0], [0.5, 0.0], [3.0, 1.0]]), opt.init(table))
    g = jnp.array([[0.0, 0.0], [0.0, 0.25], [0.0, 0.0]])  # only row 1 appears
    updates, new = update(g, state)
    for moment in ("m", "u"):
        before, after = np.asarray(getattr(state, moment)), np.asarray(getattr(new, moment))
        np.testing.assert_array_equal(after[[0, 2]], before[[0, 2]])
        assert np.all(after[1] != before[1])  # both elements of a touched row update
    np.testing.assert_array_equal(np.asarray(updates)[[0, 2]], 0.0)
    # The touched row matches a dense step on that row alone (same global count).
    dense = ax.scale_by_adamax()
    row_state = ax.AdamaxState(count=state.count, m=state.m[1], u=state.u[1])
    row_update, _ = jax.jit(dense.update)(g[1], row_state)
    np.testing.assert_allclose(np.asarray(updates)[1], row_update, rtol=1e-6)


def test_lazy_rows_on_a_vector_is_per_element():
    opt = ax.scale_by_adamax(lazy_rows=True)
    update = jax.jit(opt.update)
    _, state = update(jnp.array([1.0, 2.0, 3.0]), opt.init(jnp.zeros(3)))
    updates, new = update(jnp.array([0.0, -1.0, 0.0]), state)
    np.testing.assert_array_equal(np.asarray(new.u)[[0, 2]], np.asarray(state.u)[[0, 2]])
    np.testing.assert_array_equal(np.asarray(updates)[[0, 2]], 0.0)
    assert float(updates[1]) != 0.0
