"""How Adamax keeps its moments in memory: zeros, read and write for one leaf.

The core transform never touches the stored form of ``m`` and ``u`` directly; it
reads each moment into the compute dtype (at least float32), does the maths, and
writes it back in the same stored form. That keeps the state's dtypes and shapes
fixed through every update (``lax.cond``, ``optax.apply_if_finite`` and
``optax.MultiSteps`` need this) and gives one place to add compact storage.

Stored forms:

* a plain array in the parameter's dtype or the requested ``m_dtype``/``u_dtype``;
  float32 and float64 round-to-nearest on write.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

Moment = Literal["m", "u"]


def compute_dtype(*dtypes: Any) -> jnp.dtype:
    """The dtype the step is computed in: the widest input, at least float32.

    float16 would lose eps=1e-8 (it rounds to 0) and give 0/0 for a zero gradient;
    bfloat16 cannot resolve the 0.1% decay of b2. Real moments computed in float32 avoid
    both. Complex inputs promote to complex64 or wider.
    """
    dt = jnp.dtype(jnp.float32)
    for d in dtypes:
        dt = jnp.promote_types(dt, d)
    return dt


def real_dtype(dtype: Any) -> jnp.dtype:
    """The real dtype of the same precision (u of a complex parameter is real)."""
    return jnp.finfo(dtype).dtype


def zeros(param: Any, dtype: jnp.dtype, moment: Moment) -> Any:
    """The zero state of one moment for ``param`` (an array or ShapeDtypeStruct)."""
    del moment
    # zeros_like (not zeros(shape)) lets a concrete parameter's sharding carry over.
    return jnp.zeros_like(param, dtype=dtype)


def read(stored: Any, dtype: jnp.dtype) -> jax.Array:
    """The stored moment as an array of ``dtype``."""
    return stored.astype(dtype)


def write(value: jax.Array, like: Any, moment: Moment, *, step: jax.Array, leaf: int) -> Any:
    """Stores ``value`` in the same form as ``like`` (the moment's previous state).

    ``moment == "u"`` must never be stored below ``value`` by more than the storage's
    rounding, because the bounded step relies on ``u >= |g|``. ``step`` and ``leaf``
    identify the write for storage that needs reproducible randomness.
    """
    del moment, step, leaf
    return value.astype(like.dtype)
