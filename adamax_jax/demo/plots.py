"""The demo's PNG figures.

Figures are built with ``matplotlib.figure.Figure`` rather than ``pyplot``: no
global state and no GUI backend, so they render the same on a headless CI
machine, in a terminal and inside a notebook.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from adamax_jax.demo.digits import TrainResult
from adamax_jax.demo.toys import ToyProblem

LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D")


def plot_one_variable(
    problem: ToyProblem, path: np.ndarray, out: pathlib.Path, label: str = "adamax"
) -> pathlib.Path:
    """The 1-D descent: iterates on the curve, and the iterate against the step."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_curve, ax_steps = fig.subplots(1, 2)
    xs = np.linspace(-1.5, 1.5, 400)
    ax_curve.plot(xs, xs - xs**3, color="0.3", lw=1.5, label="f(x) = x - x³")
    x = path[:, 0]
    points = ax_curve.scatter(x, x - x**3, c=np.arange(len(x)), cmap="viridis", s=12, zorder=3)
    # The colour bar sits under the curve, not beside it, where its label would
    # crowd the right panel's axis label.
    fig.colorbar(points, ax=ax_curve, label="step", location="bottom", shrink=0.8, aspect=40)
    target = problem.target[0]
    ax_curve.axvline(target, ls="--", color="C3", lw=1, label="x = -1/√3")
    ax_curve.set(xlabel="x", ylabel="f(x)", title=f"{label} on f(x) = x - x³, lr 0.01")
    ax_curve.legend(loc="upper right")
    ax_steps.plot(np.arange(len(x)), x, color="C0", label=label)
    ax_steps.axhline(target, ls="--", color="C3", lw=1, label="-1/√3")
    ax_steps.set(xlabel="step", ylabel="x", title="iterate against step")
    ax_steps.legend(loc="lower right")
    for a in (ax_curve, ax_steps):
        a.grid(alpha=0.3)
    fig.savefig(out, dpi=100)
    return out


def plot_two_variables(
    problem: ToyProblem, path: np.ndarray, out: pathlib.Path, label: str = "adamax"
) -> pathlib.Path:
    """The 2-D descent drawn over the contours of the objective."""
    import jax
    import jax.numpy as jnp

    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.subplots()
    gx, gy = np.meshgrid(np.linspace(0.0, 3.0, 200), np.linspace(-2.0, 1.0, 200))
    grid = np.stack([gx.ravel(), gy.ravel()], axis=-1)
    z = np.asarray(jax.vmap(problem.f)(jnp.asarray(grid))).reshape(gx.shape)
    contours = ax.contour(gx, gy, z, levels=20, cmap="viridis", linewidths=0.8, alpha=0.7)
    ax.clabel(contours, fontsize=7)
    ax.plot(path[:, 0], path[:, 1], "-", color="C0", lw=1.5, label=label)
    every = max(len(path) // 20, 1)
    ax.plot(path[::every, 0], path[::every, 1], "o", color="C0", ms=3)
    ax.plot(*problem.x0, "s", color="k", label=f"start {problem.x0}")
    ax.plot(*problem.target, "*", color="C3", ms=14, label=f"minimum {problem.target}")
    ax.set(xlabel="x", ylabel="y", title=f"{label} on {problem.name}, lr 0.01")
    ax.set_aspect("equal")
    # Outside the axes: inside, any corner covers some contour labels.
    fig.legend(loc="outside lower center", ncols=3, fontsize=9)
    fig.savefig(out, dpi=100)
    return out


def plot_loss_curves(
    results: Sequence[TrainResult], out: pathlib.Path, window: int = 20
) -> pathlib.Path:
    """Minibatch loss curves (a moving average over ``window`` steps), log scale."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for i, r in enumerate(results):
        w = max(min(window, len(r.losses)), 1)
        smooth = np.convolve(r.losses, np.ones(w) / w, mode="valid")
        steps = np.arange(w, len(r.losses) + 1)
        # Curves can coincide (adamax and adamaxw with a small weight decay do): each
        # later one is thinner, drawn on top, with its own dashes and staggered markers,
        # so the one beneath still shows.
        every = max(len(steps) // 8, 1)
        ax.plot(
            steps,
            smooth,
            label=r.name,
            ls=LINE_STYLES[i % len(LINE_STYLES)],
            lw=max(2.8 - 0.6 * i, 1.4),
            marker=MARKERS[i % len(MARKERS)],
            ms=5,
            markevery=(i * every // len(results), every),
            zorder=2 + i,
        )
    ax.set_yscale("log")
    ax.set(
        xlabel="step",
        ylabel=f"training loss ({window}-step moving average)",
        title="Flax NNX MLP on scikit-learn digits",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.savefig(out, dpi=100)
    return out
