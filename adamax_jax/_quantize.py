r"""Blockwise 8-bit storage of Adamax's moments, designed around Adamax's invariants.

Each quantized leaf stores one byte for ``u`` and one byte for ``m`` per parameter,
plus one float32 per block of ``block_size`` elements for ``u`` and one float32 per
leaf for ``m``: :math:`2 + 4/\text{block\_size}` bytes per parameter (2.016 for the
default 256), against 8 for float32 state.

**u: an unsigned minifloat with the decay in the block scale.** ``u`` is
non-negative, so its code needs no sign bit: 4 exponent bits and 4 fraction bits
(``e4m4``), read as :math:`x = 2^{e-15}(1 + f/16)` for :math:`e \ge 1` and
:math:`x = 2^{-14} f/16` for :math:`e = 0` (subnormals, down to :math:`2^{-18}`), and
:math:`u = s_b x` with one float32 scale :math:`s_b` per block. Every element keeps
the same relative precision (one code step is 3 to 6 %) over the 15 binades
:math:`[2^{-14}, 2)` of the scale, 4.5 decades; subnormal codes carry it, more
coarsely, down to :math:`2^{-18}`, and anything smaller rounds up to the smallest
code. A small ``u`` never collapses to zero next to a large one. Encoding takes the
float32 bit pattern: adding :math:`2^{19} - 1` and shifting right by 19 rounds the
exponent and top four fraction bits *up*, so the stored ``u`` is never below the
value it stores (up to a relative slack of :math:`2^{-18}` that absorbs float32
rounding), and decoding builds the float32 bit pattern back; both are a handful of
integer operations, with no ``log``, ``exp`` or table.

Adamax decays every element of ``u`` by :math:`\beta_2` at every step, so the
decay lives in the scale: :math:`s_b \leftarrow \beta_2 s_b`, and an element that
only decayed keeps its code exactly (re-encoding ``b2 * decode(c)`` against the
decayed scale gives back ``c``: no creep, no stagnation, 1000 quiet steps give
exactly :math:`\beta_2^{1000} u_0`). Only elements that a new gradient raised are
re-encoded. The codes reach :math:`1.9375\, s_b`; when a new value would exceed
that, the block's scale is reset to the block's new maximum (which then sits at
code 1.0), and the block's other codes are rounded up against the new scale. That
headroom means a block whose largest element has a steady gradient is rescaled
only about every :math:`\ln(1.9375)/(1-\beta_2)` steps (660 for the default), so
the rest of the block decays exactly in between.

**m: a linear code for the ratio m / u.** Adamax's step is :math:`\hat m / u`, and
:math:`|m_t| \le R_t u_t` with :math:`R_t = (1-\beta_1)\sum_{j<t}(\beta_1/\beta_2)^j`
(which tends to :math:`(1-\beta_1)/(1-\beta_1/\beta_2)`, 1.009 for the default
betas). So ``m`` is stored as :math:`r = m / \tilde u` (:math:`\tilde u` the stored,
rounded-up ``u``) in an int8 code :math:`k = 127 r / R_t`, and read back as
:math:`m = k R_t \tilde u / 127`. Because :math:`\tilde u \ge u`, :math:`|r| \le R_t`
always fits: nothing is clipped (except with :math:`\beta_1 \ge \beta_2`, where no bound
exists and the code is capped at 64), and the stored state keeps
:math:`|m| \le R_t \tilde u`, so the bounded step survives quantization by
construction. The code's resolution
is absolute in units of the step (:math:`R_t/254`, 0.4 % of the largest possible
step), the same for an element with gradients of 1e-6 as for one with gradients
of 1e2, which is what keeps the update close to float32 over many orders of
magnitude inside a block. :math:`R_t` is stored with the leaf (one float32), so a
scheduled ``b1``/``b2`` cannot misread old codes.

A round-to-nearest ``m`` would stagnate: ``b1 * m + (1 - b1) * g`` moves by less
than half a code when ``g`` is close to ``m``, so ``m`` would stop within
:math:`\pm 5` codes of its target. ``m`` is therefore rounded with a deterministic
dither: element :math:`i` at step :math:`t` rounds up when the fractional part
exceeds :math:`\{(i + c)\varphi + t\varphi\}` (:math:`\varphi` the golden ratio,
:math:`c` a constant per leaf and moment). It is unbiased like stochastic
rounding, its errors cancel over consecutive steps instead of adding up as a
random walk, and it needs no RNG state: the same step on the same state gives the
same bits, so a resumed run is bit-identical.

Accuracy, and its limit: an element whose gradient keeps one sign has
:math:`|m| \approx u`, a step of about 1. Its ``u`` is stored rounded up by up to
one code step, so its step is shorter than with float32 state by up to
:math:`2^{-4}` (never longer). Elements with noisy or spiky gradients, whose steps
are smaller, track float32 state to within 0.02 of the learning rate.

With ``lazy_rows``, a block that no touched row reaches keeps its scale and codes
exactly; untouched elements that share a block with touched ones keep their
``u`` codes, so their ``u`` decays with the block (their ``m`` keeps its value).

Leaves with fewer than :data:`MIN_SIZE` elements (biases, norms) and complex
leaves stay in floating point: their memory is negligible, and ``u`` of a complex
leaf is real while ``m`` is complex, which the ratio code does not cover.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: Leaves with fewer elements than this keep floating-point state (as bitsandbytes).
MIN_SIZE = 4096

# The e4m4 code: 4 exponent bits with bias 15 (code 0xF0 is 1.0, 0xFF is 1.9375),
# 4 fraction bits. The constants below derive from these two numbers.
_EXP_BITS, _MAN_BITS = 4, 4
_BIAS = 2**_EXP_BITS - 1
_LAST_CODE = 2 ** (_EXP_BITS + _MAN_BITS) - 1
_U_TOP = 2.0 - 2.0**-_MAN_BITS
_MIN_NORMAL = 2.0 ** (1 - _BIAS)
_SUBNORMAL_UNIT = 2.0 ** (1 - _BIAS - _MAN_BITS)
_SHIFT = 23 - _MAN_BITS  # float32 fraction bits dropped by the code
# f32 exponent bias (127) minus the code's, shifted into the code's exponent field.
_EXP_OFFSET = (127 - _BIAS) << _MAN_BITS
_U_CODE_DTYPE = jnp.uint8
# Values within this relative distance above a code round down to it: float32
# rounding of decode -> decay -> encode must give back the same code.
_SLACK = 1.0 - 2.0**-18
_M_LEVELS = 127.0
_M_CODE_DTYPE = jnp.int8
_R_CAP = 64.0  # largest |m|/u a code can express when b1 >= b2 (no bound exists then)
_GOLDEN = 0x9E3779B9  # 2**32 / golden ratio


class _CodedMoment:
    """What the core reads off a stored moment: the logical shape and compute dtype."""

    codes: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def dtype(self) -> jnp.dtype:
        """The dtype the moment is computed in."""
        return jnp.dtype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class QuantizedU(_CodedMoment):
    """``u`` of one leaf as 8-bit codes with one float32 scale per block.

    Attributes:
      codes: ``uint8`` array of the parameter's shape (the e4m4 code of ``u / scale``).
      scales: ``float32`` vector, one scale per block of ``block_size`` consecutive
        elements of the flattened leaf.
      block_size: Elements per block (static: part of the tree structure).
    """

    codes: jax.Array
    scales: jax.Array
    block_size: int = dataclasses.field(metadata={"static": True})


@dataclasses.dataclass(frozen=True)
class QuantizedM(_CodedMoment):
    """``m`` of one leaf as int8 codes of ``m / u`` with one float32 range.

    Attributes:
      codes: ``int8`` array of the parameter's shape; ``m = codes * scale / 127 * u``.
      scale: ``float32`` scalar, the bound on ``|m| / u`` the codes were written with.
    """

    codes: jax.Array
    scale: jax.Array


jax.tree_util.register_dataclass(QuantizedU)
jax.tree_util.register_dataclass(QuantizedM)


def quantizable(param: Any) -> bool:
    """Whether a parameter's moments are stored in 8 bits (large and real)."""
    dtype = param.dtype if hasattr(param, "dtype") else jnp.result_type(param)
    return math.prod(np.shape(param)) >= MIN_SIZE and not jnp.issubdtype(dtype, jnp.complexfloating)


def _num_blocks(shape: tuple[int, ...], block_size: int) -> int:
    return -(-math.prod(shape) // block_size)


def zeros_u(param: Any, block_size: int) -> QuantizedU:
    return QuantizedU(
        codes=jnp.zeros_like(param, dtype=_U_CODE_DTYPE),
        scales=jnp.zeros([_num_blocks(param.shape, block_size)], jnp.float32),
        block_size=block_size,
    )


def zeros_m(param: Any) -> QuantizedM:
    return QuantizedM(
        codes=jnp.zeros_like(param, dtype=_M_CODE_DTYPE), scale=jnp.zeros([], jnp.float32)
    )


# --- blocks ----------------------------------------------------------------------------


def _to_blocks(x: jax.Array, block_size: int, fill: Any = 0) -> jax.Array:
    """``x`` flattened into rows of ``block_size`` (the last row padded with ``fill``)."""
    flat = x.reshape(-1)
    pad = -flat.shape[0] % block_size
    if pad:
        flat = jnp.concatenate([flat, jnp.full([pad], fill, flat.dtype)])
    return flat.reshape(-1, block_size)


def _from_blocks(xb: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return xb.reshape(-1)[: math.prod(shape)].reshape(shape)


# --- the e4m4 code of u ----------------------------------------------------------------


def decode_e4m4(codes: jax.Array) -> jax.Array:
    """float32 value of each code, relative to its block scale."""
    # int32, not uint32: AVX2 has no vector unsigned-to-float conversion.
    c = codes.astype(jnp.int32)
    normal = jax.lax.bitcast_convert_type((c + _EXP_OFFSET) << _SHIFT, jnp.float32)
    subnormal = c.astype(jnp.float32) * _SUBNORMAL_UNIT
    return jnp.where(c < 2**_MAN_BITS, subnormal, normal)


def encode_e4m4_up(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The smallest code whose value is >= ``x * (1 - 2**-18)``, and that value.

    For ``0 <= x <= 1.9375``. Returns ``(codes, decode_e4m4(codes))``; the value comes
    from the same bit pattern, without decoding the codes again.
    """
    # x >= 0, so only the top needs a clip (each NaN-propagating clip costs several
    # instructions per element on x86). NaN stays NaN.
    x = jnp.minimum(x * _SLACK, _U_TOP)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    # Adding 2**19 - 1 before dropping 19 fraction bits rounds up; a carry moves
    # into the exponent, which is the next code.
    up = (bits + np.uint32(2**_SHIFT - 1)) >> _SHIFT
    sub = jnp.ceil(x * (1.0 / _SUBNORMAL_UNIT))
    is_sub = x < _MIN_NORMAL
    code = jnp.where(is_sub, sub.astype(jnp.int32), up.astype(jnp.int32) - _EXP_OFFSET)
    value = jnp.where(
        is_sub, sub * _SUBNORMAL_UNIT, jax.lax.bitcast_convert_type(up << _SHIFT, jnp.float32)
    )
    return jnp.clip(code, 0, _LAST_CODE).astype(_U_CODE_DTYPE), value


def _abs_block_max(xb: jax.Array) -> jax.Array:
    """``max |x|`` of each row of ``xb`` (rows of a power-of-two length).

    Elementwise maxima of slices are work that XLA fuses with the reads of ``xb``;
    a row reduction makes XLA CPU write ``|x|`` to a temporary first, and is several
    times slower. The first level takes ``|x|`` of 16 column slices, each read once
    (an ``abs`` shared by two slices would be written to a temporary too), so one
    loop reads ``xb`` and leaves 1/16 of it; halving finishes the rows.
    """
    k = min(16, xb.shape[1])
    w = xb.shape[1] // k
    parts = [jnp.abs(xb[:, i * w : (i + 1) * w]) for i in range(k)]
    while len(parts) > 1:
        parts = [jnp.maximum(a, b) for a, b in zip(parts[::2], parts[1::2], strict=True)]
    m = parts[0]
    while w > 1:
        w //= 2
        m = jnp.maximum(m[:, :w], m[:, w:])
    return m[:, 0]


# --- dither ----------------------------------------------------------------------------


def dither_bits(shape: tuple[int, ...], step: jax.Array, salt: int) -> jax.Array:
    """32 dither bits per element: ``(i + salt) * phi + step * phi`` modulo 2**32.

    Deterministic in (element, step, salt). Read as a fraction, consecutive steps of
    one element form the golden-ratio low-discrepancy sequence, so rounding errors
    cancel over a few steps instead of adding up like independent random ones;
    neighbouring elements get well-spread values too. One multiply per element.
    """
    idx = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    offset = jnp.asarray(step).astype(jnp.uint32) * np.uint32(_GOLDEN) + np.uint32(
        (salt * _GOLDEN) & 0xFFFFFFFF
    )
    return idx * np.uint32(_GOLDEN) + offset


def dither(shape: tuple[int, ...], step: jax.Array, salt: int) -> jax.Array:
    """Rounding thresholds in [0, 1) from :func:`dither_bits`."""
    # 24 bits fit an int32 exactly; a signed conversion is a single vector instruction.
    top = jax.lax.bitcast_convert_type(dither_bits(shape, step, salt) >> 8, jnp.int32)
    return top.astype(jnp.float32) * np.float32(2.0**-24)


# --- read and write both moments -------------------------------------------------------


def read_u(q: QuantizedU) -> jax.Array:
    ub = decode_e4m4(_to_blocks(q.codes, q.block_size)) * q.scales[:, None]
    return _from_blocks(ub, q.shape)


def read_m(q: QuantizedM, u: jax.Array) -> jax.Array:
    """``m`` from its codes and the stored (decoded) ``u`` of the same leaf."""
    return q.codes.astype(jnp.float32) * (q.scale / _M_LEVELS) * u


def ratio_bound(b1: jax.Array, b2: jax.Array, count: jax.Array) -> jax.Array:
    """:math:`R_t = (1-\\beta_1)\\sum_{j<t}(\\beta_1/\\beta_2)^j`, the bound of |m_t| / u_t."""
    b1 = b1.astype(jnp.float32)
    b2 = b2.astype(jnp.float32)
    t = count.astype(jnp.float32)
    rho = b1 / jnp.where(b2 > 0, b2, 1.0)
    below = (b1 < b2) & (rho < 1)
    rho_safe = jnp.where(below, rho, 0.5)
    geometric = (1 - rho_safe**t) / (1 - rho_safe)
    # b1 >= b2: |m| / u has no bound (Adamax has no bounded step then); cap the code.
    r = (1 - b1) * jnp.where(below, geometric, t)
    return jnp.clip(r, 1 - b1, _R_CAP)


def write(
    m: jax.Array,
    u: jax.Array,
    m_like: QuantizedM,
    u_like: QuantizedU,
    *,
    step: jax.Array,
    leaf: int,
    b1: jax.Array,
    b2: jax.Array,
    touched: jax.Array | None,
    grad: jax.Array | None = None,
    floor: jax.Array | float = 0.0,
) -> tuple[QuantizedM, QuantizedU]:
    """Encodes the new ``m`` and ``u`` of one leaf (float32 values of its shape).

    ``touched`` (``lazy_rows``, ``skip_nonfinite``) is False where the step left
    ``m`` and ``u`` as they were; those elements keep their codes.
    """
    shape = u_like.shape
    bs = u_like.block_size
    decay = b2.astype(jnp.float32)
    # Everything below works on rows of one block each; for a leaf whose size is a
    # multiple of the block size the reshapes are free.
    ub = _to_blocks(u.astype(jnp.float32), bs)
    mb = _to_blocks(m.astype(jnp.float32), bs)
    tb = None if touched is None else _to_blocks(jnp.broadcast_to(touched, shape), bs, False)

    # -- u: the scale carries the decay; reset it where a value would overflow the code.
    if grad is None:
        need = jnp.max(ub, axis=1)
    else:
        # u = max(b2 * u_prev, |grad| + floor), and b2 * u_prev fits the decayed
        # scale by construction: only the gradient can overflow a block. Reducing
        # the gradient itself (not u) spares XLA a float32 temporary of the leaf.
        gb = _to_blocks(grad.astype(jnp.float32), bs)
        need = _abs_block_max(gb) + floor
    # A block that the step did not touch at all keeps its scale and codes exactly.
    decay_b = decay if tb is None else jnp.where(jnp.any(tb, axis=1), decay, 1.0)
    s_dec = u_like.scales * decay_b
    reset = ~(need <= s_dec * _U_TOP)  # also where need is NaN: the NaN shows in the scale
    # maximum (not need alone) carries a NaN scale forward, so a poisoned block stays
    # visibly NaN instead of silently resuming with its m wiped.
    scales = jnp.where(reset, jnp.maximum(need, s_dec), s_dec)
    inv = jnp.where(scales > 0, 1.0 / jnp.where(scales > 0, scales, 1.0), 0.0)
    codes_u, rel = encode_e4m4_up(ub * inv[:, None])
    if tb is not None:
        keep = ~tb & ~reset[:, None]
        old = _to_blocks(u_like.codes, bs)
        codes_u = jnp.where(keep, old, codes_u)
        rel = jnp.where(keep, decode_e4m4(old), rel)
    u_stored = rel * scales[:, None]

    # -- m: the ratio to the stored u, whose bound R_t is the code's full range.
    r_max = ratio_bound(b1, b2, step)
    pos = u_stored > 0
    y = jnp.where(pos, mb / jnp.where(pos, u_stored, 1.0), 0.0) * (_M_LEVELS / r_max)
    theta = _to_blocks(dither(shape, step, salt=leaf * 0x632BE5AB + 0x5BD1E995), bs)
    k = jnp.floor(y + theta)
    if tb is not None:
        k = jnp.where(tb, k, jnp.round(y))
    codes_m = jnp.clip(k, -_M_LEVELS, _M_LEVELS).astype(_M_CODE_DTYPE)

    return (
        QuantizedM(_from_blocks(codes_m, shape), r_max),
        QuantizedU(_from_blocks(codes_u, shape), scales, bs),
    )
