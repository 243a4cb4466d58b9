"""Several processes, as on a TPU pod or GPU hosts: jax.distributed over 127.0.0.1.

``examples/train_multiprocess.py`` trains with ZeRO-split Adamax state on a 4 x 2
mesh (Explicit axes) of 8 devices. Here it runs as two processes of 4 simulated
CPU devices each (gloo collectives), saves an Orbax checkpoint from both, and is
resumed by two fresh processes; the result must equal one process with all 8
devices that never stopped. Every process is bounded by a timeout, and only the
processes this test started are ended.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_multiprocess.py"
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the script sets its own device count
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _launch(n: int, *script_args: str) -> list[str]:
    """Runs the script as ``n`` processes; returns each one's output. Fails on error or timeout."""
    port = _free_port()
    procs = []
    for i in range(n):
        cmd = [sys.executable, str(SCRIPT), *script_args]
        if n > 1:
            cmd += ["--num-processes", str(n), "--process-id", str(i)]
            cmd += ["--coordinator", f"127.0.0.1:{port}"]
        procs.append(
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env()
            )
        )
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a process of {SCRIPT.name} ran past {TIMEOUT_S} s")
    finally:
        for p in procs:  # ours only, and only if still running
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-4000:]}"
    return outputs


def test_two_processes_with_checkpoint_resume_match_one_process(tmp_path: Path) -> None:
    ref = tmp_path / "one_process.npz"
    got = tmp_path / "two_processes.npz"
    ckpt = str(tmp_path / "ckpt")
    _launch(1, "--steps", "8", "--out", str(ref))
    first = _launch(2, "--steps", "4", "--checkpoint-dir", ckpt)
    assert all("/2: step 4, 8 devices" in out for out in first), first
    resumed = _launch(2, "--steps", "8", "--checkpoint-dir", ckpt, "--out", str(got))
    # Fresh processes really restored the checkpoint rather than starting over.
    assert all("resumed from step 4" in out for out in resumed), resumed

    expected, actual = np.load(ref), np.load(got)
    assert sorted(expected) == sorted(actual) and len(expected) == 12  # params, m, u x 4
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # It trained: the moments, zero at init, are well away from it.
    assert np.abs(expected["['m']['w1']"]).max() > 1e-4
