"""The demo's command line: solve the toy problems, race the optimizers, write plots.

:func:`main` is what ``python -m adamax_jax.demo`` runs; see :mod:`adamax_jax.demo`.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import optax

import adamax_jax as ax
from adamax_jax.demo.text import format_table
from adamax_jax.demo.toys import (
    ONE_VARIABLE,
    TWO_VARIABLES,
    descent_path,
    steps_to_reach,
    tutorial_loop_path,
)

if TYPE_CHECKING:  # needs flax, imported at run time only by main()
    from adamax_jax.demo.digits import TrainResult

DEFAULT_OUT = "adamax_demo_out"


@dataclasses.dataclass(frozen=True)
class ToyResult:
    """One toy problem solved by ``adamax_jax.adamax``.

    Attributes:
      problem: The problem's name.
      path: Every iterate, shape ``(steps + 1, dim)``.
      target: The known minimum.
      tutorial_loop_gap: Largest distance between our iterates and those of the
        tutorial's NumPy float64 loop, over the whole path.
    """

    problem: str
    path: np.ndarray
    target: tuple[float, ...]
    tutorial_loop_gap: float


@dataclasses.dataclass(frozen=True)
class DemoResults:
    """Everything :func:`main` measured and wrote."""

    toys: list[ToyResult]
    training: list[TrainResult]
    files: list[pathlib.Path]
    tables: str


def digits_optimizers() -> dict[str, optax.GradientTransformation]:
    """The optimizers the digits race compares, each at a common setting.

    Adamax and Adam run at their papers' default learning rates; SGD with momentum
    at a rate that trains this network well.
    """
    return {
        "adamax_jax.adamax(2e-3)": ax.adamax(2e-3),
        "adamax_jax.adamaxw(2e-3, wd=1e-2)": ax.adamaxw(2e-3, weight_decay=1e-2),
        "optax.adam(1e-3)": optax.adam(1e-3),
        "optax.sgd(0.05, momentum=0.9)": optax.sgd(0.05, momentum=0.9),
    }


def missing_extra_message(module: str | None) -> str:
    """What to install when the demo's optional dependencies are missing.

    Most users have a wheel, where ``-e .`` means nothing; a checkout gets its own line.
    """
    return (
        f"the demo needs the 'examples' extra ({module or 'a dependency'} is missing):\n"
        '    pip install "adamax_jax[examples]"\n'
        "or, in a checkout of the repository:\n"
        '    pip install -e ".[examples]"'
    )


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m adamax_jax.demo",
        description="Adamax on the neuralthreads Adamax tutorial's toy problems and on a "
        "Flax NNX digits classifier; prints tables and writes PNG plots.",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path(DEFAULT_OUT),
        help=f"folder for the PNG plots and summary.md (default: ./{DEFAULT_OUT})",
    )
    parser.add_argument(
        "--steps", type=int, default=600, help="training steps per optimizer (default: 600)"
    )
    parser.add_argument(
        "--toy-steps", type=int, default=1000, help="steps on the toy problems (default: 1000)"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="minibatch size (128)")
    parser.add_argument("--seed", type=int, default=0, help="weights, data split and batches")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("steps", "toy_steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _fmt_point(p: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6f}" for v in p) + ")"


def run_toys(steps: int) -> list[ToyResult]:
    """Solves both tutorial problems with ``adamax_jax.adamax`` at the tutorial's settings."""
    results = []
    for problem in (ONE_VARIABLE, TWO_VARIABLES):
        path = descent_path(ax.adamax(problem.learning_rate), problem, steps)
        reference = tutorial_loop_path(problem, steps)
        gap = float(np.max(np.linalg.norm(path - reference, axis=-1)))
        results.append(ToyResult(problem.name, path, problem.target, gap))
    return results


def toy_table(results: Sequence[ToyResult]) -> str:
    """The toy problems as a text table."""
    rows = []
    for r in results:
        final = r.path[-1]
        reached = steps_to_reach(r.path, r.target)
        rows.append(
            [
                r.problem,
                len(r.path) - 1,
                _fmt_point(final),
                _fmt_point(r.target),
                f"{np.linalg.norm(final - np.asarray(r.target)):.1e}",
                "never" if reached is None else reached,
                f"{r.tutorial_loop_gap:.1e}",
            ]
        )
    headers = [
        "problem (adamax, lr 0.01)",
        "steps",
        "final point",
        "minimum",
        "error",
        "steps to 1e-3",
        "gap to tutorial loop",
    ]
    return format_table(headers, rows)


def training_table(results: Sequence[TrainResult]) -> str:
    """The digits runs as a text table."""
    rows = [
        [
            r.name,
            f"{r.train_loss:.4f}",
            f"{r.test_loss:.4f}",
            f"{100 * r.test_accuracy:.1f}",
            f"{r.ms_per_step:.2f}",
            f"{r.compile_s:.2f}",
        ]
        for r in results
    ]
    headers = ["optimizer", "train loss", "test loss", "test acc %", "ms/step", "compile s"]
    return format_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> DemoResults:
    """Runs the demo; ``argv`` as on the command line (``None`` reads ``sys.argv``).

    Returns:
      A :class:`DemoResults` with the toy paths, the training results, the files
      written and the printed tables.
    """
    args = _parse(argv)
    # Imported here so that `--help` answers at once and a missing extra names itself.
    try:
        from adamax_jax.demo import digits, plots
    except ImportError as e:
        raise SystemExit(missing_extra_message(e.name)) from e

    start = time.perf_counter()
    out: pathlib.Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    print(f"adamax_jax {ax.__version__} demo, output in {out.resolve()}", flush=True)
    toys = run_toys(args.toy_steps)
    files = [
        plots.plot_one_variable(ONE_VARIABLE, toys[0].path, out / "toy_1d.png"),
        plots.plot_two_variables(TWO_VARIABLES, toys[1].path, out / "toy_2d.png"),
    ]

    data = digits.load_digits(seed=args.seed)
    print(
        f"\nTraining a Flax NNX MLP on digits ({len(data.x_train)} train / "
        f"{len(data.x_test)} test), {args.steps} steps of {args.batch_size}:",
        flush=True,
    )
    optimizers = digits_optimizers()
    width = max(len(name) for name in optimizers)
    training = [
        digits.train(
            name,
            tx,
            data,
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=None if args.quiet else name.ljust(width),
        )
        for name, tx in optimizers.items()
    ]
    files.append(plots.plot_loss_curves(training, out / "digits_loss.png"))

    tables = (
        "Tutorial problems: adamax_jax.adamax against the tutorial's NumPy loop\n\n"
        + toy_table(toys)
        + "\n\nDigits (same weights and batches for every optimizer; times on this machine)\n\n"
        + training_table(training)
    )
    summary = out / "summary.md"
    summary.write_text(tables + "\n")
    files.append(summary)
    print("\n" + tables + "\n")
    print("Wrote " + ", ".join(str(f) for f in files))
    print(f"Done in {time.perf_counter() - start:.1f}s.", flush=True)
    return DemoResults(toys=toys, training=training, files=files, tables=tables)
