"""Multi-process training with ZeRO-split Adamax state and Orbax checkpoints.

This is how JAX runs on a TPU pod or on several GPU hosts: one Python process per
host, each calling :func:`jax.distributed.initialize`, each seeing its own
devices, all of them together one global mesh. Every process runs the same
program; ``jit`` computes on the global arrays, and each process holds only the
shards on its own devices. Here the batch is split over ``data``, the hidden
layer over ``model``, and Adamax's ``m`` and ``u`` over ``data`` as well (ZeRO
stage 1, :func:`adamax_jax.sharding.state_sharding`). Checkpoints are written by
all processes together (each its own shards) and restored straight onto the
layout, so a run can stop and resume on a fresh set of processes.

On one machine, two processes of four simulated CPU devices each, talking over
127.0.0.1 with gloo collectives::

    python examples/train_multiprocess.py --num-processes 2 --process-id 0 \\
        --coordinator 127.0.0.1:12355 --checkpoint-dir /tmp/ckpt &
    python examples/train_multiprocess.py --num-processes 2 --process-id 1 \\
        --coordinator 127.0.0.1:12355 --checkpoint-dir /tmp/ckpt

Run the same two commands again with ``--steps 16`` and they resume from step 8.
Without ``--num-processes`` it is one process with eight simulated devices.

On a TPU pod slice or GPU hosts, run it on every host with ``--real-devices``:
:func:`jax.distributed.initialize` then finds the coordinator and the process ids
itself (on GPU clusters, from SLURM or Open MPI; otherwise pass them as here).
The mesh is laid out the same way over all the devices.
"""

from __future__ import annotations

import argparse
import os
import sys

# Before JAX is imported: XLA reads the device count once, when its CPU backend starts.
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--num-processes", type=int, default=1)
parser.add_argument("--process-id", type=int, default=0)
parser.add_argument("--coordinator", default=None, help="host:port of process 0")
parser.add_argument(
    "--real-devices",
    action="store_true",
    help="use the accelerators JAX finds instead of 8 simulated CPU devices in all",
)
parser.add_argument("--steps", type=int, default=8, help="train until this step")
parser.add_argument("--checkpoint-dir", default=None, help="save here at the end; resume from here")
parser.add_argument("--out", default=None, help="write the final parameters and moments (.npz)")
args = parser.parse_args()

if not args.real_devices:
    devices = 8 // args.num_processes
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import adamax_jax as ax  # noqa: E402

BATCH, HIDDEN, TOTAL_STEPS = 128, 128, 64
PARAM_SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int32)


def global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a value every process knows, each placing its own shards."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    h = jax.nn.relu(x @ params["w1"] + params["b1"])
    # The contraction runs over the model-sharded hidden dimension: on a mesh with
    # Explicit axes (jax.make_mesh's default) the result's layout must be named.
    logits = jnp.matmul(h, params["w2"], out_sharding=P("data", None)) + params["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def main() -> None:
    if args.num_processes > 1 or args.coordinator:
        if jax.config.jax_platforms == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    n = jax.device_count()
    mesh = jax.make_mesh((n // 2, 2), ("data", "model"))  # Explicit axes by default
    param_sh = {k: NamedSharding(mesh, spec) for k, spec in PARAM_SPECS.items()}
    batch_sh = NamedSharding(mesh, P("data"))

    rng = np.random.default_rng(0)  # the same values in every process
    init = {
        "w1": (rng.standard_normal((64, HIDDEN)) / 8).astype(np.float32),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": (rng.standard_normal((HIDDEN, 10)) / np.sqrt(HIDDEN)).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }
    opt = ax.adamaxw(optax.cosine_decay_schedule(0.01, TOTAL_STEPS), weight_decay=1e-4)

    with jax.set_mesh(mesh):
        params = {k: global_array(v, param_sh[k]) for k, v in init.items()}
        state_sh = ax.sharding.state_sharding(opt, params, mesh, zero_axis="data")
        state = jax.jit(opt.init, out_shardings=state_sh)(params)

        @jax.jit
        def step(params: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, Any]:
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        start = 0
        manager = None
        if args.checkpoint_dir:
            import orbax.checkpoint as ocp

            manager = ocp.CheckpointManager(os.path.abspath(args.checkpoint_dir))
            latest = manager.latest_step()
            if latest is not None:
                # The target carries the shardings: each process reads only its shards.
                target = jax.tree.map(
                    ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": state}
                )
                restored = manager.restore(latest, args=ocp.args.StandardRestore(target))
                params, state, start = restored["params"], restored["opt_state"], latest
                print(f"process {jax.process_index()}: resumed from step {start}", flush=True)

        x_all, y_all = digits()
        loss = jnp.nan
        for t in range(start, args.steps):
            rows = (np.arange(BATCH) + t * BATCH) % 1024  # the first 1024 digits
            x = global_array(x_all[rows], batch_sh)
            y = global_array(y_all[rows], batch_sh)
            params, state, loss = step(params, state, x, y)
        print(
            f"process {jax.process_index()}/{jax.process_count()}: step {args.steps}, "
            f"{n} devices, loss {float(loss):.4f}",
            flush=True,
        )

        if manager is not None:
            manager.save(
                args.steps, args=ocp.args.StandardSave({"params": params, "opt_state": state})
            )
            manager.wait_until_finished()
            manager.close()
        if args.out:
            adamax_state = state[0]
            tree = {"params": params, "m": adamax_state.m, "u": adamax_state.u}
            # Every process takes part in the gather; process 0 writes the file.
            full = multihost_utils.process_allgather(tree, tiled=True)
            if jax.process_index() == 0:
                flat = jax.tree_util.tree_leaves_with_path(full)
                np.savez(args.out, **{jax.tree_util.keystr(p): np.asarray(v) for p, v in flat})
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
