"""The README and every documentation page work as written.

* The README opens with the two set-up commands of a checkout (the package is on no
  package index), and the extras they name exist.
* Every ```python block of the README and of each page under docs/ runs, the page's
  blocks pasted in order into one namespace of a fresh interpreter, as a reader would.
  Each page gets its own process, with 8 simulated CPU devices set up before JAX is
  imported (the sharding pages need them). Shell blocks (```bash), output (```text) and
  plain ``` blocks (formulas) are not Python.
* A page that needs a framework the environment lacks (PyTorch, Keras, MLX: the
  ``parity`` extra) is skipped with the reason, and fails instead under ``CI=true``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))
DOCUMENTS = ["README.md", *PAGES]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.DOTALL | re.MULTILINE)
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)
IMPORT = re.compile(r"^\s*(?:import|from)\s+(\w+)", re.MULTILINE)

# Pages without Python, on purpose: the API reference is generated from docstrings
# (whose examples run as doctests), and these pages show commands and measurements.
NO_PYTHON = {
    "docs/api/compat.md",
    "docs/api/optimizers.md",
    "docs/api/packed.md",
    "docs/api/sharding.md",
    "docs/api/transform.md",
    "docs/benchmarks.md",
    "docs/examples.md",
}

# What a reader should see printed, where a page's comments say what it prints.
PRINTS = {
    "README.md": [
        "step 300  loss 0.00000",
        "torch.optim.Adamax        -0.990 -0.909 -0.500",
        "keras.optimizers.Adamax   -0.909 -0.500 -0.091",
        "mlx.optimizers.Adamax     -0.099 -0.091 -0.050",
        "Kingma & Ba, Algorithm 2  -1.000 -1.000 -1.000",
    ],
    "docs/how-to/memory.md": [
        "float32: 8.000 bytes per parameter",
        "bfloat16: 4.000 bytes per parameter",
        "8-bit: 2.021 bytes per parameter",
        "optax.adamax: u = 1.000",
        "ax.adamax: u = 0.816",
    ],
    "docs/how-to/porting.md": [
        "torch.optim.Adamax       float16, zero gradient: nan; bfloat16 u: 1.000",
        "keras.optimizers.Adamax  float16, zero gradient: nan; bfloat16 u: 1.000",
        "mlx.optimizers.Adamax    float16, zero gradient: nan; bfloat16 u: 1.000",
        "optax.adamax             float16, zero gradient: nan; bfloat16 u: 1.000",
        "ax.adamax                float16, zero gradient: 1.0; bfloat16 u: 0.816",
    ],
    "docs/reliability.md": ["optax.adamax [nan nan nan]", "ax.adamax [-0. -0. -0.]"],
}

# Runs every block in one namespace and names the failing one: its number and first line.
_RUNNER = textwrap.dedent(
    """
    import re, sys, traceback
    text = open(sys.argv[1], encoding="utf-8").read()
    blocks = re.findall(sys.argv[2], text, re.DOTALL | re.MULTILINE)
    namespace = {"__name__": "__main__"}
    for i, code in enumerate(blocks, 1):
        print(f"--- block {i}/{len(blocks)}: {code.splitlines()[0]}", flush=True)
        try:
            exec(compile(code, f"{sys.argv[1]} block {i}", "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            sys.exit(f"{sys.argv[1]} block {i} failed")
    print(f"--- all {len(blocks)} blocks ran", flush=True)
    """
)


def python_blocks(text: str) -> list[str]:
    return BLOCK.findall(text)


def _text(document: str) -> str:
    return (ROOT / document).read_text(encoding="utf-8")


def _first_block() -> tuple[str, list[list[str]]]:
    """The README's first fenced block: its language and the words of each command."""
    language, body = FENCE.search(README.read_text(encoding="utf-8")).groups()
    commands = []
    for line in body.splitlines():
        line = line.split("#", 1)[0].strip()
        commands += [shlex.split(c) for c in line.split("&&") if c.strip()]
    return language, commands


def test_readme_opens_with_the_checkout_commands():
    text = README.read_text(encoding="utf-8")
    # Before any section: the first thing a reader can copy.
    assert FENCE.search(text).start() < text.index("\n## ")
    language, commands = _first_block()
    assert language == "bash"
    assert ["python", "-m", "adamax_jax.demo"] in commands
    assert ["pytest"] in commands
    installs = [c for c in commands if c[:2] == ["pip", "install"]]
    # The demo's extra and the tests' extras, each installed from this checkout.
    assert [c[2:] for c in installs] == [["-e", ".[examples]"], ["-e", ".[test,parity]"]]


def test_readme_installs_only_extras_that_exist():
    extras = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    named = set()
    for match in re.finditer(r'pip install -e "\.\[([\w,]+)\]"', README.read_text("utf-8")):
        named.update(match.group(1).split(","))
    assert {"examples", "test", "parity", "docs"} <= named
    assert named <= extras, named - extras


def test_every_page_of_the_site_is_tested():
    nav = re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE)
    assert nav and all((ROOT / "docs" / page).is_file() for page in nav), nav
    assert {f"docs/{page}" for page in nav} <= set(DOCUMENTS)
    without = {d for d in DOCUMENTS if not python_blocks(_text(d))}
    assert without == NO_PYTHON


def _missing_modules(document: str) -> list[str]:
    names = set(IMPORT.findall("\n".join(python_blocks(_text(document)))))
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


@pytest.mark.parametrize("document", sorted(set(DOCUMENTS) - NO_PYTHON))
def test_python_blocks_run_in_order(document: str) -> None:
    missing = _missing_modules(document)
    if missing:
        reason = f"{document} needs {', '.join(missing)} (pip install -e '.[test,parity]')"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "KERAS_BACKEND": "jax",
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER, document, BLOCK.pattern],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    assert "blocks ran" in result.stdout
    for line in PRINTS.get(document, []):
        assert line in result.stdout, (line, result.stdout[-4000:])
