"""The demo's command line: solve the toy problems, race the optimizers, write plots.

:func:`main` is what ``python -m adamax_jax.demo`` runs; see :mod:`adamax_jax.demo`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import pathlib
import re
import shlex
import time
import tomllib
import urllib.parse
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


# The `examples` extra of pyproject.toml, for when the installed metadata cannot be read.
EXAMPLES_EXTRA = (
    "flax>=0.10",
    "dm-haiku>=0.0.13",
    "scikit-learn>=1.4",
    "matplotlib>=3.8",
    "pillow>=10",
)


def _checkout_root() -> pathlib.Path | None:
    """The repository root when adamax_jax runs from a checkout (editable or not)."""
    root = pathlib.Path(ax.__file__).resolve().parents[1]
    try:
        project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return root if project.get("project", {}).get("name") == "adamax_jax" else None


def _examples_requirements() -> list[str]:
    """The `examples` extra's requirements, from the installed package's metadata."""
    try:
        requires = importlib.metadata.requires("adamax_jax") or []
    except importlib.metadata.PackageNotFoundError:
        return list(EXAMPLES_EXTRA)
    extra = re.compile(r"""extra\s*==\s*["']examples["']""")
    found = [r.split(";")[0].strip() for r in requires if extra.search(r)]
    return found or list(EXAMPLES_EXTRA)


def _installed_wheel() -> str | None:
    """The wheel file adamax_jax was installed from, where pip recorded one that still exists."""
    try:
        direct = importlib.metadata.distribution("adamax_jax").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not direct:
        return None
    url = json.loads(direct).get("url", "")
    if not url.startswith("file://") or not url.endswith(".whl"):
        return None
    path = pathlib.Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    return str(path) if path.is_file() else None


def missing_extra_message(module: str | None) -> str:
    """What to install when the demo's optional dependencies are missing.

    The command depends on where adamax_jax runs from. In a checkout, the editable
    install of the ``examples`` extra, from the repository root. From an installed
    wheel, the extra's packages themselves (adamax_jax is not on a package index, so
    ``pip install "adamax_jax[examples]"`` would find nothing), or the wheel again
    with the extra, when pip recorded the wheel's file.
    """
    head = f"the demo needs the 'examples' extra ({module or 'a dependency'} is missing)"
    root = _checkout_root()
    if root is not None:
        return (
            f"{head}. adamax_jax runs from the checkout at {root}; install the extra there:\n"
            f'    cd {shlex.quote(str(root))} && pip install -e ".[examples]"'
        )
    packages = " ".join(f'"{r}"' for r in _examples_requirements())
    wheel = _installed_wheel()
    again = (
        f'    pip install "{wheel}[examples]"'
        if wheel
        else '    pip install "path/to/adamax_jax-<version>-py3-none-any.whl[examples]"'
    )
    return (
        f"{head}. Install the extra's packages:\n"
        f"    pip install {packages}\n"
        f"or install the adamax_jax wheel again, with the extra:\n{again}"
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
