"""The benchmark problems optax's own optimizer tests use: a parabola and Rosenbrock."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamax_jax as ax


def _parabola():
    target = jnp.array([1.0, -1.0, 1.0])
    return jnp.array([-1.0, 10.0, 1.0]), target, lambda p: jnp.sum((p - target) ** 2)


def _rosenbrock():
    a, b = 1.0, 100.0
    return (
        jnp.array([0.0, 0.0]),
        jnp.array([a, a**2]),
        lambda p: (a - p[0]) ** 2 + b * (p[1] - p[0] ** 2) ** 2,
    )


@pytest.mark.parametrize("problem", [_parabola, _rosenbrock], ids=["parabola", "rosenbrock"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: ax.adamax(1e-1),
        lambda: ax.adamax(1e-1, eps_placement="max"),
        lambda: ax.adamaxw(1e-1, weight_decay=1e-4),
        lambda: ax.nadamax(1e-1),
    ],
    ids=["adamax", "adamax-eps-in-max", "adamaxw", "nadamax"],
)
def test_converges_like_optax_test_suite(problem, make):
    # optax's alias_test: lr 1e-1, 10,000 jitted steps, rtol = atol = 3e-2.
    init, target, objective = problem()
    opt = make()

    def body(_, carry):
        params, state = carry
        updates, state = opt.update(jax.grad(objective)(params), state, params)
        return optax.apply_updates(params, updates), state

    params, _ = jax.jit(lambda p: jax.lax.fori_loop(0, 10_000, body, (p, opt.init(p))))(init)
    np.testing.assert_allclose(params, target, rtol=3e-2, atol=3e-2)
