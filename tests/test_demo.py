"""Smoke test of ``python -m adamax_jax.demo`` so the demo cannot rot.

The demo's numbers are checked against the tests' float64 NumPy transcription of
Adamax (tests/_reference.py), independent of the library and the demo.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import adamax_jax
from adamax_jax import demo
from adamax_jax.demo import tour
from tests._reference import adamax_trajectory

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs this interpreter on the copy of adamax_jax the tests import."""
    root = str(Path(adamax_jax.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, check=False, env=env
    )


def _numpy_adamax(grad, x0, steps):
    """The tutorial loop's last iterate: lr 0.01 and Adamax's defaults, in float64."""
    return adamax_trajectory(np.array(x0), grad, steps, lr=0.01)[0][-1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo.main(["--steps", "25", "--toy-steps", "600", "--out", str(out)])


@pytest.mark.slow
def test_writes_the_plots_and_the_summary(demo_run):
    out, results = demo_run
    names = sorted(p.name for p in results.files)
    assert names == ["digits_loss.png", "summary.md", "toy_1d.png", "toy_2d.png"]
    for name in ("digits_loss.png", "toy_1d.png", "toy_2d.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    assert (out / "summary.md").read_text().strip() == results.tables


@pytest.mark.slow
def test_toy_problems_match_the_tutorial_loop_and_reach_the_minima(demo_run):
    _, results = demo_run
    one, two = results.toys
    expected_one = _numpy_adamax(lambda x: 1 - 3 * x**2, [-1.0], 600)
    expected_two = _numpy_adamax(
        lambda v: np.array([4 * v[0] + 2 * v[1] - 6, 2 * v[0] + 4 * v[1]]), [1.0, 0.0], 600
    )
    # float32 iterates against a float64 loop.
    np.testing.assert_allclose(one.path[-1], expected_one, atol=1e-5)
    np.testing.assert_allclose(two.path[-1], expected_two, atol=1e-5)
    np.testing.assert_allclose(one.path[-1], [-1 / math.sqrt(3)], atol=1e-4)
    np.testing.assert_allclose(two.path[-1], [2.0, -1.0], atol=1e-3)
    assert one.path.shape == (601, 1) and two.path.shape == (601, 2)


@pytest.mark.slow
def test_every_optimizer_trains(demo_run, capsys):
    _, results = demo_run
    assert [r.name for r in results.training] == list(demo.digits_optimizers())
    for r in results.training:
        assert r.losses.shape == (25,)
        assert np.all(np.isfinite(r.losses))
        # ln(10) = 2.30 is chance level for ten classes.
        assert r.losses[-5:].mean() < r.losses[0] - 0.3, r.name
        assert 0.3 < r.test_accuracy <= 1.0, r.name
        assert r.ms_per_step > 0
        assert r.name in results.tables


def test_command_line_help_and_bad_arguments():
    proc = _python("-m", "adamax_jax.demo", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--out" in proc.stdout and "--steps" in proc.stdout
    with pytest.raises(SystemExit) as excinfo:
        demo.main(["--steps", "0"])
    assert excinfo.value.code == 2


def test_importing_the_library_does_not_import_the_demo():
    proc = _python(
        "-c",
        "import sys, adamax_jax; print(sorted(m for m in sys.modules if 'demo' in m))",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def _demo_without_flax(out: Path, cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    # `sys.modules["flax"] = None` makes `import flax` raise ImportError, as if absent.
    code = (
        "import sys; sys.modules['flax'] = None; from adamax_jax.demo import main; "
        f"main(['--out', {str(out)!r}])"
    )
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=cwd
    )


def test_missing_extra_in_a_checkout_gives_the_editable_install_from_its_root(tmp_path):
    root = Path(adamax_jax.__file__).resolve().parents[1]
    proc = _demo_without_flax(tmp_path / "out", cwd=tmp_path, pythonpath=root)
    assert proc.returncode == 1, proc.stderr
    assert "flax is missing" in proc.stderr
    # The one command that works here: the extra of this checkout, from its root.
    assert f'cd {root} && pip install -e ".[examples]"' in proc.stderr
    # Not the index form: adamax_jax is on no package index.
    assert '"adamax_jax[examples]"' not in proc.stderr


def test_missing_extra_outside_a_checkout_names_the_extras_packages(tmp_path):
    # The package alone, without the repository around it, is what a wheel installs.
    site = tmp_path / "site"
    shutil.copytree(
        Path(adamax_jax.__file__).resolve().parent,
        site / "adamax_jax",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    proc = _demo_without_flax(tmp_path / "out", cwd=tmp_path, pythonpath=site)
    assert proc.returncode == 1, proc.stderr
    assert "flax is missing" in proc.stderr
    assert "pip install -e" not in proc.stderr
    assert '"adamax_jax[examples]"' not in proc.stderr
    # Every package of pyproject.toml's `examples` extra, with its version floor.
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["examples"]
    install = next(line for line in proc.stderr.splitlines() if 'pip install "' in line)
    assert sorted(re.findall(r'"([^"]+)"', install)) == sorted(extra)
    assert ".whl[examples]" in proc.stderr


def test_the_fallback_list_is_the_examples_extra():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["examples"]
    assert sorted(tour.EXAMPLES_EXTRA) == sorted(extra)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_overlapping_loss_curves_get_a_ratio_panel(tmp_path):
    from adamax_jax.demo import plots
    from adamax_jax.demo.digits import TrainResult

    def result(name, losses):
        return TrainResult(name, np.asarray(losses), 0.1, 0.1, 0.9, 1.0, 1.0)

    steps = np.arange(1, 101)
    base = 2.0 / steps
    apart = [result("a", base), result("b", 0.3 * base)]  # 70% apart: no panel
    close = [*apart, result("c", 1.02 * base)]  # within 2% of "a": a ratio panel
    # The panel makes the figure taller: 8 x 5 inches at 100 dpi, 8 x 6.5 with it.
    assert _png_size(plots.plot_loss_curves(apart, tmp_path / "apart.png")) == (800, 500)
    assert _png_size(plots.plot_loss_curves(close, tmp_path / "close.png")) == (800, 650)
