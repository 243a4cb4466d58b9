"""Checks on hyperparameters and pytrees, with messages that name the problem.

Hyperparameters can arrive as Python numbers (checked here, at construction) or as
JAX arrays, possibly traced under ``jit``/``vmap`` by ``optax.inject_hyperparams``.
Traced values cannot be inspected, so they pass through unchecked: no Python
branching may depend on them. Schedules (callables) and ``None`` pass through too;
anything else that is not a real number is a TypeError.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from adamax_jax import _leaves, _wrapped
from adamax_jax._storage import codes8


class UnsupportedCombination(ValueError):
    """A combination of options or wrappers that adamax_jax refuses, naming both sides.

    A ``ValueError``; wrappers that re-word their inner transform's errors
    (:func:`~adamax_jax.packed`) pass it on unchanged, since it already says what to do.
    """


# The step is computed in at least float32, so a bound that a Python float keeps
# may be lost after rounding (b1 = 1 - 1e-8 is 1.0 in float32: 1 / (1 - b1**t) = inf).
_COMPUTE_FLOAT = np.float32


def concrete_array(value: Any, name: str = "value") -> np.ndarray | None:
    """``value`` as a float64 NumPy array if it is a concrete real number or array.

    Schedules, traced values and ``None`` return None: they are checked (if at all)
    where they are used.

    Raises:
      TypeError: For booleans, complex numbers and values that are not numbers
        (such as the string ``"0.9"``), naming ``name``.
    """
    if value is None or callable(value) or isinstance(value, Tracer):
        return None
    got = f"{type(value).__name__} {value!r}"
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a real number, got the boolean {value!r}")
    try:
        arr = np.asarray(value)
    except Exception as e:  # re-raised with a message that names the value
        raise TypeError(f"{name} must be a real number, got {got}") from e
    # jnp.issubdtype, not np's: it knows bfloat16.
    if arr.dtype == np.bool_ or not jnp.issubdtype(arr.dtype, jnp.number):
        raise TypeError(f"{name} must be a real number, got {got}")
    if jnp.issubdtype(arr.dtype, jnp.complexfloating):
        # optax.inject_hyperparams gives hyperparameters the parameters' dtype, so a
        # tree of complex parameters brings complex values with no imaginary part.
        if np.any(np.imag(arr) != 0):
            raise TypeError(f"{name} must be a real number, got the complex value {value!r}")
        arr = np.real(arr)
    return arr.astype(np.float64)


def check_finite(name: str, value: Any) -> None:
    """Raises ValueError if a concrete ``value`` (scalar or array) is NaN or infinite."""
    arr = concrete_array(value, name)
    if arr is not None and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {_show(arr)}")


def check_range(
    name: str,
    value: Any,
    *,
    low: float,
    high: float,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raises ValueError if a concrete ``value`` is NaN or lies outside [low, high].

    Values are also checked after rounding to float32, the narrowest dtype the step
    is computed in: ``b1 = 1 - 1e-8`` is below 1 as a Python float but exactly 1 in
    float32, where ``1 / (1 - b1**t)`` is infinite.
    """
    arr = concrete_array(value, name)
    if arr is None:
        return
    interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"

    def inside(x: np.ndarray) -> bool:
        above = x >= low if low_inclusive else x > low
        below = x <= high if high_inclusive else x < high
        return bool(np.all(np.isfinite(x) & above & below))

    if not inside(arr):
        raise ValueError(f"{name} must lie in {interval}, got {_show(arr)}")
    with np.errstate(over="ignore"):
        rounded = arr.astype(_COMPUTE_FLOAT).astype(np.float64)
    if not inside(rounded):
        raise ValueError(
            f"{name} must lie in {interval} after rounding to float32 (the dtype the step "
            f"is computed in), got {_show(arr)}, which rounds to {_show(rounded)}"
        )


def check_hyperparameter_dtypes(values: dict[str, Any]) -> None:
    """Raises TypeError for a hyperparameter array narrower than float32.

    ``optax.inject_hyperparams`` gives every numeric hyperparameter the dtype of the
    widest parameter, so a model held entirely in bfloat16 hands over ``b2=0.999``
    already rounded to 1.0 (``u`` would never decay) and ``b1=0.9`` to 0.898. The
    value is traced, but its dtype is known: refuse it and name the fix.
    """
    for name, value in values.items():
        dtype = getattr(value, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            continue
        if jnp.finfo(dtype).nmant < jnp.finfo(jnp.float32).nmant:
            raise TypeError(
                f"{name} arrived as a {jnp.dtype(dtype).name} array, too narrow for "
                "Adamax's hyperparameters (b2=0.999 rounds to 1.0 in bfloat16, b1=0.9 "
                "to 0.898). "
                "optax.inject_hyperparams gives them the parameters' dtype: pass "
                "hyperparam_dtype=jnp.float32 to optax.inject_hyperparams"
            )


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool; a TypeError otherwise (a truthy string is not a yes)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


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
    if jnp.finfo(dtype).bits < 16:
        # float8 and narrower: too few bits for a moment rounded on its own (the
        # state_bits codes keep 8 bits per moment by coding them against block scales).
        raise ValueError(
            f"{name} must be float16, bfloat16, float32 or float64, got {dtype}; for "
            "moments in one byte each, pass state_bits=8 instead"
        )
    return dtype


def check_float_leaves(tree: Any, what: str) -> None:
    """Raises TypeError naming the first leaf that is not a float or complex array."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None:
            ok, kind = jnp.issubdtype(dtype, jnp.inexact), f"dtype {dtype}"
        else:
            # A Python scalar or other object: name its type, not NumPy's guess.
            ok = isinstance(leaf, float | complex) and not isinstance(leaf, bool)
            kind = f"type {type(leaf).__name__}"
        if not ok:
            raise TypeError(
                f"{what} leaf {_leaves.path_str(path)} has {kind}; Adamax needs "
                "floating-point leaves (cast integer or boolean leaves to a float dtype, or "
                "exclude them with optax.masked / optax.partition)"
            )


def flatten_like(
    updates: Any, state_tree: Any, what: str, is_leaf: Callable[[Any], bool] | None = None
) -> list[Any]:
    """Flattens ``state_tree`` up to the structure of ``updates``, naming a mismatch.

    A wrapped leaf of ``updates`` (an nnx Variable, see :mod:`adamax_jax._wrapped`)
    counts as one leaf: its state may hold the wrapper inside a node of its own.

    Raises:
      ValueError: If the trees differ, naming the first leaf path found in one tree
        but not the other (or, when the paths agree, the differing containers).
    """
    treedef = jax.tree.structure(updates, is_leaf=_wrapped.is_wrapped)
    try:
        return treedef.flatten_up_to(state_tree)
    except (ValueError, TypeError):
        pass
    raise ValueError(
        "the gradient tree does not match the optimizer state (first "
        f"difference: {_first_difference(updates, state_tree, what, is_leaf)}); was the "
        "state made by init on these parameters?"
    )


def _first_difference(
    updates: Any, state_tree: Any, what: str, is_leaf: Callable[[Any], bool] | None
) -> str:
    upaths = [
        p for p, _ in jax.tree_util.tree_leaves_with_path(updates, is_leaf=_wrapped.is_wrapped)
    ]
    spaths = [p for p, _ in jax.tree_util.tree_leaves_with_path(state_tree, is_leaf=is_leaf)]
    # A state leaf belongs to a gradient leaf whose path is a prefix of its own: a
    # compactly stored moment (8-bit codes and scales) sits below the parameter's path.
    ukeys = {jax.tree_util.keystr(p) for p in upaths}
    owners = set()
    orphan = None
    for sp in spaths:
        owner = next(
            (k for n in range(len(sp), -1, -1) if (k := jax.tree_util.keystr(sp[:n])) in ukeys),
            None,
        )
        if owner is None:
            orphan = orphan or _leaves.path_str(sp)
        else:
            owners.add(owner)
    missing = next(
        (_leaves.path_str(p) for p in upaths if jax.tree_util.keystr(p) not in owners), None
    )
    parts = []
    if missing is not None:
        parts.append(f"{missing} is in the gradients but not in {what}")
    if orphan is not None:
        parts.append(f"{orphan} is in {what} but not in the gradients")
    if parts:
        return "; ".join(parts)
    # Same leaf paths, different containers (a tuple where the state has a list, or
    # another node type): show both structures, shortened.
    return (
        f"the leaf paths agree but the containers differ: gradients are "
        f"{_short(jax.tree.structure(updates))}, {what} is "
        f"{_short(jax.tree.structure(state_tree, is_leaf=is_leaf))}"
    )


def _short(obj: Any, limit: int = 120) -> str:
    s = str(obj)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _show(arr: np.ndarray) -> str:
    return repr(float(arr)) if arr.ndim == 0 else np.array2string(arr, threshold=8)


def check_state_options(state_bits: Any, block_size: Any) -> int:
    """Validates ``state_bits`` and ``block_size`` at construction; returns the block size.

    ``block_size=None`` means 256: a default that is not a
    number stays out of ``optax.inject_hyperparams``' traced hyperparameters.
    """
    hint = (
        "; under optax.inject_hyperparams pass static_args=('state_bits', 'block_size') "
        "so that they stay Python ints"
    )
    if state_bits is not None and (
        isinstance(state_bits, bool) or not isinstance(state_bits, int | np.integer)
    ):
        raise TypeError(f"state_bits must be None or the int 8, got {state_bits!r}{hint}")
    if state_bits is not None and state_bits != 8:
        why = (
            " (no 4-bit layout measured trains within 3% of float32 state: see the "
            '"Why not 4 bits" section of the memory how-to; ax.offload keeps the state '
            "off the device instead)"
            if state_bits == 4
            else ""
        )
        raise ValueError(f"state_bits must be None or 8, got {state_bits!r}{why}")
    if block_size is None:
        return codes8.DEFAULT_BLOCK_SIZE
    if isinstance(block_size, int | np.integer) and not isinstance(block_size, bool):
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {block_size!r}")
        return int(block_size)
    if state_bits is not None:
        raise TypeError(f"block_size must be a Python int or None, got {block_size!r}{hint}")
    # Unused, and an array only because optax.inject_hyperparams made it one.
    return codes8.DEFAULT_BLOCK_SIZE
