"""Compile time of a transformer's training step, its layers unscanned or scanned.

Usage::

    python benchmarks/compile_scan.py                  # 8 layers, 3 rounds: about 3 minutes
    python benchmarks/compile_scan.py --layers 16      # the docs' table: about 6 minutes

JAX compiles an optimizer step leaf by leaf, so a model's compile time grows with
its number of parameter leaves, and 8-bit state's leaves compile slower than float32
state's. Scanning over the layers (``jax.lax.scan`` over weights stacked along a
leading axis, as ``nnx.scan`` and ``nn.scan`` do) gives the optimizer one leaf per
kind of weight instead of one per layer.

The model is a pre-norm decoder-only transformer in plain JAX (attention and an MLP
per layer, 12 parameter leaves per layer). One training step (loss, gradients,
``opt.update``, ``optax.apply_updates``, parameters and state donated) is traced
(``jax.jit(step).lower``) and compiled (``.compile()``) on abstract inputs, each
measurement in a fresh Python process so that no cache carries over. The four cases
(unscanned or scanned, float32 or 8-bit state) run interleaved, in an order
reversed every round; the table gives each case's median over the rounds, the
spread (max - min), the median trace time, and the ratio of medians to the
unscanned float32 case.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

CASES = {
    # name: (scanned, state_bits)
    "unscanned, float32 state": (False, None),
    "unscanned, 8-bit state": (False, 8),
    "scanned, float32 state": (True, None),
    "scanned, 8-bit state": (True, 8),
}
BASELINE = "unscanned, float32 state"


def _child(scanned: bool, state_bits: int | None, args: argparse.Namespace) -> dict:
    """Traces and compiles one training step; runs in a fresh process."""
    import jax
    import jax.numpy as jnp
    import optax

    import adamax_jax as ax

    d, heads, hidden = args.width, args.heads, 4 * args.width

    def dense(key, n_in, n_out):
        return {
            "w": jax.random.normal(key, (n_in, n_out)) / n_in**0.5,
            "b": jnp.zeros(n_out),
        }

    def init_layer(key):
        k = jax.random.split(key, 4)
        return {
            "norm1": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
            "qkv": dense(k[0], d, 3 * d),
            "out": dense(k[1], d, d),
            "norm2": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
            "up": dense(k[2], d, hidden),
            "down": dense(k[3], hidden, d),
        }

    def init(key):
        k_embed, k_layers = jax.random.split(key)
        keys = jax.random.split(k_layers, args.layers)
        # Scanned: one leaf per kind of weight, stacked over the layers; else one per layer.
        layers = jax.vmap(init_layer)(keys) if scanned else [init_layer(k) for k in keys]
        return {
            "embed": jax.random.normal(k_embed, (args.vocab, d)) * 0.02,
            "pos": jnp.zeros((args.seq, d)),
            "layers": layers,
            "norm": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
        }

    def norm(p, x):
        mean = x.mean(-1, keepdims=True)
        var = x.var(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]

    def block(p, x):
        b, t, _ = x.shape
        q, k, v = jnp.split(norm(p["norm1"], x) @ p["qkv"]["w"] + p["qkv"]["b"], 3, axis=-1)
        q, k, v = (a.reshape(b, t, heads, d // heads) for a in (q, k, v))
        mask = jnp.tril(jnp.ones((t, t), bool))
        attn = jax.nn.dot_product_attention(q, k, v, mask=mask[None, None])
        x = x + attn.reshape(b, t, d) @ p["out"]["w"] + p["out"]["b"]
        h = jax.nn.gelu(norm(p["norm2"], x) @ p["up"]["w"] + p["up"]["b"])
        return x + h @ p["down"]["w"] + p["down"]["b"]

    def loss_fn(params, tokens):
        x = params["embed"][tokens[:, :-1]] + params["pos"][: tokens.shape[1] - 1]
        if scanned:
            x, _ = jax.lax.scan(lambda x, p: (block(p, x), None), x, params["layers"])
        else:
            for p in params["layers"]:
                x = block(p, x)
        logits = norm(params["norm"], x) @ params["embed"].T
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    opt = ax.adamax(1e-3, state_bits=state_bits)

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = jax.eval_shape(init, jax.random.key(0))
    opt_state = jax.eval_shape(opt.init, params)
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq + 1), jnp.int32)

    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, tokens)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {
        "trace": t1 - t0,
        "compile": t2 - t1,
        "param_leaves": len(jax.tree.leaves(params)),
        "state_leaves": len(jax.tree.leaves(opt_state)),
        "params": sum(p.size for p in jax.tree.leaves(params)),
        "versions": f"jax {jax.__version__} on {jax.default_backend()}, optax {optax.__version__}",
    }


def _measure(name: str, args: argparse.Namespace) -> dict:
    scanned, bits = CASES[name]
    cmd = [sys.executable, __file__, "--child", str(int(scanned)), str(bits or 0)]
    cmd += [f"--{k}={getattr(args, k)}" for k in ("layers", "width", "heads", "vocab", "seq")]
    cmd += [f"--batch={args.batch}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=128, help="model width (default 128)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        scanned, bits = args.child
        print(json.dumps(_child(bool(scanned), bits or None, args)))
        return

    start = time.perf_counter()
    runs: dict[str, list[dict]] = {name: [] for name in CASES}
    order = list(CASES)
    for r in range(args.rounds):
        for name in order:
            runs[name].append(_measure(name, args))
            t = runs[name][-1]
            print(f"round {r + 1}: {name}: {t['trace'] + t['compile']:.1f} s", file=sys.stderr)
        order.reverse()

    first = runs[BASELINE][0]
    print(
        f"Trace + compile of one training step: a {args.layers}-layer transformer "
        f"(width {args.width}, {first['params']:,} parameters), batch {args.batch} x "
        f"{args.seq} tokens, `ax.adamax(1e-3)`. Median of {args.rounds} rounds, each case "
        f"in a fresh process, interleaved. {platform.machine()}, {first['versions']}.\n"
    )
    print("| layers | parameter leaves | state | trace + compile, s | spread | trace, s | ratio |")
    print("|---|---:|---|---:|---:|---:|---:|")
    base = statistics.median(t["trace"] + t["compile"] for t in runs[BASELINE])
    for name, ts in runs.items():
        total = [t["trace"] + t["compile"] for t in ts]
        med = statistics.median(total)
        layout, state = name.split(", ")
        print(
            f"| {layout} | {ts[0]['param_leaves']} | {state} | {med:.1f} | "
            f"{max(total) - min(total):.1f} | {statistics.median(t['trace'] for t in ts):.1f} | "
            f"{med / base:.2f}x |"
        )
    options = " ".join(
        f"--{k} {getattr(args, k)}"
        for k in ("layers", "width", "heads", "vocab", "seq", "batch", "rounds")
    )
    print(f"\nCommand: `python benchmarks/compile_scan.py {options}`")
    print(f"({time.perf_counter() - start:.0f} s in all)", file=sys.stderr)


if __name__ == "__main__":
    main()
