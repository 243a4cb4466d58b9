"""Checkpointing the optimizer state with orbax-checkpoint.

* Every form of the state (float32, bfloat16 moments, mixed parameter dtypes,
  8-bit moments, inside ``optax.chain``, ``inject_hyperparams``, ``MultiSteps``
  and ``apply_if_finite``) saves and restores bit for bit.
* A run stopped after 3 steps and resumed from its checkpoint ends with exactly
  the bits of the run that was never stopped.
* Restoring into another optimizer configuration fails loudly: orbax checks the
  tree and the shapes against the target, and a state restored without a target
  is refused by ``update``.

See docs/how-to/checkpointing.md for the recipe these tests follow.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax

ocp = pytest.importorskip("orbax.checkpoint")


def _params(mixed: bool = False) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(0), 4)
    params = {
        # 4096 elements: large enough for 8-bit state to quantize it.
        "w": jax.random.normal(keys[0], (64, 64)),
        "b": jax.random.normal(keys[1], (8,)),
    }
    if mixed:
        params["h"] = jax.random.normal(keys[2], (5,)).astype(jnp.bfloat16)
        params["f16"] = jax.random.normal(keys[2], (3,)).astype(jnp.float16)
        params["c"] = jax.random.normal(keys[3], (2,)) * (1 + 1j)
    return params


def _decay_matrices(params: Any) -> Any:
    return jax.tree.map(lambda p: p.ndim > 1, params)


CONFIGS: dict[str, Callable[[], tuple[optax.GradientTransformation, Any]]] = {
    "float32": lambda: (ax.adamax(0.01), _params()),
    "bf16_moments": lambda: (
        ax.adamax(0.01, m_dtype=jnp.bfloat16, u_dtype=jnp.bfloat16),
        _params(),
    ),
    "mixed_param_dtypes": lambda: (ax.adamax(0.01), _params(mixed=True)),
    "adamaxw_chain_mask": lambda: (
        optax.chain(
            optax.clip_by_global_norm(1.0),
            ax.adamaxw(0.01, weight_decay=0.1, mask=_decay_matrices),
        ),
        _params(),
    ),
    "inject_hyperparams_schedule": lambda: (
        optax.inject_hyperparams(ax.adamax)(
            learning_rate=optax.cosine_decay_schedule(0.01, 10), b1=0.8
        ),
        _params(),
    ),
    "multisteps_apply_if_finite": lambda: (
        optax.MultiSteps(optax.apply_if_finite(ax.nadamax(0.01), 2), every_k_schedule=2),
        _params(),
    ),
    "state_bits_8": lambda: (ax.adamax(0.01, state_bits=8), _params(mixed=True)),
    "state_bits_8_inject": lambda: (
        optax.inject_hyperparams(ax.adamaxw, static_args=("state_bits", "block_size"))(
            learning_rate=0.01, state_bits=8, block_size=128
        ),
        _params(),
    ),
    "packed": lambda: (
        optax.chain(ax.packed(ax.scale_by_adamax()), optax.scale_by_learning_rate(0.01)),
        _params(mixed=True),
    ),
}


def _gradient(params: Any, t: jax.Array) -> Any:
    """A deterministic gradient that changes every step and is zero every third step."""
    scale = jnp.where(t % 3 == 2, 0.0, 1.0)

    def leaf(p: jax.Array) -> jax.Array:
        return (scale * jnp.cos(p * (t + 1)) + 0.1 * p).astype(p.dtype)

    return jax.tree.map(leaf, params)


@functools.cache
def _step_fn(name: str) -> Callable[..., Any]:
    tx, _ = CONFIGS[name]()

    @jax.jit
    def step(params, state, t):
        updates, state = tx.update(_gradient(params, t), state, params)
        return optax.apply_updates(params, updates), state

    return step


def _train(name: str, params: Any, state: Any, start: int, stop: int) -> tuple[Any, Any]:
    step = _step_fn(name)
    for t in range(start, stop):
        params, state = step(params, state, jnp.asarray(t, jnp.int32))
    return params, state


def assert_bit_identical(a: Any, b: Any) -> None:
    """Same tree, and every leaf with the same dtype, shape and bytes."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        x, y = np.asarray(x), np.asarray(y)
        where = jax.tree_util.keystr(path)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), where
        assert x.tobytes() == y.tobytes(), where


def _abstract(params: Any, tx: optax.GradientTransformation) -> Any:
    """The restore target: shapes and dtypes only, nothing allocated."""
    return jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p)}, params)


def _save(directory: Path, tree: Any) -> None:
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory, tree)
        ckpt.wait_until_finished()


def _restore(directory: Path, target: Any = None) -> Any:
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(directory, target)


# --- round trip and resume ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_round_trips_bit_for_bit(tmp_path, name):
    tx, params = CONFIGS[name]()
    params, state = _train(name, params, tx.init(params), 0, 2)
    _save(tmp_path / "ckpt", {"params": params, "opt_state": state})
    restored = _restore(tmp_path / "ckpt", _abstract(params, tx))
    assert_bit_identical(restored, {"params": params, "opt_state": state})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, name):
    tx, params0 = CONFIGS[name]()
    uninterrupted = _train(name, params0, tx.init(params0), 0, 6)

    params, state = _train(name, params0, tx.init(params0), 0, 3)
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        mngr.save(3, args=ocp.args.StandardSave({"params": params, "opt_state": state}))
        mngr.wait_until_finished()
    del params, state

    # As a new process would: the target comes from init, the values from disk.
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        step = mngr.latest_step()
        restored = mngr.restore(step, args=ocp.args.StandardRestore(_abstract(params0, tx)))
    resumed = _train(name, restored["params"], restored["opt_state"], step, 6)
    assert_bit_identical(resumed, uninterrupted)


@pytest.mark.slow
def test_sharded_state_restores_onto_its_sharding(tmp_path):
    mesh = jax.make_mesh((8,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    params = {"w": jax.device_put(jnp.arange(64.0).reshape(16, 4), sharding)}
    tx = ax.adamax(0.01)
    state = tx.update(params, tx.init(params), params)[1]
    _save(tmp_path / "ckpt", state)
    # A target with shardings (not eval_shape, which drops them) places each shard.
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tx.init(params))
    restored = _restore(tmp_path / "ckpt", target)
    assert_bit_identical(restored, state)
    assert restored[0].m["w"].sharding == sharding


def test_injected_hyperparameters_come_back_from_the_checkpoint(tmp_path):
    """With inject_hyperparams the hyperparameters are state: the saved values win."""
    params = _params()
    saved_tx = optax.inject_hyperparams(ax.adamax)(learning_rate=0.01)
    state = saved_tx.init(params)
    _save(tmp_path / "ckpt", state)
    new_tx = optax.inject_hyperparams(ax.adamax)(learning_rate=0.5)
    restored = _restore(tmp_path / "ckpt", jax.eval_shape(new_tx.init, params))
    assert float(restored.hyperparams["learning_rate"]) == np.float32(0.01)


def test_bf16_moments_restore_exactly_into_a_float32_configuration(tmp_path):
    """Changing the storage dtype on resume is a cast orbax does; widening is exact."""
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
    bf16 = ax.adamax(0.01, m_dtype=jnp.bfloat16, u_dtype=jnp.bfloat16)
    state = bf16.update(_gradient(params, 0), bf16.init(params))[1]
    _save(tmp_path / "ckpt", state)
    f32 = ax.adamax(0.01)
    restored = _restore(tmp_path / "ckpt", jax.eval_shape(f32.init, params))
    for saved, back in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        if jnp.issubdtype(saved.dtype, jnp.floating):
            assert back.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(back), np.asarray(saved).astype(back.dtype))
    f32.update(_gradient(params, 1), restored)  # and it trains on


# --- restoring into another configuration fails -------------------------------------------

# Large enough for 8-bit state to quantize it.
_BIG = {"w": jnp.ones((64, 64))}

MISMATCHES: dict[str, tuple[Any, Any]] = {
    # (saved configuration, restore configuration), each as (tx, params)
    "renamed_leaf": (
        (ax.adamax(), {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}),
        (ax.adamax(), {"w": jnp.ones((4, 4)), "bias": jnp.ones(4)}),
    ),
    "other_shape": (
        (ax.adamax(), {"w": jnp.ones((4, 4))}),
        (ax.adamax(), {"w": jnp.ones((4, 5))}),
    ),
    "other_chain": (
        (ax.adamax(), {"w": jnp.ones((4, 4))}),
        (optax.chain(optax.clip(1.0), ax.adamax()), {"w": jnp.ones((4, 4))}),
    ),
    "inject_vs_plain": (
        (optax.inject_hyperparams(ax.adamax)(learning_rate=0.1), {"w": jnp.ones((4, 4))}),
        (ax.adamax(0.1), {"w": jnp.ones((4, 4))}),
    ),
    "float32_into_8bit": ((ax.adamax(), _BIG), (ax.adamax(state_bits=8), _BIG)),
    "8bit_into_float32": ((ax.adamax(state_bits=8), _BIG), (ax.adamax(), _BIG)),
    "8bit_other_block_size": (
        (ax.adamax(state_bits=8, block_size=256), _BIG),
        (ax.adamax(state_bits=8, block_size=128), _BIG),
    ),
}


@pytest.fixture
def failed_restores_cancel_their_reads(monkeypatch):
    """Makes orbax cancel and await the reads a failed restore leaves behind.

    orbax (0.12) runs a restore in a fresh event loop with ``run_until_complete`` and
    then closes the loop. When one leaf fails (a shape that does not match), the
    other leaves' read tasks are left pending in the closed loop; they surface later,
    in whichever test is running or after the session's summary, as "Exception
    ignored in: <coroutine object _read_array_index_and_device_put>" and "Event loop
    is closed" warnings of a hundred lines each. Here the loop cancels its pending
    tasks and waits for them before it closes, as ``asyncio.run`` does; the
    ``ValueError`` the tests check is raised as before.
    """
    from orbax.checkpoint._src import asyncio_utils

    def run_then_cancel_pending(coro):
        loop = asyncio.new_event_loop()
        try:
            asyncio.set_event_loop(loop)
            return loop.run_until_complete(coro)
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            asyncio.set_event_loop(None)
            loop.close()

    # Older orbax ran restores with asyncio.run, which cancels pending tasks itself.
    if hasattr(asyncio_utils, "_run_sync_via_new_loop"):
        monkeypatch.setattr(asyncio_utils, "_run_sync_via_new_loop", run_then_cancel_pending)


@pytest.mark.usefixtures("failed_restores_cancel_their_reads")
@pytest.mark.parametrize("name", list(MISMATCHES))
def test_restoring_into_another_configuration_raises(tmp_path, name):
    (saved_tx, saved_params), (new_tx, new_params) = MISMATCHES[name]
    state = saved_tx.init(saved_params)
    _save(tmp_path / "ckpt", {"params": saved_params, "opt_state": state})
    # orbax compares the target's tree and shapes with what is on disk.
    with pytest.raises(ValueError, match=r"(?i)mismatch|do not match|not compatible|shape"):
        _restore(tmp_path / "ckpt", _abstract(new_params, new_tx))


@pytest.mark.parametrize(
    ("saved", "used", "said"),
    [
        (dict(state_bits=8), {}, ("state_bits=8", "state_bits=None")),
        (dict(m_dtype="bfloat16"), {}, ("m_dtype='bfloat16'", "m_dtype=None")),
        (dict(state_bits=8, block_size=128), dict(state_bits=8), ("128", "256")),
    ],
    ids=["8bit-into-float32", "bf16-into-default", "other-block-size"],
)
def test_a_checkpoint_of_another_configuration_is_refused_at_update(tmp_path, saved, used, said):
    # Restored onto its own configuration's target (as a training script that changed
    # its optimizer would), then handed to the new optimizer: refused, naming both.
    state = ax.adamax(1e-3, **saved).init(_BIG)
    _save(tmp_path / "ckpt", {"params": _BIG, "opt_state": state})
    restored = _restore(tmp_path / "ckpt", _abstract(_BIG, ax.adamax(1e-3, **saved)))
    pattern = ".*".join(re.escape(x) for x in said)
    with pytest.raises(ValueError, match=pattern):
        ax.adamax(1e-3, **used).update(_BIG, restored["opt_state"], _BIG)


@pytest.mark.parametrize("wrapped", [False, True])
def test_state_restored_without_a_target_is_refused(tmp_path, wrapped):
    """Without a target orbax returns dicts and lists: update must refuse them."""
    params = {"w": jnp.ones((4, 4))}
    tx = ax.adamax() if wrapped else ax.scale_by_adamax()
    state = tx.init(params)
    _save(tmp_path / "ckpt", state)
    restored = _restore(tmp_path / "ckpt")
    assert not isinstance(restored, type(state))
    with pytest.raises(TypeError, match="AdamaxState"):
        tx.update(params, restored, params)


# --- lazy_rows="catch_up": each row's last step is state too --------------------------------

LAZY_CONFIGS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "catch_up": lambda: ax.adamax(0.01, lazy_rows="catch_up", eps_placement="max"),
    "catch_up_8bit": lambda: ax.adamaxw(0.01, lazy_rows="catch_up", state_bits=8, block_size=128),
}
# packed() refuses lazy rows; what its error recommends: the table on its own, lazy,
# and the rest packed.
LAZY_CONFIGS["catch_up_partition_packed"] = lambda: optax.partition(
    {"table": ax.adamax(0.01, lazy_rows="catch_up"), "rest": ax.packed(ax.adamax(0.01))},
    lambda params: {k: "table" if k == "w" else "rest" for k in params},
)


def _sparse_gradient(params: Any, t: jax.Array) -> Any:
    """:func:`_gradient` on one row in five (which rows, changes with the step)."""

    def leaf(p: jax.Array, g: jax.Array) -> jax.Array:
        if p.ndim == 0:
            return g
        rows = (jnp.arange(p.shape[0]) * 7 + t * 3) % 5 == 0
        return jnp.where(rows.reshape((-1,) + (1,) * (p.ndim - 1)), g, 0).astype(g.dtype)

    return jax.tree.map(leaf, params, _gradient(params, t))


@pytest.mark.parametrize("name", list(LAZY_CONFIGS))
def test_catch_up_resumes_bit_identically(tmp_path, name):
    tx = LAZY_CONFIGS[name]()
    params0 = _params(mixed=True)

    @jax.jit
    def step(params, state, t):
        updates, state = tx.update(_sparse_gradient(params, t), state, params)
        return optax.apply_updates(params, updates), state

    def train(params, state, start, stop):
        for t in range(start, stop):
            params, state = step(params, state, jnp.asarray(t, jnp.int32))
        return params, state

    uninterrupted = train(params0, tx.init(params0), 0, 8)
    params, state = train(params0, tx.init(params0), 0, 3)
    _save(tmp_path / "ckpt", {"params": params, "opt_state": state})
    restored = _restore(tmp_path / "ckpt", _abstract(params0, tx))
    assert_bit_identical(restored, {"params": params, "opt_state": state})
    resumed = train(restored["params"], restored["opt_state"], 3, 8)
    assert_bit_identical(resumed, uninterrupted)
    # The stamps are in the checkpoint: rows left behind kept their last step.
    stamps = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(restored["opt_state"])
        if "last_step" in jax.tree_util.keystr(path)
    ]
    assert stamps and any(np.unique(np.asarray(s)).size > 1 for s in stamps)
