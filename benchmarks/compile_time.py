"""How long a jitted optimizer step takes to trace and compile, by state form and leaf count.

Usage::

    python benchmarks/compile_time.py                      # 1000 and 2000 leaves, 3 rounds
    python benchmarks/compile_time.py --leaves 300 --rounds 2

A model with thousands of parameter leaves pays the optimizer's compile time at
every start. Each measurement runs in a fresh Python process (so no trace or
executable cache carries over), timing ``jax.jit(step).lower(...)`` (trace) and
``.compile()`` of one step ``update(grads) + apply_updates`` over ``n`` leaves of 4096
elements (large enough for 8-bit state to quantize every one), with the
parameters and the state donated as in a training loop. The optimizers
are measured interleaved, in an order reversed every round, so drift in the
machine's load hits all of them alike; the table gives the median over rounds,
the spread (max - min) and the ratios of medians to ``optax.adamax`` and to
``ax.adamax`` (float32 state).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

LEAF_SIZE = 4096
OPTIMIZERS = {
    "optax.adamax": "optax.adamax(1e-3)",
    "ax.adamax": "ax.adamax(1e-3)",
    "ax.adamax bf16": "ax.adamax(1e-3, m_dtype=jnp.bfloat16, u_dtype=jnp.bfloat16)",
    "ax.adamax 8-bit": "ax.adamax(1e-3, state_bits=8)",
    "ax.packed(ax.adamax)": f"ax.packed(ax.adamax(1e-3), max_leaf_size={LEAF_SIZE})",
}

_CHILD = """
import json, time, jax, jax.numpy as jnp, optax
import adamax_jax as ax
opt = {make}
params = [jax.ShapeDtypeStruct(({size},), jnp.float32) for _ in range({n})]
state = jax.eval_shape(opt.init, params)
def step(p, g, s):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s
t0 = time.perf_counter()
lowered = jax.jit(step, donate_argnums=(0, 2)).lower(params, params, state)
t1 = time.perf_counter()
lowered.compile()
t2 = time.perf_counter()
print(json.dumps({{"trace": t1 - t0, "compile": t2 - t1}}))
"""


def measure(name: str, n: int) -> dict[str, float]:
    code = _CHILD.format(make=OPTIMIZERS[name], size=LEAF_SIZE, n=n)
    env_cmd = [sys.executable, "-c", code]
    done = subprocess.run(env_cmd, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{name} with {n} leaves failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leaves", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    args = parser.parse_args()

    print(f"trace + compile of one step over n leaves of {LEAF_SIZE} float32 elements")
    print(f"({args.rounds} rounds, interleaved, order reversed every round; seconds)\n")
    print(
        "| leaves | optimizer | trace + compile (median) | spread | trace | vs optax.adamax "
        "| vs ax.adamax |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n in args.leaves:
        times: dict[str, list[dict[str, float]]] = {k: [] for k in args.only}
        order = list(args.only)
        for _ in range(args.rounds):
            for name in order:
                times[name].append(measure(name, n))
            order.reverse()
        total = {k: [t["trace"] + t["compile"] for t in v] for k, v in times.items()}
        bases = {
            b: statistics.median(total[b]) for b in ("optax.adamax", "ax.adamax") if b in total
        }
        for name in args.only:
            med = statistics.median(total[name])
            spread = max(total[name]) - min(total[name])
            trace = statistics.median(t["trace"] for t in times[name])
            ratios = " | ".join(
                f"{med / bases[b]:.2f}x" if b in bases else "-"
                for b in ("optax.adamax", "ax.adamax")
            )
            row = f"| {n} | {name} | {med:.1f} | {spread:.1f} | {trace:.1f} | {ratios} |"
            print(row, flush=True)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\n({time.perf_counter() - start:.0f} s in all)")
