"""How Adamax keeps its moments in memory: zeros, read and write for one leaf.

The core transform never touches the stored form of ``m`` and ``u`` directly; it
reads both moments of a leaf into the compute dtype (at least float32), does the
maths, and writes them back in the same stored form. That keeps the state's dtypes
and shapes fixed through every update (``lax.cond``, ``optax.apply_if_finite`` and
``optax.MultiSteps`` need this) and gives one place for compact storage.

The package, a module for each stored form and one for what they share:

* :mod:`~adamax_jax._storage.floats`: a plain array in the parameter's dtype or
  the requested ``m_dtype``/``u_dtype``; narrow floats (bfloat16, float16) round
  with the dither, so a bfloat16 ``u`` still decays.
* :mod:`~adamax_jax._storage.codes8`: ``state_bits=8``,
  :class:`~adamax_jax.QuantizedM` and :class:`~adamax_jax.QuantizedU` for real leaves
  of at least 4096 elements (other leaves use the plain form). ``m`` is stored
  relative to ``u``, so both moments of a leaf are read and written together.
* :mod:`~adamax_jax._storage.dither`: the deterministic, unbiased rounding both use.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from adamax_jax import _leaves
from adamax_jax._storage import codes8, floats


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


def zeros(
    param: Any,
    dtype: jnp.dtype,
    moment: floats.Moment,
    *,
    state_bits: int | None = None,
    block_size: int = codes8.DEFAULT_BLOCK_SIZE,
) -> Any:
    """The zero state of one moment for ``param`` (an array or ShapeDtypeStruct).

    With ``state_bits=8``, a large real ``param`` gets quantized state and ``dtype``
    is unused; any other leaf gets a plain array of ``dtype``.
    """
    if state_bits == 8 and codes8.quantizable(param):
        z = codes8.zeros_m(param) if moment == "m" else codes8.zeros_u(param, block_size)
    else:
        # zeros_like (not zeros(shape)) lets a concrete parameter's sharding carry over.
        z = jnp.zeros_like(param, dtype=dtype)
    # The parameter-shaped zeros, and the block scales (which follow the gradients from
    # the first update on), read the parameter; m's bound R_t stays as it is.
    shape = _leaves.shape_of(param)
    z = jax.tree.map(lambda a: _leaves.tied_to(a, param) if a.shape == shape else a, z)
    if isinstance(z, codes8.QuantizedU):
        z = dataclasses.replace(z, scales=_leaves.tied_to(z.scales, param))
    return z


def is_coded(stored: Any) -> bool:
    """Whether a stored moment is integer codes (``state_bits``) rather than floats."""
    return isinstance(stored, codes8.QuantizedU | codes8.QuantizedM)


def describe(m_stored: Any, u_stored: Any) -> str:
    """The stored form of one leaf's moments, in the words of the options that make it."""
    if isinstance(u_stored, codes8.QuantizedU):
        return f"state_bits=8, block_size={u_stored.block_size}"
    m_name, u_name = jnp.dtype(m_stored.dtype).name, jnp.dtype(u_stored.dtype).name
    return f"state_bits=None, m_dtype={m_name!r}, u_dtype={u_name!r}"


def read_moments(
    m_stored: Any, u_stored: Any, m_dtype: jnp.dtype, u_dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """Both moments of one leaf, as arrays of ``m_dtype`` and ``u_dtype``."""
    if isinstance(u_stored, codes8.QuantizedU):
        u = codes8.read_u(u_stored)
        return codes8.read_m(m_stored, u).astype(m_dtype), u.astype(u_dtype)
    return floats.read(m_stored, m_dtype), floats.read(u_stored, u_dtype)


def write_moments(
    m: jax.Array,
    u: jax.Array,
    m_like: Any,
    u_like: Any,
    *,
    step: jax.Array,
    b1: jax.Array,
    b2: jax.Array,
    touched: jax.Array | None = None,
    grad: jax.Array | None = None,
    floor: jax.Array | float = 0.0,
    u_decay: jax.Array | None = None,
) -> tuple[Any, Any]:
    """Stores both moments of one leaf in the forms of ``m_like`` and ``u_like``.

    ``b1`` and ``b2`` are the step's decay rates (quantized ``u`` keeps its decay
    in the block scales; quantized ``m`` is coded relative to the bound of |m| / u).
    ``touched`` (from ``lazy_rows`` and ``skip_nonfinite``, broadcastable to the
    leaf) is False where the step kept the previous ``m`` and ``u``. ``u_decay``
    (``lazy_rows="catch_up"``, per row) is the decay ``u`` got before this step for
    the steps its row skipped, which ``u`` already includes; quantized ``u`` applies
    it to its block scales too.
    """
    if isinstance(u_like, codes8.QuantizedU):
        return codes8.write(
            m,
            u,
            m_like,
            u_like,
            step=step,
            b1=b1,
            b2=b2,
            touched=touched,
            grad=grad,
            floor=floor,
            u_decay=u_decay,
        )
    return floats.write_pair(m, u, m_like, u_like, step=step, b1=b1, b2=b2)
