"""adamax_jax inside Flax NNX, Flax Linen and Haiku training loops.

Each framework trains a small MLP on a slice of scikit-learn's bundled digits for a
few dozen full-batch steps, once with ``ax.adamax`` and once with ``ax.adamaxw`` on a
warmup-cosine schedule (which needs the framework to hand ``params`` to ``update``).
The loss must fall well below its starting value (about ln 10 = 2.3, chance level),
and the optimizer state must be our ``AdamaxState`` having counted every step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax

flax = pytest.importorskip("flax")
hk = pytest.importorskip("haiku")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

from flax import linen, nnx  # noqa: E402
from flax.training import train_state  # noqa: E402

STEPS = 40
HIDDEN = 32
NUM_EXAMPLES = 512


def _adamax() -> optax.GradientTransformation:
    return ax.adamax(learning_rate=0.01)


def _adamaxw_with_schedule() -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=0.02, warmup_steps=5, decay_steps=STEPS, end_value=1e-3
    )
    return ax.adamaxw(learning_rate=schedule, weight_decay=1e-2)


OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adamax": _adamax,
    "adamaxw+schedule": _adamaxw_with_schedule,
}


@pytest.fixture(scope="module")
def digits() -> tuple[jax.Array, jax.Array]:
    x, y = sklearn_datasets.load_digits(return_X_y=True)
    return jnp.asarray(x[:NUM_EXAMPLES] / 16.0, jnp.float32), jnp.asarray(y[:NUM_EXAMPLES])


def _xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _adamax_state(opt_state) -> ax.AdamaxState:
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, ax.AdamaxState))
        if isinstance(s, ax.AdamaxState)
    ]
    assert len(found) == 1, opt_state
    return found[0]


def _check_trained(loss_history: list[float], opt_state) -> None:
    losses = np.asarray(loss_history)
    assert np.all(np.isfinite(losses))
    assert losses[0] > 2.0  # chance level: the model really started untrained
    assert losses[-1] < 0.25 * losses[0], losses
    count = _adamax_state(opt_state).count
    if isinstance(count, nnx.Variable):  # nnx.Optimizer wraps its state in Variables
        count = count[...]
    assert int(count) == STEPS


class _NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(64, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.relu(self.hidden(x)))


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_flax_nnx_optimizer(digits, opt_name):
    x, y = digits
    model = _NnxMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, OPTIMIZERS[opt_name](), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: _xent(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, x, y)) for _ in range(STEPS)]
    losses.append(float(_xent(model(x), y)))
    _check_trained(losses, optimizer.opt_state)
    assert int(optimizer.step[...]) == STEPS


def test_flax_nnx_optimizer_applies_exactly_the_optax_update(digits):
    # nnx.Optimizer converts the state to its own Variables and back; the parameters
    # it produces must equal a plain optax loop over the same pytree.
    x, y = digits
    model = _NnxMLP(nnx.Rngs(0))
    graphdef, param_state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(param_state)
    tx = _adamaxw_with_schedule()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def framework_step(model, optimizer):
        optimizer.update(model, nnx.grad(lambda m: _xent(m(x), y))(model))

    @jax.jit
    def optax_step(params, opt_state):
        def loss_fn(p):
            state = nnx.State(p)
            return _xent(nnx.merge(graphdef, state)(x), y)

        updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(5):
        framework_step(model, optimizer)
        params, opt_state = optax_step(params, opt_state)

    trained = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), trained, params
    )
    assert jax.tree.structure(trained) == jax.tree.structure(params)


class _LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return linen.Dense(10)(jax.nn.relu(linen.Dense(HIDDEN)(x)))


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_flax_linen_train_state(digits, opt_name):
    x, y = digits
    model = _LinenMLP()
    state = train_state.TrainState.create(
        apply_fn=model.apply,
        params=model.init(jax.random.key(0), x[:1])["params"],
        tx=OPTIMIZERS[opt_name](),
    )

    @jax.jit
    def train_step(state, x, y):
        def loss_fn(params):
            return _xent(state.apply_fn({"params": params}, x), y)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    losses = []
    for _ in range(STEPS):
        state, loss = train_step(state, x, y)
        losses.append(float(loss))
    losses.append(float(_xent(state.apply_fn({"params": state.params}, x), y)))
    _check_trained(losses, state.opt_state)
    assert int(state.step) == STEPS


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_haiku(digits, opt_name):
    x, y = digits

    def forward(x):
        return hk.nets.MLP([HIDDEN, 10])(x)

    net = hk.without_apply_rng(hk.transform(forward))
    params = net.init(jax.random.key(0), x[:1])
    tx = OPTIMIZERS[opt_name]()
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: _xent(net.apply(p, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(STEPS):
        params, opt_state, loss = train_step(params, opt_state, x, y)
        losses.append(float(loss))
    losses.append(float(_xent(net.apply(params, x), y)))
    _check_trained(losses, opt_state)
