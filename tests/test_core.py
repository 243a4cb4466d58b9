"""scale_by_adamax / adamax against the float64 NumPy reference and measured facts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax
from tests._reference import adamax_trajectory, adamax_update


def _run(opt, params, grad_fn, steps):
    """Jitted trajectory of ``opt`` from ``params``; returns stacked params per step."""

    def body(carry, _):
        p, s = carry
        updates, s = opt.update(grad_fn(p), s, p)
        p = optax.apply_updates(p, updates)
        return (p, s), p

    (_, state), path = jax.jit(lambda p: jax.lax.scan(body, (p, opt.init(p)), None, steps))(params)
    return path, state


def _tree_grad(p):
    # State-dependent gradients on a multi-leaf tree, spanning several magnitudes.
    return {
        "w": jnp.sin(3.0 * p["w"]) + 0.5 * p["w"],
        "b": 1e-3 * (p["b"] - 2.0),
        "s": 50.0 * jnp.tanh(p["s"] ** 3),
    }


def _tree_grad_np(flat):
    # The same gradient on the reference's flat float64 vector [w (6), b (3), s (1)].
    w, b, s = flat[:6], flat[6:9], flat[9:]
    return np.concatenate([np.sin(3.0 * w) + 0.5 * w, 1e-3 * (b - 2.0), 50.0 * np.tanh(s**3)])


_P0 = {
    "w": jnp.linspace(-1.5, 2.0, 6, dtype=jnp.float32).reshape(2, 3),
    "b": jnp.array([0.5, -1.0, 3.0], jnp.float32),
    "s": jnp.array([0.8], jnp.float32),
}


def _flat(tree):
    return np.concatenate([np.ravel(tree["w"]), np.ravel(tree["b"]), np.ravel(tree["s"])])


def test_deep_ml_example():
    # deep-ml #148: params 1.0, grad 0.1, t = 1 -> param 0.998, m 0.01, u 0.1.
    opt = ax.adamax()
    params = jnp.array([1.0])
    state = opt.init(params)
    updates, state = opt.update(jnp.array([0.1]), state, params)
    inner = state[0]
    new_params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new_params, [0.998], rtol=1e-6)
    np.testing.assert_allclose(inner.m, [0.01], rtol=1e-6)
    np.testing.assert_allclose(inner.u, [0.1], rtol=1e-6)
    assert inner.count == 1 and inner.count.dtype == jnp.int32
    # And the reference step to a few float32 ulps, not just its rounded values.
    ref_p, ref_m, ref_u = adamax_update(
        np.array([1.0]), np.array([0.1]), np.zeros(1), np.zeros(1), 1
    )
    np.testing.assert_allclose(new_params, ref_p, rtol=4e-7)
    np.testing.assert_allclose(inner.m, ref_m, rtol=4e-7)
    np.testing.assert_allclose(inner.u, ref_u, rtol=4e-7)


@pytest.mark.parametrize("eps_placement", ["denominator", "max"])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_multi_leaf_trajectory_matches_numpy_reference(eps_placement, bias_correction):
    kw = dict(eps_placement=eps_placement, bias_correction=bias_correction)
    opt = ax.adamax(learning_rate=0.01, **kw)
    path, state = _run(opt, _P0, _tree_grad, 300)
    ref_path, ref_m, ref_u = adamax_trajectory(_flat(_P0), _tree_grad_np, 300, lr=0.01, **kw)
    ours = np.stack([_flat(jax.tree.map(lambda x, i=i: x[i], path)) for i in range(300)])
    dev = np.max(np.abs(ours - ref_path))
    print(f"max |adamax_jax - numpy float64| over 300 steps ({eps_placement}): {dev:.2e}")
    # float32 round-off accumulated over 300 steps of size <= 0.01.
    assert dev < 2e-5
    # m of converged elements is a cancellation residual: compare on the gradients' scale (~1).
    np.testing.assert_allclose(_flat(state[0].m), ref_m, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(_flat(state[0].u), ref_u, rtol=1e-5, atol=1e-9)


def test_eps_in_max_matches_optax_adamax():
    ours, state = _run(ax.adamax(0.01, eps_placement="max"), _P0, _tree_grad, 500)
    theirs, ostate = _run(optax.adamax(0.01), _P0, _tree_grad, 500)
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), ours, theirs)
    dev = max(jax.tree.leaves(diffs))
    print(f"max |adamax_jax(eps_placement='max') - optax.adamax| over 500 steps: {dev:.2e}")
    assert dev < 1e-5
    for ours_u, optax_nu in zip(
        jax.tree.leaves(state[0].u), jax.tree.leaves(ostate[0].nu), strict=True
    ):
        np.testing.assert_allclose(ours_u, optax_nu, rtol=1e-5, atol=1e-8)


def test_seed_problem_cubic_reaches_local_minimum():
    # neuralthreads: f(x) = x - x**3 from x = -1, lr 0.01, 1000 steps -> -1/sqrt(3).
    fdash = lambda x: 1.0 - 3.0 * x**2
    path, _ = _run(ax.adamax(0.01), jnp.array(-1.0), fdash, 1000)
    assert abs(float(path[-1]) + 1.0 / np.sqrt(3.0)) < 1e-2
    ref, _, _ = adamax_trajectory(np.array(-1.0), fdash, 1000, lr=0.01)
    np.testing.assert_allclose(np.asarray(path), ref, atol=1e-4)


def test_seed_problem_quadratic_reaches_minimum():
    # 2x^2 + 2xy + 2y^2 - 6x from (1, 0) -> (2, -1).
    grad = lambda p: jnp.stack([4 * p[0] + 2 * p[1] - 6, 2 * p[0] + 4 * p[1]])
    path, _ = _run(ax.adamax(0.01), jnp.array([1.0, 0.0]), grad, 1000)
    np.testing.assert_allclose(path[-1], [2.0, -1.0], atol=2e-2)


def test_tiny_gradients_first_step_per_convention():
    # REFERENCE.md: g = [1e-6, 1e-7, 1e-8], lr 0.002, first step, update x 1e3.
    g = jnp.array([1e-6, 1e-7, 1e-8])
    for eps, placement, expected in [
        (1e-8, "max", [-1.980, -1.818, -1.000]),
        (1e-7, "denominator", [-1.818, -1.000, -0.182]),  # Keras's epsilon
        (0.0, "denominator", [-2.0, -2.0, -2.0]),  # the paper
    ]:
        opt = ax.adamax(0.002, eps=eps, eps_placement=placement)
        updates, _ = opt.update(g, opt.init(jnp.zeros(3)))
        np.testing.assert_allclose(np.asarray(updates) * 1e3, expected, atol=1e-3)


@pytest.mark.parametrize(
    ("placement", "eps", "expected"),
    [("max", 1e-8, -14055.6), ("denominator", 1e-7, -1781.6)],  # optax's and Keras's settings
)
def test_eps_acts_as_a_floor_only_inside_the_max(placement, eps, expected):
    # REFERENCE.md: betas (0.9, 0.5), g = 1 then 300 zeros, lr 2e-3.
    grads = jnp.concatenate([jnp.ones(1), jnp.zeros(300)])
    opt = ax.adamax(2e-3, b1=0.9, b2=0.5, eps=eps, eps_placement=placement)

    def step(carry, g):
        theta, state = carry
        updates, state = opt.update(g, state)
        return (theta + updates, state), None

    with jax.enable_x64(True):
        theta = jnp.zeros((), jnp.float64)
        run = jax.jit(lambda theta, gs: jax.lax.scan(step, (theta, opt.init(theta)), gs)[0][0])
        theta = run(theta, grads.astype(jnp.float64))
        assert theta.dtype == jnp.float64
    np.testing.assert_allclose(float(theta), expected, rtol=0, atol=0.05)  # quoted to 0.1


@pytest.mark.parametrize("placement", ["denominator", "max"])
def test_zero_first_gradient_gives_zero_step(placement):
    opt = ax.adamax(eps_placement=placement)
    updates, state = opt.update(jnp.zeros(3), opt.init(jnp.ones(3)))
    np.testing.assert_array_equal(updates, 0.0)
    # Like Keras/TF u stays 0 with eps in the denominator; like optax/torch it is eps in the max.
    np.testing.assert_allclose(state[0].u, 0.0 if placement == "denominator" else 1e-8)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "make",
    [
        lambda: ax.adamax(eps=0.0),
        lambda: ax.adamax(eps=1e-50),  # positive, but 0 in float32
        # Positive float32 subnormals, which compiled code flushes to zero.
        lambda: ax.adamax(eps=1e-40),
        lambda: ax.compat.torch_adamax(lr=1e-3, eps=1e-40),
        lambda: ax.adamax(eps=1e-40, eps_placement="max"),
        lambda: optax.inject_hyperparams(ax.adamax)(learning_rate=1e-3, eps=0.0),  # traced
    ],
    ids=[
        "zero",
        "zero-in-float32",
        "subnormal",
        "torch-subnormal",
        "subnormal-max",
        "injected-zero",
    ],
)
def test_zero_denominator_gives_zero_step_not_nan(make, jit):
    opt = make()
    update = jax.jit(opt.update) if jit else opt.update
    params = jnp.ones(4)
    state = opt.init(params)
    for g in [jnp.zeros(4), jnp.array([0.0, 1.0, 0.0, -2.0])]:
        updates, state = update(g, state)
        assert bool(jnp.all(jnp.isfinite(updates)))
    np.testing.assert_array_equal(updates[jnp.array([0, 2])], 0.0)


@pytest.mark.parametrize("kwargs", [{"lazy_rows": True}, {"skip_nonfinite": True}])
def test_kept_elements_with_no_gradient_yet_take_no_step(kwargs):
    """eps in the max: an element kept since init has u = 0, its denominator zero."""
    opt = ax.adamax(eps_placement="max", **kwargs)
    state = opt.init(jnp.ones((2, 3)))
    g = jnp.array([[0.0, 0.0, 0.0], [1.0, jnp.nan, 2.0]])
    g = g if kwargs.get("skip_nonfinite") else jnp.nan_to_num(g)
    updates, _ = jax.jit(opt.update)(g, state)
    assert bool(jnp.all(jnp.isfinite(updates)))
    np.testing.assert_array_equal(updates[0], 0.0)


def test_float16_zero_gradient_is_finite():
    # eps = 1e-8 rounds to 0 in float16; the step is computed in float32.
    opt = ax.adamax()
    params = jnp.ones(3, jnp.float16)
    state = opt.init(params)
    update = jax.jit(opt.update)
    updates, state = update(jnp.zeros(3, jnp.float16), state)
    assert updates.dtype == jnp.float16
    np.testing.assert_array_equal(updates, 0.0)
    updates, state = update(jnp.array([1e-4, 0.0, -3.0], jnp.float16), state)
    assert bool(jnp.all(jnp.isfinite(updates)))
    assert state[0].m.dtype == state[0].u.dtype == jnp.float16


def test_counter_saturates_at_int32_max():
    opt = ax.scale_by_adamax()
    imax = np.iinfo(np.int32).max
    state = opt.init(jnp.ones(2))._replace(count=jnp.array(imax - 1, jnp.int32))
    update = jax.jit(opt.update)
    for _ in range(3):
        updates, state = update(jnp.ones(2), state)
        assert bool(jnp.all(jnp.isfinite(updates)))
    assert int(state.count) == imax


def test_state_dtypes_follow_params_and_options():
    params = {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(2, jnp.float32)}
    state = ax.scale_by_adamax().init(params)
    assert state.m["a"].dtype == state.u["a"].dtype == jnp.bfloat16
    assert state.m["b"].dtype == jnp.float32
    # bf16 params with float32 gradients must not turn the state into float32.
    grads = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.float32), params)
    _, new = ax.scale_by_adamax().update(grads, state)
    assert jax.tree.map(lambda x: x.dtype, new) == jax.tree.map(lambda x: x.dtype, state)
    state = ax.scale_by_adamax(m_dtype=jnp.float32, u_dtype="float32").init(params)
    assert state.m["a"].dtype == state.u["a"].dtype == jnp.float32


def test_complex_parameters_use_the_modulus():
    opt = ax.adamax(0.01)
    params = jnp.array([1.0 + 1.0j, -2.0j], jnp.complex64)
    state = opt.init(params)
    assert state[0].m.dtype == jnp.complex64 and state[0].u.dtype == jnp.float32
    g = jnp.array([3.0 + 4.0j, 0.5j], jnp.complex64)
    updates, state = opt.update(g, state)
    # First step: update = -lr * g / (|g| + eps).
    expected = -0.01 * np.asarray(g) / (np.abs(np.asarray(g)) + 1e-8)
    np.testing.assert_allclose(updates, expected, rtol=1e-6)
    np.testing.assert_allclose(state[0].u, [5.0, 0.5], rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(b1=1.0), "b1"),
        (dict(b1=-0.1), "b1"),
        (dict(b2=1.5), "b2"),
        (dict(b2=float("nan")), "b2"),
        (dict(eps=-1e-8), "eps"),
        (dict(eps=float("inf")), "eps"),
        (dict(eps_placement="inside"), "eps_placement"),
    ],
)
def test_bad_hyperparameters_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ax.scale_by_adamax(**kwargs)
    with pytest.raises(ValueError, match=name):
        ax.adamax(**kwargs)


def test_bad_learning_rate_and_dtypes():
    with pytest.raises(ValueError, match="learning_rate"):
        ax.adamax(learning_rate=float("nan"))
    with pytest.raises(TypeError, match="m_dtype"):
        ax.adamax(m_dtype=jnp.int8)


def test_integer_parameters_raise_type_error_at_init():
    opt = ax.adamax()
    with pytest.raises(TypeError, match=r"\['step'\].*int32"):
        opt.init({"w": jnp.ones(2), "step": jnp.array(0, jnp.int32)})
    with pytest.raises(TypeError, match="bool"):
        opt.init(jnp.array([True, False]))


def test_negative_learning_rate_ascends():
    opt = ax.adamax(-0.1)
    updates, _ = opt.update(jnp.array([1.0]), opt.init(jnp.zeros(1)))
    assert float(updates[0]) > 0


@pytest.mark.parametrize("state", [{}, {"state_bits": 8}, {"lazy_rows": "catch_up"}])
def test_narrower_gradients_get_updates_in_the_parameters_dtype(state):
    # float16 gradients of float32 parameters: a float16 update would round a step
    # of lr 1e-8 to zero (1e-6: to within 6%). optax promotes with its float32 state.
    opt = ax.adamax(1e-8, **state)
    params = jnp.ones((64, 64))
    updates, _ = jax.jit(opt.update)(jnp.ones((64, 64), jnp.float16), opt.init(params), params)
    assert updates.dtype == jnp.float32
    np.testing.assert_allclose(updates, -1e-8, rtol=1e-6)
    # Gradients of the parameters' own dtype keep it, whatever the state's dtype
    # (optax.apply_if_finite needs that).
    opt = ax.adamax(1e-3, m_dtype="float32", u_dtype="float32", **state)
    params16 = jnp.ones((64, 64), jnp.bfloat16)
    updates, _ = opt.update(jnp.ones((64, 64), jnp.bfloat16), opt.init(params16), params16)
    assert updates.dtype == jnp.bfloat16
