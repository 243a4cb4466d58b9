"""jax.export: a jitted step of every state form exports, serializes and runs the same."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

import adamax_jax as ax
from adamax_jax import _export

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
ROOT = Path(__file__).resolve().parents[1]


def _params() -> dict[str, jax.Array]:
    # "w" has 4096 elements, the smallest leaf that 8-bit state quantizes.
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
    }


def _grads(seed: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(64, 64)).astype(np.float32)
    w[::3] = 0.0  # rows without gradient, for lazy_rows
    w[1, 1] = np.nan  # for skip_nonfinite (the others only see finite gradients)
    b = rng.normal(size=(8,)).astype(np.float32)
    return {"w": jnp.asarray(w), "b": jnp.asarray(b)}


def _finite_grads(seed: int) -> dict[str, jax.Array]:
    return jax.tree.map(jnp.nan_to_num, _grads(seed))


_SCHEDULE = optax.linear_schedule(1e-3, 1e-4, 10)

# name -> (optimizer factory, whether its gradients may hold a NaN)
FORMS: dict[str, tuple[Callable[[], optax.GradientTransformation], bool]] = {
    "float32": (lambda: ax.adamax(1e-3), False),
    "bf16": (lambda: ax.adamax(1e-3, m_dtype="bfloat16", u_dtype="bfloat16"), False),
    "8bit": (lambda: ax.adamax(1e-3, state_bits=8), False),
    "nesterov": (lambda: ax.nadamax(1e-3), False),
    "lazy_rows": (lambda: ax.adamax(1e-3, lazy_rows=True), False),
    "skip_nonfinite": (lambda: ax.adamax(1e-3, skip_nonfinite=True), True),
    "packed": (lambda: ax.packed(ax.adamax(1e-3), max_leaf_size=100), False),
    "catch_up": (lambda: ax.adamax(1e-3, lazy_rows="catch_up"), False),
    "8bit_catch_up_skip_nonfinite": (
        lambda: ax.adamax(1e-3, state_bits=8, lazy_rows="catch_up", skip_nonfinite=True),
        True,
    ),
    # What the error messages and the docs point users to: parameter groups
    # (partition / multi_transform, 8-bit state for one group only), schedule-free.
    "partition_8bit_group": (
        lambda: optax.partition(
            {"big": ax.adamax(1e-3, state_bits=8), "small": ax.adamaxw(1e-2)},
            {"w": "big", "b": "small"},
        ),
        False,
    ),
    "multi_transform": (
        lambda: optax.multi_transform(
            {"a": ax.adamax(1e-3), "b": optax.sgd(1e-2)}, {"w": "a", "b": "b"}
        ),
        False,
    ),
    "schedule_free": (lambda: optax.contrib.schedule_free(ax.adamax(1e-3), 1e-3), False),
    "ema_and_zero_nans": (
        lambda: optax.chain(optax.zero_nans(), ax.adamax(1e-3), optax.ema(0.9)),
        True,
    ),
    "lr_schedule": (lambda: ax.adamax(_SCHEDULE), False),
    "adamaxw_masked_wd_schedule": (
        lambda: ax.adamaxw(1e-3, weight_decay=_SCHEDULE, mask={"w": True, "b": False}),
        False,
    ),
    "adamaxw_inject_hyperparams": (
        lambda: optax.inject_hyperparams(ax.adamaxw)(learning_rate=_SCHEDULE, weight_decay=0.1),
        False,
    ),
    "8bit_inject_hyperparams": (
        lambda: optax.inject_hyperparams(ax.adamax, static_args=("state_bits", "block_size"))(
            learning_rate=1e-3, state_bits=8
        ),
        False,
    ),
    "multisteps_apply_if_finite": (
        lambda: optax.MultiSteps(optax.apply_if_finite(ax.adamax(1e-3), 3), 2),
        True,
    ),
    "chain_clip": (
        lambda: optax.chain(optax.clip_by_global_norm(1.0), ax.adamax(1e-3)),
        False,
    ),
    "torch": (lambda: ax.compat.torch_adamax(lr=1e-3, weight_decay=0.1), False),
    "keras": (lambda: ax.compat.keras_adamax(weight_decay=0.1), False),
    "mlx": (lambda: ax.compat.mlx_adamax(1e-3), False),
    "paper": (lambda: ax.compat.paper_adamax(), False),
}


def _step_fn(opt: optax.GradientTransformation) -> Callable:
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _warm_state(opt, step, grad_fn):
    """The state after two steps, so the exported step sees a nonzero count and moments."""
    params, state = _params(), opt.init(_params())
    for seed in (1, 2):
        params, state = jax.jit(step)(params, state, grad_fn(seed))
    return params, state


def _assert_trees_equal(actual, expected, *, params_ulp: int = 0) -> None:
    """Same structure, dtypes and values; the parameters (the first entry) within ``params_ulp``."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for i, (subtree_a, subtree_e) in enumerate(zip(actual, expected, strict=True)):
        for a, e in zip(jax.tree.leaves(subtree_a), jax.tree.leaves(subtree_e), strict=True):
            assert a.dtype == e.dtype and a.shape == e.shape
            if i == 0 and params_ulp:
                np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(e), maxulp=params_ulp)
            else:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.mark.parametrize("form", list(FORMS))
def test_exported_step_round_trips(form: str) -> None:
    make, nan_ok = FORMS[form]
    opt = make()
    grad_fn = _grads if nan_ok else _finite_grads
    step = _step_fn(opt)
    params, state = _warm_state(opt, step, grad_fn)
    grads = grad_fn(3)
    expected = jax.jit(step)(params, state, grads)

    for platforms in (PLATFORMS, ("cpu",)):
        exported = export.export(jax.jit(step), platforms=platforms)(params, state, grads)
        restored = export.deserialize(exported.serialize())
        assert restored.platforms == platforms
        assert restored.in_tree == jax.tree.structure(((params, state, grads), {}))
        # A module for several platforms runs the step inside a switch on the platform,
        # where XLA's CPU fusion may round the final parameter add differently (a few
        # elements by 1 ulp, measured); the state comes out bit-identical.
        ulp = 1 if len(platforms) > 1 else 0
        _assert_trees_equal(restored.call(params, state, grads), expected, params_ulp=ulp)


def test_serialized_step_loads_in_another_process(tmp_path: Path) -> None:
    # The registrations must come from `import adamax_jax` alone, not from this process.
    opt = ax.adamax(1e-3, state_bits=8)
    step = _step_fn(opt)
    params, state = _warm_state(opt, step, _finite_grads)
    grads = _finite_grads(3)
    exported = export.export(jax.jit(step), platforms=PLATFORMS)(params, state, grads)
    (tmp_path / "step.bin").write_bytes(exported.serialize())
    args = (params, state, grads)
    np.savez(tmp_path / "args.npz", *[np.asarray(x) for x in jax.tree.leaves(args)])

    script = textwrap.dedent(
        f"""
        import jax, numpy as np
        from jax import export
        import adamax_jax
        exported = export.deserialize(open({str(tmp_path / "step.bin")!r}, "rb").read())
        loaded = np.load({str(tmp_path / "args.npz")!r})
        leaves = [loaded[f"arr_{{i}}"] for i in range(len(loaded.files))]
        out = exported.call(*jax.tree.unflatten(exported.in_tree, leaves)[0])
        np.savez({str(tmp_path / "out.npz")!r}, *[np.asarray(x) for x in jax.tree.leaves(out)])
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)

    loaded = np.load(tmp_path / "out.npz")
    out = jax.tree.unflatten(
        exported.out_tree, [loaded[f"arr_{i}"] for i in range(len(loaded.files))]
    )
    _assert_trees_equal(out, jax.jit(step)(*args), params_ulp=1)


# The registration picks its serializer from how a type is made a pytree, so a node
# type that changes from a registered dataclass to a custom node (or a NamedTuple)
# needs no change in _export.


@dataclasses.dataclass(frozen=True)
class _DataclassNode:
    codes: jax.Array
    block_size: int = dataclasses.field(metadata={"static": True})


jax.tree_util.register_dataclass(_DataclassNode)


class _CustomNode:
    def __init__(self, value: jax.Array, tag: tuple[str, int]) -> None:
        self.value, self.tag = value, tag


jax.tree_util.register_pytree_node(
    _CustomNode, lambda n: ((n.value,), n.tag), lambda tag, children: _CustomNode(children[0], tag)
)

_export._register(_DataclassNode, "tests.test_export._DataclassNode", strict=True)
_export._register(_CustomNode, "tests.test_export._CustomNode", strict=True)


def test_registration_follows_the_kind_of_pytree_node() -> None:
    tree = (_DataclassNode(jnp.arange(4.0), 256), _CustomNode(jnp.ones(2), ("x", 3)))

    def f(t):
        return (
            _DataclassNode(t[0].codes * 2, t[0].block_size),
            _CustomNode(t[1].value + 1, t[1].tag),
        )

    restored = export.deserialize(export.export(jax.jit(f))(tree).serialize())
    assert restored.in_tree == jax.tree.structure(((tree,), {}))
    out = restored.call(tree)
    assert out[0].block_size == 256 and out[1].tag == ("x", 3)
    np.testing.assert_array_equal(out[0].codes, [0.0, 2.0, 4.0, 6.0])


def test_registering_twice_keeps_the_first_registration() -> None:
    _export.register_all()  # e.g. after importlib.reload: no error


def test_static_data_that_would_not_read_back_is_refused() -> None:
    with pytest.raises(TypeError, match="Python literals"):
        _export._serialize_auxdata(jnp.float32)
    assert _export._deserialize_auxdata(_export._serialize_auxdata((256, "a", None))) == (
        256,
        "a",
        None,
    )


def _optax_state_types() -> list[type]:
    """Every NamedTuple class defined in optax's modules (states, and a few helpers)."""
    found = []
    for name, module in sorted(sys.modules.items()):
        if module is None or not (name == "optax" or name.startswith("optax.")):
            continue
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and obj.__module__ == name
                and issubclass(obj, tuple)
                and hasattr(obj, "_fields")
                and not obj.__name__.startswith("GradientTransformation")
            ):
                found.append(obj)
    return found


def test_every_optax_state_type_serializes():
    # A user wraps or chains our optimizers in any optax transform (partition,
    # schedule_free, ema, lookahead, ...); its state must not stop the export.
    types = _optax_state_types()
    assert len(types) > 50  # optax 0.2.8 defines 74
    for nodetype in types:
        node = nodetype(*(jnp.zeros([1]) for _ in nodetype._fields))
        exported = export.export(jax.jit(lambda x: x))(node)
        restored = export.deserialize(exported.serialize())
        assert restored.in_tree == jax.tree.structure(((node,), {})), nodetype
