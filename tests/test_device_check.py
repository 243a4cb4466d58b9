"""Runs ``python benchmarks/device_check.py --quick`` so the accelerator check cannot rot.

Run on this machine's CPU, as a subprocess, exactly as the README says to run it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("optax.adamax", "adamax_jax", "adamax_jax bf16 state", "adamax_jax 8-bit state")


def test_quick_device_check_passes_and_prints_one_table() -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "benchmarks/device_check.py", "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert sum(line.startswith("PASS") for line in lines) == 3, result.stdout
    assert not any(line.startswith("FAIL") for line in lines)

    table = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in lines
        if line.startswith("|")
    ]
    assert table[0][:4] == ["backend", "device", "step", "ms"]
    assert table[0][-1].startswith("of ")  # the bandwidth reference is named
    assert set(table[1][0]) == {"-"}
    rows = {cells[2]: cells for cells in table[2:]}
    assert set(rows) == {*ROWS, "a + c*b (donated)"}
    for name in ROWS:
        backend, device, _, ms, _, ratio, _, gbs, fraction = rows[name]
        assert backend == "cpu" and device == "cpu"
        assert float(ms) > 0 and float(gbs) > 0 and float(fraction) > 0
        assert ratio.endswith("x")
    assert rows["optax.adamax"][5] == "1.00x"
