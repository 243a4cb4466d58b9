"""Which low-bit layouts of Adamax's state train like float32 state: a simulation.

Each design stores ``u`` as a code of ``u / s`` (``s`` a float32 scale per block that
carries the ``b2`` decay, as adamax_jax's 8-bit state does) and ``m`` as a code of the
ratio ``m / (R_t u)``. Here the codes are simulated by their decoded values in float32,
so a layout can be tried without writing its bit packing. The 8-bit row uses the
library's own 8-bit code tables and reproduces the real 8-bit state's results, which
is what makes the other rows worth reading.

Each design trains the digits MLP of ``tests/test_quantized_state.py`` (64-256-256-10,
scikit-learn's bundled digits): full batch for 300 steps, and in minibatches of 64 for
600 steps. The table gives the final loss against float32 state's, in percent.

    python benchmarks/low_bit_designs.py           # every design, about 10 minutes
    python benchmarks/low_bit_designs.py 4/4 8/8   # some of them
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import adamax_jax as ax
from adamax_jax._storage import codes8

B1, B2, EPS = 0.9, 0.999, 1e-8
PHI = 0.6180339887498949  # the golden-ratio dither of adamax_jax._storage.dither


def _log_levels(per_binade: float, n: int, top: float = 1.97) -> np.ndarray:
    """Zero and ``n`` codes spaced ``per_binade`` to a binade, the largest ``top``."""
    return np.concatenate([[0.0], top * 2.0 ** (-np.arange(n)[::-1] / per_binade)])


def _symmetric(magnitudes: Any) -> np.ndarray:
    mags = np.asarray(magnitudes, np.float64)
    return np.concatenate([-mags[::-1], [0.0], mags])


U8 = np.asarray(codes8.decode_u_code(jnp.arange(256)), np.float64)
M8 = np.asarray(codes8.decode_m_code(jnp.arange(-127, 128).astype(jnp.int8)), np.float64)
U4 = _log_levels(2, 15)  # two codes per binade over 7 binades, and zero
M4 = _symmetric(np.geomspace(0.01, 1.0, 7))  # 15 of 16 codes
U6 = _log_levels(8, 63)
M6 = _symmetric(
    np.sort(np.concatenate([np.linspace(1 / 16, 1, 25), 2.0 ** (-4 - np.arange(1, 7) / 2)]))
)


@dataclasses.dataclass(frozen=True)
class Design:
    """One layout: its code tables and how it rounds."""

    u_levels: np.ndarray
    m_levels: np.ndarray
    # A raised u (one a new gradient set) is rounded up when its position between two
    # codes is above this: 0.5 is to nearest, 1.0 is down.
    u_round_up_above: float = 0.5
    # "u": m's ratio against the u the step computed (adamax_jax's 8-bit rule); "code":
    # against the rounded u, with u read back as max(code, |m| / R_t).
    m_against: str = "u"
    m_block_scale: bool = False  # one float32 per block for m's ratio code as well
    block: int = 128

    @property
    def bytes_per_param(self) -> float:
        bits = math.log2(len(self.u_levels)) + math.log2(len(self.m_levels) + 1)
        scales = 4 * (1 + self.m_block_scale) / self.block
        return bits / 8 + scales


DESIGNS = {
    "8/8": Design(U8, M8, block=256),
    "4/4": Design(U4, M4),
    "4/4 u down": Design(U4, M4, u_round_up_above=1.0, m_against="code"),
    "4/4 u up above 0.7, m block scale": Design(U4, M4, u_round_up_above=0.7, m_block_scale=True),
    "4u/8m": Design(U4, M8),
    "4u/8m u down": Design(U4, M8, u_round_up_above=1.0, m_against="code"),
    "8u/4m m block scale": Design(U8, M4, block=256, m_block_scale=True),
    "6/6": Design(U6, M6),
}


def _ratio_bound(t: jax.Array) -> jax.Array:
    rho = B1 / B2
    return (1 - B1) * (1 - rho**t) / (1 - rho)


def _round(x: jax.Array, levels: np.ndarray, up_above: Any) -> jax.Array:
    """The index of the code below or above ``x``: above when its position between
    them exceeds ``up_above`` (a number, or an array of thresholds for a dither)."""
    lv = jnp.asarray(levels, jnp.float32)
    hi = jnp.clip(jnp.searchsorted(lv, x), 0, len(levels) - 1)
    lo = jnp.clip(hi - 1, 0, len(levels) - 1)
    gap = lv[hi] - lv[lo]
    pos = jnp.clip(jnp.where(gap > 0, (x - lv[lo]) / jnp.where(gap > 0, gap, 1.0), 1.0), 0, 1)
    return jnp.where(pos > up_above, hi, lo)


class _Coded(NamedTuple):
    count: jax.Array
    m_code: jax.Array
    u_code: jax.Array
    u_scale: jax.Array  # per block
    m_scale: jax.Array  # per block (1 without a block scale)
    r_bound: jax.Array  # R_t the m codes were written with


class _Plain(NamedTuple):
    count: jax.Array
    m: jax.Array
    u: jax.Array


def simulate(design: Design) -> optax.GradientTransformation:
    """Adamax's direction with ``design``'s stored state (leaves under 4096: float32)."""
    ul, ml = (np.asarray(x, np.float64) for x in (design.u_levels, design.m_levels))
    if design.m_against == "code":
        ml = ml * ul[-1] / ul[-2]  # room for m over a u rounded down by a code step
    top, bs = float(ul[-1]), design.block

    def init(params: Any) -> Any:
        def leaf(p: jax.Array) -> Any:
            zero = jnp.zeros([], jnp.int32)
            if p.size < 4096:
                return _Plain(zero, jnp.zeros_like(p), jnp.zeros_like(p))
            nb = -(-p.size // bs)
            m0 = jnp.full(p.shape, int(np.argmin(np.abs(ml))), jnp.int32)
            ones, zeros = jnp.ones([nb]), jnp.zeros([nb])
            return _Coded(zero, m0, jnp.zeros(p.shape, jnp.int32), zeros, ones, jnp.zeros([]))

        return jax.tree.map(leaf, params)

    def leaf_update(g: jax.Array, s: Any) -> tuple[jax.Array, Any]:
        t = s.count + 1
        tf = t.astype(jnp.float32)
        if isinstance(s, _Plain):
            m = B1 * s.m + (1 - B1) * g
            u = jnp.maximum(B2 * s.u, jnp.abs(g))
            return m / (1 - B1**tf) / (u + EPS), _Plain(t, m, u)
        n, nb = g.size, s.u_scale.shape[0]

        def blocks(x: jax.Array) -> jax.Array:
            flat = x.reshape(-1)
            return jnp.pad(flat, (0, nb * bs - n)).reshape(nb, bs)

        def leaf_shaped(xb: jax.Array) -> jax.Array:
            return xb.reshape(-1)[:n].reshape(g.shape)

        u_lv, m_lv = jnp.asarray(ul, jnp.float32), jnp.asarray(ml, jnp.float32)
        u_prev = leaf_shaped(u_lv[blocks(s.u_code)] * s.u_scale[:, None])
        m_scale_per_element = leaf_shaped(jnp.broadcast_to(s.m_scale[:, None], (nb, bs)))
        m_prev = m_lv[s.m_code] * s.r_bound * u_prev * m_scale_per_element
        if design.m_against == "code":
            u_prev = jnp.maximum(u_prev, jnp.abs(m_prev) / jnp.where(s.r_bound > 0, s.r_bound, 1))
        m = B1 * m_prev + (1 - B1) * g
        u = jnp.maximum(B2 * u_prev, jnp.abs(g))
        direction = m / (1 - B1**tf) / (u + EPS)

        # u: the decay in the block scale; raised values re-coded.
        need = jnp.max(jnp.abs(blocks(g)), axis=1)
        decayed = s.u_scale * B2
        scale = jnp.where(need <= decayed * top, decayed, jnp.maximum(need, decayed))
        x = blocks(u) / jnp.where(scale > 0, scale, 1)[:, None]
        raised = blocks(jnp.abs(g) >= B2 * u_prev)
        code = jnp.where(raised, _round(x, ul, design.u_round_up_above), _round(x, ul, 0.5))
        code = jnp.where(x > 0, jnp.maximum(code, 1), code)  # a positive u stays positive
        u_read = leaf_shaped(u_lv[code] * scale[:, None])

        # m: its ratio to u, dithered between neighbouring codes.
        r_bound = _ratio_bound(tf)
        ref = u_read if design.m_against == "code" else u
        r = jnp.where(ref > 0, m / jnp.where(ref > 0, ref, 1), 0) / r_bound
        r = jnp.clip(r, ml[0], ml[-1])
        m_scale = s.m_scale
        if design.m_block_scale:
            m_scale = jnp.max(jnp.abs(blocks(r)), axis=1) / ml[-1]
            m_scale = jnp.where(m_scale > 0, m_scale, 1.0)
            r = leaf_shaped(blocks(r) / m_scale[:, None])
        index = jnp.arange(n, dtype=jnp.float32).reshape(g.shape)
        theta = jnp.mod((index + 0.7) * PHI + tf * PHI, 1.0)
        m_code = _round(r, ml, theta)
        return direction, _Coded(t, m_code, leaf_shaped(code), scale, m_scale, r_bound)

    def update(grads: Any, state: Any, params: Any = None) -> Any:
        del params
        leaves, treedef = jax.tree.flatten(grads)
        out = [leaf_update(g, s) for g, s in zip(leaves, treedef.flatten_up_to(state), strict=True)]
        return treedef.unflatten([d for d, _ in out]), treedef.unflatten([s for _, s in out])

    return optax.GradientTransformation(init, update)


# (name, learning rate, steps, batch size; 0 for the full batch)
SETTINGS = [
    ("full", 2e-4, 300, 0),
    ("full", 1e-3, 300, 0),
    ("full", 2e-3, 300, 0),
    ("minibatch", 3e-4, 600, 64),
    ("minibatch", 3e-3, 600, 64),
]


def _digits() -> tuple[Any, Any, Any]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    sizes = [(64, 256), (256, 256), (256, 10)]
    keys = jax.random.split(jax.random.key(0), len(sizes))
    params = [
        {"w": jax.random.normal(k, s) * jnp.sqrt(2.0 / s[0]), "b": jnp.zeros(s[1])}
        for k, s in zip(keys, sizes, strict=True)
    ]
    return jnp.asarray(x / 16.0, jnp.float32), jax.nn.one_hot(y, 10), params


def final_losses(direction: optax.GradientTransformation) -> list[float]:
    x, labels, params0 = _digits()

    def loss(params: Any, xb: jax.Array, yb: jax.Array) -> jax.Array:
        h = xb
        for i, layer in enumerate(params):
            h = h @ layer["w"] + layer["b"]
            h = jax.nn.relu(h) if i < len(params) - 1 else h
        return optax.softmax_cross_entropy(h, yb).mean()

    def train(lr: float, steps: int, batch: int) -> jax.Array:
        tx = optax.chain(direction, optax.scale(-lr))

        def step(carry: Any, key: jax.Array) -> Any:
            params, state = carry
            if batch:
                pick = jax.random.choice(key, x.shape[0], (batch,), replace=False)
                grads = jax.grad(loss)(params, x[pick], labels[pick])
            else:
                grads = jax.grad(loss)(params, x, labels)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        keys = jax.random.split(jax.random.key(1), steps)
        params, _ = jax.lax.scan(step, (params0, tx.init(params0)), keys)[0]
        return loss(params, x, labels)

    return [float(jax.jit(lambda s=s: train(*s[1:]))()) for s in SETTINGS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("designs", nargs="*", help=f"some of: {', '.join(DESIGNS)}")
    names = parser.parse_args().designs or list(DESIGNS)
    base = final_losses(ax.scale_by_adamax(B1, B2, EPS))
    header = " | ".join(f"{kind} lr {lr:g}" for kind, lr, _, _ in SETTINGS)
    print(f"| design | bytes/param | {header} |")
    print("|---|---:|" + "---:|" * len(SETTINGS))
    print("| float32 state (final loss) | 8 | " + " | ".join(f"{b:.4f}" for b in base) + " |")
    for name in names:
        design = DESIGNS[name]
        losses = final_losses(simulate(design))
        cells = " | ".join(f"{(v / b - 1) * 100:+.1f}%" for v, b in zip(losses, base, strict=True))
        print(f"| {name} | {design.bytes_per_param:.2f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
