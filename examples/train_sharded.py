"""Data- and model-parallel training with ZeRO-sharded Adamax state, on 8 simulated devices.

A Flax NNX MLP learns scikit-learn's handwritten digits on a 4 x 2 device mesh:
the batch is split over the ``data`` axis, the hidden layers over the ``model``
axis (Megatron style: the first layer by columns, the second by rows), and the
optimizer state is split over ``data`` too (ZeRO stage 1), so each data-parallel
replica keeps a quarter of Adamax's ``m`` and ``u``. The same run with the state
laid out beside the parameters (replicated over ``data``) shows that the split
changes the memory per device and not the numbers.

Run it with ``python examples/train_sharded.py`` (``--quick`` for a short run).
On a machine with 8 or more accelerators it uses them; otherwise it simulates 8
CPU devices, which is why XLA_FLAGS is set before JAX is imported.
"""

from __future__ import annotations

import os

# Before JAX is imported: XLA reads the flag once, when its CPU backend starts.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse
import collections
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits

import adamax_jax as ax

BATCH = 128  # split 4 ways over "data"
HIDDEN = 256  # split 2 ways over "model"


class MLP(nnx.Module):
    """64 -> 256 -> 256 -> 10, with the hidden layers sharded over the "model" axis."""

    def __init__(self, rngs: nnx.Rngs):
        kernel = nnx.initializers.lecun_normal()
        zeros = nnx.initializers.zeros_init()
        # Column-parallel then row-parallel: the hidden activations stay split over
        # "model" between the two layers, and XLA adds one all-reduce after the second.
        self.hidden1 = nnx.Linear(
            64,
            HIDDEN,
            kernel_init=nnx.with_partitioning(kernel, (None, "model")),
            bias_init=nnx.with_partitioning(zeros, ("model",)),
            rngs=rngs,
        )
        self.hidden2 = nnx.Linear(
            HIDDEN,
            HIDDEN,
            kernel_init=nnx.with_partitioning(kernel, ("model", None)),
            bias_init=nnx.with_partitioning(zeros, (None,)),
            rngs=rngs,
        )
        self.head = nnx.Linear(HIDDEN, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.hidden1(x))
        x = nnx.relu(self.hidden2(x))
        return self.head(x)


def make_mesh() -> jax.sharding.Mesh:
    devices = jax.devices() if jax.device_count() >= 8 else jax.devices("cpu")
    # Auto axes: XLA's partitioner places the collectives, so the model code needs
    # no sharding annotations beyond its parameters'.
    return jax.make_mesh(
        (4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2, devices=devices[:8]
    )


def bytes_per_device(tree: Any) -> int:
    """The most bytes any one device holds of ``tree``'s arrays."""
    held: collections.Counter[Any] = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] += shard.data.nbytes
    return max(held.values())


def load_data(seed: int = 0) -> tuple[np.ndarray, ...]:
    pixels, labels = load_digits(return_X_y=True)
    x = (np.asarray(pixels) / 16.0).astype(np.float32)
    y = np.asarray(labels).astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_train = 12 * BATCH
    train, test = order[:n_train], order[n_train:]
    return x[train], y[train], x[test], y[test]


def init_model(mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's structure and its parameters, created already sharded on ``mesh``."""
    with jax.set_mesh(mesh):  # flax places each variable by its partitioning metadata
        # Created inside jit, each variable is born sharded: no device ever holds
        # a whole one (and it is one compilation instead of one per variable).
        model = nnx.jit(lambda: MLP(nnx.Rngs(0)))()
    return nnx.split(model, nnx.Param)


class Run(NamedTuple):
    params: nnx.State
    state_shardings: Any
    loss: float
    state_bytes_per_device: int
    state_bytes: int  # the whole state, unsharded


def train(
    mesh: jax.sharding.Mesh,
    graphdef: nnx.GraphDef,
    params: nnx.State,
    *,
    steps: int,
    zero_axis: str | None,
) -> Run:
    """Trains ``params`` with the optimizer state laid out by ``zero_axis``."""
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    opt = ax.adamaxw(learning_rate=2e-3, weight_decay=1e-4)
    state_shardings = ax.sharding.state_sharding(opt, params, mesh, zero_axis=zero_axis)
    # Created in place, already split: no device ever holds the whole state.
    opt_state = jax.jit(opt.init, out_shardings=state_shardings)(params)
    state_bytes = (bytes_per_device(opt_state), sum(a.nbytes for a in jax.tree.leaves(opt_state)))

    @functools.partial(
        jax.jit,
        out_shardings=(param_shardings, state_shardings, None),
        donate_argnums=(0, 1),
    )
    def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        def loss_fn(p: Any) -> jax.Array:
            logits = nnx.merge(graphdef, p)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    x_train, y_train, _, _ = load_data()
    batch_sharding = NamedSharding(mesh, P("data"))
    loss = jnp.nan
    for i in range(steps):
        lo = (i * BATCH) % len(x_train)
        x = jax.device_put(x_train[lo : lo + BATCH], batch_sharding)
        y = jax.device_put(y_train[lo : lo + BATCH], batch_sharding)
        params, opt_state, loss = step(params, opt_state, x, y)
        # One step in flight at a time: with hundreds queued, XLA's in-process
        # collectives between simulated CPU devices can deadlock (jax 0.10, 2 cores).
        jax.block_until_ready(loss)

    # The state kept its layout through every step.
    assert jax.tree.all(
        jax.tree.map(
            lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), opt_state, state_shardings
        )
    )
    return Run(params, state_shardings, float(loss), *state_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run, for tests")
    args = parser.parse_args()
    steps = 24 if args.quick else 600

    mesh = make_mesh()
    print(
        f"mesh: {dict(mesh.shape)} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices"
    )

    graphdef, params = init_model(mesh)
    start = time.perf_counter()
    runs = {}
    for zero_axis in (None, "data"):
        # Each run starts from its own copy: the training step donates its inputs.
        runs[zero_axis] = train(
            mesh, graphdef, jax.tree.map(jnp.copy, params), steps=steps, zero_axis=zero_axis
        )
    elapsed = time.perf_counter() - start

    print("\nparameter            shape         its sharding     Adamax moments, ZeRO")
    adamax_state = runs["data"].state_shardings[0]  # adamaxw is a chain; Adamax comes first
    for (path, p), m in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(adamax_state.m), strict=True
    ):
        name = ".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        spec = str(tuple(p.sharding.spec))
        print(f"{name:<20} {p.shape!s:<13} {spec:<16} {tuple(m.spec)}")

    beside, zero = runs[None], runs["data"]
    _, _, x_test, y_test = load_data()
    # On the mesh, not the default device (which is an accelerator on a 1-GPU machine).
    logits = nnx.merge(graphdef, zero.params)(jax.device_put(x_test, NamedSharding(mesh, P())))
    accuracy = float(np.mean(np.argmax(np.asarray(logits), axis=-1) == y_test))
    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(zero.params), jax.tree.leaves(beside.params), strict=True)
    )
    print("\noptimizer state per device:")
    print(f"  beside the parameters (replicated over data): {beside.state_bytes_per_device:>9,d} B")
    print(f"  ZeRO over data:                               {zero.state_bytes_per_device:>9,d} B")
    ratio = beside.state_bytes_per_device / zero.state_bytes_per_device
    print(f"  ({ratio:.2f}x less with ZeRO; the whole state is {zero.state_bytes:,d} B)")
    print(f"\n{steps} steps per layout in {elapsed:.1f} s")
    print(f"final train loss: ZeRO {zero.loss:.4f}, beside the parameters {beside.loss:.4f}")
    print(f"largest parameter difference between the two runs: {diff:.2e}")
    print(f"test accuracy: {accuracy:.3f}")


if __name__ == "__main__":
    main()
