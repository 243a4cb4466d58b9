"""Checks on hyperparameters and pytrees, with messages that name the problem.

Hyperparameters can arrive as Python numbers (checked here, at construction) or as
JAX arrays, possibly traced under ``jit``/``vmap`` by ``optax.inject_hyperparams``.
Traced values cannot be inspected, so they pass through unchecked: no Python
branching may depend on them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_float(value: Any) -> float | None:
    """Returns ``value`` as a Python float if it is a concrete scalar, else None.

    Schedules, traced values and non-scalar arrays return None: they are checked
    (if at all) where they are used.
    """
    if callable(value) or isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"expected a number, got the boolean {value!r}")
    try:
        arr = np.asarray(value)
    except Exception:  # noqa: BLE001 - anything not array-like is not ours to check
        return None
    if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number):
        return None
    return float(arr)


def check_finite(name: str, value: Any) -> None:
    v = concrete_float(value)
    if v is not None and not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v!r}")


def check_range(
    name: str,
    value: Any,
    *,
    low: float,
    high: float,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raises ValueError if a concrete ``value`` lies outside [low, high]."""
    v = concrete_float(value)
    if v is None:
        return
    ok_low = v >= low if low_inclusive else v > low
    ok_high = v <= high if high_inclusive else v < high
    if not (math.isfinite(v) and ok_low and ok_high):
        lb = "[" if low_inclusive else "("
        hb = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must lie in {lb}{low}, {high}{hb}, got {v!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def check_dtype_option(name: str, value: Any) -> jnp.dtype | None:
    """Normalises an optional dtype argument; rejects non-floating dtypes."""
    if value is None:
        return None
    try:
        dtype = jnp.dtype(value)
    except TypeError as e:
        raise TypeError(f"{name} must be a floating dtype or None, got {value!r}") from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating dtype (such as jnp.float32), got {dtype}")
    return dtype


def path_str(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def check_float_leaves(tree: Any, what: str) -> None:
    """Raises TypeError naming the first leaf that is not a float or complex array."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            dtype = np.asarray(leaf).dtype
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"adamax_jax: {what} leaf {path_str(path)} has dtype {dtype}; Adamax needs "
                "floating-point leaves (cast integer or boolean leaves to a float dtype, or "
                "exclude them with optax.masked / optax.partition)"
            )


def flatten_like(
    updates: Any, state_tree: Any, what: str, is_leaf: Callable[[Any], bool] | None = None
) -> list[Any]:
    """Flattens ``state_tree`` up to the structure of ``updates``, naming a mismatch."""
    treedef = jax.tree.structure(updates)
    try:
        return treedef.flatten_up_to(state_tree)
    except (ValueError, TypeError):
        pass
    # Find the first path where they differ, for the message.
    upaths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(updates)]
    spaths = [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(state_tree, is_leaf=is_leaf)
    ]
    first = next(
        (
            f"{a or '<root>'} (gradients) vs {b or '<root>'} ({what})"
            for a, b in zip(upaths, spaths, strict=False)
            if a != b
        ),
        f"gradients have {len(upaths)} leaves, {what} has {len(spaths)}",
    )
    raise ValueError(
        "adamax_jax: the gradient tree does not match the optimizer state "
        f"(first difference: {first}); was the state made by init on these parameters?"
    )
