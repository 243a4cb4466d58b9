"""Accelerator check: is adamax_jax right, and how fast, on the device JAX sees?

Usage::

    python benchmarks/device_check.py            # a 16M-element leaf
    python benchmarks/device_check.py --quick    # a 1M leaf, 5 rounds: under 90 s on 2 cores
    python benchmarks/device_check.py --pytest   # also runs tests/test_core.py on this backend

It runs on whatever backend JAX picks (set ``JAX_PLATFORMS`` to choose), in two parts:

1. **Correctness on the device**, against the float64 NumPy transcription in
   ``tests/_reference.py``: float32 state (the trajectory), bfloat16 state (the
   trajectory, within a bound for its rounding) and 8-bit state (every step bounded by
   the learning rate and close to the reference's). A failed check exits with status 1.
2. **Speed**: one leaf, each optimizer's step jitted with donated parameters and state,
   timed interleaved in a rotating order over several rounds (``benchmarks/run.py``'s
   ``bench_case``): the median step time, its interquartile spread, the ratio to
   ``optax.adamax``, and the achieved bandwidth.

Bytes moved per parameter per step are counted as the least a fused step must touch:
read the parameter, the gradient and both moments, write the parameter and both
moments. With float32 parameters and gradients that is 4 + 4 + 4 (p, g read; p
written) plus the moments read and written: float32 ``4 * 4``, bfloat16 ``2 * 4``, 8-bit
``1 * 4`` plus the per-block ``u`` scales (``2 * 4 / block_size``): 28, 20 and 16.03
bytes. The bandwidth is compared with the device's memory bandwidth from its
datasheet where the device is in :data:`PEAK_BANDWIDTH`, otherwise with a measured
``a + c * b`` (``a`` donated, 12 bytes per element) of the same size, timed alongside.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# This checkout's adamax_jax (installed or not), benchmarks/run.py and tests/_reference.py.
sys.path[:0] = [str(ROOT), str(HERE)]

import jax
import jax.numpy as jnp
import numpy as np
import optax
import run as bench

import adamax_jax as ax
from tests._reference import adamax_update

# Datasheet memory bandwidth, bytes per second, by a pattern of `device_kind`.
PEAK_BANDWIDTH: tuple[tuple[str, str, float], ...] = (
    (r"h200", "H200", 4.8e12),
    (r"h100.*(sxm|hbm3)", "H100 SXM", 3.35e12),
    (r"a100.*80\s*gb", "A100 80GB", 2.0e12),
    (r"tpu v4", "TPU v4", 1.2e12),
    (r"tpu v5 ?(lite|e)", "TPU v5e", 0.82e12),
    (r"tpu v5p?$", "TPU v5p", 2.76e12),
)

BLOCK_SIZE = 256
TRIAD = "a + c*b (donated)"
# (row name in bench.OPTIMIZERS, bytes per parameter per step)
TIMED: tuple[tuple[str, float], ...] = (
    (bench.BASELINE, 28.0),
    ("adamax_jax", 28.0),
    ("adamax_jax bf16 state", 20.0),
    ("adamax_jax 8-bit state", 16.0 + 8.0 / BLOCK_SIZE),
)


def peak_bandwidth(device_kind: str) -> tuple[str, float] | None:
    kind = device_kind.lower()
    for pattern, label, bandwidth in PEAK_BANDWIDTH:
        if re.search(pattern, kind):
            return label, bandwidth
    return None


# ----------------------------------------------------------------- correctness


def _gradients(steps: int, shape: tuple[int, ...], seed: int, cauchy: bool = False) -> np.ndarray:
    """Per-step gradients whose scale varies over five decades between rows."""
    rng = np.random.default_rng(seed)
    draw = rng.standard_cauchy if cauchy else rng.standard_normal
    g = draw((steps, *shape))
    row_scale = 10.0 ** rng.uniform(-3, 2, size=(shape[0],) + (1,) * (len(shape) - 1))
    return (g * row_scale).astype(np.float32)


def _jax_updates(opt: optax.GradientTransformation, grads: np.ndarray) -> np.ndarray:
    """The update of every step (Adamax's update does not read the parameters)."""
    state = opt.init(jnp.zeros(grads.shape[1:], jnp.float32))
    update = jax.jit(opt.update)
    out = []
    for g in grads:
        u, state = update(jnp.asarray(g), state)
        out.append(np.asarray(u))
    return np.stack(out)


def _reference_updates(grads: np.ndarray, lr: float) -> np.ndarray:
    zeros = np.zeros(grads.shape[1:])
    m, u, out = zeros, zeros, []
    for t, g in enumerate(grads, 1):
        p, m, u = adamax_update(zeros, g, m, u, t, lr)
        out.append(p)  # from zero parameters, the new parameters are the update
    return np.stack(out)


def correctness_checks() -> list[tuple[str, bool, str]]:
    """(name, passed, what was measured) for each check, run on the default device."""
    lr, steps = 1e-2, 30
    checks = []

    grads = _gradients(steps, (64, 80), seed=0)
    ref = _reference_updates(grads, lr)
    f32 = _jax_updates(ax.adamax(lr), grads)
    err = float(np.max(np.abs(f32 - ref)) / lr)
    checks.append(("float32 state vs NumPy float64", err <= 1e-5, f"max |du| = {err:.1e} lr"))

    bf16 = _jax_updates(ax.adamax(lr, m_dtype="bfloat16", u_dtype="bfloat16"), grads)
    err = float(np.max(np.abs(bf16 - ref)) / lr)
    med = float(np.median(np.abs(bf16 - ref)) / lr)
    checks.append(
        (
            "bfloat16 state vs NumPy float64",
            err <= 0.05 and med <= 0.005,
            f"max |du| = {err:.3f} lr, median {med:.1e} lr",
        )
    )

    grads = _gradients(steps, (64, 256), seed=1, cauchy=True)  # 64 blocks of 256
    ref = _reference_updates(grads, lr)
    q8 = _jax_updates(ax.adamax(lr, state_bits=8, block_size=BLOCK_SIZE), grads)
    bound = float(np.max(np.abs(q8)) / lr)
    p99 = float(np.percentile(np.abs(q8 - ref), 99) / lr)
    checks.append(
        (
            "8-bit state: bounded step, close to NumPy float64",
            bound <= 1.05 and p99 <= 0.05,
            f"max |u| = {bound:.4f} lr, p99 |du| = {p99:.3f} lr",
        )
    )
    return checks


def run_pytest() -> int:
    """tests/test_core.py in a subprocess on this backend (conftest.py would pick cpu)."""
    env = {**os.environ, "JAX_PLATFORMS": jax.default_backend()}
    # addopts cleared: no xdist workers, notebooks or doctests, just the one file.
    cmd = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "tests/test_core.py"]
    return subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode


# ------------------------------------------------------------------------ speed


def timed_optimizers() -> list[bench.Optimizer]:
    by_name = {o.name: o for o in bench.OPTIMIZERS}
    chosen = [by_name[name] for name, _ in TIMED]
    return [*chosen, bench.Optimizer(TRIAD, lambda: optax.scale(0.5))]


def speed(n: int, repeats: int, batch_s: float) -> list[bench.Result]:
    # optax.scale(0.5) under the runner's `apply_updates` is `p + 0.5 * g` with p
    # donated: a streaming kernel of the same size, read 8 and write 4 bytes.
    case = bench.Case("leaf", f"{n:,} leaf", lambda: bench._leaves(1, n))
    return bench.bench_case(case, timed_optimizers(), repeats, batch_s, log=lambda _: None)


def table(results: list[bench.Result], n: int) -> str:
    device = jax.devices()[0]
    backend, kind = jax.default_backend(), device.device_kind
    bytes_per_param = {**dict(TIMED), TRIAD: 12.0}
    by_name = {r.optimizer: r for r in results}
    base = by_name[bench.BASELINE].seconds
    triad = by_name[TRIAD]
    peak = peak_bandwidth(kind)
    if peak is not None:
        reference = peak[1]
        ref_label = f"of {reference / 1e12:.2f} TB/s ({peak[0]} datasheet)"
    else:
        assert triad.seconds is not None
        reference = 12.0 * n / triad.seconds
        ref_label = f"of {reference / 1e9:.1f} GB/s (measured a + c*b)"
    header = ["backend", "device", "step", "ms", "IQR", "vs optax.adamax", "B/param", "GB/s"]
    header.append(ref_label)
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 3)]
    for r in results:
        if r.seconds is None:
            lines.append(f"| {backend} | {kind} | {r.optimizer} | n/a ({r.note}) |")
            continue
        rate = bytes_per_param[r.optimizer] * n / r.seconds
        ratio = "-" if r.optimizer == TRIAD or base is None else f"{r.seconds / base:.2f}x"
        cells = [backend, kind, r.optimizer, f"{r.seconds * 1e3:.3f}", f"{r.spread:.0%}", ratio]
        cells += [f"{bytes_per_param[r.optimizer]:.2f}", f"{rate / 1e9:.1f}"]
        cells.append(f"{rate / reference:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 1M leaf and 5 rounds")
    parser.add_argument("--size", type=int, help="elements in the timed leaf (default 2**24)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds (default 15, quick 5)")
    parser.add_argument("--pytest", action="store_true", help="also run tests/test_core.py")
    args = parser.parse_args(argv)
    n = args.size or (2**20 if args.quick else 2**24)
    repeats = args.repeats or (5 if args.quick else 15)
    start = time.perf_counter()
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {device.device_kind}")

    failed = 0
    for name, passed, detail in correctness_checks():
        failed += not passed
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {detail}", flush=True)
    if args.pytest:
        code = run_pytest()
        failed += code != 0
        print(f"{'PASS' if code == 0 else 'FAIL'}  pytest tests/test_core.py", flush=True)

    results = speed(n, repeats, batch_s=0.03 if args.quick else 0.1)
    print(
        f"\nOne {n:,}-element float32 leaf; median of {repeats} interleaved rounds; "
        "bytes per parameter as counted in this script's docstring.\n"
    )
    print(table(results, n))
    print(f"\n{time.perf_counter() - start:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
