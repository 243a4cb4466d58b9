"""What keeps a step over many leaves quick to compile, tested as properties.

Compile time itself is measured by ``benchmarks/compile_time.py``, not here (a timed
test would flake). These tests pin down the two mechanisms behind it: each distinct
leaf signature is traced once, and doing so does not change the compiled program.
"""

from __future__ import annotations

import re
from collections import Counter

import jax
import jax.numpy as jnp
import optax
import pytest

import adamax_jax as ax
from adamax_jax import _transform

FORMS = {
    "float32": {},
    "bf16": {"m_dtype": jnp.bfloat16, "u_dtype": jnp.bfloat16},
    "8-bit": {"state_bits": 8},
    # Rows of 64 elements: freeze needs blocks that fit in them.
    "8-bit lazy skip": {
        "state_bits": 8,
        "block_size": 64,
        "lazy_rows": True,
        "skip_nonfinite": True,
    },
}


def _params(n_same: int) -> list[jax.ShapeDtypeStruct]:
    same = [jax.ShapeDtypeStruct((64, 64), jnp.float32) for _ in range(n_same)]
    return [
        *same,
        jax.ShapeDtypeStruct((7,), jnp.float32),
        jax.ShapeDtypeStruct((3, 5), jnp.bfloat16),
    ]


def _compiled_ops(opt: optax.GradientTransformation, params: list) -> Counter[str]:
    """The optimized HLO's instructions with their names taken out."""
    state = jax.eval_shape(opt.init, params)

    def step(p, g, s):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    text = jax.jit(step, donate_argnums=(0, 2)).lower(params, params, state).compile().as_text()
    lines = (re.sub(r", metadata=\{[^}]*\}", "", ln) for ln in text.splitlines() if " = " in ln)
    return Counter(re.sub(r"%[\w.\-]+", "%", ln.split("=", 1)[1]) for ln in lines)


@pytest.mark.parametrize("form", list(FORMS))
def test_each_leaf_signature_is_traced_once(form, monkeypatch):
    traced = []
    leaf_update = _transform._leaf_update

    def counting(*args, **kwargs):
        traced.append(args[0].shape)
        return leaf_update(*args, **kwargs)

    monkeypatch.setattr(_transform, "_leaf_update", counting)
    opt = ax.adamax(1e-3, **FORMS[form])
    params = _params(n_same=40)
    state = jax.eval_shape(opt.init, params)
    jax.jit(opt.update).lower(params, state, params)
    # 40 leaves of one shape and two others: three traces, not 42.
    assert sorted(traced) == sorted([(64, 64), (7,), (3, 5)])


@pytest.mark.parametrize("form", list(FORMS))
def test_tracing_once_compiles_the_same_program(form, monkeypatch):
    opt = ax.adamax(1e-3, **FORMS[form])
    params = _params(n_same=3)
    once = _compiled_ops(opt, params)
    monkeypatch.setattr(_transform, "_is_traced", lambda *trees: False)  # op by op
    each = _compiled_ops(ax.adamax(1e-3, **FORMS[form]), params)
    assert once == each
