"""Masking or partitioning a tree does not change the other leaves' updates.

The narrow-float and 8-bit moments round with a deterministic dither. Keyed by a
leaf's position in the tree, it would change when ``optax.masked`` or
``optax.partition`` hides a leaf from the optimizer; it is keyed by the element, the
step and the moment only, so every leaf steps bit for bit as it would unmasked.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax

FORMS = {
    "bf16": {"m_dtype": jnp.bfloat16, "u_dtype": jnp.bfloat16},
    "float16": {"m_dtype": jnp.float16, "u_dtype": jnp.float16},
    "8bit": {"state_bits": 8},
}


def tree() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    # Same shapes on purpose: a leaf-keyed dither would tell them apart only by index.
    return {k: rng.standard_normal((64, 64)).astype(np.float32) for k in ("a", "b", "c")}


def run(opt: optax.GradientTransformation, params: Any, steps: int = 12) -> tuple[Any, Any]:
    state = opt.init(params)
    rng = np.random.default_rng(1)

    @jax.jit
    def step(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        g = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
        params, state = step(params, state, g)
    return params, moments(state)


def moments(state: Any) -> dict[str, Any]:
    """Each parameter's (m, u) in whatever AdamaxState holds it, as NumPy arrays."""
    is_state = lambda x: isinstance(x, ax.AdamaxState)
    found: dict[str, Any] = {}
    for s in jax.tree.leaves(state, is_leaf=is_state):
        if is_state(s):
            for name in s.m:
                if not isinstance(s.m[name], optax.MaskedNode):
                    found[name] = jax.tree.map(np.asarray, (s.m[name], s.u[name]))
    return found


def assert_bit_identical(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


@pytest.mark.parametrize("form", FORMS)
def test_masked_leaves_step_as_if_unmasked(form: str) -> None:
    opt = ax.adamax(0.01, **FORMS[form])
    params, state = run(opt, tree())
    masked_params, masked_state = run(optax.masked(opt, {"a": False, "b": True, "c": True}), tree())
    assert sorted(masked_state) == ["b", "c"]
    for name in ("b", "c"):
        assert_bit_identical(masked_state[name], state[name])
        assert_bit_identical(masked_params[name], params[name])


@pytest.mark.parametrize("form", FORMS)
def test_partitioned_groups_step_as_if_together(form: str) -> None:
    params, state = run(ax.adamax(0.01, **FORMS[form]), tree())
    groups = optax.partition(
        {"first": ax.adamax(0.01, **FORMS[form]), "rest": ax.adamax(0.01, **FORMS[form])},
        {"a": "rest", "b": "first", "c": "rest"},
    )
    split_params, split_state = run(groups, tree())
    for name in ("a", "b", "c"):
        # The rounded state is bit for bit the same.
        assert_bit_identical(split_state[name], state[name])
        # The parameters too, up to XLA fusing `p + update` differently in the two
        # programs: an ulp per step, float32 state included. A dither that differed
        # would move them by about lr * 2**-8 (4e-5) a step.
        np.testing.assert_allclose(split_params[name], params[name], rtol=0, atol=2e-6)
