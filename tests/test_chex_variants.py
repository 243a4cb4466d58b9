"""adamax, adamaxw and nadamax, eager, under ``jit`` and under ``pmap``, against NumPy.

``chex.variants`` runs each test body three ways: the step function as written, under
``jax.jit``, and under ``jax.pmap`` over the 8 simulated devices (the arguments broadcast
to every device, the first device's result compared). Each variant steps along a
trajectory and is checked, step by step, against float64 NumPy transcriptions of the
formulas (``tests/_reference.py``: Adamax, its decoupled decay and its Nesterov
look-ahead), so a transform that traces differently under one
transformation, or leaks Python state between steps, fails here.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized

import adamax_jax as ax
from tests._reference import adamax_update

STEPS = 25
LR = 0.01
WEIGHT_DECAY = 0.1
B1, B2, EPS = 0.9, 0.999, 1e-8

Reference = Callable[
    [np.ndarray, np.ndarray, np.ndarray, np.ndarray, int],
    tuple[np.ndarray, np.ndarray, np.ndarray],
]


def _adamax_ref(p, g, m, u, t):
    return adamax_update(p, g, m, u, t, lr=LR, beta1=B1, beta2=B2, epsilon=EPS)


def _adamaxw_ref(p, g, m, u, t):
    return adamax_update(
        p, g, m, u, t, lr=LR, beta1=B1, beta2=B2, epsilon=EPS, weight_decay=WEIGHT_DECAY
    )


def _nadamax_ref(p, g, m, u, t):
    return adamax_update(p, g, m, u, t, lr=LR, beta1=B1, beta2=B2, epsilon=EPS, nesterov=True)


OPTIMIZERS: dict[str, tuple[optax.GradientTransformation, Reference]] = {
    "adamax": (ax.adamax(LR, B1, B2, EPS), _adamax_ref),
    "adamaxw": (ax.adamaxw(LR, B1, B2, EPS, weight_decay=WEIGHT_DECAY), _adamaxw_ref),
    "nadamax": (ax.nadamax(LR, B1, B2, EPS), _nadamax_ref),
}

# A matrix, a bias and a scalar, with gradients over four decades.
_P0 = {
    "w": np.linspace(-1.5, 2.0, 6, dtype=np.float32).reshape(2, 3),
    "b": np.array([0.5, -1.0, 3.0], np.float32),
    "s": np.array(0.8, np.float32),
}


def _grad(p, xp):
    """A state-dependent gradient, written once for jnp and np."""
    return {
        "w": xp.sin(3.0 * p["w"]) + 0.5 * p["w"],
        "b": 1e-3 * (p["b"] - 2.0),
        "s": 10.0 * xp.tanh(p["s"] ** 3),
    }


class VariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.named_parameters(*((name, name) for name in OPTIMIZERS))
    def test_trajectory_matches_the_numpy_reference(self, name):
        opt, reference = OPTIMIZERS[name]

        @self.variant
        def step(params, state):
            grads = _grad(params, jnp)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), updates, state

        params = jax.tree.map(jnp.asarray, _P0)
        state = opt.init(params)
        ref_p = {k: v.astype(np.float64) for k, v in _P0.items()}
        ref_m = {k: np.zeros_like(v) for k, v in ref_p.items()}
        ref_u = {k: np.zeros_like(v) for k, v in ref_p.items()}
        for t in range(1, STEPS + 1):
            ref_g = _grad(ref_p, np)
            new = {k: reference(ref_p[k], ref_g[k], ref_m[k], ref_u[k], t) for k in ref_p}
            ref_updates = {k: new[k][0] - ref_p[k] for k in ref_p}
            ref_p = {k: new[k][0] for k in ref_p}
            ref_m = {k: new[k][1] for k in ref_p}
            ref_u = {k: new[k][2] for k in ref_p}

            new_params, updates, new_state = step(params, state)
            chex.assert_tree_all_finite((new_params, new_state))
            # The state keeps its structure, shapes and dtypes from step to step.
            chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
            # float32 against float64: updates are at most ~lr, the error ~1e-7 lr per step.
            chex.assert_trees_all_close(updates, ref_updates, rtol=1e-5, atol=1e-8)
            chex.assert_trees_all_close(new_params, ref_p, rtol=1e-5, atol=1e-6)
            params, state = new_params, new_state

        adamax_state = state[0]
        assert isinstance(adamax_state, ax.AdamaxState)
        chex.assert_trees_all_equal(adamax_state.count, jnp.int32(STEPS))
        chex.assert_trees_all_close(adamax_state.m, ref_m, rtol=1e-5, atol=1e-9)
        chex.assert_trees_all_close(adamax_state.u, ref_u, rtol=1e-6, atol=1e-12)

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_init_builds_the_same_state_under_every_variant(self):
        opt = ax.adamax(LR)
        params = jax.tree.map(jnp.asarray, _P0)
        state = self.variant(opt.init)(params)
        expected = opt.init(params)
        chex.assert_trees_all_equal_structs(state, expected)
        chex.assert_trees_all_equal(state, expected)
        chex.assert_trees_all_equal_shapes_and_dtypes(state[0].m, params)
