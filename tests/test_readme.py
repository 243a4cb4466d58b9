"""The README's Python examples run as written, in order, in one namespace.

So do those of the sharding how-to, which shows the README's sharded step at length.
Each document runs in a fresh interpreter so that 8 simulated CPU devices are set up
before JAX is imported, as a reader trying the sharding example would set them. Only
```python blocks run; shell blocks (```bash) and plain ``` blocks (formulas) are not
Python.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = ["README.md", "docs/how-to/sharding.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)

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


def test_readme_has_the_examples_this_test_runs() -> None:
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    joined = "\n".join(blocks)
    # The quick start, the compat constructors and the sharded step, at least.
    assert len(blocks) >= 3
    for needle in ("ax.adamax(", "ax.compat.mlx_adamax(", "ax.sharding.state_sharding("):
        assert needle in joined, needle


@pytest.mark.parametrize("document", DOCUMENTS)
def test_python_blocks_run_in_order(document: str) -> None:
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
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
