"""What a user installs: one version, the licence, an sdist whose tests can run.

The build test runs hatchling on this checkout (or on an unpacked sdist, which must
rebuild itself) and reads the archives it writes, so a file dropped from the include
list, or a version written in a second place, fails here rather than in a user's
``pip install``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

import adamax_jax as ax

ROOT = Path(__file__).resolve().parents[1]

# What `pytest` in an unpacked sdist reads besides the package and the tests.
SDIST_NEEDS = [
    "conftest.py",
    "LICENSE",
    "README.md",
    "CHANGELOG.md",
    "pyproject.toml",
    "mkdocs.yml",
    "examples/train_sharded.py",
    "examples/train_multiprocess.py",
    "benchmarks/run.py",
    "notebooks/01_adamax_from_scratch.ipynb",
    "docs/index.md",
    "tests/_reference.py",
    "tests/test_packaging.py",
]


def test_version_is_pep440_and_equals_the_installed_metadata():
    Version(ax.__version__)  # raises InvalidVersion otherwise
    assert ax.__version__ == importlib.metadata.version("adamax_jax")


def test_pyproject_takes_the_version_from_the_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["hatch"]["version"]["path"] == "adamax_jax/__init__.py"


def _runtime_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in project["dependencies"]}


def _library_imports() -> set[str]:
    """Top-level names the library imports, the demo (which has its extra) aside."""
    names = set()
    for path in (ROOT / "adamax_jax").rglob("*.py"):
        if "demo" in path.relative_to(ROOT / "adamax_jax").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__", "adamax_jax"}


def test_runtime_dependencies_are_what_the_library_imports():
    # jaxlib is never imported by name, but jax cannot run without it.
    assert _runtime_requirements() - {"jaxlib"} == _library_imports()


def test_license_file_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    pytest.importorskip("hatchling")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_sdist_holds_what_its_tests_read(built):
    (sdist,) = built.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        top = f"adamax_jax-{ax.__version__}/"
        names = {n.removeprefix(top) for n in tar.getnames()}
    missing = [n for n in SDIST_NEEDS if n not in names]
    assert not missing, missing
    # The demo ships as a subpackage of its own.
    assert "adamax_jax/demo/__main__.py" in names


def test_wheel_ships_the_license_and_its_metadata(built):
    (wheel,) = built.glob("*.whl")
    assert wheel.name.startswith(f"adamax_jax-{ax.__version__}-")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"adamax_jax-{ax.__version__}.dist-info/"
        metadata = zf.read(info + "METADATA").decode()
    assert info + "licenses/LICENSE" in names
    assert "adamax_jax/py.typed" in names
    assert not any(n.startswith(("tests/", "examples/", "conftest")) for n in names)
    headers = dict(
        line.split(": ", 1) for line in metadata.split("\n\n", 1)[0].splitlines() if ": " in line
    )
    assert headers["Version"] == ax.__version__
    assert headers["License-Expression"] == "Apache-2.0"
