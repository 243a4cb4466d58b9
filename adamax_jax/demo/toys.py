"""The neuralthreads Adamax tutorial's two toy problems, solved with any optax optimizer.

Both come from the neuralthreads post "Adamax — Extension to Adam based on infinity norm" (2021):

* one variable: ``f(x) = x - x**3`` from ``x = -1`` with learning rate 0.01, whose
  local minimum is at ``x = -1/sqrt(3)``;
* two variables: ``f(x, y) = 2x**2 + 2xy + 2y**2 - 6x`` from ``(1, 0)``, whose minimum
  is at ``(2, -1)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class ToyProblem:
    """A smooth function of a small vector, a start and the minimum it should reach.

    Attributes:
      name: Short label for tables and plot titles.
      f: The objective, mapping a 1-D array to a scalar.
      gradient: Its gradient written out by hand in NumPy, as the tutorial does.
      x0: Starting point.
      target: The minimum the tutorial reaches from ``x0``.
      learning_rate: The tutorial's learning rate.
    """

    name: str
    f: Callable[[jax.Array], jax.Array]
    gradient: Callable[[np.ndarray], np.ndarray]
    x0: tuple[float, ...]
    target: tuple[float, ...]
    learning_rate: float = 0.01


def _cubic(v: jax.Array) -> jax.Array:
    return jnp.sum(v - v**3)


def _quadratic(v: jax.Array) -> jax.Array:
    x, y = v[0], v[1]
    return 2 * x**2 + 2 * x * y + 2 * y**2 - 6 * x


def _cubic_gradient(v: np.ndarray) -> np.ndarray:
    return 1 - 3 * v**2


def _quadratic_gradient(v: np.ndarray) -> np.ndarray:
    x, y = v[0], v[1]
    return np.array([4 * x + 2 * y - 6, 2 * x + 4 * y])


ONE_VARIABLE = ToyProblem("x - x^3", _cubic, _cubic_gradient, (-1.0,), (-1.0 / math.sqrt(3.0),))
TWO_VARIABLES = ToyProblem(
    "2x^2+2xy+2y^2-6x", _quadratic, _quadratic_gradient, (1.0, 0.0), (2.0, -1.0)
)


def descent_path(tx: optax.GradientTransformation, problem: ToyProblem, steps: int) -> np.ndarray:
    """Runs ``tx`` on ``problem`` for ``steps`` steps inside one ``lax.scan``.

    Args:
      tx: Any optax optimizer (its learning rate included).
      problem: The function and starting point.
      steps: Number of updates.

    Returns:
      A float32 array of shape ``(steps + 1, dim)``: the start, then every iterate.

    Example:
      >>> import adamax_jax as ax
      >>> path = descent_path(ax.adamax(0.01), ONE_VARIABLE, 1000)
      >>> path.shape, round(float(path[-1, 0]), 4)
      ((1001, 1), -0.5774)
    """
    x0 = jnp.asarray(problem.x0, jnp.float32)
    grad = jax.grad(problem.f)

    def step(carry: tuple[jax.Array, optax.OptState], _: None) -> tuple:
        x, state = carry
        updates, state = tx.update(grad(x), state, x)
        x = optax.apply_updates(x, updates)
        return (x, state), x

    @jax.jit
    def run(x: jax.Array) -> jax.Array:
        _, xs = jax.lax.scan(step, (x, tx.init(x)), None, length=steps)
        return jnp.concatenate([x[None], xs])

    return np.asarray(run(x0))


def tutorial_loop_path(
    problem: ToyProblem,
    steps: int,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> np.ndarray:
    """The tutorial's Adamax loop, transcribed in NumPy float64.

    Hand-written gradients, ``eps`` in the denominator: an implementation independent
    of this library, which the demo compares ``adamax_jax.adamax`` with.

    Returns:
      A float64 array of shape ``(steps + 1, dim)``.

    Example:
      >>> round(float(tutorial_loop_path(ONE_VARIABLE, 1000)[-1, 0]), 6)
      -0.57735
    """
    lr = problem.learning_rate
    x = np.asarray(problem.x0, np.float64)
    m = np.zeros_like(x)
    u = np.zeros_like(x)
    path = [x.copy()]
    for i in range(steps):
        g = problem.gradient(x)
        m = b1 * m + (1 - b1) * g
        u = np.maximum(b2 * u, np.abs(g))
        x = x - lr / (1 - b1 ** (i + 1)) * m / (u + eps)
        path.append(x.copy())
    return np.stack(path)


def steps_to_reach(path: np.ndarray, target: tuple[float, ...], tol: float = 1e-3) -> int | None:
    """The first step whose iterate lies within ``tol`` (Euclidean) of ``target``.

    Example:
      >>> steps_to_reach(np.array([[0.0], [0.5], [0.9999]]), (1.0,))
      2
    """
    dist = np.linalg.norm(path - np.asarray(target), axis=-1)
    hits = np.flatnonzero(dist < tol)
    return int(hits[0]) if hits.size else None
