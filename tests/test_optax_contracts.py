"""The contracts an optax transform must honour (see shared REFERENCE.md), for adamax_jax."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax

_PARAMS = {"w": jnp.arange(6.0).reshape(2, 3) / 5.0 - 0.4, "b": jnp.array([0.3, -0.7])}


def _grads(params, k=0):
    return jax.tree.map(lambda p: jnp.cos(p * (k + 1.0)) - 0.2 * p, params)


def _steps(opt, params, n, update=None):
    update = update or opt.update
    state = opt.init(params)
    for k in range(n):
        updates, state = update(_grads(params, k), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _assert_trees_close(a, b, **kw):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def test_jit_equals_eager():
    opt = ax.adamaxw(0.05, weight_decay=0.01)
    eager, s1 = _steps(opt, _PARAMS, 20)
    jitted, s2 = _steps(opt, _PARAMS, 20, update=jax.jit(opt.update))
    _assert_trees_close(eager, jitted, rtol=1e-6, atol=1e-7)
    _assert_trees_close(s1, s2, rtol=1e-6, atol=1e-7)


def test_vmap_over_a_batch_of_parameter_sets():
    opt = ax.adamax(0.05)
    batch = jax.tree.map(lambda p: jnp.stack([p, 2 * p, -p]), _PARAMS)
    state = jax.vmap(opt.init)(batch)
    assert state[0].count.shape == (3,)
    params = batch
    for k in range(10):
        updates, state = jax.vmap(opt.update)(
            jax.vmap(functools.partial(_grads, k=k))(params), state, params
        )
        params = optax.apply_updates(params, updates)
    for i in range(3):
        single, _ = _steps(opt, jax.tree.map(lambda p, i=i: p[i], batch), 10)
        _assert_trees_close(jax.tree.map(lambda p, i=i: p[i], params), single, rtol=1e-6)


def test_inject_hyperparams_equals_plain_and_vmaps_over_learning_rates():
    injected = optax.inject_hyperparams(ax.adamax)(learning_rate=0.05, b1=0.8, eps=1e-6)
    plain = ax.adamax(0.05, b1=0.8, eps=1e-6)
    a, _ = _steps(injected, _PARAMS, 10, update=jax.jit(injected.update))
    b, _ = _steps(plain, _PARAMS, 10)
    _assert_trees_close(a, b, rtol=1e-6, atol=1e-7)

    lrs = jnp.array([0.01, 0.05, 0.2])

    def train(lr):
        opt = optax.inject_hyperparams(ax.adamax)(learning_rate=lr)
        params, state = _PARAMS, opt.init(_PARAMS)
        for k in range(5):
            updates, state = opt.update(_grads(params, k), state, params)
            params = optax.apply_updates(params, updates)
        return params

    swept = jax.jit(jax.vmap(train))(lrs)
    for i, lr in enumerate([0.01, 0.05, 0.2]):
        ref, _ = _steps(ax.adamax(lr), _PARAMS, 5)
        _assert_trees_close(jax.tree.map(lambda p, i=i: p[i], swept), ref, rtol=1e-5, atol=1e-7)


def test_pmap_with_a_leading_device_axis_equals_one_device():
    n = jax.local_device_count()
    assert n == 8, "conftest.py sets 8 simulated CPU devices"
    opt = ax.adamax(0.05)
    data = jnp.linspace(-1.0, 1.0, n * 4).reshape(n, 4)

    def grad_fn(params, x):
        return jax.grad(lambda p: jnp.mean((p["w"].sum() * x + p["b"][0]) ** 2))(params)

    @functools.partial(jax.pmap, axis_name="d")
    def step(params, state, x):
        grads = jax.lax.pmean(grad_fn(params, x), "d")
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    rep = jax.tree.map(lambda p: jnp.broadcast_to(p, (n, *p.shape)), _PARAMS)
    state = jax.pmap(opt.init)(rep)
    assert state[0].count.shape == (n,)
    params = rep
    for _ in range(5):
        params, state = step(params, state, data)

    single, sstate = _PARAMS, opt.init(_PARAMS)
    for _ in range(5):
        updates, sstate = opt.update(grad_fn(single, data.reshape(-1)), sstate, single)
        single = optax.apply_updates(single, updates)
    _assert_trees_close(jax.tree.map(lambda p: p[3], params), single, rtol=1e-5, atol=1e-6)


def test_chain_with_clip_by_global_norm_matches_optax():
    ours = optax.chain(optax.clip_by_global_norm(0.5), ax.adamax(0.05, eps_placement="max"))
    theirs = optax.chain(optax.clip_by_global_norm(0.5), optax.adamax(0.05))
    _assert_trees_close(
        _steps(ours, _PARAMS, 30)[0], _steps(theirs, _PARAMS, 30)[0], rtol=1e-5, atol=1e-7
    )


def test_masked_applies_only_where_the_mask_is_true():
    opt = optax.masked(ax.adamax(0.05), {"w": True, "b": False})
    state = opt.init(_PARAMS)
    grads = _grads(_PARAMS)
    updates, _ = opt.update(grads, state, _PARAMS)
    np.testing.assert_array_equal(updates["b"], grads["b"])  # passed through untouched
    plain, _ = ax.adamax(0.05).update(grads["w"], ax.adamax(0.05).init(_PARAMS["w"]))
    np.testing.assert_allclose(updates["w"], plain, rtol=1e-6)


def test_multisteps_accumulates_then_steps_on_the_mean():
    opt = optax.MultiSteps(ax.adamax(0.05), every_k_schedule=3)
    state = opt.init(_PARAMS)
    gs = [_grads(_PARAMS, k) for k in range(3)]
    for k, g in enumerate(gs):
        updates, state = jax.jit(opt.update)(g, state, _PARAMS)
        if k < 2:
            assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(updates))
    mean = jax.tree.map(lambda *x: sum(x) / 3, *gs)
    expected, _ = ax.adamax(0.05).update(mean, ax.adamax(0.05).init(_PARAMS))
    _assert_trees_close(updates, expected, rtol=1e-5)


def test_apply_if_finite_skips_the_step_and_keeps_the_state():
    opt = optax.apply_if_finite(ax.adamax(0.05), max_consecutive_errors=5)
    state = opt.init(_PARAMS)
    updates, state = jax.jit(opt.update)(_grads(_PARAMS), state, _PARAMS)
    before = state
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _grads(_PARAMS))
    updates, state = jax.jit(opt.update)(bad, state, _PARAMS)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(updates))
    _assert_trees_close(state.inner_state, before.inner_state, rtol=0, atol=0)
    assert int(state.notfinite_count) == 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_state_dtypes_survive_lax_cond(dtype):
    with jax.enable_x64(dtype == "float64"):
        params = jax.tree.map(lambda p: p.astype(dtype), _PARAMS)
        opt = ax.adamax(0.05)
        state = opt.init(params)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), _grads(params))  # mixed dtypes

        @jax.jit
        def maybe_step(pred, state):
            return jax.lax.cond(pred, lambda s: opt.update(grads, s, params)[1], lambda s: s, state)

        new = maybe_step(True, state)
        dtypes = lambda t: jax.tree.map(lambda x: (x.dtype, x.shape), t)
        assert dtypes(new) == dtypes(state)
        assert new[0].m["w"].dtype == jnp.dtype(dtype)
        updates, _ = opt.update(jax.tree.map(lambda g: g.astype(dtype), grads), state, params)
        assert all(u.dtype == jnp.dtype(dtype) for u in jax.tree.leaves(updates))


def test_init_under_eval_shape_and_tree_map_params():
    opt = ax.adamax()
    shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), _PARAMS)
    abstract = jax.eval_shape(opt.init, shapes)
    assert abstract[0].m["w"].shape == (2, 3) and abstract[0].count.dtype == jnp.int32

    state = opt.init(_PARAMS)
    doubled = optax.tree_utils.tree_map_params(opt, lambda x: 2 * x + 1, state)
    np.testing.assert_array_equal(doubled[0].m["w"], 1.0)  # mapped: a moment
    assert int(doubled[0].count) == 0  # not a parameter-shaped leaf: left alone


def test_update_accepts_none_and_masked_nodes():
    params = {"a": jnp.ones(2), "frozen": None}
    opt = ax.adamax(0.1)
    updates, _ = opt.update({"a": jnp.ones(2), "frozen": None}, opt.init(params))
    assert updates["frozen"] is None
    masked = optax.MaskedNode()
    tree = {"a": jnp.ones(2), "m": masked}
    updates, _ = ax.scale_by_adamax().update(tree, ax.scale_by_adamax().init(tree))
    assert isinstance(updates["m"], optax.MaskedNode)


@pytest.mark.parametrize("factory", [ax.adamax, ax.adamaxw, ax.nadamax])
def test_every_constructor_works_under_inject_hyperparams(factory):
    # inject_hyperparams binds the factory's signature: no **kwargs may hide a keyword.
    injected = optax.inject_hyperparams(factory)(learning_rate=0.05)
    a, _ = _steps(injected, _PARAMS, 5, update=jax.jit(injected.update))
    b, _ = _steps(factory(0.05), _PARAMS, 5)
    _assert_trees_close(a, b, rtol=1e-6, atol=1e-7)


def test_inject_hyperparams_over_complex_parameters():
    # inject_hyperparams gives the hyperparameters the parameters' (complex) dtype.
    params = jnp.array([1.0 + 1.0j, -2.0j], jnp.complex64)
    grads = jnp.array([3.0 + 4.0j, 0.5j], jnp.complex64)
    injected = optax.inject_hyperparams(ax.adamax)(learning_rate=0.01)
    updates, _ = jax.jit(injected.update)(grads, injected.init(params), params)
    expected, _ = ax.adamax(0.01).update(grads, ax.adamax(0.01).init(params))
    np.testing.assert_allclose(updates, expected, rtol=1e-6)
