"""The demo's PNG figures.

Figures are built with ``matplotlib.figure.Figure`` rather than ``pyplot``: no
global state and no GUI backend, so they render the same on a headless CI
machine, in a terminal and inside a notebook.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from adamax_jax.demo.digits import TrainResult
from adamax_jax.demo.toys import ToyProblem, steps_to_reach

# Distance to the minimum from which the 1-D plot's colour scale stops changing.
CONVERGED = 1e-3

LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D")


def plot_one_variable(
    problem: ToyProblem, path: np.ndarray, out: pathlib.Path, label: str = "adamax"
) -> pathlib.Path:
    """The 1-D descent: iterates on the curve, and the iterate against the step.

    The colour scale spans the steps that move: it ends at the first step within
    ``CONVERGED`` of the minimum, and every later iterate takes the last colour.
    """
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_curve, ax_steps = fig.subplots(1, 2)
    xs = np.linspace(-1.5, 1.5, 400)
    ax_curve.plot(xs, xs - xs**3, color="0.3", lw=1.5, label="f(x) = x - x³")
    x = path[:, 0]
    last = len(x) - 1
    reached = steps_to_reach(path, problem.target, tol=CONVERGED)
    moving = last if reached is None else max(reached, 1)
    points = ax_curve.scatter(
        x,
        x - x**3,
        c=np.arange(len(x)),
        cmap="viridis",
        norm=Normalize(0, moving),
        s=12,
        zorder=3,
    )
    # The colour bar sits under the curve, not beside it, where its label would
    # crowd the right panel's axis label.
    bar_label = (
        "step" if reached is None else f"step (from step {reached} on: within {CONVERGED:g})"
    )
    fig.colorbar(
        points,
        ax=ax_curve,
        label=bar_label,
        location="bottom",
        shrink=0.8,
        aspect=40,
        extend="neither" if moving == last else "max",
    )
    target = problem.target[0]
    ax_curve.axvline(target, ls="--", color="C3", lw=1, label="x = -1/√3")
    ax_curve.set(xlabel="x", ylabel="f(x)", title=f"{label} on f(x) = x - x³, lr 0.01")
    ax_curve.legend(loc="upper right")
    ax_steps.plot(np.arange(len(x)), x, color="C0", label=label)
    ax_steps.axhline(target, ls="--", color="C3", lw=1, label="-1/√3")
    if reached is not None:
        ax_steps.axvline(
            reached, ls=":", color="0.3", lw=1, label=f"within {CONVERGED:g} from step {reached}"
        )
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
    # A dot every `every` steps shows the pace: the dots bunch up as the steps
    # shrink near the minimum. The first few are numbered with their step.
    every = max(len(path) // 20, 1)
    dots = np.arange(0, len(path), every)
    ax.plot(path[dots, 0], path[dots, 1], "o", color="C0", ms=4, label=f"every {every} steps")
    labelled = path[0]
    for step in dots[1:]:
        if np.linalg.norm(path[step] - labelled) > 0.2:
            ax.annotate(
                f"step {step}",
                (float(path[step, 0]), float(path[step, 1])),
                xytext=(6, 2),
                textcoords="offset points",
                fontsize=8,
                color="C0",
            )
            labelled = path[step]
    ax.plot(*problem.x0, "s", color="k", label=f"start {problem.x0}")
    ax.plot(*problem.target, "*", color="C3", ms=14, label=f"minimum {problem.target}")
    ax.set(xlabel="x", ylabel="y", title=f"{label} on {problem.name}, lr 0.01")
    ax.set_aspect("equal")
    # Outside the axes: inside, any corner covers some contour labels.
    fig.legend(loc="outside lower center", ncols=2, fontsize=9)
    fig.savefig(out, dpi=100)
    return out


def _moving_average(losses: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    w = max(min(window, len(losses)), 1)
    return np.arange(w, len(losses) + 1), np.convolve(losses, np.ones(w) / w, mode="valid")


def plot_loss_curves(
    results: Sequence[TrainResult],
    out: pathlib.Path,
    window: int = 20,
    close: float = 0.15,
) -> pathlib.Path:
    """Minibatch loss curves (a moving average over ``window`` steps), log scale.

    Curves that stay within ``close`` (relative) of an earlier one would hide each
    other on the log scale: a panel underneath shows each such curve divided by the
    earlier one, where their difference is visible.
    """
    curves = [_moving_average(r.losses, window) for r in results]
    pairs = [
        (j, i)
        for i in range(len(results))
        for j in range(i)
        if np.max(np.abs(np.log(curves[i][1] / curves[j][1]))) < np.log1p(close)
    ]
    # An axis can only be given to `subplots` once it is known which panels exist.
    fig = Figure(figsize=(8, 6.5 if pairs else 5), layout="constrained")
    if pairs:
        ax, ax_ratio = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    else:
        ax, ax_ratio = fig.subplots(), None
    for i, (r, (steps, smooth)) in enumerate(zip(results, curves, strict=True)):
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
        ylabel=f"training loss ({window}-step moving average)",
        title="Flax NNX MLP on scikit-learn digits",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    if ax_ratio is None:
        ax.set_xlabel("step")
    else:
        for j, i in pairs:
            (steps, smooth), (_, base) = curves[i], curves[j]
            ax_ratio.plot(
                steps, smooth / base, color=f"C{i}", ls=LINE_STYLES[i % len(LINE_STYLES)], lw=1.4
            )
            ax_ratio.text(
                0.01,
                0.92 - 0.14 * pairs.index((j, i)),
                f"{results[i].name} / {results[j].name}",
                transform=ax_ratio.transAxes,
                color=f"C{i}",
                fontsize=8,
                va="top",
            )
        ax_ratio.axhline(1.0, color="0.3", lw=1)
        ax_ratio.set(xlabel="step", ylabel="loss ratio")
        ax_ratio.grid(alpha=0.3)
    fig.savefig(out, dpi=100)
    return out
