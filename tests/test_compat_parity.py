"""adamax_jax.compat against the real PyTorch, Keras and MLX optimizers and the paper.

Every framework gets the same state-dependent gradients: a NumPy float32 function
of that framework's own current parameters (a multi-leaf, nonconvex loss with a
tiny-gradient leaf where epsilon matters and a leaf whose gradient is exactly zero
on part of it). Each trajectory is compared over all of its steps with the
trajectory of the matching compat constructor. Run with ``-s`` to see the
measured maximum differences (the README's parity table).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax
from adamax_jax import compat
from tests import _frameworks
from tests._frameworks import require
from tests._reference import adamax_update

STEPS = 300
TOL = 1e-4

Tree = dict[str, np.ndarray]


def _p0(dtype=np.float32) -> Tree:
    return {
        "w": np.linspace(-1.2, 1.5, 12).reshape(3, 4).astype(dtype),
        "b": np.array([0.3, -0.7, 1.1, 0.05], dtype),
        "s": np.linspace(-2.0, 2.0, 5).astype(dtype),
        "z": np.array([-0.5, -0.1, 0.1, 0.4, 0.8, 1.2], dtype),
    }


def _grad(p: Tree) -> Tree:
    """Gradient of a nonconvex loss at ``p``, in the dtype of ``p``."""
    w, b, s, z = p["w"], p["b"], p["s"], p["z"]
    sech2 = 1.0 - np.tanh(w @ b) ** 2
    zp = np.maximum(z, 0)
    return {
        "w": np.outer(sech2, b) + 0.1 * w + 0.3 * np.cos(3.0 * w),
        "b": w.T @ sech2 - 2.0 * np.sin(2.0 * b),
        # Gradients around 1e-6, where eps = 1e-8 or 1e-7 changes the step by 1-10%.
        "s": 1e-6 * (np.sin(5.0 * s) + 0.2 * s),
        # Exactly zero where z <= 0 (continuous at 0): u stays 0 there without decay.
        "z": 4.0 * zp**2 * (z - 0.4),
    }


def _max_diff(a: list[Tree], b: list[Tree]) -> float:
    assert len(a) == len(b) == STEPS
    return max(
        float(np.max(np.abs(np.asarray(x[k], np.float64) - np.asarray(y[k], np.float64))))
        for x, y in zip(a, b, strict=True)
        for k in x
    )


def _report(name: str, diff: float) -> None:
    print(f"\nparity {name}: max abs diff over {STEPS} steps = {diff:.2e}")
    assert diff < TOL, f"{name}: trajectories differ by {diff:.3e} (tolerance {TOL})"


def _run_jax(opt: optax.GradientTransformation, p0: Tree | None = None) -> list[Tree]:
    params = jax.tree.map(jnp.asarray, _p0() if p0 is None else p0)
    state = opt.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    out = []
    for _ in range(STEPS):
        grads = _grad(jax.tree.map(np.asarray, params))
        params, state = step(params, state, grads)
        out.append(jax.tree.map(np.asarray, params))
    return out


# --------------------------------------------------------------------------- torch


def _run_torch(make: Callable, schedule_gamma: float | None = None) -> list[Tree]:
    torch = require("torch")
    tensors = {k: torch.from_numpy(v.copy()) for k, v in _p0().items()}
    opt = make(torch, list(tensors.values()))
    sched = (
        None
        if schedule_gamma is None
        else torch.optim.lr_scheduler.ExponentialLR(opt, gamma=schedule_gamma)
    )
    out = []
    for _ in range(STEPS):
        grads = _grad({k: t.numpy() for k, t in tensors.items()})
        for k, t in tensors.items():
            t.grad = torch.from_numpy(grads[k])
        opt.step()
        if sched is not None:
            sched.step()
        out.append({k: t.numpy().copy() for k, t in tensors.items()})
    return out


TORCH_CASES = {
    "defaults": ({}, {}),
    "weight_decay": ({"lr": 0.01, "weight_decay": 0.05}, {"lr": 0.01, "weight_decay": 0.05}),
    "maximize": ({"lr": 0.01, "maximize": True}, {"lr": 0.01, "maximize": True}),
    "maximize+weight_decay+betas+eps": (
        {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-3, "weight_decay": 0.05, "maximize": True},
        {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-3, "weight_decay": 0.05, "maximize": True},
    ),
    "foreach": (
        {"lr": 0.01, "weight_decay": 0.05, "foreach": True},
        {"lr": 0.01, "weight_decay": 0.05},
    ),
}


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_torch_adamax_matches_torch(case):
    torch_kw, ours_kw = TORCH_CASES[case]
    ref = _run_torch(lambda torch, ps: torch.optim.Adamax(ps, **torch_kw))
    ours = _run_jax(compat.torch_adamax(**ours_kw))
    _report(f"torch {case}", _max_diff(ours, ref))


def test_torch_adamax_matches_torch_lr_scheduler():
    gamma = 0.99
    ref = _run_torch(
        lambda torch, ps: torch.optim.Adamax(ps, lr=0.02, weight_decay=0.01), schedule_gamma=gamma
    )
    lr = optax.exponential_decay(0.02, transition_steps=1, decay_rate=gamma)
    ours = _run_jax(compat.torch_adamax(lr=lr, weight_decay=0.01))
    _report("torch ExponentialLR", _max_diff(ours, ref))


def test_torch_adamax_matches_torch_on_complex_parameters():
    torch = require("torch")
    rng = np.random.default_rng(0)
    c0 = (rng.normal(size=6) + 1j * rng.normal(size=6)).astype(np.complex64)
    r0 = rng.normal(size=3).astype(np.float32)
    target = np.complex64(0.5 - 1.5j)

    def grads(c, r):
        # PyTorch's convention for the gradient of a real loss of a complex parameter.
        gc = (c - target) * (1.0 + 0.5 * np.sin(np.abs(c))) + 1e-6j * np.cos(c.real)
        return gc.astype(np.complex64), np.sin(3.0 * r) + r

    kw = {"lr": 0.01, "weight_decay": 0.02}
    tc, tr = torch.from_numpy(c0.copy()), torch.from_numpy(r0.copy())
    opt = torch.optim.Adamax([tc, tr], **kw)
    params = {"c": jnp.asarray(c0), "r": jnp.asarray(r0)}
    tx = compat.torch_adamax(**kw)
    state = tx.init(params)

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    diff = 0.0
    for _ in range(STEPS):
        tc.grad, tr.grad = (torch.from_numpy(g) for g in grads(tc.numpy(), tr.numpy()))
        opt.step()
        gc, gr = grads(np.asarray(params["c"]), np.asarray(params["r"]))
        params, state = step(params, state, {"c": gc, "r": gr})
        assert params["c"].dtype == jnp.complex64
        diff = max(
            diff,
            float(np.max(np.abs(np.asarray(params["c"]) - tc.numpy()))),
            float(np.max(np.abs(np.asarray(params["r"]) - tr.numpy()))),
        )
    _report("torch complex64", diff)


# --------------------------------------------------------------------------- keras


def _run_keras(make: Callable) -> list[Tree]:
    keras = require("keras")
    keys = sorted(_p0())
    variables = [keras.Variable(_p0()[k]) for k in keys]
    opt = make(keras)
    opt.build(variables)
    # Keras's own pure step for the JAX backend, as its trainer runs it under jit.
    step = jax.jit(opt.stateless_apply)
    opt_vars = [v.value for v in opt.variables]
    values = [v.value for v in variables]
    out = []
    for _ in range(STEPS):
        g = _grad({k: np.asarray(v) for k, v in zip(keys, values, strict=True)})
        values, opt_vars = step(opt_vars, [g[k] for k in keys], values)
        out.append({k: np.asarray(v) for k, v in zip(keys, values, strict=True)})
    return out


KERAS_CASES = {
    "defaults": {},
    "weight_decay": {"learning_rate": 0.01, "weight_decay": 0.05},
    "betas+epsilon+weight_decay": {
        "learning_rate": 0.01,
        "beta_1": 0.8,
        "beta_2": 0.99,
        "epsilon": 1e-3,
        "weight_decay": 0.1,
    },
}


@pytest.mark.parametrize("case", list(KERAS_CASES))
def test_keras_adamax_matches_keras(case):
    kw = KERAS_CASES[case]
    ref = _run_keras(lambda keras: keras.optimizers.Adamax(**kw))
    ours = _run_jax(compat.keras_adamax(**kw))
    _report(f"keras {case}", _max_diff(ours, ref))


def test_keras_adamax_matches_keras_schedule_with_weight_decay():
    # Keras scales its decay by the scheduled learning rate too.
    def make(keras):
        lr = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=10, decay_rate=0.9)
        return keras.optimizers.Adamax(learning_rate=lr, weight_decay=0.05)

    ref = _run_keras(make)
    lr = optax.exponential_decay(0.02, transition_steps=10, decay_rate=0.9)
    ours = _run_jax(compat.keras_adamax(learning_rate=lr, weight_decay=0.05))
    _report("keras ExponentialDecay+weight_decay", _max_diff(ours, ref))


# --------------------------------------------------------------------------- mlx


def _run_mlx(make: Callable) -> list[Tree]:
    mx = require("mlx.core")
    optimizers = require("mlx.optimizers")
    params = {k: mx.array(v) for k, v in _p0().items()}
    opt = make(optimizers)
    out = []
    for _ in range(STEPS):
        g = _grad({k: np.array(v) for k, v in params.items()})
        params = opt.apply_gradients({k: mx.array(v) for k, v in g.items()}, params)
        out.append({k: np.array(v) for k, v in params.items()})
    return out


MLX_CASES = {
    "lr=0.01": {"learning_rate": 0.01},
    "betas+eps": {"learning_rate": 0.01, "betas": (0.8, 0.99), "eps": 1e-3},
}


@pytest.mark.parametrize("case", list(MLX_CASES))
def test_mlx_adamax_matches_mlx(case):
    kw = MLX_CASES[case]
    ref = _run_mlx(lambda o: o.Adamax(**{**kw, "betas": list(kw.get("betas", (0.9, 0.999)))}))
    ours = _run_jax(compat.mlx_adamax(**kw))
    _report(f"mlx {case}", _max_diff(ours, ref))


def test_mlx_adamax_matches_mlx_schedule():
    ref = _run_mlx(lambda o: o.Adamax(learning_rate=o.exponential_decay(0.02, 0.99)))
    lr = optax.exponential_decay(0.02, transition_steps=1, decay_rate=0.99)
    ours = _run_jax(compat.mlx_adamax(lr))
    _report("mlx exponential_decay", _max_diff(ours, ref))


# --------------------------------------------------------------------------- paper


def _run_paper_float64(alpha: float, beta1: float, beta2: float) -> list[Tree]:
    # Algorithm 2 in float64 NumPy: eps = 0, and 0/0 (u = 0) read as no step.
    p = _p0(np.float64)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    u = {k: np.zeros_like(v) for k, v in p.items()}
    out = []
    for t in range(1, STEPS + 1):
        g = _grad(p)
        for k in p:
            p[k], m[k], u[k] = adamax_update(
                p[k], g[k], m[k], u[k], t, lr=alpha, beta1=beta1, beta2=beta2, epsilon=0.0
            )
        out.append({k: v.copy() for k, v in p.items()})
    return out


@pytest.mark.parametrize(
    "kw", [{}, {"alpha": 0.01, "beta1": 0.8, "beta2": 0.99}], ids=["defaults", "custom"]
)
def test_paper_adamax_matches_float64_algorithm_2(kw):
    full = {"alpha": 0.002, "beta1": 0.9, "beta2": 0.999, **kw}
    ref = _run_paper_float64(**full)
    ours = _run_jax(compat.paper_adamax(**kw))
    # The z entries that start at or below 0 never see a gradient: u stays 0 and
    # they must not move (nor turn NaN).
    for snap in ours:
        np.testing.assert_array_equal(snap["z"][:2], _p0()["z"][:2])
    _report(f"paper {'custom' if kw else 'defaults'} (float32 vs float64)", _max_diff(ours, ref))


# --------------------------------------------------------------------------- contracts


def test_conventions_are_distinguishable_on_this_problem():
    # The parity problem must be able to tell the conventions apart, or the tests
    # above could pass with the wrong one.
    base = _run_jax(compat.torch_adamax(lr=0.01, weight_decay=0.05))
    others = {
        "eps in denominator": ax.adamax(0.01, eps_placement="denominator"),
        "decoupled decay": ax.adamaxw(0.01, weight_decay=0.05, eps_placement="max"),
        "no bias correction": optax.chain(
            optax.add_decayed_weights(0.05),
            ax.scale_by_adamax(eps_placement="max", bias_correction=False),
            optax.scale_by_learning_rate(0.01),
        ),
    }
    for name, opt in others.items():
        assert _max_diff(base, _run_jax(opt)) > 100 * TOL, name


def test_inject_hyperparams_traces_the_same_chain():
    opt = optax.inject_hyperparams(compat.torch_adamax)(lr=0.01, weight_decay=0.05)
    params = {"w": jnp.array([1.0, -2.0])}
    state = opt.init(params)
    step = jax.jit(opt.update)
    plain = compat.torch_adamax(lr=0.01, weight_decay=0.05)
    plain_state = plain.init(params)
    g = {"w": jnp.array([0.3, -0.1])}
    for _ in range(3):
        upd, state = step(g, state, params)
        ref, plain_state = plain.update(g, plain_state, params)
        np.testing.assert_allclose(upd["w"], ref["w"], rtol=1e-6)


def test_zero_weight_decay_needs_no_params():
    for opt in (compat.torch_adamax(), compat.keras_adamax(), compat.keras_adamax(weight_decay=0)):
        state = opt.init(jnp.ones(2))
        upd, _ = opt.update(jnp.ones(2), state)
        assert np.all(np.asarray(upd) < 0)
    opt = compat.torch_adamax(weight_decay=0.1)
    with pytest.raises(ValueError, match="params"):
        opt.update(jnp.ones(2), opt.init(jnp.ones(2)))


def test_init_under_eval_shape_with_complex_leaves():
    opt = compat.torch_adamax()
    shapes = {
        "c": jax.ShapeDtypeStruct((3,), jnp.complex64),
        "r": jax.ShapeDtypeStruct((2,), jnp.float32),
    }
    state = jax.eval_shape(opt.init, shapes)
    direct = opt.init(shapes)
    assert jax.tree.map(lambda s: (s.shape, s.dtype), state) == jax.tree.map(
        lambda s: (s.shape, s.dtype), direct
    )


@pytest.mark.parametrize(
    ("factory", "kwargs", "match"),
    [
        (compat.torch_adamax, {"lr": -0.1}, r"lr must lie in \[0.0, inf\]"),
        (compat.torch_adamax, {"betas": (1.0, 0.999)}, r"betas\[0\]"),
        (compat.torch_adamax, {"betas": (0.9, 1.0)}, r"betas\[1\]"),
        (compat.torch_adamax, {"betas": (0.9, 0.99, 0.9)}, "pair"),
        (compat.torch_adamax, {"eps": -1e-8}, "eps"),
        (compat.torch_adamax, {"weight_decay": -0.1}, "weight_decay"),
        (compat.torch_adamax, {"lr": float("nan")}, "lr"),
        (compat.keras_adamax, {"beta_1": 1.0}, "beta_1"),
        (compat.keras_adamax, {"beta_2": 1.5}, "beta_2"),
        (compat.keras_adamax, {"epsilon": -1.0}, "epsilon"),
        (compat.keras_adamax, {"weight_decay": -1e-4}, "weight_decay"),
        (compat.keras_adamax, {"learning_rate": float("inf")}, "learning_rate"),
        (compat.mlx_adamax, {"learning_rate": 0.1, "betas": (-0.1, 0.9)}, r"betas\[0\]"),
        (compat.mlx_adamax, {"learning_rate": 0.1, "eps": -1.0}, "eps"),
        (compat.mlx_adamax, {"learning_rate": float("nan")}, "learning_rate"),
        (compat.paper_adamax, {"beta1": 1.0}, "beta1"),
        (compat.paper_adamax, {"beta2": -0.5}, "beta2"),
        (compat.paper_adamax, {"alpha": float("nan")}, "alpha"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)


def test_bad_argument_types_raise_type_error():
    with pytest.raises(TypeError, match="betas must be a pair"):
        compat.torch_adamax(betas=0.9)
    with pytest.raises(TypeError, match="maximize"):
        compat.torch_adamax(maximize="yes")
    with pytest.raises(TypeError):
        compat.mlx_adamax()  # MLX has no default learning rate either


def test_require_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="parity"):
        _frameworks.require("adamax_jax_no_such_framework")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        _frameworks.require("adamax_jax_no_such_framework")
