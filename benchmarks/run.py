"""Optimizer-step benchmark: adamax_jax against optax and PyTorch, side by side.

Usage::

    python benchmarks/run.py            # full run, about 7 minutes on 2 cores
    python benchmarks/run.py --quick    # short run, under 2 minutes
    python benchmarks/run.py --sweep    # also: where packing small leaves stops paying

Every optimizer is timed in the same process, interleaved: each round times a
batch of steps of every optimizer in turn, after a 30 ms pause that lets the
previous runtime's spinning worker threads go idle, in an order that is rotated
every round and reversed every other round, so drift in the machine's load and
the position in the round hit all of them alike. Ratios to ``optax.adamax`` are
paired: the median over rounds of each round's own ratio, with the interquartile
range of those ratios as their spread (a ratio whose spread straddles 1 is no
difference). The step times are the medians over rounds.
JAX steps are ``jax.jit(step, donate_argnums=(params, state))``: without donation,
XLA allocates fresh outputs every step, which on CPU is several times slower.
PyTorch's step is ``torch.optim.Adamax(foreach=True).step()``.

Adamax is memory-bound: a float32 step must read params, grads, m and u and
write params, m and u, 28 bytes per parameter. The limit is measured with XLA
itself, on all cores, in the same rounds: a jitted, donated ``p + c * g`` over
the same tree (``optax.scale`` applied with ``optax.apply_updates``: 12 bytes per
parameter). Each float32-state result is reported as the fraction of that
bandwidth it reaches (``28 B * n / time`` over ``12 B * n / probe time``) and as
nanoseconds per parameter. XLA on CPU writes ``m``, ``u`` and the parameters in
separate loops that read the gradient and the new moments again (about 40 B
moved per parameter, not 28), so about 0.7 is what an XLA step reaches here.

``--quick`` runs fewer repeats, leaves out the packed bf16/8-bit variants, and
shrinks the two many-leaf cases from 1000 to 300 small leaves (XLA compiles one
kernel per leaf for ``optax.flatten`` and ``packed``, a few seconds per hundred).

Outputs: the tables on stdout; ``benchmarks/out/results.json`` (raw timings);
``benchmarks/results.md`` (the Markdown tables shown in the README) and
``docs/assets/benchmark.png`` (the plot), unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamax_jax as ax

ROOT = Path(__file__).resolve().parent.parent
LR = 1e-3
BYTES_PER_PARAM_F32 = 28  # read p, g, m, u; write p, m, u (4 bytes each)
BASELINE = "optax.adamax"
PROBE = "XLA p + c*g (bandwidth probe)"
BYTES_PER_PARAM_PROBE = 12  # read p, g; write p


# --------------------------------------------------------------------------- cases


def _leaves(n_leaves: int, size: int) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct((size,), jnp.float32) for _ in range(n_leaves)]


def transformer_shapes(
    vocab: int = 8192, d_model: int = 256, layers: int = 4, heads: int = 4, mlp: int = 1024
) -> Any:
    """The parameter tree (shapes only) of a small Flax decoder-only transformer."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            x = x + nn.SelfAttention(num_heads=heads)(nn.LayerNorm()(x))
            h = nn.Dense(mlp)(nn.LayerNorm()(x))
            return x + nn.Dense(d_model)(nn.gelu(h))

    class Transformer(nn.Module):
        @nn.compact
        def __call__(self, tokens: jax.Array) -> jax.Array:
            x = nn.Embed(vocab, d_model)(tokens)
            x = x + self.param("pos", nn.initializers.normal(0.02), (128, d_model))
            for _ in range(layers):
                x = Block()(x)
            return nn.Dense(vocab)(nn.LayerNorm()(x))

    tokens = jax.ShapeDtypeStruct((1, 128), jnp.int32)
    return jax.eval_shape(Transformer().init, jax.random.key(0), tokens)["params"]


@dataclasses.dataclass(frozen=True)
class Case:
    key: str  # stable identifier, used by the target checks
    name: str
    build: Callable[[], Any]  # returns a tree of ShapeDtypeStruct


def make_cases(n_small: int = 1000) -> list[Case]:
    """The benchmark's parameter trees; ``n_small`` small leaves in the many-leaf cases."""
    return [
        Case("1M", "1M leaf", lambda: _leaves(1, 2**20)),
        Case("16M", "16M leaf", lambda: _leaves(1, 2**24)),
        Case("many", f"{n_small} x 1000", lambda: _leaves(n_small, 1000)),
        Case("medium", "100 x 10000", lambda: _leaves(100, 10000)),
        Case(
            "mixed",
            f"mixed 4M + {n_small} x 1000",
            lambda: _leaves(1, 2**22) + _leaves(n_small, 1000),
        ),
        Case("flax", "flax transformer", transformer_shapes),
    ]


# ---------------------------------------------------------------------- optimizers


@dataclasses.dataclass(frozen=True)
class Optimizer:
    name: str
    make: Callable[[], Any] | None  # None: PyTorch; a str result: not available
    float32_state: bool = True  # whether the 28 B/param model applies
    quick: bool = True  # part of the --quick run


def _try(make: Callable[[], optax.GradientTransformation]) -> Callable[[], Any]:
    """A factory that returns 'n/a (...)' instead if a keyword does not exist (yet)."""

    def build() -> Any:
        try:
            return make()
        except TypeError as e:
            return f"n/a ({e})"

    return build


def _bf16() -> dict[str, Any]:
    return {"m_dtype": jnp.bfloat16, "u_dtype": jnp.bfloat16}


OPTIMIZERS = [
    Optimizer(BASELINE, lambda: optax.adamax(LR)),
    Optimizer(PROBE, lambda: optax.scale(-LR), float32_state=False),
    Optimizer("optax.flatten(adamax)", lambda: optax.flatten(optax.adamax(LR))),
    Optimizer("torch Adamax foreach", None),
    Optimizer("adamax_jax", lambda: ax.adamax(LR)),
    Optimizer("adamax_jax packed", lambda: ax.packed(ax.adamax(LR))),
    Optimizer("adamax_jax bf16 state", _try(lambda: ax.adamax(LR, **_bf16())), False),
    Optimizer(
        "adamax_jax bf16 packed", _try(lambda: ax.packed(ax.adamax(LR, **_bf16()))), False, False
    ),
    Optimizer("adamax_jax 8-bit state", _try(lambda: ax.adamax(LR, state_bits=8)), False),
    Optimizer(
        "adamax_jax 8-bit packed",
        _try(lambda: ax.packed(ax.adamax(LR, state_bits=8))),
        False,
        False,
    ),
]


# ------------------------------------------------------------------------- runners


def _random_tree(shapes: Any, seed: int, scale: float) -> Any:
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    # One host draw, sliced: thousands of separate device calls would dominate set-up.
    total = sum(math.prod(s.shape) for s in leaves)
    flat = (scale * rng.standard_normal(total, dtype=np.float32)).astype(np.float32)
    out, offset = [], 0
    for s in leaves:
        n = math.prod(s.shape)
        out.append(flat[offset : offset + n].reshape(s.shape))
        offset += n
    return treedef.unflatten(out)


class JaxRunner:
    """A jitted, donated step of one optax transformation on one parameter tree."""

    def __init__(self, tx: optax.GradientTransformation, params: Any, grads: Any):
        def step(p: Any, g: Any, s: Any) -> tuple[Any, Any]:
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        self._step = jax.jit(step, donate_argnums=(0, 2))
        self._params = jax.tree.map(jnp.array, params)
        self._grads = jax.tree.map(jnp.asarray, grads)
        self._state = jax.jit(tx.init)(self._params)
        self.run(1)  # compile

    def run(self, steps: int) -> float:
        p, s, g = self._params, self._state, self._grads
        start = time.perf_counter()
        for _ in range(steps):
            p, s = self._step(p, g, s)
        jax.block_until_ready((p, s))
        elapsed = time.perf_counter() - start
        self._params, self._state = p, s
        return elapsed / steps

    def close(self) -> None:
        self._params = self._state = self._grads = None


class TorchRunner:
    """``torch.optim.Adamax(foreach=True).step()`` with fixed gradients."""

    def __init__(self, params: Any, grads: Any):
        import torch

        self._torch = torch
        self._params = [torch.tensor(np.asarray(p)) for p in jax.tree.leaves(params)]
        for p, g in zip(self._params, jax.tree.leaves(grads), strict=True):
            p.grad = torch.tensor(np.asarray(g))
        self._opt = torch.optim.Adamax(self._params, lr=LR, foreach=True)
        self.run(1)

    def run(self, steps: int) -> float:
        with self._torch.no_grad():
            start = time.perf_counter()
            for _ in range(steps):
                self._opt.step()
            return (time.perf_counter() - start) / steps

    def close(self) -> None:
        self._opt = self._params = None


def copy_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 15) -> float:
    """Bytes per second of a NumPy copy (bytes read + bytes written), median of repeats."""
    src = np.ones(n_bytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(times)


# --------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Result:
    case: str  # Case.key
    case_name: str
    optimizer: str
    n_params: int
    n_leaves: int
    seconds: float | None  # median per step; None if not available
    spread: float | None  # (p75 - p25) / median over repeats
    setup_s: float | None = None  # init + first (compiling) step
    note: str = ""
    samples: list[float] | None = None  # seconds per step, one per round, in round order


def _calibrate(runner: Any, target_s: float) -> int:
    t = runner.run(1)
    return max(1, min(200, int(target_s / max(t, 1e-6))))


def bench_case(
    case: Case,
    optimizers: list[Optimizer],
    repeats: int,
    batch_s: float,
    log: Callable[[str], None] = print,
    settle_s: float = 0.03,
) -> list[Result]:
    """Times every optimizer on one case, interleaved; returns one Result per optimizer."""
    shapes = case.build()
    leaves = jax.tree.leaves(shapes)
    n_params = sum(math.prod(s.shape) for s in leaves)
    params = _random_tree(shapes, 0, 1.0)
    grads = _random_tree(shapes, 1, 1e-2)
    runners: dict[str, Any] = {}
    notes: dict[str, str] = {}
    setup: dict[str, float] = {}
    for opt in optimizers:
        start = time.perf_counter()
        try:
            if opt.make is None:
                runners[opt.name] = TorchRunner(params, grads)
            else:
                tx = opt.make()
                if isinstance(tx, str):
                    notes[opt.name] = tx
                    continue
                runners[opt.name] = JaxRunner(tx, params, grads)
        except ImportError as e:
            notes[opt.name] = f"n/a ({e})"
            continue
        setup[opt.name] = time.perf_counter() - start
    steps = {name: _calibrate(r, batch_s) for name, r in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for rep in range(repeats):
        # Rotate the order so no optimizer always runs right after the same one, and
        # reverse it every other round so none always runs early in a round.
        names = list(runners)
        names = names[rep % len(names) :] + names[: rep % len(names)]
        if rep % 2:
            names.reverse()
        for name in names:
            # Let the previous runtime's spinning worker threads go idle first: JAX's
            # and PyTorch's thread pools otherwise compete for the cores.
            time.sleep(settle_s)
            times[name].append(runners[name].run(steps[name]))
    for r in runners.values():
        r.close()
    results = []
    for opt in optimizers:
        common = dict(case=case.key, case_name=case.name, optimizer=opt.name)
        common.update(n_params=n_params, n_leaves=len(leaves))
        if opt.name in times:
            ts = times[opt.name]
            med = statistics.median(ts)
            q25, q75 = np.percentile(ts, [25, 75])
            spread = float((q75 - q25) / med)
            results.append(
                Result(**common, seconds=med, spread=spread, setup_s=setup[opt.name], samples=ts)
            )
        else:
            note = notes.get(opt.name, "n/a")
            log(f"  {opt.name}: {note}")
            results.append(Result(**common, seconds=None, spread=None, note=note))
    return results


def threshold_sweep(
    sizes: tuple[int, ...] = (1024, 4096, 8192, 16384, 32768, 65536),
    total: int = 2**21,
    repeats: int = 11,
) -> list[tuple[int, int, float, float]]:
    """Leaves of each size (``total`` parameters in all), all packed against none packed.

    Returns ``(size, n_leaves, seconds unpacked, seconds packed)`` per size: where the
    ratio crosses 1 is where packing a leaf stops paying (``packed``'s default
    ``max_leaf_size`` sits below it).
    """
    rows = []
    for size in sizes:
        k = max(2, total // size)
        shapes = _leaves(k, size)
        params, grads = _random_tree(shapes, 0, 1.0), _random_tree(shapes, 1, 1e-2)
        plain = JaxRunner(ax.adamax(LR), params, grads)
        packed = JaxRunner(ax.packed(ax.adamax(LR), max_leaf_size=size), params, grads)
        steps = _calibrate(plain, 0.05)
        t_plain, t_packed = [], []
        for _ in range(repeats):
            time.sleep(0.02)
            t_plain.append(plain.run(steps))
            time.sleep(0.02)
            t_packed.append(packed.run(steps))
        row = (size, k, statistics.median(t_plain), statistics.median(t_packed))
        print(f"  {size:>6} x {k:<5} packed / unpacked = {row[3] / row[2]:.2f}", flush=True)
        rows.append(row)
    return rows


# -------------------------------------------------------------------------- reports


def _by(results: list[Result]) -> dict[tuple[str, str], Result]:
    return {(r.case, r.optimizer): r for r in results}


def _paired(table: dict[tuple[str, str], Result], case: str, a: str, b: str) -> list[float] | None:
    """``a``'s time over ``b``'s, round by round (or of the medians, for old results)."""
    ra, rb = table.get((case, a)), table.get((case, b))
    if ra is None or rb is None or ra.seconds is None or rb.seconds is None:
        return None
    if ra.samples and rb.samples and len(ra.samples) == len(rb.samples):
        return [x / y for x, y in zip(ra.samples, rb.samples, strict=True)]
    return [ra.seconds / rb.seconds]


def _ratio(table: dict[tuple[str, str], Result], case: str, a: str, b: str) -> float | None:
    """The median of the paired, round-by-round ratios of ``a`` to ``b``."""
    ratios = _paired(table, case, a, b)
    return None if ratios is None else float(statistics.median(ratios))


def _ratio_spread(table: dict[tuple[str, str], Result], case: str, a: str, b: str) -> float:
    """The interquartile range of the paired ratios."""
    ratios = _paired(table, case, a, b) or [0.0]
    q25, q75 = np.percentile(ratios, [25, 75])
    return float(q75 - q25)


def limit_fraction(table: dict[tuple[str, str], Result], r: Result) -> float | None:
    """Bytes a float32 step moves per second over the bandwidth probe's, in the same rounds."""
    probe = _ratio(table, r.case, PROBE, r.optimizer)  # probe time / step time, paired
    if probe is None:
        return None
    return BYTES_PER_PARAM_F32 / BYTES_PER_PARAM_PROBE * probe


def target_checks(results: list[Result], bandwidth: float) -> list[tuple[str, float | None, str]]:
    """(description, measured value, verdict) for each target of the issue."""
    t = _by(results)
    names = {r.case: r.case_name for r in results}
    checks: list[tuple[str, float | None, str]] = []

    def add(desc: str, value: float | None, ok: Callable[[float], bool]) -> None:
        verdict = "n/a" if value is None else ("met" if ok(value) else "NOT met")
        checks.append((desc, value, verdict))

    big, many, medium, mixed = (names.get(k, k) for k in ("16M", "many", "medium", "mixed"))
    add(
        f"{big}: adamax_jax / optax.adamax <= 1.0",
        _ratio(t, "16M", "adamax_jax", BASELINE),
        lambda v: v <= 1.0,
    )
    r = t.get(("16M", "adamax_jax"))
    frac = None if r is None or r.seconds is None else limit_fraction(t, r)
    add(
        f"{big}: adamax_jax, fraction of XLA's streaming bandwidth >= 0.9", frac, lambda v: v >= 0.9
    )
    add(
        f"{big}: adamax_jax / torch foreach < 1.0",
        _ratio(t, "16M", "adamax_jax", "torch Adamax foreach"),
        lambda v: v < 1.0,
    )
    add(
        f"{many}: packed / optax.flatten(adamax) <= 1.0",
        _ratio(t, "many", "adamax_jax packed", "optax.flatten(adamax)"),
        lambda v: v <= 1.0,
    )
    add(
        f"{medium}: packed / optax.adamax <= 1.0",
        _ratio(t, "medium", "adamax_jax packed", BASELINE),
        lambda v: v <= 1.0,
    )
    add(
        f"{big}: packed / optax.adamax <= 1.0",
        _ratio(t, "16M", "adamax_jax packed", BASELINE),
        lambda v: v <= 1.0,
    )
    a = _ratio(t, "mixed", "adamax_jax packed", BASELINE)
    b = _ratio(t, "mixed", "adamax_jax packed", "optax.flatten(adamax)")
    add(
        f"{mixed}: packed / min(optax.adamax, optax.flatten) <= 0.8",
        None if a is None or b is None else max(a, b),
        lambda v: v <= 0.8,
    )
    add(
        f"{big}: 8-bit state / float32 state <= 1.0",
        _ratio(t, "16M", "adamax_jax 8-bit state", "adamax_jax"),
        lambda v: v <= 1.0,
    )
    return checks


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def markdown(
    results: list[Result],
    optimizers: list[Optimizer],
    bandwidth: float,
    meta: dict[str, Any],
    sweep: list[tuple[int, int, float, float]] | None = None,
) -> str:
    t = _by(results)
    cases = list(dict.fromkeys(r.case for r in results))
    names = {r.case: r.case_name for r in results}
    header = ["optimizer", *(names[c] for c in cases)]
    shown = [o for o in optimizers if any(t.get((c, o.name)) for c in cases)]

    def cell(c: str, name: str, fmt: Callable[[Result], str]) -> str:
        r = t.get((c, name))
        return "n/a" if r is None or r.seconds is None else fmt(r)

    def time_cell(c: str, name: str) -> str:
        def fmt(r: Result) -> str:
            ratio = _ratio(t, c, name, BASELINE)
            if ratio is None:
                return f"{r.seconds * 1e3:.2f}"
            spread = _ratio_spread(t, c, name, BASELINE)
            return f"{r.seconds * 1e3:.2f} ({ratio:.2f}x ± {spread / 2:.2f})"

        return cell(c, name, fmt)

    def bw_cell(c: str, name: str) -> str:
        def fmt(r: Result) -> str:
            frac = limit_fraction(t, r)
            shown = "n/a" if frac is None else f"{frac:.2f}"
            return f"{r.seconds / r.n_params * 1e9:.2f} ns ({shown})"

        return cell(c, name, fmt)

    lines = [
        f"Step time in ms (median of {meta['repeats']} interleaved rounds) and, in brackets, "
        f"its ratio to `{BASELINE}`: the median of the rounds' paired ratios ± half their "
        f"interquartile range; lower is faster. {meta['machine']}. "
        f"Command: `{meta['command']}`.",
        "",
        *_table(header, [[o.name, *(time_cell(c, o.name) for c in cases)] for o in shown]),
        "",
        "Float32 state: nanoseconds per parameter and, in brackets, the fraction of XLA's "
        f"streaming bandwidth reached ({BYTES_PER_PARAM_F32} B/param per step against "
        f"`{PROBE}` at {BYTES_PER_PARAM_PROBE} B/param, timed in the same rounds; a "
        f"single-threaded NumPy copy moves {bandwidth / 1e9:.1f} GB/s here).",
        "",
        *_table(
            header,
            [[o.name, *(bw_cell(c, o.name) for c in cases)] for o in shown if o.float32_state],
        ),
        "",
        "Set-up time in s: init and the first, compiling, step.",
        "",
        *_table(
            header,
            [
                [o.name, *(cell(c, o.name, lambda r: f"{r.setup_s:.1f}") for c in cases)]
                for o in shown
            ],
        ),
        "",
        *_table(
            ["target", "measured", "verdict"],
            [
                [desc, "n/a" if v is None else f"{v:.2f}", verdict]
                for desc, v, verdict in target_checks(results, bandwidth)
            ],
        ),
    ]
    spreads = [r.spread for r in results if r.spread is not None]
    if spreads:
        lines += [
            "",
            f"Noise: the interquartile range of the repeats is a median {np.median(spreads):.0%} "
            f"(at most {max(spreads):.0%}) of each median.",
        ]
    if sweep:
        lines += [
            "",
            "Where packing stops paying: leaves of one size (2M parameters in all), "
            "`packed(adamax(), max_leaf_size=size)` against `adamax()`.",
            "",
            *_table(
                ["leaf size", "leaves", "unpacked ms", "packed ms", "packed / unpacked"],
                [
                    [f"{s}", f"{k}", f"{a * 1e3:.2f}", f"{b * 1e3:.2f}", f"{b / a:.2f}"]
                    for s, k, a, b in sweep
                ],
            ),
        ]
    return "\n".join(lines) + "\n"


def plot(results: list[Result], optimizers: list[Optimizer], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = _by(results)
    cases = list(dict.fromkeys(r.case for r in results))
    names = {r.case: r.case_name for r in results}
    shown = [
        o.name
        for o in optimizers
        if any(t.get((c, o.name)) and t[(c, o.name)].seconds for c in cases)
    ]
    fig, axis = plt.subplots(figsize=(11, 5.4))
    width = 0.8 / max(len(shown), 1)
    ratios = []
    for i, name in enumerate(shown):
        ys = [_ratio(t, c, name, BASELINE) or 0.0 for c in cases]
        ratios += [y for y in ys if y > 0]
        xs = np.arange(len(cases)) + (i - (len(shown) - 1) / 2) * width
        axis.bar(xs, ys, width, label=name)
    axis.axhline(1.0, color="black", lw=0.8)
    axis.set_xticks(np.arange(len(cases)), [names[c] for c in cases], fontsize=9)
    axis.set_ylabel(f"step time / {BASELINE} (lower is faster)")
    axis.set_yscale("log")
    ticks = [x for x in (0.125, 0.25, 0.5, 1, 2, 4, 8, 16) if min(ratios) / 2 < x < max(ratios) * 2]
    axis.set_yticks(ticks, [f"{x:g}x" for x in ticks])
    axis.minorticks_off()
    axis.set_title("Adamax step, jitted with donated buffers (same process, interleaved)")
    axis.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results: list[Result], bandwidth: float) -> None:
    t = _by(results)
    for case in dict.fromkeys(r.case for r in results):
        rows = [r for r in results if r.case == case]
        n = rows[0].n_params
        print(f"\n{rows[0].case_name}: {n:,} params in {rows[0].n_leaves} leaves")
        head = ("ms/step", 9), ("ns/param", 10), ("x optax", 9), ("of probe", 9), ("IQR", 7)
        print(f"  {'optimizer':<26}" + "".join(f"{h:>{w}}" for h, w in head) + "  set-up s")
        for r in rows:
            if r.seconds is None:
                print(f"  {r.optimizer:<26}{'n/a':>9}")
                continue
            ratio = _ratio(t, case, r.optimizer, BASELINE) or float("nan")
            frac = (r.optimizer != PROBE and limit_fraction(t, r)) or float("nan")
            print(
                f"  {r.optimizer:<26}{r.seconds * 1e3:>9.3f}{r.seconds / n * 1e9:>10.3f}"
                f"{ratio:>9.2f}{frac:>9.2f}{r.spread:>7.1%}{r.setup_s:>10.1f}"
            )


# ----------------------------------------------------------------------------- main


def rewrite(raw_path: Path, markdown_path: Path, plot_path: Path) -> list[Result]:
    """The Markdown table and plot again, from a saved ``results.json``."""
    raw = json.loads(raw_path.read_text())
    results = [Result(**r) for r in raw["results"]]
    names = dict.fromkeys(r.optimizer for r in results)
    optimizers = [o for o in OPTIMIZERS if o.name in names]
    sweep = [tuple(row) for row in raw["sweep"]] if raw.get("sweep") else None
    markdown_path.write_text(
        markdown(results, optimizers, raw["copy_bandwidth"], raw["meta"], sweep)
    )
    plot(results, optimizers, plot_path)
    print(f"wrote {markdown_path} and {plot_path}")
    return results


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (see above)")
    parser.add_argument("--sweep", action="store_true", help="also sweep the packing threshold")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per case")
    parser.add_argument("--cases", help="comma-separated case keys: 1M,16M,many,medium,mixed,flax")
    parser.add_argument("--optimizers", help="comma-separated substrings of optimizer names")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "results.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "assets" / "benchmark.png")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    parser.add_argument(
        "--from-json", type=Path, help="rewrite the Markdown and plot from a saved results.json"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        return rewrite(args.from_json, args.markdown, args.plot)

    repeats = args.repeats or (5 if args.quick else 15)
    batch_s = 0.03 if args.quick else 0.1
    cases = make_cases(300 if args.quick else 1000)
    if args.cases:
        keys = {k.strip() for k in args.cases.split(",")}
        cases = [c for c in cases if c.key in keys]
    optimizers = [o for o in OPTIMIZERS if o.quick or not args.quick]
    if args.optimizers:
        keys = [k.strip() for k in args.optimizers.split(",")]
        optimizers = [o for o in optimizers if any(k in o.name for k in keys)]

    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, optax {optax.__version__}"
    )
    bandwidth = copy_bandwidth()
    print(f"{machine}\nNumPy copy bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
    results: list[Result] = []
    for case in cases:
        start = time.perf_counter()
        print(f"[{case.name}] ...", flush=True)
        results += bench_case(case, optimizers, repeats, batch_s)
        print(f"[{case.name}] done in {time.perf_counter() - start:.0f} s", flush=True)
    bandwidth = (bandwidth + copy_bandwidth()) / 2  # before and after, against drift
    print_table(results, bandwidth)
    print()
    for desc, value, verdict in target_checks(results, bandwidth):
        print(f"{verdict:>8}  {desc}: {'n/a' if value is None else f'{value:.2f}'}")
    sweep = None
    if args.sweep:
        print("\npacking threshold sweep:")
        sweep = threshold_sweep()

    if not args.no_write:
        command = "python benchmarks/run.py" + (" --quick" if args.quick else "")
        command += " --sweep" if args.sweep else ""
        meta = {"repeats": repeats, "machine": machine, "command": command}
        args.out.mkdir(parents=True, exist_ok=True)
        raw = {
            "meta": meta,
            "copy_bandwidth": bandwidth,
            "results": [dataclasses.asdict(r) for r in results],
            "sweep": sweep,
        }
        (args.out / "results.json").write_text(json.dumps(raw, indent=1))
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(results, optimizers, bandwidth, meta, sweep))
        plot(results, optimizers, args.plot)
        print(f"\nwrote {args.markdown}, {args.plot} and {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
