"""The conformance matrix: combinations of features against the float64 reference.

Each case picks one value on every axis of :data:`AXES` (state form, options, the
constructor, layout, wrapper and parameter dtype), runs the optimizer for ``T`` steps
on a fixed gradient sequence with transients (a spike, an all-zero step, rows without
gradient, a long skip, non-finite elements where something is meant to skip them),
and compares every update with the float64 NumPy reference of ``tests/_reference.py``
(wrapped in NumPy models of the optax wrappers). The tolerance of each state form is
stated once, in :data:`TOLERANCE`. A combination the library does not support must be
refused at construction or ``init`` with a ``ValueError`` that names both options
(:data:`REFUSED`); the matrix checks that as well.

The default run covers every pair of values of any two axes at least once (a
covering array built greedily from a seeded sample, :func:`pairwise_cases`), and a
seeded random sample of the whole product runs under the ``slow`` marker. Run
``python tests/test_conformance.py`` for the error statistics of every case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import pathlib
import random
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import adamax_jax as ax
from tests._reference import adamax_update, direction_bound

AXES: dict[str, tuple[Any, ...]] = {
    "form": ("default", "bfloat16", "float16", "8bit"),
    "eps_placement": ("denominator", "max"),
    "bias_correction": (True, False),
    "nesterov": (False, True),
    "lazy_rows": (False, "freeze", "catch_up"),
    "skip_nonfinite": (False, True),
    "block_size": (None, 64),
    "constructor": ("adamax", "adamaxw"),
    "layout": ("jit", "packed", "explicit_zero", "auto", "pmap", "shard_map"),
    "wrapper": (
        "none",
        "inject_hyperparams",
        "multisteps",
        "apply_if_finite",
        "masked",
        "partition",
        "schedule_free",
        "offload",
    ),
    "dtype": ("float32", "bfloat16", "float16", "float64", "complex64"),
    # Halfway through, the state leaves the process and comes back: an Orbax checkpoint
    # restored onto jax.eval_shape(opt.init, params), or the rest of the run as a
    # jax.export-ed, serialized and deserialized step. Either must resume bit for bit.
    "way_out": ("none", "orbax", "export"),
}

# Combinations refused at construction or init: what makes a case one, and what the
# ValueError must say.
REFUSED: tuple[tuple[Callable[[Case], bool], str], ...] = (
    # packed() ravels small leaves into one buffer, where every element is a row.
    (lambda c: c.layout == "packed" and bool(c.lazy_rows), r"lazy_rows=.*packed\(\)"),
    # A frozen row would decay with the touched rows sharing its 8-bit block's scale:
    # w's rows have 128 elements, the default blocks 256.
    (
        lambda c: c.form == "8bit" and c.lazy_rows == "freeze" and c.block_size is None,
        r"lazy_rows=True \(freeze\) with state_bits=8.*catch_up",
    ),
)

# Combinations that run but whose results are not the reference's, by design or by
# a defect outside adamax_jax, each with the reason (the documentation says so too).
NOT_APPLICABLE: tuple[tuple[Callable[[Case], bool], str], ...] = (
    # optax.apply_if_finite looks at the whole gradient tree, which inside shard_map
    # is one shard: each shard then skips on its own non-finite elements only.
    (
        lambda c: c.layout == "shard_map" and c.wrapper == "apply_if_finite",
        "apply_if_finite decides per shard",
    ),
    # MultiSteps' skip of non-finite micro-steps is decided per shard inside shard_map,
    # so the shards' accumulation windows drift apart.
    (
        lambda c: c.layout == "shard_map" and c.wrapper == "multisteps" and c.has_nonfinite,
        "MultiSteps' skip decides per shard",
    ),
    # The harness saves and exports single-device runs; sharded checkpoints are tested
    # in tests/test_checkpoint.py and tests/test_multiprocess.py.
    (
        lambda c: c.way_out != "none" and c.layout not in ("jit", "packed"),
        "saved and exported on one device here",
    ),
    # optax 0.2.8's MultiSteps averages complex gradients wrongly (with optax.sgd:
    # [1+2j, 3-1j] then [1-2j, 1+1j] give the mean [1-1j, 2+0.5j], not [1, 2]).
    (
        lambda c: c.wrapper == "multisteps" and c.dtype == "complex64",
        "optax.MultiSteps and complex gradients",
    ),
)

# The accuracy of each way a leaf's moments are stored: |update - reference update|
# as the 99th percentile and the maximum over every element and step of a case, in
# units of the largest step the case's bound allows (lr times the bound, about lr for
# the default betas). float32 and float64: round-off. The narrow forms: their
# documented accuracy (docs/how-to/memory.md); 8-bit's maximum is the bound itself,
# reached by elements below the u code's range, whose steps shrink.
TOLERANCE: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-9),
    "float32": (2e-6, 2e-5),
    "bfloat16": (0.01, 0.05),
    "float16": (0.002, 0.01),
    "8bit": (0.02, 1.0),
}
# How far over the bound a step may go: what storing a moment rounds away (a narrow
# float's u may be an ulp below its value; 8-bit m is coded inside the bound).
BOUND_RTOL = {
    "float64": 1e-9,
    "float32": 1e-6,
    "bfloat16": 2.0**-7,
    "float16": 2.0**-10,
    "8bit": 1e-5,
}
# Updates rounded to the parameters' dtype add their own rounding (relative).
UPDATE_ROUNDING = {"bfloat16": 2.0**-8, "float16": 2.0**-11}

T = 40  # steps per case
LR = 1e-2
B1, B2, EPS = 0.9, 0.95, 1e-8  # b2 well below 1, so that decay shows within T steps
WEIGHT_DECAY = 0.05
SHAPES = {"w": (64, 128), "b": (7,), "s": ()}  # w: 8192 elements, enough for 8-bit state
BIG = "w"
MASK = {"w": True, "b": False, "s": True}  # wrapper "masked": b passes through
LABELS = {"w": "case", "b": "plain", "s": "case"}  # wrapper "partition"
MULTISTEPS = 2
SPIKE_STEP, ZERO_STEP, NONFINITE_STEPS = 12, 20, (15, 33)
LONG_SKIP = (range(0, 4), range(3, 30))  # rows 0-3 have no gradient at steps 3-29


@dataclasses.dataclass(frozen=True)
class Case:
    form: str = "default"
    eps_placement: str = "denominator"
    bias_correction: bool = True
    nesterov: bool = False
    lazy_rows: Any = False
    skip_nonfinite: bool = False
    block_size: int | None = None
    constructor: str = "adamax"
    layout: str = "jit"
    wrapper: str = "none"
    dtype: str = "float32"
    way_out: str = "none"

    def __str__(self) -> str:
        defaults = Case()
        parts = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(defaults, f.name)
        ]
        return "-".join(parts) or "defaults"

    def pairs(self) -> Iterator[tuple[str, Any, str, Any]]:
        items = [(name, getattr(self, name)) for name in AXES]
        for (a, x), (b, y) in itertools.combinations(items, 2):
            yield (a, x, b, y)

    def refusal(self) -> str | None:
        """What the ValueError refusing this case must say; None if it runs."""
        return next((said for applies, said in REFUSED if applies(self)), None)

    def not_applicable(self) -> str | None:
        return next((why for applies, why in NOT_APPLICABLE if applies(self)), None)

    @property
    def has_nonfinite(self) -> bool:
        """Whether the gradients hold NaN and inf (only where something skips them)."""
        return self.skip_nonfinite or self.wrapper == "apply_if_finite"


def _runnable(case: Case) -> bool:
    return case.refusal() is None and case.not_applicable() is None


def pairwise_cases(seed: int = 0, candidates: int = 60) -> list[Case]:
    """Cases covering every pair of values of two axes that a runnable case can have.

    Greedy (as AETG): each new case is the best of ``candidates`` random runnable
    cases by the number of pairs it covers for the first time; seeded, so the list
    is the same on every run.
    """
    rng = random.Random(seed)
    names = list(AXES)
    wanted = {pair for pair in _all_pairs() if _completion(pair) is not None}
    cases: list[Case] = []
    while wanted:
        best, best_new = None, -1
        # Seed each candidate with an uncovered pair, so that every step makes progress.
        a, x, b, y = sorted(wanted, key=repr)[rng.randrange(len(wanted))]
        for _ in range(candidates):
            values = {n: rng.choice(AXES[n]) for n in names}
            values[a], values[b] = x, y
            case = Case(**values)
            if not _runnable(case):
                continue
            new = sum(1 for p in case.pairs() if p in wanted)
            if new > best_new:
                best, best_new = case, new
        assert best is not None
        cases.append(best)
        wanted -= set(best.pairs())
    return cases


def _all_pairs() -> Iterator[tuple[str, Any, str, Any]]:
    for a, b in itertools.combinations(AXES, 2):
        for x in AXES[a]:
            for y in AXES[b]:
                yield (a, x, b, y)


def _completion(pair: tuple[str, Any, str, Any], tries: int = 200) -> Case | None:
    """A runnable case with the two values of ``pair``, if there is one (seeded search)."""
    a, x, b, y = pair
    first = dataclasses.replace(Case(), **{a: x, b: y})
    if _runnable(first):
        return first
    rng = random.Random(repr(pair))
    for _ in range(tries):
        case = Case(**{n: rng.choice(v) for n, v in AXES.items()} | {a: x, b: y})
        if _runnable(case):
            return case
    return None


def sampled_cases(n: int, seed: int = 1) -> list[Case]:
    """``n`` runnable cases drawn uniformly from the whole product (seeded)."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < n:
        case = Case(**{name: rng.choice(values) for name, values in AXES.items()})
        if _runnable(case) and case not in cases:
            cases.append(case)
    return cases


def refused_cases() -> list[Case]:
    """Refused cases: each refusal with the fewest changes from the defaults."""
    return [
        Case(layout="packed", lazy_rows="freeze"),
        Case(layout="packed", lazy_rows="catch_up"),
        Case(form="8bit", lazy_rows="freeze"),
        Case(form="8bit", lazy_rows="freeze", wrapper="inject_hyperparams", dtype="bfloat16"),
    ]


# --- gradients ---------------------------------------------------------------------------


@functools.cache
def _gradients(dtype: str, nonfinite: bool) -> dict[str, np.ndarray]:
    """``T`` steps of gradients per leaf (float64 or complex128), with transients."""
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in SHAPES.items():
        rows = shape[0] if shape else 1
        # Row scales over two decades: rows sharing an 8-bit block differ by at most one.
        scale = 10.0 ** rng.uniform(-1, 1, size=(rows,) + (1,) * max(len(shape) - 1, 0))
        bias = rng.normal(size=scale.shape) * (rng.uniform(size=scale.shape) < 0.5)
        g = scale * (bias + rng.normal(size=(T, *shape)))
        if dtype == "complex64":
            g = g + 1j * scale * rng.normal(size=(T, *shape))
        if shape:
            # Rows without gradient: 40% at random at each step, and a long skip.
            idle = rng.uniform(size=(T, rows)) < 0.4
            if name == BIG:
                rows_idle, steps_idle = LONG_SKIP
                idle[np.ix_(list(steps_idle), list(rows_idle))] = True
            g = g * ~idle.reshape((T, rows) + (1,) * (len(shape) - 1))
        g[SPIKE_STEP] *= 300.0  # a spike on every element
        g[ZERO_STEP] = 0.0
        if nonfinite and name == BIG:
            g[NONFINITE_STEPS[0], 5, :3] = [np.nan, np.inf, -np.inf]
            g[NONFINITE_STEPS[1], 40, 7] = np.nan
        out[name] = g
    return out


# --- the reference, with NumPy models of the wrappers ------------------------------------


def _reference_updates(
    case: Case, grads: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every step's update of every leaf, from ``tests/_reference.py``, and where each
    update is zero by construction (no Adamax step there, and nothing else moves it).

    ``grads`` are the gradients as the optimizer receives them (in the case's dtype),
    in float64.
    """
    kw = dict(
        beta1=B1,
        beta2=B2,
        epsilon=EPS,
        eps_placement=case.eps_placement,
        bias_correction=case.bias_correction,
        nesterov=case.nesterov,
        skip_nonfinite=case.skip_nonfinite,
        weight_decay=WEIGHT_DECAY if case.constructor == "adamaxw" else 0.0,
        lazy="freeze" if case.lazy_rows in (True, "freeze") else "catch_up",
    )
    plain_kw = dict(beta1=0.9, beta2=0.999, epsilon=1e-8)  # wrapper "partition": ax.adamax()
    cplx = case.dtype == "complex64"
    zeros = {k: np.zeros(np.shape(g[0]), complex if cplx else float) for k, g in grads.items()}
    params = dict(zeros)
    m = dict(zeros)
    u = {k: np.zeros(np.shape(g[0])) for k, g in grads.items()}
    count = 0
    # schedule_free: z (the base iterates) and x (their average); params are y.
    z, x = dict(params), dict(params)
    pending: list[dict[str, np.ndarray]] = []
    updates: dict[str, list[np.ndarray]] = {k: [] for k in grads}
    still: dict[str, list[np.ndarray]] = {k: [] for k in grads}

    def no_update() -> None:
        for k in grads:
            updates[k].append(np.zeros_like(params[k]))
            still[k].append(np.ones(np.shape(params[k]), bool))

    for t in range(T):
        g = {k: v[t] for k, v in grads.items()}
        finite = all(np.all(np.isfinite(v)) for v in g.values())
        if case.wrapper == "multisteps" and not finite:
            no_update()  # a skipped micro-step: the window waits
            continue
        if case.wrapper == "multisteps":
            pending.append(g)
            if len(pending) < MULTISTEPS:
                no_update()
                continue
            g = {k: _multisteps_mean(case, [p[k] for p in pending]) for k in g}
            pending = []
        if case.wrapper == "apply_if_finite" and not finite:
            no_update()
            continue
        count += 1
        step = {}
        for k, gk in g.items():
            rows = None
            stepping = np.isfinite(gk) if case.skip_nonfinite else np.ones(gk.shape, bool)
            if case.lazy_rows:  # a row along axis 0; a 0-d leaf is one row
                rows = np.any(gk.reshape((gk.shape[0] if gk.ndim else 1, -1)) != 0, axis=1)
                stepping = stepping & rows.reshape(gk.shape[:1] + (1,) * (gk.ndim - 1))
            adamax_only = case.constructor == "adamax" and case.wrapper != "schedule_free"
            plain = case.wrapper == "partition" and LABELS[k] == "plain"
            masked = case.wrapper == "masked" and not MASK[k]
            still[k].append(~stepping & adamax_only & (not plain) & (not masked))
            here = params[k]
            if case.wrapper == "partition" and LABELS[k] == "plain":
                new, m[k], u[k] = adamax_update(here, gk, m[k], u[k], count, LR, **plain_kw)
            elif case.wrapper == "masked" and not MASK[k]:
                new = here + gk  # optax.masked passes the gradient through
            else:
                new, m[k], u[k] = adamax_update(
                    here,
                    gk,
                    m[k],
                    u[k],
                    count,
                    LR,
                    rows=rows,
                    **kw,
                )
            step[k] = new - here
        if case.wrapper == "schedule_free":
            # optax.contrib.schedule_free, constant lr: c_t = 1/t, b1 = 0.9.
            c = 1.0 / count
            for k in step:
                z_new = z[k] + step[k]
                x[k] = (1 - c) * x[k] + c * z_new
                z[k] = z_new
                y = 0.9 * x[k] + 0.1 * z[k]
                step[k] = y - params[k]
        for k in step:
            params[k] = params[k] + step[k]
            updates[k].append(step[k])
    return {k: np.stack(v) for k, v in updates.items()}, {k: np.stack(v) for k, v in still.items()}


def _multisteps_mean(case: Case, window: list[np.ndarray]) -> np.ndarray:
    """optax.MultiSteps' mean: a running mean kept in float32 between micro-steps,
    computed in the wider of float32 and the gradients' dtype, and handed on in the
    gradients' dtype."""
    wide = np.float64 if case.dtype == "float64" else np.float32
    acc = np.zeros(window[0].shape, np.float32)
    for n, g in enumerate(window):
        mean = acc.astype(wide) + (g.astype(wide) - acc.astype(wide)) / wide(n + 1)
        acc = mean.astype(np.float32)
    return _as_seen(case, mean)


def _as_seen(case: Case, x: np.ndarray) -> np.ndarray:
    """``x`` rounded to the case's dtype, back in float64 (complex128)."""
    with _precision(case):
        rounded = np.asarray(jnp.asarray(x, _param_dtype(case)))
    return rounded.astype(np.complex128 if case.dtype == "complex64" else np.float64)


# --- the case's optimizer, layout and run -------------------------------------------------


def _form_options(form: str) -> dict[str, Any]:
    return {
        "default": {},
        "bfloat16": {"m_dtype": "bfloat16", "u_dtype": "bfloat16"},
        "float16": {"m_dtype": "float16", "u_dtype": "float16"},
        "8bit": {"state_bits": 8},
    }[form]


def _static_options(case: Case) -> dict[str, Any]:
    return dict(
        eps_placement=case.eps_placement,
        bias_correction=case.bias_correction,
        nesterov=case.nesterov,
        lazy_rows=case.lazy_rows,
        skip_nonfinite=case.skip_nonfinite,
        block_size=case.block_size,
        **_form_options(case.form),
    )


def _layout(case: Case, opt: optax.GradientTransformation) -> optax.GradientTransformation:
    return ax.packed(opt, max_leaf_size=1000) if case.layout == "packed" else opt


def _optimizer(case: Case) -> optax.GradientTransformation:
    static = _static_options(case)
    ctor = ax.adamaxw if case.constructor == "adamaxw" else ax.adamax
    extra = {"weight_decay": WEIGHT_DECAY} if case.constructor == "adamaxw" else {}

    def build(learning_rate: Any, b1: Any, b2: Any, eps: Any) -> Any:
        return _layout(case, ctor(learning_rate, b1, b2, eps, **extra, **static))

    if case.wrapper == "inject_hyperparams":
        # Every number traced: b1, b2 and eps reach the core as arrays.
        # At least float32: with bfloat16 parameters optax would round b2 to 1.0,
        # which adamax_jax refuses (tests/test_bad_input.py).
        narrow = case.dtype in ("bfloat16", "float16")
        return optax.inject_hyperparams(build, hyperparam_dtype=jnp.float32 if narrow else None)(
            learning_rate=LR, b1=B1, b2=B2, eps=EPS
        )
    opt = build(LR, B1, B2, EPS)
    if case.wrapper == "multisteps":
        # optax.MultiSteps keeps a non-finite gradient in its running mean for good (a
        # NaN then reaches every later mean); its own remedy skips such micro-steps.
        return optax.MultiSteps(
            opt, every_k_schedule=MULTISTEPS, should_skip_update_fn=optax.skip_not_finite
        )
    if case.wrapper == "apply_if_finite":
        return optax.apply_if_finite(opt, max_consecutive_errors=T)
    if case.wrapper == "masked":
        return optax.masked(opt, MASK)
    if case.wrapper == "partition":
        return optax.partition({"case": opt, "plain": ax.adamax(LR)}, LABELS)
    if case.wrapper == "schedule_free":
        return optax.contrib.schedule_free(opt, LR, b1=0.9)
    if case.wrapper == "offload":
        return ax.offload(opt)  # the state in host memory between steps
    return opt


def _param_dtype(case: Case) -> Any:
    return jnp.dtype(case.dtype)


def _device_arrays(case: Case, tree: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v, _param_dtype(case)) for k, v in tree.items()}


def _step(opt: optax.GradientTransformation) -> Callable[..., Any]:
    def step(params: Any, state: Any, g: Any) -> Any:
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, updates

    return step


def _run_jit(case, opt, params, grads):
    step = _step(opt)

    def body(carry, g):
        p, s, u = step(*carry, g)
        return (p, s), u

    scan = jax.jit(lambda carry, gs: jax.lax.scan(body, carry, gs))
    state0 = jax.jit(opt.init)(params)
    (_, state), upd = scan((params, state0), grads)
    if case.way_out == "none":
        return upd, state0, state
    # Halfway, the state goes out and comes back; the rest must be bit for bit the run
    # that never stopped.
    half = T // 2
    carry, first = scan((params, state0), jax.tree.map(lambda g: g[:half], grads))
    rest = jax.tree.map(lambda g: g[half:], grads)
    if case.way_out == "orbax":
        carry = _through_orbax(carry)
        (_, resumed), second = scan(carry, rest)
    else:
        exported = jax.export.export(scan, platforms=("cpu",))(carry, rest)
        (_, resumed), second = jax.export.deserialize(exported.serialize()).call(carry, rest)
    resumed_upd = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, second)
    leaves = zip(
        jax.tree.leaves((resumed_upd, resumed)), jax.tree.leaves((upd, state)), strict=True
    )
    for a, b in leaves:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(case))
    return resumed_upd, state0, resumed


def _through_orbax(tree: Any) -> Any:
    """``tree`` saved with Orbax and restored onto its shapes, dtypes and shardings (the
    shardings carry the memory kind of an offloaded state: ``pinned_host``)."""
    ocp = pytest.importorskip("orbax.checkpoint")
    with tempfile.TemporaryDirectory() as tmp, ocp.StandardCheckpointer() as ckpt:
        path = pathlib.Path(tmp) / "ckpt"
        ckpt.save(path, tree)
        ckpt.wait_until_finished()
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
        )
        restored = ckpt.restore(path, target)
    # On one device Orbax (0.12) restores host-memory arrays typed as device memory,
    # which lax.scan refuses as the carry: docs/how-to/offload.md says what to do.
    host = lambda x: x.sharding.memory_kind == "pinned_host"
    return jax.tree.map(
        lambda r, x: jax.device_put(r, jax.memory.Space.Host) if host(x) else r, restored, tree
    )


def _mesh(axis_type: AxisType) -> jax.sharding.Mesh:
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)


def _run_mesh(case, opt, params, grads):
    explicit = case.layout == "explicit_zero"
    mesh = _mesh(AxisType.Explicit if explicit else AxisType.Auto)
    specs = {"w": P(None, "model"), "b": P(), "s": P()}
    param_sh = {k: NamedSharding(mesh, specs[k]) for k in params}
    with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
        params = jax.device_put(params, param_sh)
        state_sh = ax.sharding.state_sharding(
            opt, params, mesh, zero_axis="data" if explicit else None
        )
        state = state0 = jax.jit(opt.init, out_shardings=state_sh)(params)
        step = jax.jit(_step(opt), out_shardings=(param_sh, state_sh, param_sh))
        upd = []
        for t in range(T):
            g = jax.device_put({k: v[t] for k, v in grads.items()}, param_sh)
            params, state, u = jax.block_until_ready(step(params, state, g))
            upd.append(u)
        # The state keeps the layout state_sharding gave it.
        for s, sh in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh), strict=True):
            assert s.sharding.is_equivalent_to(sh, s.ndim), (s.sharding, sh)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *upd), state0, state


def _run_pmap(case, opt, params, grads):
    devices = jax.devices()[:2]
    step = _step(opt)

    def pstep(params, state, g):
        g = jax.lax.pmean(g, "d")  # identical on both devices: the same step
        return step(params, state, g)

    stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * len(devices)), tree)
    params = stack(params)
    state = state0 = jax.pmap(opt.init, devices=devices)(params)
    run = jax.pmap(pstep, axis_name="d", devices=devices)
    upd = []
    for t in range(T):
        params, state, u = run(params, state, stack({k: v[t] for k, v in grads.items()}))
        upd.append(jax.tree.map(lambda x: x[0], u))
        # Both devices hold the same state.
        for leaf in jax.tree.leaves(state):
            np.testing.assert_array_equal(np.asarray(leaf[0]), np.asarray(leaf[1]))
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *upd), first(state0), first(state)


def _run_shard_map(case, opt, params, grads):
    mesh = jax.make_mesh((2,), ("x",), axis_types=(AxisType.Explicit,))
    specs = {"w": P("x"), "b": P(), "s": P()}
    seq_specs = {"w": P(None, "x"), "b": P(), "s": P()}

    def per_shard(params, grads):
        upd, state0, state = _run_jit(case, opt, params, grads)
        del state0, state  # per shard; their avals are checked by the scan
        return upd

    run = jax.jit(
        jax.shard_map(per_shard, mesh=mesh, in_specs=(specs, seq_specs), out_specs=seq_specs)
    )
    with jax.set_mesh(mesh):
        place = lambda tree, sp: {
            k: jax.device_put(v, NamedSharding(mesh, sp[k])) for k, v in tree.items()
        }
        upd = run(place(params, specs), place(grads, seq_specs))
    return upd, None, None


RUNNERS = {
    "jit": _run_jit,
    "packed": _run_jit,
    "explicit_zero": _run_mesh,
    "auto": _run_mesh,
    "pmap": _run_pmap,
    "shard_map": _run_shard_map,
}


@contextlib.contextmanager
def _precision(case: Case) -> Iterator[None]:
    with jax.enable_x64(case.dtype == "float64"):
        yield


def _storage_of(case: Case, leaf: str) -> str:
    """How ``leaf``'s moments are stored in ``case`` (a key of :data:`TOLERANCE`)."""
    form = "default" if case.wrapper == "partition" and LABELS[leaf] == "plain" else case.form
    complex_leaf = case.dtype == "complex64"
    if form == "8bit":
        # 8-bit codes only for large real leaves (a packed buffer of small ones
        # here stays under 4096 elements).
        big = math.prod(SHAPES[leaf]) >= 4096 and not complex_leaf
        if case.layout == "shard_map":
            big = big and math.prod(SHAPES[leaf]) // 2 >= 4096
        if big:
            return "8bit"
        form = "default"
    if form == "default":
        return {"complex64": "float32", "float64": "float64"}.get(case.dtype, case.dtype)
    return form


def errors(case: Case) -> dict[str, Any]:
    """Runs ``case``; returns per-leaf error statistics and the checks' inputs."""
    grads64 = _gradients(case.dtype, case.has_nonfinite)
    ref, still = _reference_updates(case, {k: _as_seen(case, g) for k, g in grads64.items()})
    with _precision(case):
        opt = _optimizer(case)
        params = _device_arrays(case, {k: np.zeros(v) for k, v in SHAPES.items()})
        grads = _device_arrays(case, grads64)
        upd, state0, state = RUNNERS[case.layout](case, opt, params, grads)
        upd = jax.tree.map(np.asarray, upd)
        if state0 is not None:
            # The state keeps the dtypes and shapes init gave it.
            avals = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
            assert avals(state) == avals(state0)
    out = {}
    for k in SHAPES:
        if case.wrapper == "masked" and not MASK[k]:
            # optax.masked hands the gradient through unchanged, in its own dtype.
            np.testing.assert_array_equal(upd[k], np.asarray(grads[k]), err_msg=str(case))
            continue
        got = upd[k].astype(np.complex128 if case.dtype == "complex64" else np.float64)
        err = np.abs(got - ref[k]) / LR
        out[k] = {
            "storage": _storage_of(case, k),
            "update_dtype": upd[k].dtype,
            "p99": float(np.quantile(err, 0.99)),
            "max": float(err.max()),
            "finite": bool(np.all(np.isfinite(got))),
            "got": got,
            "ref": ref[k],
            "still": still[k],
        }
    return out


def check(case: Case) -> None:
    stats = errors(case)
    bound = direction_bound(
        B1,
        B2,
        np.arange(1, T + 1),
        nesterov=case.nesterov,
        bias_correction=case.bias_correction,
    )
    for k, s in stats.items():
        where = f"{case} leaf {k} ({s['storage']} state)"
        assert s["finite"], f"{where}: a non-finite update"
        p99_tol, max_tol = TOLERANCE[s["storage"]]
        # Updates in a narrow dtype are rounded once more, relative to their size;
        # schedule_free's updates are differences of parameter-sized values, rounded
        # relative to those.
        # (The core's direction has the parameters' dtype, whatever a float32 learning
        # rate injected after it makes of the update.)
        rounding = UPDATE_ROUNDING.get(case.dtype, 0.0)
        unit = bound.max()
        if case.wrapper == "schedule_free":
            # Its update rounds x, z and y (several operations) in the parameters' dtype.
            unit = max(unit, np.abs(np.cumsum(s["ref"], axis=0)).max() / LR)
            rounding *= 3
        assert s["p99"] <= (p99_tol + rounding) * unit, f"{where}: p99 error {s['p99']:.3g} lr"
        assert s["max"] <= (max_tol + rounding) * unit, f"{where}: max error {s['max']:.3g} lr"
        # Exactly no step where the reference takes none by construction: rows without
        # gradient, skipped non-finite elements, skipped and accumulating steps.
        np.testing.assert_array_equal(s["got"][s["still"]], 0, err_msg=where)
        if case.constructor == "adamax" and case.wrapper in ("none", "inject_hyperparams"):
            # The bounded step: every update within lr times the bound of step t.
            worst = np.abs(s["got"]).reshape(T, -1).max(axis=1) / LR
            excess = BOUND_RTOL[s["storage"]] + rounding
            assert np.all(worst <= bound * (1 + excess)), where


PAIRWISE = pairwise_cases()
SAMPLED = sampled_cases(40)


@pytest.mark.parametrize("case", PAIRWISE, ids=str)
def test_pairwise_combinations_match_the_reference(case: Case) -> None:
    check(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SAMPLED, ids=str)
def test_sampled_combinations_match_the_reference(case: Case) -> None:
    check(case)


@pytest.mark.parametrize("case", refused_cases(), ids=str)
def test_unsupported_combinations_are_refused(case: Case) -> None:
    pattern = case.refusal()
    assert pattern is not None
    with _precision(case), pytest.raises(ValueError, match=pattern):
        _optimizer(case).init(_device_arrays(case, {k: np.zeros(v) for k, v in SHAPES.items()}))


def test_the_pairwise_cases_cover_every_pair_that_can_run() -> None:
    covered = {p for case in PAIRWISE for p in case.pairs()}
    missing = [p for p in _all_pairs() if p not in covered and _completion(p) is not None]
    assert not missing


if __name__ == "__main__":  # error statistics of every case, for the documentation
    import sys
    import time

    assert "jax" not in sys.modules or jax.device_count() >= 8, "set XLA_FLAGS first"

    for case in PAIRWISE + (SAMPLED if "--all" in sys.argv else []):
        start = time.perf_counter()
        try:
            stats = errors(case)
            line = "  ".join(
                f"{k}[{s['storage']}] p99 {s['p99']:.2e} max {s['max']:.2e}"
                for k, s in stats.items()
            )
        except Exception as e:  # noqa: BLE001 (report and go on)
            line = f"FAILED {type(e).__name__}: {str(e)[:300]}"
        print(f"{time.perf_counter() - start:5.1f}s {case}: {line}", flush=True)
