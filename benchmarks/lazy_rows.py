"""Lazy rows on an embedding model with Zipfian token frequencies: dense, freeze, catch_up.

Usage::

    python benchmarks/lazy_rows.py           # about 40 s on 2 CPU cores
    python benchmarks/lazy_rows.py --steps 300 --lr 0.1

The task is a bag-of-embeddings classifier on synthetic data: each example is a
bag of tokens drawn from a Zipf distribution over the vocabulary, labelled by a
random teacher (the argmax of its mean teacher embedding times a teacher matrix).
The student has an embedding table, a linear layer and a bias, trained with
cross-entropy by :func:`adamax_jax.adamax` with ``lazy_rows`` off (dense),
``True`` (freeze, TensorFlow's legacy sparse semantics) and ``"catch_up"``, with
the default ``b1=0.9`` and with ``b1=0`` (no momentum, where a row without
gradient does not move in dense Adamax either).

Reported per optimizer:

* the training loss (mean of the last 10% of steps) and the loss and accuracy on
  a held-out set drawn like the training data;
* how far the lazy modes' updates of the touched rows are from dense Adamax's:
  a shadow dense Adamax is fed the *same* gradients as the lazy run, and the
  table's updates of the rows in each batch are compared (relative L2 error over
  all steps, for all touched rows and for the rare ones, rank >= 1000);
* the optimizer state's bytes per table row.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamax_jax as ax

MODES: dict[str, dict[str, Any]] = {
    "dense": {"lazy_rows": False},
    "freeze (lazy_rows=True)": {"lazy_rows": True},
    'lazy_rows="catch_up"': {"lazy_rows": "catch_up"},
    'lazy_rows="catch_up", state_bits=8': {"lazy_rows": "catch_up", "state_bits": 8},
    "dense, b1=0": {"lazy_rows": False, "b1": 0.0},
    "freeze, b1=0": {"lazy_rows": True, "b1": 0.0},
    'lazy_rows="catch_up", b1=0': {"lazy_rows": "catch_up", "b1": 0.0},
}
RARE_RANK = 1000


def make_data(args: argparse.Namespace) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(args.seed)
    freq = 1.0 / np.arange(1, args.vocab + 1) ** args.zipf
    freq /= freq.sum()
    teacher_emb = rng.normal(size=(args.vocab, args.dim))
    teacher_w = rng.normal(size=(args.dim, args.classes))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = rng.choice(args.vocab, size=(n, args.bag), p=freq).astype(np.int32)
        labels = np.argmax(teacher_emb[tokens].mean(axis=1) @ teacher_w, axis=1)
        return tokens, labels.astype(np.int32)

    tokens, labels = draw(args.steps * args.batch)
    eval_tokens, eval_labels = draw(4096)
    return {
        "tokens": tokens.reshape(args.steps, args.batch, args.bag),
        "labels": labels.reshape(args.steps, args.batch),
        "eval_tokens": eval_tokens,
        "eval_labels": eval_labels,
    }


def init_params(args: argparse.Namespace) -> dict[str, jax.Array]:
    key_e, key_w = jax.random.split(jax.random.key(args.seed))
    return {
        "emb": 0.1 * jax.random.normal(key_e, (args.vocab, args.dim)),
        "w": 0.1 * jax.random.normal(key_w, (args.dim, args.classes)),
        "b": jnp.zeros(args.classes),
    }


def loss_fn(params: Any, tokens: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = params["emb"][tokens].mean(axis=1) @ params["w"] + params["b"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, axis=1) == labels)


def train(
    opt: optax.GradientTransformation,
    shadow: optax.GradientTransformation | None,
    params: Any,
    data: dict,
):
    """Trains with ``opt``, feeding ``shadow`` (dense Adamax) the same gradients if given."""
    lazy = shadow is not None
    rare = jnp.arange(params["emb"].shape[0]) >= RARE_RANK

    def body(carry, batch):
        p, s, s_dense = carry
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(p, *batch)
        upd, s = opt.update(g, s, p)
        stats = jnp.zeros(4)
        if lazy:
            assert shadow is not None
            dense_upd, s_dense = shadow.update(g, s_dense, p)
            rows = jnp.any(g["emb"] != 0, axis=1)
            sq_diff = jnp.sum((upd["emb"] - dense_upd["emb"]) ** 2, axis=1)
            sq_ref = jnp.sum(dense_upd["emb"] ** 2, axis=1)
            stats = jnp.stack(
                [
                    jnp.sum(jnp.where(rows, sq_diff, 0)),
                    jnp.sum(jnp.where(rows, sq_ref, 0)),
                    jnp.sum(jnp.where(rows & rare, sq_diff, 0)),
                    jnp.sum(jnp.where(rows & rare, sq_ref, 0)),
                ]
            )
        return (optax.apply_updates(p, upd), s, s_dense), (loss, stats)

    @jax.jit
    def run(p, tokens, labels):
        carry = (p, opt.init(p), shadow.init(p) if shadow is not None else None)
        (p, s, _), (losses, stats) = jax.lax.scan(body, carry, (tokens, labels))
        return p, s, losses, stats.sum(axis=0)

    return run(params, data["tokens"], data["labels"])


def state_bytes_per_row(opt: optax.GradientTransformation, params: Any) -> float:
    state = jax.eval_shape(opt.init, params)
    emb = state[0]
    leaves = jax.tree.leaves((emb.m["emb"], emb.u["emb"]))
    return sum(x.size * x.dtype.itemsize for x in leaves) / params["emb"].shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--vocab", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--bag", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    data = make_data(args)
    params = init_params(args)
    seen = np.zeros(args.vocab, bool)
    seen[data["tokens"].ravel()] = True
    print(
        f"vocab {args.vocab} x dim {args.dim}, Zipf exponent {args.zipf}, {args.steps} steps of "
        f"{args.batch} bags of {args.bag} tokens, lr {args.lr}: {seen.mean():.0%} of the rows "
        f"ever touched, {np.mean(seen[RARE_RANK:]):.0%} of the rare ones (rank >= {RARE_RANK})\n"
    )
    print(
        "| optimizer | train loss | eval loss | eval accuracy | touched-row update vs dense "
        "(all / rare) | state bytes per row |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    tail = max(1, args.steps // 10)
    for name, kw in MODES.items():
        opt = ax.adamax(args.lr, **kw)
        lazy = kw["lazy_rows"] is not False
        shadow = ax.adamax(args.lr, b1=kw.get("b1", 0.9)) if lazy else None
        p, _, losses, stats = train(opt, shadow, params, data)
        eval_loss, eval_acc = loss_fn(p, data["eval_tokens"], data["eval_labels"])
        stats = np.asarray(stats, np.float64)
        if lazy:
            err = f"{np.sqrt(stats[0] / stats[1]):.1e} / {np.sqrt(stats[2] / stats[3]):.1e}"
        else:
            err = "(reference)"
        print(
            f"| {name} | {float(np.mean(losses[-tail:])):.4f} | {float(eval_loss):.4f} | "
            f"{float(eval_acc):.3f} | {err} | {state_bytes_per_row(opt, params):.2f} |"
        )
    print(
        f"\n({time.perf_counter() - start:.0f} s; jax {jax.__version__}, {jax.default_backend()})"
    )


if __name__ == "__main__":
    main()
