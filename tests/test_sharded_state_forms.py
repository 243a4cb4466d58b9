"""Every state form on meshes with Explicit axes (``jax.make_mesh``'s default) and Auto axes.

Each form of the optimizer state (float32, bfloat16, 8-bit, Nesterov, lazy rows,
skipped non-finite gradients, ``packed``, and combinations) trains a few steps
under ``jit`` on a 4 x 2 mesh, with the state beside its parameters and split
ZeRO-style over ``data``, and must give what the same steps give on one device.
Adamax is elementwise, so the layout may change XLA's collectives, never the
numbers beyond float32 round-off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import adamax_jax as ax

STEPS = 3

# "w" is quantized with 8-bit state (8192 elements) and sharded past its first
# dimension, so flattening it into blocks needs a layout; "e" is an embedding-like
# table whose rows get no gradient half the time; "b" and "s" stay small. With
# ``packed`` all four share one buffer of 8836 elements, which 4 data shards divide.
PARAM_SPECS = {
    "w": P(None, "model"),
    "e": P("model", None),
    "b": P("model"),
    "s": P(),
}
SHAPES = {"w": (64, 128), "e": (32, 16), "b": (128,), "s": (4,)}

FORMS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "float32": lambda: ax.adamax(0.01),
    "bf16": lambda: ax.adamax(0.01, m_dtype=jnp.bfloat16, u_dtype=jnp.bfloat16),
    "8bit": lambda: ax.adamax(0.01, state_bits=8),
    "nesterov": lambda: ax.nadamax(0.01),
    "lazy_rows": lambda: ax.adamax(0.01, lazy_rows=True),
    "skip_nonfinite": lambda: ax.adamax(0.01, skip_nonfinite=True),
    "lazy_rows=catch_up": lambda: ax.adamax(0.01, lazy_rows="catch_up"),
    "8bit+catch_up+nesterov": lambda: ax.nadamax(0.01, state_bits=8, lazy_rows="catch_up"),
    "packed": lambda: ax.packed(ax.adamax(0.01)),
    # freeze with 8-bit state needs blocks that fit in the rows.
    "8bit+nesterov+lazy+skip": lambda: ax.nadamax(
        0.01, state_bits=8, block_size=128, lazy_rows=True, skip_nonfinite=True
    ),
    "bf16+lazy+skip": lambda: ax.adamax(
        0.01, m_dtype=jnp.bfloat16, u_dtype=jnp.bfloat16, lazy_rows=True, skip_nonfinite=True
    ),
    "packed+8bit": lambda: ax.packed(ax.adamax(0.01, state_bits=8)),
    # b1 and b2 arrive as arrays traced outside the step (and outside auto_axes).
    "inject_hyperparams b1,b2": lambda: optax.inject_hyperparams(ax.adamax)(
        learning_rate=0.01, b1=0.8, b2=0.99
    ),
    "adamaxw+clip+schedule": lambda: optax.chain(
        optax.clip_by_global_norm(1.0),
        ax.adamaxw(optax.linear_schedule(0.02, 0.005, STEPS), weight_decay=0.1),
    ),
}
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(shape).astype(np.float32) for k, shape in SHAPES.items()}


def gradients(form: str) -> list[dict[str, np.ndarray]]:
    """Gradients with whole zero rows in "e" (lazy rows) and, for the forms that skip
    them, a few non-finite elements."""
    rng = np.random.default_rng(1)
    out = []
    for t in range(STEPS):
        g = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in SHAPES.items()}
        g["e"][(t % 2) :: 2] = 0.0  # every other row untouched, alternating
        if "skip" in form:
            g["w"][t, :3] = [np.nan, np.inf, -np.inf]
        out.append(g)
    return out


def step_fn(opt: optax.GradientTransformation) -> Callable:
    def step(grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def run(step: Callable, p: Any, state: Any, grads: list[Any], put: Callable = lambda x: x) -> Any:
    for g in grads:
        # One step in flight at a time: simulated CPU devices can deadlock otherwise.
        p, state = jax.block_until_ready(step(put(g), state, p))
    return jax.tree.map(np.asarray, (p, state))


def make_mesh(axis_type: AxisType) -> Mesh:
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)


def assert_close(actual: Any, expected: Any, *, atol: float) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=1e-6, atol=atol
        )


def assert_laid_out(tree: Any, shardings: Any) -> None:
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.sharding, sharding)


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=list(AXIS_TYPES))
@pytest.mark.parametrize("form", FORMS)
def test_state_form_on_mesh_matches_one_device(form: str, axis_type: str) -> None:
    opt = FORMS[form]()
    grads = gradients(form)
    step = step_fn(opt)
    expected = run(jax.jit(step), params(), opt.init(params()), grads)

    mesh = make_mesh(AXIS_TYPES[axis_type])
    explicit = AXIS_TYPES[axis_type] == AxisType.Explicit
    param_sh = {k: NamedSharding(mesh, spec) for k, spec in PARAM_SPECS.items()}
    # The sharded runs agree with one device to round-off; 8-bit codes may flip by
    # one where a round-off difference meets a rounding threshold (lr / 127).
    atol = 2e-4 if "8bit" in form else 1e-6
    for zero_axis in (None, "data"):
        with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
            p = jax.device_put(params(), param_sh)
            state_sh = ax.sharding.state_sharding(opt, p, mesh, zero_axis=zero_axis)
            state = jax.jit(opt.init, out_shardings=state_sh)(p)
            assert_laid_out(state, state_sh)
            jit_step = jax.jit(step, out_shardings=(param_sh, state_sh), donate_argnums=(1, 2))
            got = run(jit_step, p, state, grads, put=lambda g: jax.device_put(g, param_sh))
        assert_close(got, expected, atol=atol)
        if zero_axis is not None:
            # The ZeRO layout really splits the large moments over data.
            split = [sh for sh in jax.tree.leaves(state_sh) if "data" in str(sh.spec)]
            assert split, state_sh


def test_eager_8bit_update_on_explicit_mesh() -> None:
    """Outside jit too: each eager op must find a layout for the 8-bit blocks."""
    opt = ax.adamax(0.01, state_bits=8)
    mesh = make_mesh(AxisType.Explicit)
    w = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32)
    expected = jax.jit(opt.update)({"w": w}, opt.init({"w": w}))
    with jax.set_mesh(mesh):
        sharded = {"w": jax.device_put(w, NamedSharding(mesh, P(None, "model")))}
        state = opt.init(sharded)
        assert isinstance(state[0].u["w"], ax.QuantizedU)
        updates, _ = opt.update(sharded, state)
    assert updates["w"].sharding.spec == P(None, "model")
    np.testing.assert_allclose(np.asarray(updates["w"]), np.asarray(expected[0]["w"]), atol=1e-7)


def test_gradients_on_another_mesh_are_a_clear_error() -> None:
    opt = ax.adamax(0.01, state_bits=8)
    mesh = make_mesh(AxisType.Explicit)
    other = jax.make_mesh((8,), ("fsdp",))
    w = np.ones((64, 64), np.float32)
    state = opt.init({"w": jax.device_put(w, NamedSharding(mesh, P("data")))})
    grads = {"w": jax.device_put(w, NamedSharding(other, P("fsdp")))}
    with pytest.raises(ValueError, match=r"gradient \['w'\] mixes arrays on two meshes.*'fsdp'"):
        opt.update(grads, state)


def test_state_sharding_of_packed_state() -> None:
    """Large leaves beside their parameters, small-leaf buffers replicated or ZeRO-split."""
    mesh = make_mesh(AxisType.Explicit)
    p = {
        "big": jax.ShapeDtypeStruct(
            (64, 256), jnp.float32, sharding=NamedSharding(mesh, P(None, "model"))
        ),
        "w": jax.ShapeDtypeStruct(
            (16, 8), jnp.float32, sharding=NamedSharding(mesh, P(None, "model"))
        ),
        "b": jax.ShapeDtypeStruct((8,), jnp.float32),
        "h": jax.ShapeDtypeStruct((8,), jnp.bfloat16),
    }
    opt = ax.packed(ax.adamax(0.01), max_leaf_size=1000)
    beside = ax.sharding.state_sharding(opt, p, mesh)
    zero = ax.sharding.state_sharding(opt, p, mesh, zero_axis="data")
    assert jax.tree.structure(beside) == jax.tree.structure(jax.eval_shape(opt.init, p))
    for moment in ("m", "u"):
        packed_b, packed_z = getattr(beside[0], moment), getattr(zero[0], moment)
        assert packed_b.large[0].spec == P(None, "model")
        assert packed_z.large[0].spec == P("data", "model")
        # 16 * 8 + 8 float32 elements: replicated, or split 4 ways over data.
        assert packed_b.small["float32"].spec == P()
        assert packed_z.small["float32"].spec == P("data")
        # 8 bfloat16 elements: 8 % 4 == 0, split too.
        assert packed_z.small["bfloat16"].spec == P("data")
    assert zero[0].count.spec == P()
