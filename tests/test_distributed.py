"""Adamax on 8 devices: sharded jit, ZeRO state sharding, pmap and shard_map.

The root conftest.py gives every test process 8 simulated CPU devices. Every
distributed run is compared with the same run on one device (or, for ZeRO, with
the run whose state sits beside its parameters): Adamax is elementwise, so the
layout may change which collectives XLA inserts, never the numbers beyond
float32 round-off.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import adamax_jax as ax

if hasattr(jax, "shard_map"):
    shard_map = jax.shard_map
else:  # JAX before 0.6
    from jax.experimental.shard_map import shard_map

STEPS = 6
BATCH = 32  # divisible by every data-axis size used here, and by 8 for pmap
ROOT = Path(__file__).resolve().parents[1]

# Megatron-style layout: w1 by columns, w2 by rows; b2 and the scalar replicated.
PARAM_SPECS = {
    "w1": P(None, "model"),
    "b1": P("model"),
    "w2": P("model", None),
    "b2": P(),
    "s": P(),
}


def no_decay_on_vectors(params: Any) -> Any:
    return jax.tree.map(lambda x: x.ndim > 1, params)


def adamaxw_chain() -> optax.GradientTransformation:
    """adamaxw behind a global-norm clip (a cross-device reduction under sharding),
    with a masked decay and hyperparameters that live in the state."""
    return optax.chain(
        optax.clip_by_global_norm(0.5),
        optax.inject_hyperparams(ax.adamaxw, static_args=("mask",))(
            learning_rate=optax.linear_schedule(0.02, 0.005, 4),
            weight_decay=0.1,
            mask=no_decay_on_vectors,
        ),
    )


@pytest.fixture(scope="module", autouse=True)
def _eight_devices() -> None:
    if jax.device_count() < 8:
        pytest.fail(
            f"these tests need 8 devices, JAX sees {jax.device_count()}: the root conftest.py "
            "sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX is imported"
        )


# Data and parameters come from NumPy: eager JAX ops on sharded arrays would each
# compile a program, and compiling dominates these tests' time.
def init_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w1": (rng.standard_normal((16, 32)) / 4).astype(np.float32),
        "b1": np.zeros(32, np.float32),
        "w2": (rng.standard_normal((32, 8)) / 6).astype(np.float32),
        "b2": np.zeros(8, np.float32),
        "s": np.ones((), np.float32),
    }


def batches() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((STEPS, BATCH, 16)).astype(np.float32)
    return x, rng.standard_normal((STEPS, BATCH, 8)).astype(np.float32)


def make_mesh(shape: tuple[int, int], axis_type: AxisType) -> Mesh:
    return jax.make_mesh(shape, ("data", "model"), axis_types=(axis_type,) * 2)


def loss_fn(params: Any, x: jax.Array, y: jax.Array, out_sharding: Any = None) -> jax.Array:
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    # Under explicit sharding a contraction over a sharded dimension must say
    # where its result goes; under automatic sharding XLA decides.
    out = jnp.matmul(h, params["w2"], out_sharding=out_sharding)
    return jnp.mean((params["s"] * out + params["b2"] - y) ** 2)


def train_step(opt: optax.GradientTransformation, out_sharding: Any = None) -> Callable:
    def step(params: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any]:
        grads = jax.grad(loss_fn)(params, x, y, out_sharding)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


@functools.cache
def single_device_run() -> tuple[Any, Any]:
    """The reference: the whole batch on one device, as NumPy arrays."""
    opt = adamaxw_chain()
    params, (xs, ys) = init_params(), batches()
    state = opt.init(params)
    step = jax.jit(train_step(opt))
    for t in range(STEPS):
        params, state = step(params, state, xs[t], ys[t])
    return jax.tree.map(np.asarray, (params, state))


def assert_trees_close(actual: Any, expected: Any, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


def same_layout(array: jax.Array, sharding: Any) -> bool:
    return array.sharding.is_equivalent_to(sharding, array.ndim)


def find_adamax_state(state: Any) -> ax.AdamaxState:
    is_adamax = lambda s: isinstance(s, ax.AdamaxState)
    found = [s for s in jax.tree.leaves(state, is_leaf=is_adamax) if is_adamax(s)]
    assert len(found) == 1
    return found[0]


def assert_moments_beside_params(state: Any, params: Any) -> None:
    adamax_state = find_adamax_state(state)
    for moments in (adamax_state.m, adamax_state.u):
        for name, p in params.items():
            assert same_layout(moments[name], p.sharding), (name, moments[name].sharding)
    assert adamax_state.count.sharding.is_fully_replicated


def sharded_run(mesh: Mesh, *, zero_axis: str | None) -> tuple[Any, Any]:
    """Data- and model-parallel training of :func:`adamaxw_chain`; returns (params, state).

    The moments' layout is checked after init and after the last step. Without
    ZeRO no shardings are given to the step: the state must keep following its
    parameters by itself. With explicit axes init gets none either.
    """
    opt = adamaxw_chain()
    explicit = mesh.axis_types[0] == AxisType.Explicit
    with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
        param_sh = {k: NamedSharding(mesh, spec) for k, spec in PARAM_SPECS.items()}
        params = jax.device_put(init_params(), param_sh)
        state_sh = ax.sharding.state_sharding(opt, params, mesh, zero_axis=zero_axis)
        step = train_step(opt, out_sharding=P("data", None) if explicit else None)
        if zero_axis is None:
            # No shardings given: the moments must follow their parameters by themselves.
            init = jax.jit(opt.init)
            jit_step = jax.jit(step, donate_argnums=(0, 1))
        else:
            init = jax.jit(opt.init, out_shardings=state_sh)
            jit_step = jax.jit(step, out_shardings=(param_sh, state_sh), donate_argnums=(0, 1))
        state = init(params)
        if zero_axis is None:
            assert_moments_beside_params(state, params)
        batch_sh = NamedSharding(mesh, P("data"))
        for x, y in zip(*batches(), strict=True):
            params, state = jit_step(
                params, state, jax.device_put(x, batch_sh), jax.device_put(y, batch_sh)
            )
            # Many sharded steps in flight can deadlock XLA's collectives between
            # simulated CPU devices: keep one at a time.
            jax.block_until_ready(params)
        for name, p in params.items():
            assert same_layout(p, param_sh[name]), (name, p.sharding)
        for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh), strict=True):
            assert same_layout(leaf, sh), (leaf.sharding, sh)
        if zero_axis is None:
            assert_moments_beside_params(state, params)
        return params, state


def optimizer_step(opt: optax.GradientTransformation) -> Callable:
    """One optimizer step as a function of (grads, state, params)."""

    def step(grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def run_steps(step: Callable, params: Any, state: Any, *, grads: list[Any]) -> Any:
    """Applies ``step`` once per gradient, one step in flight at a time (see above)."""
    for g in grads:
        params, state = jax.block_until_ready(step(g, state, params))
    return params, state


# --- sharded jit ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mesh_shape", "axis_type"),
    [((4, 2), AxisType.Auto), ((2, 4), AxisType.Explicit)],
    ids=["auto-4x2", "explicit-2x4"],
)
def test_sharded_runs_match_single_device_with_and_without_zero(
    mesh_shape: tuple[int, int], axis_type: AxisType
) -> None:
    mesh = make_mesh(mesh_shape, axis_type)
    beside = sharded_run(mesh, zero_axis=None)
    zero = sharded_run(mesh, zero_axis="data")
    assert_trees_close(beside, single_device_run())
    assert_trees_close(zero, single_device_run())
    # Only the layout differs: the two sharded runs agree to round-off.
    assert_trees_close(zero, beside, rtol=1e-6, atol=1e-7)


def test_plain_jit_init_follows_params_on_auto_mesh() -> None:
    # Zeros that never read the parameters would be placed on one device by jit;
    # _storage.zeros ties them to the parameters' layout.
    mesh = make_mesh((4, 2), AxisType.Auto)
    param_sh = {k: NamedSharding(mesh, spec) for k, spec in PARAM_SPECS.items()}
    params = jax.device_put(init_params(), param_sh)
    assert_moments_beside_params(jax.jit(ax.adamax().init)(params), params)


# --- the layout state_sharding computes -------------------------------------------------


def test_state_sharding_follows_params_and_zero_splits_first_free_dimension() -> None:
    mesh = make_mesh((4, 2), AxisType.Auto)

    def abstract(shape: tuple[int, ...], spec: P) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))

    # name: (shape, parameter spec, moment spec with zero_axis="data")
    cases = {
        "column": ((64, 32), P(None, "model"), P("data", "model")),
        "row": ((30, 16), P("model", None), P("model", "data")),  # 30 % 4 != 0: next dim
        "late": ((3, 8), P(), P(None, "data")),
        "odd": ((6, 10), P(), P()),  # no dimension divisible by 4
        "model_bias": ((32,), P("model"), P("model")),  # its only dimension is taken
        "fsdp": ((64, 32), P("data", None), P("data", None)),  # already split over data
        "scalar": ((), P(), P()),
        "empty": ((0, 4), P(), P(None, "data")),
        "unsharded": (np.zeros((8, 3), np.float32), None, P("data")),  # NumPy: replicated
    }
    params = {
        name: shape if spec is None else abstract(shape, spec)
        for name, (shape, spec, _) in cases.items()
    }
    opt = optax.chain(ax.scale_by_adamax(), optax.trace(0.9))
    beside = ax.sharding.state_sharding(opt, params, mesh)
    zero = ax.sharding.state_sharding(opt, params, mesh, zero_axis="data")
    assert jax.tree.structure(beside) == jax.tree.structure(jax.eval_shape(opt.init, params))

    for name, (shape, spec, zero_spec) in cases.items():
        ndim = np.ndim(shape) if spec is None else len(shape)
        spec = P() if spec is None else spec
        for tree, want in ((beside, spec), (zero, zero_spec)):
            # Adamax's m and u and optax.trace's momentum are all parameter-shaped.
            for moment in (tree[0].m[name], tree[0].u[name], tree[1].trace[name]):
                assert moment.is_equivalent_to(NamedSharding(mesh, want), ndim), (name, moment)
    for tree in (beside, zero):
        assert tree[0].count.spec == P()

    both = ax.sharding.state_sharding(
        ax.adamax(), {"w": abstract((64, 32), P())}, mesh, zero_axis=("data", "model")
    )
    assert both[0].m["w"].spec == P(("data", "model"))


def test_state_sharding_through_optax_wrappers() -> None:
    """A prefix mask leaves a MaskedNode for a whole subtree; MultiSteps nests the state."""
    mesh = make_mesh((4, 2), AxisType.Auto)
    column = NamedSharding(mesh, P(None, "model"))
    params = {
        "dense": {
            "w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=column),
            "b": jax.ShapeDtypeStruct((4,), jnp.float32),
        },
        "frozen": {"z": jax.ShapeDtypeStruct((16,), jnp.float32)},
    }
    opt = optax.chain(
        optax.masked(ax.scale_by_adamax(), {"dense": True, "frozen": False}),
        optax.MultiSteps(ax.adamax(), every_k_schedule=2).gradient_transformation(),
    )
    shardings = ax.sharding.state_sharding(opt, params, mesh, zero_axis="data")
    masked, multi = shardings
    assert masked.inner_state.m["frozen"] == optax.MaskedNode()
    assert masked.inner_state.m["dense"]["w"].spec == P("data", "model")
    assert masked.inner_state.u["dense"]["b"].spec == P("data")
    # MultiSteps' gradient accumulator is parameter-shaped too, and split alike.
    assert multi.acc_grads["dense"]["w"].spec == P("data", "model")
    assert multi.inner_opt_state[0].u["frozen"]["z"].spec == P("data")
    assert multi.mini_step.spec == P()


def test_state_sharding_falls_back_for_state_of_another_shape() -> None:
    """Compact storage: a parameter's moment may be a node of arrays of other shapes."""

    class Blocks(NamedTuple):
        codes: Any  # one row of 256 codes per block of the flattened parameter
        scales: Any  # one scale per block
        values: Any  # shaped like the parameter

    def compact_init(params: Any) -> Any:
        def blocks(p: Any) -> Blocks:
            n = math.ceil(max(p.size, 1) / 256)
            return Blocks(
                jnp.zeros((n, 256), jnp.uint8), jnp.zeros((n,), jnp.float32), jnp.zeros_like(p)
            )

        return jax.tree.map(blocks, params)

    compact = optax.GradientTransformation(compact_init, lambda u, s, p=None: (u, s))
    mesh = make_mesh((4, 2), AxisType.Auto)
    big = jax.ShapeDtypeStruct(
        (64, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, "model"))
    )
    small = jax.ShapeDtypeStruct((10,), jnp.float32)
    params = {"big": big, "small": small}

    beside = ax.sharding.state_sharding(compact, params, mesh)
    zero = ax.sharding.state_sharding(compact, params, mesh, zero_axis="data")
    # Shaped like the parameter: the parameter's layout (plus the ZeRO split).
    assert beside["big"].values.spec == P(None, "model")
    assert zero["big"].values.spec == P("data", "model")
    # Another shape: replicated, or split over data on the first divisible dimension.
    assert beside["big"].codes.spec == P() and beside["big"].scales.spec == P()
    assert zero["big"].codes.spec == P("data")  # 16 blocks
    assert zero["big"].scales.spec == P("data")
    assert zero["small"].codes.spec == P(None, "data")  # 1 block of 256 codes
    assert zero["small"].scales.spec == P()  # 1 scale: nothing to split

    state = jax.jit(compact.init, out_shardings=zero)(
        {"big": np.ones((64, 64), np.float32), "small": np.ones(10, np.float32)}
    )
    for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(zero), strict=True):
        assert same_layout(leaf, sh)


def test_zero_run_with_8bit_state_matches_single_device() -> None:
    opt = optax.chain(ax.scale_by_adamax(state_bits=8), optax.scale(-0.01))
    mesh = make_mesh((4, 2), AxisType.Auto)
    param_sh = {"w": NamedSharding(mesh, P(None, "model"))}
    rng = np.random.default_rng(3)
    params = {"w": rng.standard_normal((128, 256)).astype(np.float32)}
    grads = [{"w": rng.standard_normal((128, 256)).astype(np.float32)} for _ in range(STEPS)]

    step = optimizer_step(opt)
    run = functools.partial(run_steps, grads=grads)

    expected = run(jax.jit(step), params, opt.init(params))
    sharded = jax.device_put(params, param_sh)
    state_sh = ax.sharding.state_sharding(opt, sharded, mesh, zero_axis="data")
    # Codes shaped like the parameter follow it (plus the split); the per-block
    # scales are split over data; scalars stay replicated.
    shapes = jax.eval_shape(opt.init, params)
    for shape, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(state_sh), strict=True):
        if shape.shape == (128, 256):
            assert sh.spec == P("data", "model")
        else:
            assert sh.spec == (P("data") if shape.ndim == 1 else P())
    state = jax.jit(opt.init, out_shardings=state_sh)(sharded)
    sharded_step = jax.jit(step, out_shardings=(param_sh, state_sh))
    # A round-off difference may flip one 8-bit code: allow a step's worth of it.
    assert_trees_close(run(sharded_step, sharded, state), expected, atol=2e-4)


# --- the ZeRO layout really splits the state --------------------------------------------


def test_zero_layout_holds_a_quarter_of_each_split_moment_per_device() -> None:
    mesh = make_mesh((4, 2), AxisType.Auto)
    n_data = mesh.shape["data"]
    param_sh = {k: NamedSharding(mesh, spec) for k, spec in PARAM_SPECS.items()}
    params = jax.device_put(init_params(), param_sh)
    opt = ax.adamax()
    layouts = {
        z: jax.jit(
            opt.init, out_shardings=ax.sharding.state_sharding(opt, params, mesh, zero_axis=z)
        )(params)[0]
        for z in (None, "data")
    }
    split = {"w1", "w2", "b2"}  # b1's only dimension is taken by "model"; s is a scalar

    def shard_bytes(array: jax.Array) -> dict[Any, int]:
        return {s.device: s.data.nbytes for s in array.addressable_shards}

    for moment in ("m", "u"):
        for name in params:
            beside = getattr(layouts[None], moment)[name]
            zero = getattr(layouts["data"], moment)[name]
            held_beside, held_zero = shard_bytes(beside), shard_bytes(zero)
            assert held_beside.keys() == held_zero.keys() == set(mesh.devices.flat)
            factor = n_data if name in split else 1
            for device, nbytes in held_zero.items():
                assert nbytes * factor == held_beside[device], (moment, name, device)
            # The data replicas hold different slices: together, one copy of the moment.
            distinct = {tuple((i.start, i.stop) for i in s.index) for s in zero.addressable_shards}
            assert len(distinct) == factor * len(
                {tuple((i.start, i.stop) for i in s.index) for s in beside.addressable_shards}
            )

    def per_device(state: Any) -> int:
        totals: dict[Any, int] = {}
        for leaf in jax.tree.leaves(state):
            for device, nbytes in shard_bytes(leaf).items():
                totals[device] = totals.get(device, 0) + nbytes
        assert len(set(totals.values())) == 1  # balanced
        return next(iter(totals.values()))

    # The split leaves dominate: the whole state shrinks by more than 3x.
    assert per_device(layouts["data"]) * 3 < per_device(layouts[None])


# --- pmap -------------------------------------------------------------------------------


def test_pmap_data_parallel_matches_single_device() -> None:
    n = 8
    opt = adamaxw_chain()
    params = jax.tree.map(lambda x: np.broadcast_to(x, (n, *x.shape)), init_params())
    state = jax.pmap(opt.init)(params)
    # pmap gives every state leaf a leading device axis, the scalar count included.
    assert all(leaf.shape[0] == n for leaf in jax.tree.leaves(state))
    assert find_adamax_state(state).count.shape == (n,)

    def step(params: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any]:
        grads = jax.lax.pmean(jax.grad(loss_fn)(params, x, y), "batch")
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    pstep = jax.pmap(step, axis_name="batch")
    for x, y in zip(*batches(), strict=True):
        per_device = lambda b: b.reshape(n, BATCH // n, -1)
        params, state = jax.block_until_ready(pstep(params, state, per_device(x), per_device(y)))

    result = jax.tree.map(np.asarray, (params, state))
    for i in range(n):
        assert_trees_close(jax.tree.map(lambda x, i=i: x[i], result), single_device_run())


# --- shard_map --------------------------------------------------------------------------


def test_transform_inside_shard_map_matches_full_array_update() -> None:
    # Per-element transforms only: a global-norm clip inside shard_map would see
    # only its own shard's norm (use it outside, or under jit as above).
    opt = optax.chain(
        optax.clip(0.5),
        ax.adamaxw(
            optax.cosine_decay_schedule(0.02, 10), weight_decay=0.05, mask=no_decay_on_vectors
        ),
    )
    mesh = make_mesh((4, 2), AxisType.Auto)
    # Every parameter split as far as it goes: each device updates its own block.
    specs = {
        "w1": P("data", "model"),
        "b1": P("model"),
        "w2": P("model", "data"),
        "b2": P("data"),
        "s": P(),
    }
    params = init_params()
    rng = np.random.default_rng(2)
    grads = [
        {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()}
        for _ in range(STEPS)
    ]

    step = optimizer_step(opt)
    run = functools.partial(run_steps, grads=grads)

    expected = run(jax.jit(step), params, opt.init(params))

    sharded = jax.device_put(params, {k: NamedSharding(mesh, s) for k, s in specs.items()})
    state_specs = jax.tree.map(lambda s: s.spec, ax.sharding.state_sharding(opt, sharded, mesh))
    per_shard = functools.partial(shard_map, mesh=mesh)
    init = jax.jit(per_shard(opt.init, in_specs=(specs,), out_specs=state_specs))
    update = jax.jit(
        per_shard(step, in_specs=(specs, state_specs, specs), out_specs=(specs, state_specs))
    )
    assert_trees_close(run(update, sharded, init(sharded)), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda o: optax.MultiSteps(o, 2),
        lambda o: optax.apply_if_finite(o, 3),
        # 8-bit catch_up keeps one stamp per group of rows that fills whole blocks.
        lambda o: optax.apply_if_finite(ax.adamax(0.01, state_bits=8, lazy_rows="catch_up"), 3),
    ],
    ids=["MultiSteps", "apply_if_finite", "catch_up"],
)
def test_8bit_state_inside_shard_map_goes_through_lax_cond(wrap) -> None:
    # optax's wrappers run lax.cond over the state: its types must not change from init
    # to update. Inside shard_map the 8-bit block scales vary over the mesh axis once
    # they follow the gradients, so their zeros must vary from the start too.
    opt = wrap(ax.adamax(0.01, state_bits=8))
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
    shape = (8 * 64, 64)  # 4096 elements per shard: quantized on every shard

    def train(p, gs):
        state = opt.init(p)
        for g in gs:
            updates, state = opt.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return p

    rng = np.random.default_rng(0)
    gs = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4)]
    p0 = jnp.zeros(shape)
    run = jax.jit(shard_map(train, mesh=mesh, in_specs=(P("x"), P(None, "x")), out_specs=P("x")))
    with jax.set_mesh(mesh):
        place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
        got = run(place(p0, P("x")), place(jnp.stack(gs), P(None, "x")))
    # Each shard's blocks lie inside it (64 rows of 64: blocks of 256 never straddle
    # shards); only the m code's rounding differs (its dither is keyed by the element's
    # index in its shard): within 8-bit state's accuracy, 0.02 lr per step.
    want = np.asarray(jax.jit(train)(p0, gs))
    np.testing.assert_allclose(np.asarray(got), want, atol=4 * 0.02 * 0.01)


# --- errors -----------------------------------------------------------------------------


def test_state_sharding_rejects_bad_arguments_clearly() -> None:
    mesh = make_mesh((4, 2), AxisType.Auto)
    params = {"w": jnp.zeros((8, 4))}
    opt = ax.adamax()
    with pytest.raises(TypeError, match=r"jax\.sharding\.Mesh"):
        ax.sharding.state_sharding(opt, params, jax.devices())
    with pytest.raises(TypeError, match="GradientTransformation"):
        ax.sharding.state_sharding(lambda p: p, params, mesh)
    with pytest.raises(ValueError, match=r"zero_axis names \['batch'\]"):
        ax.sharding.state_sharding(opt, params, mesh, zero_axis="batch")
    with pytest.raises(TypeError, match="zero_axis must be"):
        ax.sharding.state_sharding(opt, params, mesh, zero_axis=0)
    with pytest.raises(TypeError, match="zero_axis must be"):
        ax.sharding.state_sharding(opt, params, mesh, zero_axis=())

    other = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
    on_other = {"w": jax.device_put(jnp.zeros((8, 4)), NamedSharding(other, P("fsdp")))}
    with pytest.raises(ValueError, match=r"\['w'\] is sharded over mesh axis 'fsdp'"):
        ax.sharding.state_sharding(opt, on_other, mesh)

    wide = make_mesh((2, 4), AxisType.Auto)
    on_wide = {"w": jax.device_put(jnp.zeros((8, 4)), NamedSharding(wide, P("data")))}
    with pytest.raises(ValueError, match="axis 'data' of size 2, but that axis has size 4"):
        ax.sharding.state_sharding(opt, on_wide, mesh)

    positional = types.SimpleNamespace(
        shape=(8, 4), sharding=types.SimpleNamespace(is_fully_replicated=False)
    )
    with pytest.raises(TypeError, match=r"\['w'\] has a SimpleNamespace"):
        ax.sharding.state_sharding(opt, {"w": positional}, mesh)


# --- the example ------------------------------------------------------------------------


def test_train_sharded_example_runs_and_zero_saves_memory() -> None:
    script = ROOT / "examples" / "train_sharded.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout

    def number(pattern: str) -> float:
        match = re.search(pattern, out)
        assert match, (pattern, out)
        return float(match.group(1).replace(",", ""))

    beside = number(r"beside the parameters \(replicated over data\): +([\d,]+) B")
    zero = number(r"ZeRO over data: +([\d,]+) B")
    assert zero * 3 < beside
    assert number(r"difference between the two runs: (\S+)") <= 1e-6
    assert number(r"test accuracy: (\S+)") > 0.5
