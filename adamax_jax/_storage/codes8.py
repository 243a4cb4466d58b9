r"""Blockwise 8-bit storage of Adamax's moments, designed around Adamax's invariants.

Each quantized leaf stores one byte for ``u`` and one byte for ``m`` per parameter,
plus one float32 per block of ``block_size`` elements for ``u`` and one float32 per
leaf for ``m``: :math:`2 + 4/\text{block\_size}` bytes per parameter (2.016 for the
default 256), against 8 for float32 state.

**u: an unsigned code with its precision near the block's top, and the decay in
the block scale.** ``u`` is non-negative, so its code needs no sign bit, and
:math:`u = s_b x` with one float32 scale :math:`s_b` per block and :math:`x` the
value of the element's code, read in three regimes:

* codes 64-255: the six binades :math:`[2^{-5}, 2)` with 5 fraction bits,
  :math:`x = 2^e(1 + f/32)` (a code step is 1.6 to 3.1 %);
* codes 8-63: the seven binades :math:`[2^{-12}, 2^{-5})` with 3 fraction bits
  (6 to 12.5 %);
* codes 0-7: multiples of :math:`2^{-15}`, down to zero (a positive ``u`` gets at
  least code 1, so it never collapses to zero next to a large one).

Elements keep a relative precision down to 3.6 decades below their block's largest
``u``, and a nonzero value down to 4.5 decades. The precision is tapered because the
step is decided where most elements are: in a trained MLP, 90 % of the elements of
a block of 256 have a ``u`` within 3 to 5 binades of the block's largest and 99 %
within 7 to 8, while a steady-gradient element's step is only as accurate as its
``u``, so five fraction bits there take the error of such a step from up to 6 %
(a float8-style ``e4m4``) to under 1.6 %. Encoding takes the float32 bit pattern:
adding half of the dropped fraction and shifting rounds to the nearest code (a
carry moves into the exponent, which is the next code, and two regimes give the
same code where they meet), and decoding builds the float32 bit pattern back; both
are a handful of integer operations per regime, with no ``log``, ``exp`` or table.

``u`` is rounded to its nearest code, not up. Rounding up would keep
:math:`\tilde u \ge u`, but the bounded step does not need it (see ``m`` below,
whose code carries the invariant by itself), and it costs a one-sided error of a
whole code step: an element with a steady gradient would step up to one code step
shorter than with float32 state, for as long as its rounded-up ``u`` takes to decay.

Adamax decays every element of ``u`` by :math:`\beta_2` at every step, so the
decay lives in the scale: :math:`s_b \leftarrow \beta_2 s_b`, and an element that
only decayed keeps its code exactly (re-encoding ``b2 * decode(c)`` against the
decayed scale gives back ``c``: no creep, no stagnation, 1000 quiet steps give
exactly :math:`\beta_2^{1000} u_0`). Only elements that a new gradient raised are
re-encoded. The codes reach :math:`1.97\, s_b`; when a new value would exceed
that, the block's scale is reset to the block's new maximum (which then sits at
code 1.0), and the block's other elements are re-encoded against the new scale.
That headroom means a block whose largest element has a steady gradient is
rescaled only about every :math:`\ln(1.97)/(1-\beta_2)` steps (680 for the
default), so the rest of the block decays exactly in between.

**m: a tapered code for the ratio m / u.** Adamax's step is :math:`\hat m / u`, and
:math:`|m_t| \le R_t u_t` with :math:`R_t = (1-\beta_1)\sum_{j<t}(\beta_1/\beta_2)^j`
(which tends to :math:`(1-\beta_1)/(1-\beta_1/\beta_2)`, 1.009 for the default
betas). So ``m`` is stored as :math:`r = m / (R_t u)` in an int8 code, sign and
magnitude, and read back as :math:`m = x_k R_t \tilde u` with :math:`x_k \in [-1, 1]`
the code's value and :math:`\tilde u` the decoded ``u``. The ratio is taken against
the ``u`` the step computed, before rounding, so :math:`|r| \le 1` always fits:
nothing is clipped (except with :math:`\beta_1 \ge \beta_2`, where no bound exists
and :math:`R_t` is capped at 64). Read back, ``m`` and ``u`` carry the same rounding
factor, so the direction :math:`m/u` the next step starts from is the one this step
computed, and the read-back state keeps :math:`|m| \le R_t \tilde u`; by induction
(:math:`|b_1 m + (1-b_1) g| \le R_{t+1} \max(b_2 \tilde u, |g|)`) every later step
keeps :math:`|\hat m_t / u_t| \le R_t / (1-\beta_1^t)`, the bound of float32 state,
however ``u`` was rounded. :math:`R_t` is stored with the leaf (one float32), so a
scheduled ``b1``/``b2`` cannot misread old codes.

One exception: a ``u`` below the code's range (more than 4.5 decades under its
block's largest) is rounded up to the smallest nonzero code, possibly many times
too large, and there the ratio is taken against that code instead. Against the
``u`` itself, ``m`` would be read back scaled up as far, and its old direction would
outweigh the element's new gradients for as many steps as that factor takes to
decay (30 steps for 30x). Against the code, ``m`` is read back as it is, stays
within its bound, and only the element's steps shrink, by ``u`` over the code.

The magnitudes have two parts, because the step needs two kinds of precision:

* codes 15-127: linear from :math:`2^{-6}` to 1 in steps of 9/1024 (1/114 of the
  bound). The error there is absolute, in units of the largest possible step, the
  same for an element with gradients of 1e-6 as for one with gradients of 1e2,
  which is what keeps the update close to float32 over many orders of magnitude
  inside a block. Noisy elements sit at 0.05 to 0.4 of the bound and need these
  fine steps: steps of 1/64 over :math:`[1/4, 1/2)` alone take the mixture below
  from 0.014 to 0.025 at the 99th percentile, and over the top half, 0.017 to 0.028.
* codes 1-14: two per binade, :math:`2^e (1, 1.5)` for :math:`2^{-13} \le x <
  2^{-6}`, and code 0 is zero. These give relative precision to an element whose
  gradient fell far under its running max: after one gradient of 1 and then a
  steady 1e-3, ``u`` stays near the spike for thousands of steps and :math:`|r|` is
  about 1e-3. A linear code (steps of 1/127) gets each such step 0 or one code
  step, off by a median 90 % and a 99th percentile of 770 % against float32 state
  at step 300 (steady gradients 1e-4 to 1e-2); this code by 8.9 % and 33 %, and
  trajectories of such elements mixed with small sign-alternating ones drift from
  float32's by a median 1.3-1.4 % of the path walked instead of 1.9-2.0 % (99th
  percentile 4.1-5.3 % instead of 7.2-9.8 %, steps 300 and 1000).

One byte cannot have both fully. After a spike a step's error is a median quarter
of the code step there and a 99th percentile 0.8 of it, so 5 % and 20 % would need
four codes per binade: 14 magnitudes more, which would leave the linear part steps
of 1/100 of the bound, too coarse for the mixture's 0.02 (steps of 1/100 measured
0.0205 for its steady-sign elements; 1/114 gives 0.019 at worst). Encoding needs
no ``log``, ``exp`` or table (a 255-entry lookup measured slower): the linear part's
position is :math:`(1024 x + 119)/9`, an exact integer at each code, and below it
the float32 bit pattern shifted right by 22 is the code (plus an offset) and the
dropped bits the position within the code step, linear as the codes are; decoding
builds the same patterns back.

A round-to-nearest ``m`` would stagnate: ``b1 * m + (1 - b1) * g`` moves by less
than half a code when ``g`` is close to ``m``, so ``m`` would stop within
:math:`\pm 5` codes of its target. ``m`` is therefore rounded with a deterministic
dither between the two codes around it on the signed axis, :math:`lo \le r < hi`:
element :math:`i` at step :math:`t` rounds up (towards :math:`+\infty`) when its
position :math:`(r - lo)/(hi - lo)` is at least :math:`1 - \{(i + c)\varphi +
t\varphi\}` (:math:`\varphi` the golden ratio, :math:`c` a constant of the moment,
the same for every leaf). It is unbiased in value like stochastic rounding (a dither
of the code index would not be, the code being non-linear), its errors cancel over
consecutive steps instead of adding up as a random walk, and it needs no RNG state:
the same step on the same state gives the same bits, so a resumed run is
bit-identical.

The signed axis, not the magnitude with the sign put back: the dither's sequence
is deterministic, with most of its power at one frequency (0.382 cycles per step),
and rounding the magnitude makes the value's error :math:`\operatorname{sign}(m)`
times a function of the threshold. An ``m`` whose sign oscillates near that
frequency, as a stiff direction at Adamax's edge of stability does, then gets a bias
that lasts while the two stay in step: on optax's Rosenbrock tiled over 4096
copies (lr 0.1, 10,000 steps) its 64-step means reached 0.15-0.3 of a code step,
which ``m`` carries nine-fold (:math:`\beta_1/(1-\beta_1)`) into the steps, and 7-41
copies (by layout) drifted along the valley outside optax's tolerance (float32: 0). On
the signed axis none do, for the same operations. A dither random in time has no
such line either, but loses the cancellation (the mixture below at 0.021-0.023).
What remains is the unbiased error of a code step, which still rocks such a
direction in proportion to the learning rate: the copies spread along the valley to
:math:`|x-1|` of 0.005, 0.016 and 0.056 at lr 0.03, 0.1 and 0.3 (float32: 0.001), so
at lr 0.3, 1.3-1.4 % of them end outside the tolerance (magnitude rounding: 9-12 %).

Accuracy: on a mix of steady, noisy and one-spike elements over five decades, the
update stays within 0.02 of the learning rate of the float32-state update for 99 %
of the elements of each kind (0.014 to 0.016 for the whole mix at steps 10 to
1000, 0.019 for the worst kind; with the linear code 0.013 to 0.015 and 0.018).

With ``lazy_rows``, a block that no touched row reaches keeps its scale and codes
exactly; untouched elements that share a block with touched ones keep their
``u`` codes, so their ``u`` decays with the block (their ``m`` code is rewritten
against that decayed ``u``, to the nearest code, so ``m`` keeps its value).

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

from adamax_jax import _leaves
from adamax_jax._storage import dither

#: Leaves with fewer elements than this keep floating-point state (as bitsandbytes).
MIN_SIZE = 4096
#: Elements per block of the 8-bit ``u`` when ``block_size`` is None.
DEFAULT_BLOCK_SIZE = 256

# The u code, relative to the block scale (see the module docstring): codes
# _FINE_START.._LAST_CODE have _FINE_BITS fraction bits over the top _FINE_BINADES
# binades below 2; codes _COARSE_START.._FINE_START - 1 have _COARSE_BITS over the
# binades below those; codes 0.._COARSE_START - 1 are multiples of _LINEAR_UNIT.
_FINE_BITS, _COARSE_BITS = 5, 3
_FINE_START, _COARSE_START = 64, 8
_LAST_CODE = 255
_FINE_BINADES = (_LAST_CODE + 1 - _FINE_START) >> _FINE_BITS  # 6
_COARSE_BINADES = (_FINE_START - _COARSE_START) >> _COARSE_BITS  # 7
_FINE_MIN = 2.0 ** (1 - _FINE_BINADES)  # 2**-5, the value of code _FINE_START
_COARSE_MIN = _FINE_MIN * 2.0**-_COARSE_BINADES  # 2**-12, the value of _COARSE_START
_LINEAR_UNIT = _COARSE_MIN / _COARSE_START  # 2**-15
_U_TOP = 2.0 - 2.0**-_FINE_BITS  # the value of the last code
_FINE_SHIFT, _COARSE_SHIFT = 23 - _FINE_BITS, 23 - _COARSE_BITS


def _code_offset(first_code: int, first_value: float, shift: int) -> int:
    """``k`` such that ``bitcast((c + k) << shift)`` is the float32 value of code ``c``."""
    exponent = int(math.log2(first_value)) + 127
    return (exponent << (23 - shift)) - first_code


_FINE_OFFSET = _code_offset(_FINE_START, _FINE_MIN, _FINE_SHIFT)
_COARSE_OFFSET = _code_offset(_COARSE_START, _COARSE_MIN, _COARSE_SHIFT)
_U_CODE_DTYPE = jnp.uint8
_M_CODE_DTYPE = jnp.int8
# The m code, of r = m / (R_t u) in [-1, 1]: int8 sign and magnitude. Magnitudes
# c = _M_LIN_START..127 are linear, (9 c - 119) / 1024, from 2**-6 to 1 in steps of
# 9/1024 (1/114 of the bound); 1.._M_LIN_START - 1 are two per binade,
# 2**e * (1, 1.5), over [2**-13, 2**-6); 0 is zero.
_M_LIN_START = 15
_M_LIN_MIN, _M_LOG_MIN = 2.0**-6, 2.0**-13
_M_LOG_SHIFT = 22  # one fraction bit
_M_LOG_OFFSET = _code_offset(1, _M_LOG_MIN, _M_LOG_SHIFT)
_R_CAP = 64.0  # largest |m|/u a code can express when b1 >= b2 (no bound exists then)


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
      codes: ``uint8`` array of the parameter's shape (the code of ``u / scale``).
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
      codes: ``int8`` array of the parameter's shape; ``m = x * scale * u`` with ``x``
        the code's value in ``[-1, 1]`` (sign and magnitude; see the module docstring).
      scale: ``float32`` scalar, the bound on ``|m| / u`` the codes were written with.
      param_dtype: The name of the parameter's dtype (static), which ``dtype`` reports,
        as a plain ``m`` has its parameter's dtype: the update takes it.
    """

    codes: jax.Array
    scale: jax.Array
    param_dtype: str = dataclasses.field(default="float32", metadata={"static": True})

    @property
    def dtype(self) -> jnp.dtype:
        """The parameter's dtype (the moment is computed in at least float32)."""
        return jnp.dtype(self.param_dtype)


jax.tree_util.register_dataclass(QuantizedU)
jax.tree_util.register_dataclass(QuantizedM)


def quantizable(param: Any) -> bool:
    """Whether a parameter's moments are stored in 8 bits (large and real)."""
    dtype = _leaves.dtype_of(param)
    return math.prod(_leaves.shape_of(param)) >= MIN_SIZE and not jnp.issubdtype(
        dtype, jnp.complexfloating
    )


def _num_blocks(shape: tuple[int, ...], block_size: int) -> int:
    return -(-math.prod(shape) // block_size)


def leaf_block_size(block_size: int, shape: tuple[int, ...]) -> int:
    """The block size a leaf of ``shape`` stores its ``u`` with: ``block_size``, or
    for a leaf smaller than one block the smallest power of two that holds it.

    Either way the leaf is one block, but a block far larger than the leaf would be
    padded on every step (256 leaves of 4096 elements in blocks of 32768 stepped 4.4x
    slower).
    """
    return min(block_size, 1 << (math.prod(shape) - 1).bit_length())


def zeros_u(param: Any, block_size: int) -> QuantizedU:
    block_size = leaf_block_size(block_size, _leaves.shape_of(param))
    return QuantizedU(
        codes=jnp.zeros_like(param, dtype=_U_CODE_DTYPE),
        scales=jnp.zeros([_num_blocks(param.shape, block_size)], jnp.float32),
        block_size=block_size,
    )


def zeros_m(param: Any) -> QuantizedM:
    return QuantizedM(
        codes=jnp.zeros_like(param, dtype=_M_CODE_DTYPE),
        scale=jnp.zeros([], jnp.float32),
        param_dtype=_leaves.dtype_of(param).name,
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


def _per_block(per_row: jax.Array, shape: tuple[int, ...], block_size: int) -> jax.Array:
    """A value per row of a leaf (rows along axis 0) as one per block: the value of
    the row holding the block's first element. Exact where every block lies inside
    rows that share their value, as the row groups of ``lazy_rows`` do."""
    row_size = math.prod(shape[1:])
    first_rows = np.arange(_num_blocks(shape, block_size)) * block_size // row_size
    return per_row.reshape(-1)[first_rows]


# --- the code of u -------------------------------------------------------------------


def decode_u_code(codes: jax.Array) -> jax.Array:
    """float32 value of each code, relative to its block scale."""
    # int32, not uint32: AVX2 has no vector unsigned-to-float conversion.
    c = codes.astype(jnp.int32)
    fine = jax.lax.bitcast_convert_type((c + _FINE_OFFSET) << _FINE_SHIFT, jnp.float32)
    coarse = jax.lax.bitcast_convert_type((c + _COARSE_OFFSET) << _COARSE_SHIFT, jnp.float32)
    linear = c.astype(jnp.float32) * _LINEAR_UNIT
    return jnp.where(c >= _FINE_START, fine, jnp.where(c >= _COARSE_START, coarse, linear))


def encode_u_code(x: jax.Array) -> jax.Array:
    """The code nearest to ``x``, for ``0 <= x``.

    Values above the last code get the last code, and positive values below the
    first nonzero code get that code.
    """
    # x >= 0, so only the top needs a clip (each NaN-propagating clip costs several
    # instructions per element on x86).
    x = jnp.minimum(x, _U_TOP)
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    # Adding half of the dropped fraction before the shift rounds to nearest; a
    # carry moves into the exponent, which is the next code. Where two regimes
    # meet, both give the same code for the power of two between them.
    fine = ((bits + (1 << (_FINE_SHIFT - 1))) >> _FINE_SHIFT) - _FINE_OFFSET
    coarse = ((bits + (1 << (_COARSE_SHIFT - 1))) >> _COARSE_SHIFT) - _COARSE_OFFSET
    # A positive u never rounds to zero, which would wipe the element's m with it.
    linear = jnp.maximum(jnp.round(x * (1.0 / _LINEAR_UNIT)), jnp.where(x > 0, 1.0, 0.0))
    code = jnp.where(
        x >= _FINE_MIN, fine, jnp.where(x >= _COARSE_MIN, coarse, linear.astype(jnp.int32))
    )
    return code.astype(_U_CODE_DTYPE)


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


# --- the code of m -------------------------------------------------------------------


def _m_code_value_1024(codes: jax.Array) -> jax.Array:
    """1024 times the value of each ``m`` code (the 1/1024 goes into the caller's
    product)."""
    c = codes.astype(jnp.int32)
    a = jnp.abs(c)
    lin = a.astype(jnp.float32) * 9.0 - 119.0  # exact (an integer multiply is slower)
    # 1024 times the code's value is 10 binades up: 20 codes of the pattern.
    log = jax.lax.bitcast_convert_type((a + (_M_LOG_OFFSET + 20)) << _M_LOG_SHIFT, jnp.float32)
    x = jnp.where(a >= _M_LIN_START, lin, jnp.where(a > 0, log, 0.0))
    # The sign bit of the code is the sign bit of the value.
    bits = jax.lax.bitcast_convert_type(x, jnp.int32) | (c & jnp.int32(-(2**31)))
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def decode_m_code(codes: jax.Array) -> jax.Array:
    """float32 value of each ``m`` code, in ``[-1, 1]`` (``m / (R_t u)``)."""
    return _m_code_value_1024(codes) * (1.0 / 1024)


def encode_m_code(y: jax.Array, theta: jax.Array | float) -> jax.Array:
    """The code of ``y`` (values beyond ``[-1, 1]`` get the last code), rounded
    between its two neighbouring codes on the signed axis ``lo <= y < hi``: up
    (towards +inf, whatever the sign) where ``theta``, a threshold in ``[0, 1)``, is
    at least ``1 - (y - lo) / (hi - lo)``.

    With ``theta`` uniform that is up with probability ``(y - lo) / (hi - lo)``, so
    the decoded value is unbiased; ``theta = 0.5`` rounds to the nearest code.
    """
    x = jnp.minimum(jnp.abs(y), 1.0)
    # t: the code as a real number, whose integer part is the code below x and
    # fractional part x's position towards the next code. Linear part: (x * 1024 +
    # 119) / 9; at the codes the sum is an exact integer and times 1/9 gives the code
    # exactly (elsewhere the sum's rounding is 2**-16 of a code step at most).
    lin = (x * 1024.0 + 119.0) * (1.0 / 9)
    # Two codes per binade: the float32 bit pattern shifted right by 22 is the code
    # (plus an offset), and the dropped bits are linear within the binade, as the
    # codes are; converted to float32 (exact at the codes, within 2**-17 of a code
    # step elsewhere).
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    log = bits.astype(jnp.float32) * 2.0**-_M_LOG_SHIFT - _M_LOG_OFFSET
    t = jnp.where(x >= _M_LIN_MIN, lin, jnp.where(x >= _M_LOG_MIN, log, x * (1 / _M_LOG_MIN)))
    # The sign of y onto the position (its bit pattern) before the rounding, not onto
    # the code after it: the rounding then goes up on the signed axis where theta is
    # large, whatever the sign. Rounding the magnitude instead makes the error of the
    # value sign(y) times a function of theta, so an m whose sign oscillates in step
    # with the dither's sequence gets a bias that lasts (see the module docstring).
    sign = jax.lax.bitcast_convert_type(y, jnp.int32) & jnp.int32(-(2**31))
    t = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(t, jnp.int32) | sign, jnp.float32)
    return jnp.floor(t + theta).astype(_M_CODE_DTYPE)


# --- read and write both moments -------------------------------------------------------


def read_u(q: QuantizedU) -> jax.Array:
    ub = decode_u_code(_to_blocks(q.codes, q.block_size)) * q.scales[:, None]
    return _from_blocks(ub, q.shape)


def read_m(q: QuantizedM, u: jax.Array) -> jax.Array:
    """``m`` from its codes and the stored (decoded) ``u`` of the same leaf."""
    return _m_code_value_1024(q.codes) * (q.scale * (1.0 / 1024)) * u


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


@jax.custom_jvp
def refuse_derivative(x: jax.Array) -> jax.Array:
    """``x``; differentiating through it is a TypeError that says why and what to do.

    8-bit moments are stored as integer codes, which carry no derivative. Without
    this, ``jax.grad`` through unrolled steps would silently see only the part of
    the state that flows through the float32 block scales.
    """
    return x


@refuse_derivative.defjvp
def refuse_derivative_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> Any:
    raise TypeError(
        "cannot differentiate through state_bits=8 state: its moments are "
        "integer codes, which carry no derivative. To differentiate through optimizer "
        "steps (meta-learning, learned learning rates), use float32 or bfloat16 moments "
        "(m_dtype=u_dtype=jnp.bfloat16 is differentiated straight through its rounding)"
    )


def write(
    m: jax.Array,
    u: jax.Array,
    m_like: QuantizedM,
    u_like: QuantizedU,
    *,
    step: jax.Array,
    b1: jax.Array,
    b2: jax.Array,
    touched: jax.Array | None,
    grad: jax.Array | None = None,
    floor: jax.Array | float = 0.0,
    u_decay: jax.Array | None = None,
) -> tuple[QuantizedM, QuantizedU]:
    """Encodes the new ``m`` and ``u`` of one leaf (float32 values of its shape).

    ``touched`` (``lazy_rows``, ``skip_nonfinite``) is False where the step left
    ``m`` and ``u`` as they were; those elements keep their codes. ``u_decay``
    (``lazy_rows="catch_up"``: ``b2**k`` per row, for the ``k`` steps the row
    skipped) decays the scales of its blocks as well, so that a caught-up block's
    codes keep their place in the code's range. Integer codes carry no derivative,
    so differentiating through this is refused.
    """
    m, u = refuse_derivative(m), refuse_derivative(u)
    shape = u_like.shape
    bs = u_like.block_size
    # The codec works in float32 whatever the compute dtype: a float64 value (x64)
    # would reach the bit patterns below as two int32 words per element.
    decay = b2.astype(jnp.float32)
    floor = jnp.asarray(floor, jnp.float32)
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
    if u_decay is not None:
        decay_b = decay_b * _per_block(u_decay.astype(jnp.float32), shape, bs)
    s_dec = u_like.scales * decay_b
    reset = ~(need <= s_dec * _U_TOP)  # also where need is NaN: the NaN shows in the scale
    # maximum (not need alone) carries a NaN scale forward, so a poisoned block stays
    # visibly NaN instead of silently resuming with its m wiped.
    scales = jnp.where(reset, jnp.maximum(need, s_dec), s_dec)
    inv = jnp.where(scales > 0, 1.0 / jnp.where(scales > 0, scales, 1.0), 0.0)
    codes_u = encode_u_code(ub * inv[:, None])
    # The u that m's code is taken against (below): the u this step computed, or the
    # smallest nonzero code where u lies below the code's range and was rounded up to
    # it. Against the u itself, m would be read back scaled up with u (by u's
    # rounding factor, 30x in a test), and new gradients would be outweighed by that
    # inflated m for as many steps; against the code, m is read back as it is and only
    # the step shrinks, by u / code.
    u_ref = jnp.maximum(ub, _LINEAR_UNIT * scales[:, None])
    if tb is not None:
        # Untouched elements keep their u code, which now decays with the block's
        # scale; their m code is rewritten against that decayed u, so m keeps its value.
        keep = ~tb & ~reset[:, None]
        old = _to_blocks(u_like.codes, bs)
        codes_u = jnp.where(keep, old, codes_u)
        u_ref = jnp.where(keep, decode_u_code(old) * scales[:, None], ub)

    # -- m: the ratio m / u, whose bound R_t is the code's full range. It is taken
    # against the u this step computed, not against its rounded code: m and u are
    # then read back rounded by the same factor, which keeps |m| <= R_t u (the
    # bounded step) whatever the rounding of u, and keeps the rounding out of the
    # step direction m / u that the next step starts from.
    r_max = ratio_bound(b1, b2, step)
    pos = u_ref > 0
    y = jnp.where(pos, mb / jnp.where(pos, u_ref, 1.0), 0.0) * (1.0 / r_max)
    theta = _to_blocks(dither.dither(shape, step, dither.SALTS["m codes"]), bs)
    if tb is not None:
        theta = jnp.where(tb, theta, 0.5)  # untouched elements: the nearest code
    codes_m = encode_m_code(y, theta)

    return (
        QuantizedM(_from_blocks(codes_m, shape), r_max, m_like.param_dtype),
        QuantizedU(_from_blocks(codes_u, shape), scales, bs),
    )
