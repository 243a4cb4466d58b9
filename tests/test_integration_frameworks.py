"""adamax_jax inside Flax NNX, Flax Linen, Haiku and Equinox training loops, with every state form.

Each framework trains the same kind of MLP (64 -> 128 -> 10) on a slice of
scikit-learn's bundled digits for a few full-batch steps with ``ax.adamaxw`` on a
warmup-cosine schedule (which needs the framework to hand ``params`` to ``update``),
once per state form: float32, bfloat16, 8-bit, and float32 packed. The hidden
kernel (8192 elements) is large enough for 8-bit state, which only quantizes leaves
of at least 4096 elements; the output kernel and the biases keep float state.

Every run must train (the loss falls well below chance level), count its steps, and
hold its state in the form asked for after all those updates (the state goes
through the framework's own containers at every step: ``nnx.Optimizer`` rewrites it
through ``nnx.update``). Each other form must then land where the float32-state run
of the same framework lands, within what its rounding allows. ``nnx.Optimizer`` must
apply exactly the update of a plain optax loop on the same pytree.

The runs are cached: each (framework, form) trains once for all the tests that read it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax
from adamax_jax._storage import codes8

flax = pytest.importorskip("flax")
hk = pytest.importorskip("haiku")
eqx = pytest.importorskip("equinox")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

from flax import linen, nnx  # noqa: E402
from flax.training import train_state  # noqa: E402

STEPS = 20
HIDDEN = 128
NUM_EXAMPLES = 256
FRAMEWORKS = ("nnx", "linen", "haiku", "equinox")
FORMS = ("float32", "bf16", "8bit", "packed")


def _tx(form: str) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=0.02, warmup_steps=5, decay_steps=STEPS, end_value=1e-3
    )
    options: dict[str, Any] = {
        "float32": {},
        "packed": {},
        "bf16": {"m_dtype": jnp.bfloat16, "u_dtype": jnp.bfloat16},
        "8bit": {"state_bits": 8},
    }[form]
    tx = ax.adamaxw(learning_rate=schedule, weight_decay=1e-2, **options)
    return ax.packed(tx) if form == "packed" else tx


@functools.cache
def _digits() -> tuple[jax.Array, jax.Array]:
    x, y = sklearn_datasets.load_digits(return_X_y=True)
    return jnp.asarray(x[:NUM_EXAMPLES] / 16.0, jnp.float32), jnp.asarray(y[:NUM_EXAMPLES])


def _key() -> jax.Array:
    # rbg, not threefry: threefry's initializers take seconds to compile on CPU, and
    # what is under test here is the optimizer, not the initialization.
    return jax.random.key(0, impl="rbg")


def _xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@dataclasses.dataclass(frozen=True)
class _Run:
    losses: np.ndarray  # before each step, then after the last
    initial: list[np.ndarray]  # parameter leaves, in the framework's tree order
    final: list[np.ndarray]
    opt_state: Any  # as the framework holds it
    framework_step: int | None  # the framework's own step counter, where it has one


# --- one training run per framework -------------------------------------------------


class _NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(64, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.relu(self.hidden(x)))


@nnx.jit
def _nnx_step(model: _NnxMLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(lambda m: _xent(m(x), y))(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def _nnx_loss(model: _NnxMLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return _xent(model(x), y)


def _nnx_params(model: nnx.Module) -> list[np.ndarray]:
    return [np.asarray(p) for p in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))]


def _train_nnx(form: str) -> _Run:
    x, y = _digits()
    model = _NnxMLP(nnx.Rngs(_key()))
    initial = _nnx_params(model)
    optimizer = nnx.Optimizer(model, _tx(form), wrt=nnx.Param)
    losses = [float(_nnx_step(model, optimizer, x, y)) for _ in range(STEPS)]
    losses.append(float(_nnx_loss(model, x, y)))
    return _Run(
        np.asarray(losses),
        initial,
        _nnx_params(model),
        optimizer.opt_state,
        int(optimizer.step[...]),
    )


class _LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return linen.Dense(10)(jax.nn.relu(linen.Dense(HIDDEN)(x)))


@jax.jit
def _linen_loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return _xent(_LinenMLP().apply({"params": params}, x), y)


def _train_linen(form: str) -> _Run:
    x, y = _digits()
    state = train_state.TrainState.create(
        apply_fn=_LinenMLP().apply,
        params=_LinenMLP().init(_key(), x[:1])["params"],
        tx=_tx(form),
    )
    initial = [np.asarray(p) for p in jax.tree.leaves(state.params)]

    @jax.jit
    def step(state: train_state.TrainState) -> tuple[train_state.TrainState, jax.Array]:
        loss, grads = jax.value_and_grad(_linen_loss)(state.params, x, y)
        return state.apply_gradients(grads=grads), loss

    losses = []
    for _ in range(STEPS):
        state, loss = step(state)
        losses.append(float(loss))
    losses.append(float(_linen_loss(state.params, x, y)))
    final = [np.asarray(p) for p in jax.tree.leaves(state.params)]
    return _Run(np.asarray(losses), initial, final, state.opt_state, int(state.step))


_HAIKU_NET = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([HIDDEN, 10])(x)))


@jax.jit
def _haiku_loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return _xent(_HAIKU_NET.apply(params, x), y)


def _train_haiku(form: str) -> _Run:
    x, y = _digits()
    params = _HAIKU_NET.init(_key(), x[:1])
    initial = [np.asarray(p) for p in jax.tree.leaves(params)]
    tx = _tx(form)
    opt_state = tx.init(params)

    @jax.jit
    def step(params: Any, opt_state: Any) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(_haiku_loss)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(STEPS):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    losses.append(float(_haiku_loss(params, x, y)))
    final = [np.asarray(p) for p in jax.tree.leaves(params)]
    return _Run(np.asarray(losses), initial, final, opt_state, None)


def _eqx_arrays(model: Any) -> Any:
    """What Equinox users hand optax: the model with everything but float arrays None."""
    return eqx.filter(model, eqx.is_inexact_array)


@eqx.filter_jit
def _eqx_loss(model: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return _xent(jax.vmap(model)(x), y)


def _train_equinox(form: str) -> _Run:
    x, y = _digits()
    model = eqx.nn.MLP(64, 10, width_size=HIDDEN, depth=1, key=_key())
    initial = [np.asarray(p) for p in jax.tree.leaves(_eqx_arrays(model))]
    tx = _tx(form)
    opt_state = tx.init(_eqx_arrays(model))

    @eqx.filter_jit
    def step(model: Any, opt_state: Any) -> tuple[Any, Any, jax.Array]:
        loss, grads = eqx.filter_value_and_grad(_eqx_loss)(model, x, y)
        updates, opt_state = tx.update(grads, opt_state, _eqx_arrays(model))
        return eqx.apply_updates(model, updates), opt_state, loss

    losses = []
    for _ in range(STEPS):
        model, opt_state, loss = step(model, opt_state)
        losses.append(float(loss))
    losses.append(float(_eqx_loss(model, x, y)))
    final = [np.asarray(p) for p in jax.tree.leaves(_eqx_arrays(model))]
    return _Run(np.asarray(losses), initial, final, opt_state, None)


_TRAINERS: dict[str, Callable[[str], _Run]] = {
    "nnx": _train_nnx,
    "linen": _train_linen,
    "haiku": _train_haiku,
    "equinox": _train_equinox,
}


@functools.cache
def _run(framework: str, form: str) -> _Run:
    return _TRAINERS[framework](form)


# --- what the state holds ------------------------------------------------------------


def _pure(tree: Any) -> Any:
    """The state with nnx's Variables replaced by their values (other trees unchanged)."""
    return nnx.as_pure(tree)


def _adamax_state(opt_state: Any) -> ax.AdamaxState:
    found = [
        s
        for s in jax.tree.leaves(_pure(opt_state), is_leaf=lambda s: isinstance(s, ax.AdamaxState))
        if isinstance(s, ax.AdamaxState)
    ]
    assert len(found) == 1, opt_state
    return found[0]


def _nodes(tree: Any, kind: type) -> list[Any]:
    return [
        n
        for n in jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, kind))
        if isinstance(n, kind)
    ]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_trains_and_keeps_its_state_form(framework: str, form: str) -> None:
    run = _run(framework, form)
    assert np.all(np.isfinite(run.losses))
    assert run.losses[0] > 2.0  # chance level (ln 10 = 2.3): the model started untrained
    assert run.losses[-1] < 0.25 * run.losses[0], run.losses  # measured 0.08-0.11
    assert int(_adamax_state(run.opt_state).count) == STEPS
    if run.framework_step is not None:
        assert run.framework_step == STEPS

    # Read off the state as the framework holds it, after all the updates: nnx keeps
    # it in Variables and writes each update back through nnx.update.
    big = sorted(p.shape for p in run.initial if p.size >= codes8.MIN_SIZE)
    assert big == [(64, HIDDEN)] or big == [(HIDDEN, 64)]  # the hidden kernel, as laid out
    qu = _nodes(run.opt_state, codes8.QuantizedU)
    qm = _nodes(run.opt_state, codes8.QuantizedM)
    packed = _nodes(_pure(run.opt_state), ax.PackedTree)
    state = _adamax_state(run.opt_state)
    moments = jax.tree.leaves(state.m) + jax.tree.leaves(state.u)
    if form == "8bit":
        # Exactly the large leaf is quantized, both moments; the small ones keep float32.
        assert sorted(q.shape for q in qu) == big and sorted(q.shape for q in qm) == big
        u = qu[0]
        assert u.block_size == 256
        assert np.shape(u.scales) == (math.ceil(math.prod(u.shape) / u.block_size),)
        assert np.asarray(jnp.asarray(u.codes)).dtype == np.uint8
        assert np.any(np.asarray(jnp.asarray(u.codes)) > 0)  # it holds what training wrote
        small = [
            a
            for a in jax.tree.leaves(state.u, is_leaf=lambda n: isinstance(n, codes8.QuantizedU))
            if not isinstance(a, codes8.QuantizedU)
        ]
        assert len(small) == 3 and all(a.dtype == jnp.float32 for a in small)
    else:
        assert not qu and not qm
    if form == "packed":
        assert isinstance(state.m, ax.PackedTree) and isinstance(state.u, ax.PackedTree)
    else:
        assert not packed
    if form == "bf16":
        assert moments and all(a.dtype == jnp.bfloat16 for a in moments)
    elif form in ("float32", "packed"):
        assert moments and all(a.dtype == jnp.float32 for a in moments)


# How far each form may land from the float32-state run of the same framework, as
# (relative difference of the final loss, distance of the final parameters relative
# to how far float32 state moved them from the start).
# - packed runs the same element-wise maths on concatenated buffers (measured
#   bit-identical; the margin is for XLA fusing differently elsewhere).
# - bf16 rounds m and u to bfloat16 with a dither, at most one unit in the last place
#   (2**-7 relative) each, so a step's m / u is within about 1.6 % of float32's, with
#   unbiased signs: the displacement stays within 1.6 % even if all errors lined up
#   (measured 0.4-0.6 %; final loss 0.01-0.13 %).
# - 8-bit: 99 % of updates within 0.02 of the learning rate of float32's (see
#   _quantize), and early Adamax steps are about the learning rate, so within about
#   2 %, more for the few rest (measured 1.0-1.2 % of the displacement; final loss
#   0.03-0.08 %).
_TOLERANCE = {"packed": (1e-6, 1e-6), "bf16": (0.005, 0.02), "8bit": (0.01, 0.04)}


@pytest.mark.parametrize("form", list(_TOLERANCE))
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_lands_where_float32_state_lands(framework: str, form: str) -> None:
    ref, run = _run(framework, "float32"), _run(framework, form)
    for a, b in zip(ref.initial, run.initial, strict=True):
        np.testing.assert_array_equal(a, b)  # the same start
    loss_tol, param_tol = _TOLERANCE[form]
    assert abs(run.losses[-1] - ref.losses[-1]) <= loss_tol * ref.losses[-1], (
        run.losses,
        ref.losses,
    )

    def norm(leaves: list[np.ndarray]) -> float:
        return float(np.sqrt(sum(np.sum(np.square(a, dtype=np.float64)) for a in leaves)))

    moved = norm([f - i for f, i in zip(ref.final, ref.initial, strict=True)])
    apart = norm([f - r for f, r in zip(run.final, ref.final, strict=True)])
    assert moved > 0.1  # float32 state really trained the parameters
    assert apart <= param_tol * moved, (apart, moved)


def _plain(tree: Any) -> Any:
    """``tree`` with nnx's State mappings turned into the dicts they hold."""
    return jax.tree.map(
        lambda n: _plain(dict(n)) if isinstance(n, nnx.State) else n,
        tree,
        is_leaf=lambda n: isinstance(n, nnx.State),
    )


@pytest.mark.parametrize("form", ["float32", "8bit"])
def test_flax_nnx_optimizer_applies_exactly_the_optax_update(form: str) -> None:
    # nnx.Optimizer converts the state to its own Variables and back at every step;
    # the parameters and the state it ends with must equal a plain optax loop over
    # the same pytree (8-bit: the same codes and scales).
    x, y = _digits()
    run = _run("nnx", form)
    graphdef, param_state = nnx.split(_NnxMLP(nnx.Rngs(_key())), nnx.Param)
    params = nnx.to_pure_dict(param_state)
    tx = _tx(form)

    @jax.jit
    def optax_step(params: Any, opt_state: Any) -> tuple[Any, Any]:
        def loss_fn(p: Any) -> jax.Array:
            return _xent(nnx.merge(graphdef, nnx.State(p))(x), y)

        updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(STEPS):
        params, opt_state = optax_step(params, opt_state)

    for a, b in zip(run.final, jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    nnx_state = _plain(_pure(run.opt_state))
    assert jax.tree.structure(nnx_state) == jax.tree.structure(opt_state)
    for a, b in zip(jax.tree.leaves(nnx_state), jax.tree.leaves(opt_state), strict=True):
        if jnp.issubdtype(jnp.asarray(a).dtype, jnp.integer):
            np.testing.assert_array_equal(a, b)  # counts and 8-bit codes
        else:
            np.testing.assert_allclose(
                np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=1e-7
            )


def test_flax_nnx_functional_loop_with_variables_keeps_the_state_structure() -> None:
    # Without nnx.Optimizer: tx.init and tx.update on nnx States that hold Param
    # Variables, as jax.grad returns them. The Param goes around each
    # parameter-shaped array of the state (the 8-bit codes), not around a
    # QuantizedU, so the state keeps one structure through a scan, and the maths
    # is that of plain arrays.
    x, y = _digits()
    graphdef, params = nnx.split(_NnxMLP(nnx.Rngs(_key())), nnx.Param)
    tx = _tx("8bit")

    def steps(params: Any) -> tuple[Any, Any]:
        def body(carry: Any, _: None) -> tuple[Any, None]:
            p, s = carry
            grads = jax.grad(lambda p: _xent(nnx.merge(graphdef, p)(x), y))(p)
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        return jax.lax.scan(body, (params, tx.init(params)), None, length=3)[0]

    (wrapped, state), (pure, pure_state) = jax.jit(
        lambda p: (steps(p), steps(nnx.to_pure_dict(p)))
    )(params)
    u = tx.init(params)[0].u["hidden"]["kernel"]
    assert isinstance(u, codes8.QuantizedU) and isinstance(u.codes, nnx.Param)
    assert isinstance(state[0].u["hidden"]["kernel"].codes, nnx.Param)
    assert int(state[0].count) == 3
    for a, b in zip(jax.tree.leaves(wrapped), jax.tree.leaves(pure), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(pure_state), strict=True):
        np.testing.assert_array_equal(a, b)
