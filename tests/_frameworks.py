"""Imports another framework for a parity test: skip where it is missing, fail under CI.

A user who has not installed the ``parity`` extra sees those tests skipped with the
reason. CI installs the extra and sets ``CI=true``; there a missing framework means
the parity claims went unchecked, so it is a failure, not a skip.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def _missing(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason} (CI=true: install the `parity` extra, pip install -e .[parity])")
    pytest.skip(f"{reason}; install the `parity` extra to run it (pip install -e .[parity])")


def require(module: str) -> ModuleType:
    """Imports ``module`` or skips (fails under ``CI=true``) the calling test, saying why."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        _missing(f"parity test needs {module!r}, which is not importable ({e})")
        raise  # unreachable: skip and fail raise
    if module.split(".")[0] == "keras":
        backend = importlib.import_module("keras").backend.backend()
        if backend != "jax":
            _missing(f"keras parity runs on the JAX backend, but keras uses {backend!r}")
    return mod
