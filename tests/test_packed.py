"""ax.packed: the same optimizer, on small leaves packed into one buffer per dtype.

The reference for every equivalence test is the *unpacked* transform (adamax_jax's own,
checked against NumPy float64 in test_core.py, or optax's), run on the same gradients.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import adamax_jax as ax
from adamax_jax._packed import PackedTree

_MAX = 64  # packing threshold used throughout: leaves of <= 64 elements are packed


def _mixed_params():
    """Small and large leaves of several dtypes and ranks, in nested containers."""
    f32, bf16, f16 = jnp.float32, jnp.bfloat16, jnp.float16

    def lin(n, dtype, lo=-1.0, hi=1.0, shape=None):
        return jnp.linspace(lo, hi, n, dtype=jnp.float32).reshape(shape or (n,)).astype(dtype)

    return {
        "big": lin(300, f32, shape=(20, 15)),  # large
        "edge": lin(_MAX, f32, -2.0, 0.5),  # exactly max_leaf_size: packed
        "over": lin(_MAX + 1, f32, 0.1, 3.0),  # one more: large
        "layers": [
            {"w": lin(48, f32, shape=(6, 8)), "b": lin(8, f32, 0.0, 0.3)},
            {"w": lin(48, f32, 0.5, -0.5, (6, 8)), "b": lin(8, f32, -0.3, 0.0)},
        ],
        "scalar": jnp.asarray(0.7, f32),
        "empty": jnp.zeros((0, 3), f32),
        "half": {"s": lin(10, bf16, -1.0, 2.0), "big": lin(200, bf16, shape=(10, 20))},
        "f16": lin(5, f16, 0.2, 0.9),
    }


def _small_params():
    """A lighter tree for the wrapper-composition tests (threshold 16 in those tests)."""
    return {
        "w": jnp.linspace(-1.0, 1.0, 30, dtype=jnp.float32).reshape(6, 5),  # large
        "b": jnp.linspace(0.0, 0.4, 5, dtype=jnp.float32),
        "c": jnp.linspace(-0.5, 0.5, 6, dtype=jnp.float32).reshape(3, 2),
        "h": jnp.linspace(1.0, 2.0, 4, dtype=jnp.float32).astype(jnp.bfloat16),
        "s": jnp.asarray(0.7, jnp.float32),
    }


_SMALL_MAX = 16


def _grad(p, k):
    """Gradients for step ``k``, shaped like ``p`` but not a function of its values.

    Independent of the parameters on purpose: narrow-float state is rounded with a
    dither that packing reshuffles (see _assert_trees_close), and a gradient that fed
    the parameters back would amplify those last-bit differences over many steps.
    """
    return jax.tree.map(
        lambda x: (
            jnp.sin(0.37 * k + 0.05 * jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape))
            * (1.0 + k % 3)
            * 10.0 ** (k % 4 - 2)
        ).astype(x.dtype),
        p,
    )


def _trajectory(opt, params, steps, with_params=True):
    """Final params and state after ``steps`` jitted steps (one compiled scan).

    The gradients are computed once, outside, so that both programs compared see
    bit-identical inputs.
    """
    grads = jax.tree.map(lambda *g: jnp.stack(g), *[_grad(params, k) for k in range(steps)])

    def body(carry, g):
        p, s = carry
        updates, s = opt.update(g, s, p if with_params else None)
        return (optax.apply_updates(p, updates), s), None

    return jax.jit(lambda p, gs: jax.lax.scan(body, (p, opt.init(p)), gs)[0])(params, grads)


def _assert_trees_close(a, b):
    """Equal up to round-off: float32 to a few ulps; float16/bfloat16 to 8 ulps.

    Narrow-float moments are stored with a dithered rounding keyed by the leaf's index
    and each element's position (see _storage.floats.write), and packing changes both, so
    leaves with bfloat16/float16 state may differ in the last stored bit each step.
    """
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        tol = 1e-6 if x.dtype == jnp.float32 else 8 * float(jnp.finfo(x.dtype).eps)
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=tol, atol=tol
        )


def _assert_same_avals(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert (jnp.shape(x), jnp.result_type(x)) == (jnp.shape(y), jnp.result_type(y))


# ----------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    "make", [lambda: ax.adamax(0.01), lambda: optax.adam(0.01)], ids=["adamax", "optax.adam"]
)
def test_packed_equals_unpacked_over_many_steps(make):
    params = _mixed_params()
    p_ref, _ = _trajectory(make(), params, 100)
    p_packed, _ = _trajectory(ax.packed(make(), max_leaf_size=_MAX), params, 100)
    # Elementwise maths on the same values: equal up to XLA's fusion choices.
    _assert_trees_close(p_packed, p_ref)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), p_ref, params)
    assert sum(jax.tree.leaves(moved)) == len(jax.tree.leaves(params)) - 1  # all but "empty"


def test_low_precision_state_step_by_step():
    # bfloat16 moments are stored with a dithered rounding keyed by leaf index and
    # element position, which packing changes: m and u may differ in their last stored
    # bit (2**-8 relative), a difference that decays over a few steps and, where m
    # nearly cancels, is an absolute error of about lr * 2**-8 in the update. So
    # compare step by step, to 4 bfloat16 ulps relative or absolute in lr units.
    params, lr = _small_params(), 0.01
    make = lambda: ax.adamax(lr, m_dtype=jnp.bfloat16, u_dtype=jnp.bfloat16)
    plain, packed = make(), ax.packed(make(), max_leaf_size=_SMALL_MAX)
    s_plain, s_packed = plain.init(params), packed.init(params)
    up_plain, up_packed = jax.jit(plain.update), jax.jit(packed.update)
    for k in range(15):
        g = _grad(params, k)
        u_plain, s_plain = up_plain(g, s_plain, params)
        u_packed, s_packed = up_packed(g, s_packed, params)
        for a, b in zip(jax.tree.leaves(u_packed), jax.tree.leaves(u_plain), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(
                np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=2**-6, atol=lr * 2**-6
            )
    assert s_packed[0].m.small["float32"].dtype == jnp.bfloat16
    assert s_packed[0].u.large[0].dtype == jnp.bfloat16


def _mixed_dtype_case():
    """Parameters of three dtypes, each with gradients of its own or of another dtype.

    bfloat16 parameters with float32 gradients (mixed-precision training), float32 ones
    with float32 and bfloat16 gradients, float16 ones with float16 and float32 ones: so
    one buffer (float16's) holds gradients of two dtypes. Threshold _SMALL_MAX.
    """
    lin = lambda n, lo, hi: jnp.linspace(lo, hi, n, dtype=jnp.float32)
    f32, bf16, f16 = jnp.float32, jnp.bfloat16, jnp.float16
    params = {  # name: (value, parameter dtype, gradient dtype)
        "bw": (lin(30, -1.0, 1.0).reshape(6, 5), bf16, f32),  # large
        "bb": (lin(5, 0.0, 0.4), bf16, f32),
        "bs": (jnp.asarray(0.7), bf16, f32),
        "fw": (lin(24, -0.5, 0.5).reshape(4, 6), f32, f32),  # large
        "fb": (lin(7, 0.1, 0.9), f32, f32),
        "fc": (lin(6, -0.3, 0.3).reshape(3, 2), f32, bf16),
        "h1": (lin(4, 1.0, 2.0), f16, f16),
        "h2": (lin(6, -2.0, -1.0).reshape(2, 3), f16, f32),
        "hw": (lin(20, 0.5, 1.5), f16, f32),  # large
    }
    values = {k: v.astype(p) for k, (v, p, _) in params.items()}
    grad_dtypes = {k: g for k, (_, _, g) in params.items()}

    def grads(k):
        # Computed in float32 from float32 copies, then cast: a float32 gradient of a
        # bfloat16 parameter carries more than bfloat16's 8 bits.
        g = _grad(jax.tree.map(lambda x: x.astype(jnp.float32), values), k)
        return {name: g[name].astype(grad_dtypes[name]) for name in g}

    return values, grads


# The small leaves whose gradients are narrower than another's in their buffer (fc: a
# bfloat16 gradient among float32 ones; h1: float16 among float32): packed, they are
# stepped in the wider dtype and cast back at the end.
_PROMOTED = ("fc", "h1")


def _state_leaves(tree, params, max_leaf_size):
    """The per-leaf pieces of a packed moment, cut out as PackedTree's docstring lays them out.

    An independent reading of the layout: large leaves in tree order; small ones raveled
    and concatenated in tree order into the buffer named after the parameter's dtype.
    """
    offsets, n_large, out = {}, 0, {}
    for name, p in zip(sorted(params), jax.tree.leaves(params), strict=True):
        if p.size > max_leaf_size:
            out[name] = tree.large[n_large]
            n_large += 1
        else:
            key = jnp.dtype(p.dtype).name
            start = offsets.get(key, 0)
            out[name] = tree.small[key][start : start + p.size].reshape(p.shape)
            offsets[key] = start + p.size
    return out


def _ulps(dtype):
    return float(jnp.finfo(dtype).eps)


@pytest.mark.parametrize("with_params", [True, False], ids=["params", "no-params"])
def test_gradients_of_other_float_dtypes_step_like_unpacked(with_params):
    # The reference is unpacked ax.adamax on the same inputs: it keeps each parameter's
    # dtype for its moments, computes in float32 and returns updates in each
    # gradient's dtype. Packed must give the same dtypes everywhere, and the same
    # values: exactly so in step 1, whose update comes from unrounded moments (but for
    # _PROMOTED's single rounding); after that, narrow-float moments carry a dither
    # keyed by element position, which packing moves (test_low_precision_state_...).
    params, grads = _mixed_dtype_case()
    lr = 0.01
    plain, packed = ax.adamax(lr), ax.packed(ax.adamax(lr), max_leaf_size=_SMALL_MAX)
    s_plain, s_packed = plain.init(params), packed.init(params)
    up_plain, up_packed = jax.jit(plain.update), jax.jit(packed.update)
    p_arg = params if with_params else None
    for k in range(6):
        g = grads(k)
        u_plain, s_plain = up_plain(g, s_plain, p_arg)
        u_packed, s_packed = up_packed(g, s_packed, p_arg)
        for name in params:
            a, b = u_packed[name], u_plain[name]
            # The gradient's dtype promoted with the parameter's, as optax's updates.
            assert a.dtype == b.dtype == jnp.promote_types(g[name].dtype, params[name].dtype), name
            if name in _PROMOTED:
                # Rounded to its dtype once, after the learning rate, where unpacked
                # rounds twice (after the core step, and after the learning rate).
                tol = dict(rtol=2 * _ulps(a.dtype), atol=0)
            elif k == 0 or params[name].dtype == jnp.float32:
                tol = dict(rtol=1e-6, atol=0) if a.dtype == jnp.float32 else dict(rtol=0, atol=0)
            else:
                tol = dict(rtol=2**-6, atol=lr * 2**-6)
            np.testing.assert_allclose(
                np.asarray(a, np.float64), np.asarray(b, np.float64), **tol, err_msg=name
            )
        for moment in ("m", "u"):
            got = _state_leaves(getattr(s_packed[0], moment), params, _SMALL_MAX)
            want = getattr(s_plain[0], moment)
            for name in params:
                a, b = got[name], want[name]
                assert a.dtype == b.dtype == params[name].dtype, (moment, name)
                # Two roundings of one value to a neighbouring stored number: 1 ulp
                # after step 1; the dither's difference then decays, a few ulps.
                ulps = 1 if k == 0 else 4
                tol = 1e-6 if a.dtype == jnp.float32 else ulps * _ulps(a.dtype)
                np.testing.assert_allclose(
                    np.asarray(a, np.float64),
                    np.asarray(b, np.float64),
                    rtol=tol,
                    atol=tol * float(jnp.max(jnp.abs(b.astype(jnp.float32)))),
                    err_msg=f"{moment} {name} step {k + 1}",
                )
    assert int(s_packed[0].count) == int(s_plain[0].count) == 6


def test_float32_gradients_of_bfloat16_parameters_in_optax_adam_and_stateless_transforms():
    # Other transforms: optax.adam (state made bf16 by init, promoted by its update,
    # as unpacked) and stateless ones, where no packed tree in the state records the
    # layout and the parameters (or, without them, the gradients) give it.
    params, grads = _mixed_dtype_case()
    params = {k: v for k, v in params.items() if k in ("bw", "bb", "bs", "fw", "fb", "h1")}
    g0, g1 = ({k: v for k, v in grads(i).items() if k in params} for i in (0, 1))
    makes = {
        "adam": lambda: optax.adam(0.01),
        "decay": lambda: optax.chain(optax.add_decayed_weights(0.1), optax.scale(-0.5)),
        "scale": lambda: optax.scale(-0.5),
    }
    for name, make in makes.items():
        for p_arg in [params, None] if name != "decay" else [params]:
            plain, packed = make(), ax.packed(make(), max_leaf_size=_SMALL_MAX)
            s_plain, s_packed = plain.init(params), packed.init(params)
            for g in (g0, g1):
                u_plain, s_plain = plain.update(g, s_plain, p_arg)
                u_packed, s_packed = packed.update(g, s_packed, p_arg)
                for leaf in params:
                    a, b = u_packed[leaf], u_plain[leaf]
                    assert a.dtype == b.dtype, (name, leaf)
                    np.testing.assert_allclose(
                        np.asarray(a, np.float64),
                        np.asarray(b, np.float64),
                        rtol=1e-6,
                        err_msg=f"{name} {leaf}",
                    )


def test_adamaxw_gets_packed_params_and_masks_go_outside():
    params = _small_params()
    p_ref, _ = _trajectory(ax.adamaxw(0.02, weight_decay=0.3), params, 20)
    packed = ax.packed(ax.adamaxw(0.02, weight_decay=0.3), max_leaf_size=_SMALL_MAX)
    _assert_trees_close(_trajectory(packed, params, 20)[0], p_ref)

    # The documented recipe for a per-parameter mask: the decay chained after packed().
    mask = jax.tree.map(lambda p: p.ndim >= 1 and p.size > 4, params)
    recipe = optax.chain(
        ax.packed(ax.scale_by_adamax(), max_leaf_size=_SMALL_MAX),
        optax.add_decayed_weights(0.3, mask),
        optax.scale_by_learning_rate(0.02),
    )
    ref = ax.adamaxw(0.02, weight_decay=0.3, mask=mask)
    _assert_trees_close(_trajectory(recipe, params, 20)[0], _trajectory(ref, params, 20)[0])


def test_params_none_for_a_transform_that_does_not_need_them():
    params = _small_params()
    ref, _ = _trajectory(ax.adamax(0.01), params, 10, with_params=False)
    opt = ax.packed(ax.adamax(0.01), _SMALL_MAX)
    _assert_trees_close(_trajectory(opt, params, 10, with_params=False)[0], ref)


def test_inject_hyperparams_inside_and_outside():
    params = _small_params()
    ref, _ = _trajectory(ax.adamax(0.03, b1=0.8), params, 10)
    outside = optax.inject_hyperparams(
        lambda learning_rate, b1: ax.packed(ax.adamax(learning_rate, b1), _SMALL_MAX)
    )(learning_rate=0.03, b1=0.8)
    inside = ax.packed(optax.inject_hyperparams(ax.adamax)(learning_rate=0.03, b1=0.8), _SMALL_MAX)
    _assert_trees_close(_trajectory(outside, params, 10)[0], ref)
    _assert_trees_close(_trajectory(inside, params, 10)[0], ref)

    # Changing the injected learning rate mid-run acts as on the unpacked optimizer.
    def run(opt):
        state, p, update = opt.init(params), params, jax.jit(opt.update)
        for k in range(4):
            if k == 2:
                state.hyperparams["learning_rate"] = jnp.asarray(0.5)
            u, state = update(_grad(p, k), state, p)
            p = optax.apply_updates(p, u)
        return p

    opt = optax.inject_hyperparams(lambda learning_rate: ax.packed(ax.adamax(learning_rate), 16))
    _assert_trees_close(
        run(opt(learning_rate=0.03)), run(optax.inject_hyperparams(ax.adamax)(learning_rate=0.03))
    )


def test_apply_if_finite_skips_a_nan_step_like_the_unpacked_optimizer():
    params = _small_params()

    def run(opt):
        def body(carry, k):
            p, s = carry
            g = _grad(p, k)
            # Step 3 has a NaN in one small leaf: the whole step must be skipped.
            g["b"] = jnp.where(k == 3, jnp.nan, g["b"])
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, s), _ = jax.jit(lambda p: jax.lax.scan(body, (p, opt.init(p)), jnp.arange(6)))(params)
        return p, s

    p_ref, s_ref = run(optax.apply_if_finite(ax.adamax(0.01), 2))
    p_got, s_got = run(optax.apply_if_finite(ax.packed(ax.adamax(0.01), _SMALL_MAX), 2))
    assert int(s_got.total_notfinite) == int(s_ref.total_notfinite) == 1
    _assert_trees_close(p_got, p_ref)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p_got))


def test_multisteps_accumulates_like_the_unpacked_optimizer():
    params = _small_params()
    p_ref, _ = _trajectory(optax.MultiSteps(ax.adamax(0.05), 3), params, 6)
    packed = optax.MultiSteps(ax.packed(ax.adamax(0.05), _SMALL_MAX), 3)
    _assert_trees_close(_trajectory(packed, params, 6)[0], p_ref)


def test_masked_and_none_leaves_are_skipped():
    params = _small_params()
    mask = {"w": True, "b": False, "c": True, "h": True, "s": False}
    ref, _ = _trajectory(optax.masked(ax.adamax(0.01), mask), params, 10)
    got, _ = _trajectory(optax.masked(ax.packed(ax.adamax(0.01), _SMALL_MAX), mask), params, 10)
    _assert_trees_close(got, ref)

    tree = {"a": jnp.ones(3), "gap": None, "b": (jnp.ones(2), None)}
    opt = ax.packed(ax.adamax(0.1), _SMALL_MAX)
    updates, _ = opt.update(jax.tree.map(jnp.ones_like, tree), opt.init(tree))
    assert jax.tree.structure(updates) == jax.tree.structure(tree)
    np.testing.assert_allclose(updates["b"][0], [-0.1, -0.1], rtol=1e-6)


def test_extra_arguments_reach_the_inner_transform():
    def scale_by_arg():
        def update(updates, state, params=None, *, factor):
            return jax.tree.map(lambda u: u * factor, updates), state

        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

    opt = ax.packed(scale_by_arg(), _MAX)
    params = {"a": jnp.ones(3), "b": jnp.ones(100)}
    updates, _ = opt.update(params, opt.init(params), factor=2.5)
    np.testing.assert_array_equal(updates["a"], np.full(3, 2.5, np.float32))
    np.testing.assert_array_equal(updates["b"], np.full(100, 2.5, np.float32))


# ----------------------------------------------------------------------- state layout


def test_layout_threshold_and_groups():
    params = _mixed_params()
    state = ax.packed(ax.adamax(), max_leaf_size=_MAX).init(params)
    m = state[0].m
    assert isinstance(m, PackedTree)
    leaves = jax.tree.leaves(params)
    large = [x for x in leaves if x.size > _MAX]
    assert [x.shape for x in m.large] == [x.shape for x in large]
    for dtype in ("float32", "bfloat16", "float16"):
        small = [x for x in leaves if x.size <= _MAX and x.dtype == jnp.dtype(dtype)]
        assert m.small[dtype].shape == (sum(x.size for x in small),)
        assert m.small[dtype].dtype == jnp.dtype(dtype)
    assert sorted(m.small) == ["bfloat16", "float16", "float32"]
    assert m.leaf_groups == tuple(
        None if x.size > _MAX else jnp.dtype(x.dtype).name for x in leaves
    )
    # Recorded in the tree structure: a state of other groups is another structure.
    assert state[0].u.leaf_groups == m.leaf_groups
    other = ax.packed(ax.adamax(), max_leaf_size=_MAX).init(
        jax.tree.map(lambda x: x.astype(jnp.float32), params)
    )
    assert jax.tree.structure(other) != jax.tree.structure(state)


def test_max_leaf_size_zero_packs_nothing_but_empty_leaves():
    params = _mixed_params()
    state = ax.packed(ax.adamax(), max_leaf_size=0).init(params)
    m = state[0].m
    assert len(m.large) == sum(1 for x in jax.tree.leaves(params) if x.size > 0)
    assert m.small["float32"].shape == (0,)


def test_init_under_eval_shape_and_state_avals_are_stable():
    params = _mixed_params()
    opt = ax.packed(ax.adamax(0.01, u_dtype=jnp.bfloat16), _MAX)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    abstract = jax.eval_shape(opt.init, shapes)
    state = opt.init(params)
    _assert_same_avals(abstract, state)
    _, state2 = jax.jit(opt.update)(_grad(params, 0), state, params)
    _assert_same_avals(state2, state)
    # The same through lax.cond, which needs identical avals in both branches.
    grads = _grad(params, 1)
    update_avals = jax.eval_shape(lambda s: opt.update(grads, s, params)[0], state)
    _, state3 = jax.lax.cond(
        True,
        lambda s: opt.update(grads, s, params),
        lambda s: (jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), update_avals), s),
        state,
    )
    _assert_same_avals(state3, state)


@pytest.mark.parametrize(
    "axis_type", [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit], ids=str
)
def test_large_leaves_keep_their_sharding(axis_type):
    mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    # A bfloat16 small leaf with a float32 gradient too: cast into its buffer and back.
    params = {"w": jax.device_put(jnp.ones((64, 4)), sharded), "b": jnp.ones(4, jnp.bfloat16)}
    grads = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    opt = ax.packed(ax.adamax(0.1), max_leaf_size=16)
    state = opt.init(params)
    assert state[0].m.large[0].sharding.is_equivalent_to(sharded, 2)
    assert state[0].m.small["bfloat16"].dtype == jnp.bfloat16
    updates, state = jax.jit(opt.update)(grads, state)
    assert updates["w"].sharding.is_equivalent_to(sharded, 2)
    assert updates["b"].dtype == jnp.float32 and state[0].u.small["bfloat16"].dtype == jnp.bfloat16
    np.testing.assert_allclose(updates["w"], np.full((64, 4), -0.1), rtol=1e-6)
    np.testing.assert_allclose(updates["b"], np.full(4, -0.1), rtol=1e-6)


# ----------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [1.5, "64", None, True])
def test_max_leaf_size_must_be_an_integer(bad):
    with pytest.raises(TypeError, match="max_leaf_size"):
        ax.packed(ax.adamax(), max_leaf_size=bad)


def test_max_leaf_size_must_be_non_negative():
    with pytest.raises(ValueError, match="max_leaf_size must be >= 0"):
        ax.packed(ax.adamax(), max_leaf_size=-1)


@pytest.mark.parametrize(
    "change",
    [
        lambda g: {**g, "b": jnp.ones(7)},  # shape of a small leaf
        lambda g: {**g, "w": jnp.ones((5, 20))},  # shape of a large leaf
        lambda g: {**g, "b": g["b"].astype(jnp.int32)},  # an integer gradient
        lambda g: {**g, "b": g["b"].astype(jnp.complex64)},  # a complex gradient
        lambda g: {"w": g["w"]},  # a leaf missing
    ],
    ids=["small-shape", "large-shape", "int", "complex", "structure"],
)
def test_gradients_unlike_the_parameters_are_rejected(change):
    params = {"w": jnp.ones((4, 20)), "b": jnp.ones(8), "c": jnp.ones(3)}
    opt = ax.packed(optax.adam(0.1), max_leaf_size=16)
    state = opt.init(params)
    with pytest.raises(ValueError, match="do not pack like the parameters"):
        opt.update(change(params), state)


_MASK_PARAMS = {"w": jnp.ones((4, 20)), "k": jnp.ones((3, 3)), "b": jnp.ones(8)}
_NDIM_MASK = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ax.adamaxw(0.1, weight_decay=0.5, mask=_NDIM_MASK),
        lambda: ax.adamaxw(0.1, weight_decay=0.5, mask={"w": True, "k": True, "b": False}),
        lambda: optax.masked(ax.adamax(0.1), _NDIM_MASK),
        lambda: optax.chain(ax.scale_by_adamax(), optax.add_decayed_weights(0.5, _NDIM_MASK)),
        lambda: optax.partition(
            {"a": ax.adamax(0.1), "s": optax.sgd(0.1)}, {"w": "a", "k": "a", "b": "s"}
        ),
    ],
    ids=["adamaxw-callable", "adamaxw-tree", "masked", "add_decayed_weights", "partition"],
)
def test_a_mask_inside_packed_is_refused_at_init(make):
    # Unpacked, adamaxw's callable mask decays w and k. Packed, it would see k inside
    # a 1-D buffer and silently not decay it; a mask tree would not match the packed
    # tree at all. Both are refused, with the recipe that works.
    params = _MASK_PARAMS
    assert jax.tree.leaves(_NDIM_MASK(params)) == [False, True, True]  # b, k, w
    opt = ax.packed(make(), max_leaf_size=16)
    with pytest.raises(ValueError, match=r"masks or partitions the parameters.*outside packed"):
        opt.init(params)
    with pytest.raises(ValueError, match="masks or partitions"):
        jax.eval_shape(opt.init, params)


def test_the_mask_outside_packed_decays_what_it_does_unpacked():
    # The recipe the refusal gives, against adamaxw with the same callable mask.
    params = _MASK_PARAMS
    recipe = optax.chain(
        ax.packed(ax.scale_by_adamax(), max_leaf_size=16),
        optax.add_decayed_weights(0.5, _NDIM_MASK),
        optax.scale_by_learning_rate(0.1),
    )
    ref = ax.adamaxw(0.1, weight_decay=0.5, mask=_NDIM_MASK)
    masked = optax.masked(ax.packed(ax.adamaxw(0.1, weight_decay=0.5), 16), _NDIM_MASK)
    ref_masked = optax.masked(ax.adamaxw(0.1, weight_decay=0.5), _NDIM_MASK)
    for got, want in ((recipe, ref), (masked, ref_masked)):
        p_got, _ = _trajectory(got, params, 5)
        p_want, _ = _trajectory(want, params, 5)
        _assert_trees_close(p_got, p_want)
    # The decay did act on the small 2-D leaf k: without it k moves less.
    plain_k = _trajectory(ax.adamax(0.1), params, 5)[0]["k"]
    assert float(jnp.max(jnp.abs(p_want["k"] - plain_k))) > 1e-3


def test_init_failing_only_on_the_packed_tree_is_explained():
    def by_name():  # refers to the parameters by name: meaningless on a packed tree
        return optax.GradientTransformation(
            lambda p: {"w_norm": jnp.linalg.norm(p["w"])}, lambda u, s, p=None: (u, s)
        )

    with pytest.raises(ValueError, match="accepts the parameters but not their packed form"):
        ax.packed(by_name(), 16).init(_MASK_PARAMS)

    def broken():  # fails on any input: its own error comes through untouched
        def init(params):
            raise RuntimeError("broken init")

        return optax.GradientTransformation(init, lambda u, s, p=None: (u, s))

    with pytest.raises(RuntimeError, match="broken init"):
        ax.packed(broken(), 16).init(_MASK_PARAMS)


def test_gradients_of_other_leaves_than_the_state_records_are_rejected():
    params = {"w": jnp.ones((4, 20)), "b": jnp.ones(8), "c": jnp.ones(3)}
    opt = ax.packed(ax.adamax(0.1), max_leaf_size=16)
    state = opt.init(params)
    with pytest.raises(ValueError, match="made from 3 parameter leaves, and there are 4"):
        opt.update({**params, "d": jnp.ones(2)}, state)


def test_params_unlike_the_gradients_are_rejected():
    params = {"w": jnp.ones((4, 20)), "b": jnp.ones(8)}
    opt = ax.packed(ax.adamaxw(), max_leaf_size=16)
    state = opt.init(params)
    with pytest.raises(ValueError, match="params do not have the tree structure"):
        opt.update(params, state, {"w": params["w"]})
    with pytest.raises(ValueError, match=r"the parameter \[.b.\] has shape \(9,\)"):
        opt.update(params, state, {**params, "b": jnp.ones(9)})


def test_tree_map_params_maps_over_the_packed_buffers():
    params = {"w": jnp.ones((4, 20)), "b": jnp.ones(8), "c": jnp.ones(3)}
    opt = ax.packed(ax.adamax(), max_leaf_size=16)
    state = opt.update(jax.tree.map(jnp.ones_like, params), opt.init(params))[1]
    doubled = optax.tree_utils.tree_map_params(opt, lambda x: 2 * x, state)
    np.testing.assert_allclose(doubled[0].u.small["float32"], 2 * state[0].u.small["float32"])
    np.testing.assert_allclose(doubled[0].m.large[0], 2 * state[0].m.large[0])
    assert int(doubled[0].count) == 1  # not a parameter tree: left alone


# ----------------------------------------------------------------------- property


_SHAPES = [(0,), (1,), (3,), (4, 2), (12,), (5, 5), (40,)]
_DTYPES = [jnp.float32, jnp.bfloat16]


@settings(max_examples=12, deadline=None)
@given(
    leaves=st.lists(
        st.tuples(st.sampled_from(_SHAPES), st.sampled_from(_DTYPES)), min_size=1, max_size=6
    ),
    max_leaf_size=st.sampled_from([0, 1, 8, 16, 100]),
    seed=st.integers(0, 2**16),
)
def test_property_packed_equals_unpacked(leaves, max_leaf_size, seed):
    # Shapes come from a short menu so that eager dispatch reuses its compiled kernels.
    rng = np.random.default_rng(seed)
    params = [jnp.asarray(rng.standard_normal(shape), dtype) for shape, dtype in leaves]
    plain, packed = ax.adamax(0.05), ax.packed(ax.adamax(0.05), max_leaf_size)
    s_plain, s_packed = plain.init(params), packed.init(params)
    for _ in range(2):
        scale = 10.0 ** rng.integers(-3, 3)
        grads = [jnp.asarray(rng.standard_normal(p.shape) * scale, p.dtype) for p in params]
        u_plain, s_plain = plain.update(grads, s_plain)
        u_packed, s_packed = packed.update(grads, s_packed)
        for a, b in zip(u_packed, u_plain, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            # bfloat16 leaves keep bfloat16 moments, dithered differently once packed
            # (see test_low_precision_state_step_by_step): 4 ulps, or 4 ulps of lr.
            tol = 1e-6 if a.dtype == jnp.float32 else 2**-6
            np.testing.assert_allclose(
                np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=0.05 * tol
            )


def test_benchmark_runs_one_tiny_case(tmp_path):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
    spec = importlib.util.spec_from_file_location("adamax_benchmark_run", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up while executing it
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules[spec.name]

    case = bench.Case("tiny", "tiny", lambda: bench._leaves(3, 50) + bench._leaves(1, 9000))
    chosen = [o for o in bench.OPTIMIZERS if o.name in ("optax.adamax", "adamax_jax packed")]
    results = bench.bench_case(case, chosen, repeats=2, batch_s=0.001, settle_s=0.0)
    assert [r.optimizer for r in results] == ["optax.adamax", "adamax_jax packed"]
    assert all(r.seconds is not None and 0 < r.seconds < 1 for r in results)
    assert all(r.n_params == 9150 and r.n_leaves == 4 for r in results)
    meta = {"repeats": 2, "machine": "m", "command": "c"}
    table = bench.markdown(results, chosen, 1e10, meta)
    assert "| adamax_jax packed |" in table and "(1.00x ± 0.00)" in table  # paired with itself
    bench.plot(results, chosen, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
    assert math.isfinite(bench.copy_bandwidth(2**20, 3))


# --- combinations packed() refuses, and abstract parameters -----------------------------


def test_init_takes_abstract_parameters_as_optax_harnesses_pass_them():
    # optax's sharding harness calls init on jax.ShapeDtypeStruct leaves directly.
    params = _mixed_params()
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    opt = ax.packed(ax.adamax(0.01), _MAX)
    _assert_same_avals(opt.init(shapes), opt.init(params))


def test_packed_inside_packed_is_refused_at_init():
    opt = ax.packed(ax.packed(ax.adamax(0.01), _MAX), _MAX)
    with pytest.raises(ValueError, match=r"packed\(packed\(...\)\)"):
        opt.init(_mixed_params())


@pytest.mark.parametrize("lazy_rows", [True, "catch_up"])
def test_lazy_rows_inside_packed_is_refused_at_init(lazy_rows):
    # Packed, every element of a small leaf would be a row of its own.
    opt = ax.packed(ax.adamax(0.01, lazy_rows=lazy_rows), _MAX)
    with pytest.raises(ValueError, match=r"lazy_rows=.*cannot run inside packed\(\).*partition"):
        opt.init(_mixed_params())


@pytest.mark.parametrize("into_packed", [False, True])
def test_a_state_of_the_other_layout_is_refused_naming_packed(into_packed):
    params = _mixed_params()
    made = ax.adamax(0.01) if into_packed else ax.packed(ax.adamax(0.01), _MAX)
    used = ax.packed(ax.adamax(0.01), _MAX) if into_packed else ax.adamax(0.01)
    grads = _grad(params, 0)
    with pytest.raises(ValueError, match="packed"):
        used.update(grads, made.init(params), params)
