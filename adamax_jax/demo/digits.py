"""A small Flax NNX classifier on scikit-learn's bundled digits, for the demo.

The digits set (1797 8x8 grey images, ten classes) ships inside scikit-learn, so
nothing is downloaded. Every optimizer sees the same initial weights and the same
minibatches, so their loss curves differ only by the optimizer.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits as sklearn_digits
from sklearn.model_selection import train_test_split

from adamax_jax.demo.text import ProgressBar

NUM_FEATURES = 64
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Digits:
    """Train and test splits: pixels scaled to [0, 1], integer labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Digits:
    """scikit-learn's digits, split into stratified train and test sets.

    Example:
      >>> data = load_digits()
      >>> data.x_train.shape, data.x_test.shape, float(data.x_train.max())
      ((1347, 64), (450, 64), 1.0)
    """
    x, y = sklearn_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)  # pixel values are integers 0..16
    y = y.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Digits(*(np.asarray(a) for a in (x_train, y_train, x_test, y_test)))


class MLP(nnx.Module):
    """Two hidden ReLU layers: 64 -> hidden -> hidden -> 10 logits."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs) -> None:
        self.hidden1 = nnx.Linear(NUM_FEATURES, hidden, rngs=rngs)
        self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, NUM_CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.hidden1(x))
        x = jax.nn.relu(self.hidden2(x))
        return self.out(x)


def cross_entropy(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``model`` on a batch."""
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit(static_argnums=(0, 1))
def init_mlp(hidden: int, seed: int) -> MLP:
    """A fresh :class:`MLP`, initialised in one compiled call rather than op by op."""
    return MLP(hidden, rngs=nnx.Rngs(seed))


@nnx.jit
def evaluate(model: MLP, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in one compiled call."""
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What one training run measured.

    Attributes:
      name: The optimizer's label.
      losses: Minibatch loss at every step, shape ``(steps,)``.
      train_loss: Loss on the whole training set after training.
      test_loss: Loss on the test set after training.
      test_accuracy: Fraction of test digits classified correctly.
      ms_per_step: Wall-clock milliseconds per training step, compilation excluded,
        Python dispatch included.
      compile_s: Seconds spent compiling the step.
    """

    name: str
    losses: np.ndarray
    train_loss: float
    test_loss: float
    test_accuracy: float
    ms_per_step: float
    compile_s: float


def train(
    name: str,
    tx: optax.GradientTransformation,
    data: Digits,
    *,
    steps: int,
    batch_size: int = 128,
    hidden: int = 128,
    seed: int = 0,
    progress: str | None = None,
) -> TrainResult:
    """Trains a fresh :class:`MLP` with ``tx`` on minibatches of ``data``.

    The step is one ``jax.jit`` of a pure function of the split NNX state, compiled
    ahead of time so that compilation and stepping are timed apart.

    Args:
      name: Label of the result.
      tx: The optimizer.
      data: The digits splits.
      steps: Number of minibatch steps.
      batch_size: Examples per minibatch, drawn with replacement.
      hidden: Width of the hidden layers.
      seed: Seeds both the initial weights and the minibatch order.
      progress: Label of a progress bar drawn on standard error; ``None`` for none.

    Returns:
      A :class:`TrainResult`.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    model = init_mlp(hidden, seed)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    x_train = jnp.asarray(data.x_train)
    y_train = jnp.asarray(data.y_train)
    rng = np.random.default_rng(seed)
    batches = jnp.asarray(rng.integers(0, len(data.x_train), size=(steps, batch_size)))

    def step(state: nnx.State, i: jax.Array) -> tuple[nnx.State, jax.Array]:
        model, optimizer = nnx.merge(graphdef, state)
        idx = batches[i]
        loss, grads = nnx.value_and_grad(cross_entropy)(model, x_train[idx], y_train[idx])
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, jnp.int32(0)).compile()
    compile_s = time.perf_counter() - start

    bar = None if progress is None else ProgressBar(steps, progress)
    losses = []
    start = time.perf_counter()
    for i in range(steps):
        state, loss = compiled(state, jnp.int32(i))
        losses.append(loss)
        if bar is not None:
            if i % 25 == 24:
                loss.block_until_ready()  # keep the bar honest under async dispatch
            bar.update()
    jax.block_until_ready(state)
    ms_per_step = 1e3 * (time.perf_counter() - start) / steps
    if bar is not None:
        bar.close()

    model, _ = nnx.merge(graphdef, state)
    train_loss, _ = evaluate(model, x_train, y_train)
    test_loss, test_accuracy = evaluate(model, jnp.asarray(data.x_test), jnp.asarray(data.y_test))
    return TrainResult(
        name=name,
        losses=np.asarray(jax.device_get(losses)),
        train_loss=float(train_loss),
        test_loss=float(test_loss),
        test_accuracy=float(test_accuracy),
        ms_per_step=ms_per_step,
        compile_s=compile_s,
    )
