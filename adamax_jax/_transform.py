"""The Adamax gradient transformation: one core that every constructor builds on."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.core import Tracer

from adamax_jax import _explicit, _lazy, _leaves, _packed, _storage, _validation, _wrapped

EpsPlacement = Literal["denominator", "max"]
EPS_PLACEMENTS: tuple[str, ...] = ("denominator", "max")


class AdamaxState(NamedTuple):
    """State of :func:`scale_by_adamax`.

    Attributes:
      count: Number of updates applied so far, an ``int32`` scalar that saturates
        at the int32 maximum instead of wrapping.
      m: Exponential moving average of the gradients, a tree like the parameters.
      u: Exponentially weighted infinity norm of the gradients, a tree like the
        parameters (real-valued, and never negative). With
        ``lazy_rows="catch_up"`` each leaf is a :class:`~adamax_jax.StampedRows`
        node ``(moment, last_step)``: the stored ``u`` and the ``int32`` step
        each row was last brought up to date at.
    """

    # Named like tuple.count, as in optax's own states.
    count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]
    m: optax.Updates
    u: optax.Updates


def scale_by_adamax(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    eps_placement: EpsPlacement = "denominator",
    bias_correction: bool = True,
    m_dtype: Any = None,
    u_dtype: Any = None,
    nesterov: bool = False,
    lazy_rows: _lazy.LazyRows = False,
    skip_nonfinite: bool = False,
    state_bits: int | None = None,
    block_size: int | None = None,
) -> optax.GradientTransformation:
    r"""Rescales updates by Adamax: a bias-corrected mean over an infinity norm.

    For gradients :math:`g_t` at step :math:`t = 1, 2, \dots`, with
    :math:`m_0 = u_0 = 0`:

    .. math::

        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        u_t &= \max(\beta_2 u_{t-1}, |g_t|) \\
        \hat m_t &= m_t / (1 - \beta_1^t) \\
        \text{update}_t &= \hat m_t / (u_t + \epsilon)

    This is Algorithm 2 of Kingma & Ba (2015) with the :math:`\epsilon` of the
    common textbook form in the denominator (``eps_placement="denominator"``).
    ``eps_placement="max"`` instead takes :math:`u_t = \max(\beta_2 u_{t-1},
    |g_t| + \epsilon)` and divides by :math:`u_t`, as ``optax.scale_by_adamax`` and
    ``torch.optim.Adamax`` do; there :math:`\epsilon` acts as a floor that never
    decays. Only the first moment is bias-corrected; ``bias_correction=False``
    drops :math:`1/(1-\beta_1^t)` (MLX's convention).

    With ``nesterov=True`` the numerator looks one step ahead, as in NAdam:
    :math:`\hat m_t = \beta_1 m_t / (1 - \beta_1^{t+1}) + (1 - \beta_1) g_t /
    (1 - \beta_1^t)`.

    The returned update is the *direction*: chain with
    :func:`optax.scale_by_learning_rate` (as :func:`adamax_jax.adamax` does) to get
    a step. Because :math:`u_t \ge |g_t|` and :math:`u_t` decays more slowly than
    :math:`m_t` when :math:`\beta_1 < \beta_2`, every element of the update is at
    most about 1 in magnitude (1 at :math:`t=1`, at most 1.009 for the default
    betas): Adamax's step is bounded by the learning rate. The Nesterov form looks
    ahead by one gradient, so its bound is looser early on (about 1.47 at
    :math:`t=1` and 1.16 at :math:`t=2` for the default betas, tending to 1.009).

    Numerics: the step is computed in at least float32 whatever the storage dtype,
    so float16 parameters with a zero gradient get a zero step rather than 0/0. An
    element whose denominator is exactly zero (``eps=0`` and no gradient so far)
    gets a zero update. The state keeps the dtypes and shapes ``init`` gave it, so
    it can flow through ``lax.cond``, ``optax.apply_if_finite`` and
    ``optax.MultiSteps``.

    State memory: float32 moments take 8 bytes per parameter, bfloat16 moments
    (``m_dtype=u_dtype=jnp.bfloat16``) 4, and ``state_bits=8`` about 2 (2.016 with
    ``block_size=256``). Narrow float moments round with a deterministic dither
    keyed by the step, so a bfloat16 ``u`` still decays by ``b2`` (round-to-nearest
    would leave it stuck). With ``state_bits=8``, real leaves of at least 4096
    elements store ``u`` as an 8-bit minifloat, rounded to nearest, with one float32
    scale per block that carries the decay, and ``m`` as an 8-bit code of ``m / u``,
    so the step stays bounded; smaller and complex leaves keep the plain form. Pass
    ``state_bits`` and ``block_size`` in ``static_args`` of
    ``optax.inject_hyperparams``, and dtypes as strings (``m_dtype="bfloat16"``).

    Differentiating through ``update`` (meta-learning) works with float moments:
    narrow ones are differentiated straight through their rounding. 8-bit moments
    are integer codes, with no derivative: ``jax.grad`` through them is a
    ``TypeError``.

    Args:
      b1: Decay rate of the first moment, in ``[0, 1)``.
      b2: Decay rate of the infinity norm, in ``[0, 1]``.
      eps: Non-negative constant that keeps the division finite; where it goes is
        set by ``eps_placement``.
      eps_placement: ``"denominator"`` (the paper's textbook form, Keras, MLX) or
        ``"max"`` (optax, PyTorch).
      bias_correction: Whether to divide the first moment by :math:`1-\beta_1^t`.
      m_dtype: Dtype to store ``m`` in; ``None`` keeps each parameter's dtype.
      u_dtype: Dtype to store ``u`` in; ``None`` keeps each parameter's (real) dtype.
      nesterov: Use the Nesterov (NAdam-style) numerator; see :func:`nadamax`.
      lazy_rows: What rows whose gradient is entirely zero do, for embedding
        tables trained on sparse lookups. A row is a slice along axis 0 (an
        element of a 1-D leaf; a 0-d leaf is one row). Such a row's update is
        zero with either lazy mode; leave it ``False`` for dense layers, where a
        zero gradient row is information.

        * ``False``: dense Adamax, every row steps.
        * ``True``, also spelled ``"freeze"``: TensorFlow's legacy sparse
          semantics. The row's ``m`` and ``u`` keep their values, so a rare row
          keeps the ``u`` of its last large gradient and its old momentum at full
          strength for its next touch.
        * ``"catch_up"``: lazy, but exact where it steps. With a zero gradient
          the moments evolve in closed form, so a row skipped for ``k`` steps
          gets :math:`m \leftarrow \beta_1^k m`, :math:`u \leftarrow \beta_2^k u`
          (:math:`\max(\beta_2^k u, \epsilon)` with ``eps_placement="max"``)
          when it is next touched, before that step: every touched row's ``m``,
          ``u`` and update equal dense Adamax's on the same gradients (to float32
          round-off, with Nesterov, either eps placement and a learning-rate
          schedule). What differs from dense is the parameters of skipped rows,
          which miss the momentum steps dense Adamax takes while they have no
          gradient: on a Zipfian bag-of-embeddings model
          (``benchmarks/lazy_rows.py``) that made it train worse than dense and
          ``"freeze"`` with ``b1=0.9``, while with ``b1=0`` it trains exactly like
          dense Adamax (the how-to "Embedding tables" has the numbers). It costs
          one ``int32`` per row (4 bytes; see :class:`AdamaxState`). ``b1`` and
          ``b2`` that change over time
          (``optax.inject_hyperparams``) decay all the skipped steps with the
          values of the step that catches up. With ``state_bits=8`` the steps
          are kept per group of rows that fills whole blocks (one row when the
          row length is a multiple of ``block_size``); a touched row brings its
          whole group up to date (the rows without gradient by the dense step on
          a zero gradient, without moving), so the state stays dense Adamax's.

        Decoupled weight decay chained after this transform (``adamaxw``) still
        acts on every row, as in Keras. ``lazy_rows=True`` with ``state_bits=8``
        needs rows that fill whole blocks (a ``block_size`` dividing the row
        length): a frozen row sharing a block's scale with touched rows would
        decay with them, so ``init`` refuses that; ``"catch_up"`` has no such
        limit.
      skip_nonfinite: Leave elements whose gradient is NaN or infinite untouched:
        their ``m`` and ``u`` keep their values and this transform's update is
        zero there (decoupled weight decay chained after it still applies), while
        the other elements step as usual (the per-element skip of bitsandbytes'
        8-bit kernels). Without it, such an element's ``m`` and ``u`` become NaN
        or infinite for good and its update is NaN from then on (with
        ``state_bits=8``, the whole block of ``block_size`` elements it sits in). To skip the
        whole step instead, wrap the optimizer in ``optax.apply_if_finite``.
      state_bits: ``None`` for floating-point moments, or ``8`` for blockwise 8-bit
        moments (about 2 bytes per parameter instead of 8). ``m_dtype`` and
        ``u_dtype`` then apply only to the leaves that are not quantized.
      block_size: Elements per block of the 8-bit ``u`` (one float32 scale each), a
        power of two; ``None`` for 256. Used only with ``state_bits=8``.

    Returns:
      An :class:`optax.GradientTransformation` whose state is :class:`AdamaxState`.

    Raises:
      ValueError: At construction, for a concrete hyperparameter out of range, an
        unknown ``eps_placement`` or ``lazy_rows`` string, ``state_bits`` other
        than None or 8, or a ``block_size`` that is not a positive power of two;
        at update, for gradients whose tree or shapes do not match the state, or
        a state made with another ``lazy_rows="catch_up"`` setting.
      TypeError: At ``init``/``update``, for integer or boolean leaves, and for a
        non-floating ``m_dtype``/``u_dtype``; at construction, for a
        ``bias_correction``, ``nesterov`` or ``skip_nonfinite`` that is not a bool, a ``lazy_rows``
        that is neither a bool nor a string, or a
        ``state_bits``/``block_size`` that is not a Python int (as
        ``optax.inject_hyperparams`` makes them unless they are static).
        At ``update``, for a state that is not an :class:`AdamaxState` (such as a
        checkpoint restored without a target).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import adamax_jax as ax
      >>> tx = optax.chain(ax.scale_by_adamax(), optax.scale(-0.002))
      >>> params = jnp.array([1.0])
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([0.1]), state)
      >>> optax.apply_updates(params, updates)
      Array([0.998], dtype=float32)

    References:
      Kingma & Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, ICLR 2015 (Algorithm 2, section 7.1).

      Dozat, `Incorporating Nesterov Momentum into Adam
      <https://openreview.net/pdf?id=OM0jvwB8jIp57ZJjtNEZ>`_, ICLR workshop 2016.
    """
    _validation.check_hyperparameter_dtypes({"b1": b1, "b2": b2, "eps": eps})
    _validation.check_range("b1", b1, low=0.0, high=1.0, high_inclusive=False)
    _validation.check_range("b2", b2, low=0.0, high=1.0)
    _validation.check_range("eps", eps, low=0.0, high=float("inf"), high_inclusive=False)
    _validation.check_choice("eps_placement", eps_placement, EPS_PLACEMENTS)
    eps_value = _validation.concrete_array(eps, "eps")
    options = _Options(
        eps_in_max=eps_placement == "max",
        # A concrete eps that stays positive in float32 (the narrowest compute dtype)
        # as a normal number: compiled code flushes float32 subnormals (below about
        # 1.2e-38) to zero, so eps=1e-40 must keep the zero-denominator guard.
        eps_positive=eps_value is not None
        and bool(np.all(eps_value.astype(np.float32) >= np.finfo(np.float32).tiny)),
        bias_correction=_validation.check_bool("bias_correction", bias_correction),
        nesterov=_validation.check_bool("nesterov", nesterov),
        lazy_rows=_lazy.check_mode(lazy_rows),
        skip_nonfinite=_validation.check_bool("skip_nonfinite", skip_nonfinite),
        m_dtype=_validation.check_dtype_option("m_dtype", m_dtype),
        u_dtype=_validation.check_dtype_option("u_dtype", u_dtype),
        state_bits=state_bits,
        block_size=_validation.check_state_options(state_bits, block_size),
    )

    eager_step = functools.partial(_leaf_update, options=options)
    # Under a trace, each leaf's step is a call of one jitted function: leaves of one
    # shape, dtype and stored form (a model's many same-shaped layers) are then traced
    # and lowered once, not once each, and XLA inlines the calls, so the compiled
    # program is the same (tracing each 8-bit leaf anew took 17 ms). Eagerly the step
    # stays op by op, as it always was.
    traced_step = jax.jit(eager_step)

    def init_fn(params: optax.Params) -> AdamaxState:
        _validation.check_float_leaves(params, "parameter")
        options.check_freeze_blocks(params)
        if options.lazy_rows is not None and _packed.packs_leaves(params):
            raise _validation.UnsupportedCombination(
                f"lazy_rows={lazy_rows!r} cannot run inside packed(): a row is a slice "
                "along axis 0 of a parameter, and packed() concatenates small parameters "
                "into flat buffers, where every element would be a row. Give the "
                "embedding tables their own optimizer with optax.partition: lazy adamax "
                "for the tables, packed(adamax()) for the rest"
            )

        def per_leaf(zeros: Callable[[Any], Any]) -> Callable[[Any], Any]:
            # A framework's wrapper around a parameter (an nnx Variable) goes around
            # the parameter-shaped array of its state, not around an 8-bit moment.
            return lambda p: _wrapped.wrap_like(p, zeros(_wrapped.unwrap(p)))

        # Param-shaped state only through tree.map over params, so that
        # optax.tree_utils.tree_map_params can locate it.
        return AdamaxState(
            count=jnp.zeros([], jnp.int32),
            m=jax.tree.map(per_leaf(options.m_zeros), params, is_leaf=_wrapped.is_wrapped),
            u=jax.tree.map(per_leaf(options.u_zeros), params, is_leaf=_wrapped.is_wrapped),
        )

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, AdamaxState]:
        if not isinstance(state, AdamaxState):
            raise TypeError(
                "expected the state to be an AdamaxState, got "
                f"{type(state).__name__}; a checkpoint restored without a target comes back "
                "as plain dicts and lists: restore it onto jax.eval_shape(opt.init, params)"
            )
        _validation.check_float_leaves(updates, "gradient")
        packed_state = _packed.holds_packed(state.m)
        if packed_state != _packed.holds_packed(updates):
            made, now = ("", "not ") if packed_state else ("not ", "")
            raise ValueError(
                f"the state was {made}made by packed()'s init (packed moments are "
                f"PackedTree buffers), but the gradients are {now}packed: update the "
                "state with the optimizer whose init made it"
            )
        # Wrapped parameters (nnx Variables) are leaves here: see _wrapped.
        treedef = jax.tree.structure(updates, is_leaf=_wrapped.is_wrapped)
        paths_and_slots = jax.tree_util.tree_leaves_with_path(updates, is_leaf=_wrapped.is_wrapped)
        m_leaves = _validation.flatten_like(updates, state.m, "state.m")
        u_leaves = _validation.flatten_like(updates, state.u, "state.u")
        param_dtypes = _param_dtypes(treedef, params)
        count = jnp.asarray(optax.safe_increment(state.count))  # saturates at int32 max
        # The step's scalars, once per real dtype rather than once per leaf.
        scalars: dict[jnp.dtype, _Scalars] = {}

        new_updates, new_m, new_u = [], [], []
        for (path, slot), m_slot, u_slot, p_dtype in zip(
            paths_and_slots, m_leaves, u_leaves, param_dtypes, strict=True
        ):
            where = f"gradient {_leaves.path_str(path)}"
            g = jnp.asarray(_wrapped.unwrap(slot))  # a leaf may be a Python float
            m_s, u_s = _wrapped.unwrap(m_slot), _wrapped.unwrap(u_slot)
            options.check_leaf_state(where, g, m_s, u_s, p_dtype)
            rdt = _storage.real_dtype(_storage.compute_dtype(g.dtype, m_s.dtype, u_s.dtype))
            if rdt not in scalars:
                scalars[rdt] = _Scalars.at(count, b1, b2, eps, rdt, options)
            # On a mesh with Explicit axes the update takes the gradient's layout and
            # the new moments their old layout (ZeRO-split or beside the parameter).
            step = traced_step if _is_traced(g, m_s, u_s) else eager_step
            upd, m_new, u_new = _explicit.run_as_auto(
                step, g, m_s, u_s, scalars[rdt], out_like=(g, m_s, u_s), where=where
            )
            new_updates.append(_wrapped.wrap_like(slot, upd))
            new_m.append(_wrapped.wrap_like(slot, m_new))
            new_u.append(_wrapped.wrap_like(slot, u_new))

        return treedef.unflatten(new_updates), AdamaxState(
            count=count, m=treedef.unflatten(new_m), u=treedef.unflatten(new_u)
        )

    return optax.GradientTransformation(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class _Options:
    """The static choices of :func:`scale_by_adamax`, validated once at construction."""

    eps_in_max: bool  # eps_placement == "max"
    eps_positive: bool  # every denominator is at least eps > 0
    bias_correction: bool
    nesterov: bool
    lazy_rows: _lazy.Mode  # None (off), "freeze" or "catch_up"
    skip_nonfinite: bool
    m_dtype: Any  # None: each parameter's dtype
    u_dtype: Any
    state_bits: int | None
    block_size: int

    def m_zeros(self, p: Any) -> Any:
        p_dtype = _leaves.dtype_of(p)
        dtype = self.plain_m_dtype(p_dtype) or p_dtype
        return _storage.zeros(p, dtype, "m", state_bits=self.state_bits, block_size=self.block_size)

    def plain_m_dtype(self, p_dtype: Any) -> jnp.dtype | None:
        """The dtype ``m_dtype`` gives ``m`` of a parameter of ``p_dtype`` (None: its own)."""
        if self.m_dtype is None:
            return None
        if jnp.issubdtype(p_dtype, jnp.complexfloating):
            return jnp.dtype(jnp.result_type(self.m_dtype, jnp.complex64))  # m is complex
        return self.m_dtype

    def u_zeros(self, p: Any) -> Any:
        dtype = _storage.real_dtype(_leaves.dtype_of(p)) if self.u_dtype is None else self.u_dtype
        u = _storage.zeros(p, dtype, "u", state_bits=self.state_bits, block_size=self.block_size)
        return _lazy.zeros(p, u) if self.lazy_rows == "catch_up" else u

    def check_freeze_blocks(self, params: Any) -> None:
        """Refuses ``lazy_rows="freeze"`` where 8-bit blocks span several rows.

        A block's scale carries the decay of all its elements, so a frozen row that
        shares a block with a touched one would decay with it: neither frozen nor
        dense Adamax. ``"catch_up"`` handles such rows exactly, in groups.
        """
        if self.lazy_rows != "freeze" or self.state_bits is None:
            return
        for path, p in jax.tree_util.tree_leaves_with_path(params, is_leaf=_wrapped.is_wrapped):
            p = _wrapped.unwrap(p)
            if not _storage.codes8.quantizable(p):
                continue
            shape = _leaves.shape_of(p)
            row = math.prod(shape[1:])
            block = _storage.codes8.leaf_block_size(self.block_size, shape)
            if row % block:
                raise _validation.UnsupportedCombination(
                    f"lazy_rows=True (freeze) with state_bits={self.state_bits}: the rows "
                    f"of parameter {_leaves.path_str(path)} ({row} elements each) share "
                    f"blocks of block_size={block}, whose scale would decay a frozen row "
                    'with its touched neighbours. Use lazy_rows="catch_up" (touched rows '
                    "then step exactly like dense Adamax), or a block_size that divides "
                    f"the row length (block_size={row & -row} here)"
                )

    def check_leaf_state(
        self, where: str, g: jax.Array, m: Any, u: Any, param_dtype: Any = None
    ) -> None:
        """Raises ValueError where a leaf's state was not made by this optimizer's init.

        ``param_dtype`` (None when ``update`` was not given the parameters) is what a
        moment without a storage dtype of its own has.
        """
        if tuple(g.shape) != tuple(m.shape) or tuple(g.shape) != tuple(u.shape):
            raise ValueError(
                f"{where} has shape {tuple(g.shape)} but its moments have "
                f"shapes {tuple(m.shape)} (m) and {tuple(u.shape)} (u)"
            )
        if isinstance(u, _lazy.StampedRows) != (self.lazy_rows == "catch_up"):
            made = "without" if self.lazy_rows == "catch_up" else "with"
            raise ValueError(
                f"the state of {where} was made {made} "
                'lazy_rows="catch_up" (which keeps the step each row was last touched '
                f"at), but this optimizer has lazy_rows={self.lazy_rows or False!r}; make "
                "the state with init of the same configuration"
            )
        u = _lazy.split(u)[0]
        quantized = _storage.is_coded(u)
        if quantized != (self.state_bits is not None and _storage.codes8.quantizable(g)):
            same = False
        elif quantized:
            same = u.block_size == _storage.codes8.leaf_block_size(self.block_size, g.shape)
        else:
            # With m_dtype/u_dtype None a moment has its parameter's dtype, which the
            # gradient need not share (float32 gradients of bfloat16 parameters): it
            # is checked where update is given the parameters.
            want_m, want_u = self.plain_m_dtype(g.dtype), self.u_dtype
            if param_dtype is not None:
                want_m = want_m or param_dtype
                want_u = want_u or _storage.real_dtype(param_dtype)
            same = (want_m is None or m.dtype == want_m) and (want_u is None or u.dtype == want_u)
        if not same:
            raise ValueError(
                f"the state of {where} was made by an optimizer with "
                f"{_storage.describe(m, u)}, but this optimizer has "
                f"{self.describe_state(param_dtype)}; "
                "make the state with init of this optimizer (restore a checkpoint onto "
                "jax.eval_shape(opt.init, params))"
            )

    def update_dtype(self, grad_dtype: Any, m: Any, u: Any) -> jnp.dtype:
        """The dtype of a leaf's update: the gradient's promoted with the parameter's.

        Updates the parameters can absorb: float16 gradients of float32 parameters
        get float32 updates (in float16 a step of 1e-8 would round to zero), as in
        optax, whose moments have the parameters' dtype. Gradients of the
        parameters' own dtype keep it, whatever the state is stored in, which is what
        ``optax.apply_if_finite`` needs. The parameter's dtype is read off a moment
        that ``init`` gave it (``m`` unless ``m_dtype`` was set, 8-bit ``m`` always,
        else ``u`` unless ``u_dtype`` was set); with both storage dtypes set it is
        unknown, and the update keeps the gradient's dtype.
        """
        if self.m_dtype is None or _storage.is_coded(m):
            return jnp.promote_types(grad_dtype, m.dtype)
        if self.u_dtype is None and not _storage.is_coded(u):
            return jnp.promote_types(grad_dtype, u.dtype)
        return jnp.dtype(grad_dtype)

    def describe_state(self, param_dtype: Any = None) -> str:
        """This optimizer's state options, as an error message shows them."""
        if self.state_bits is not None:
            return f"state_bits={self.state_bits}, block_size={self.block_size}"
        own = "" if param_dtype is None else f" (the parameter's {jnp.dtype(param_dtype).name})"
        show = lambda d: f"None{own}" if d is None else repr(jnp.dtype(d).name)
        return f"state_bits=None, m_dtype={show(self.m_dtype)}, u_dtype={show(self.u_dtype)}"


class _Scalars(NamedTuple):
    """One step's scalars in a real dtype: the hyperparameters and bias corrections."""

    step: jax.Array  # the step count t, int32
    b1: jax.Array
    b2: jax.Array
    eps: jax.Array
    correction: jax.Array  # 1 - b1**t
    next_correction: jax.Array  # 1 - b1**(t + 1), for Nesterov's look-ahead

    @classmethod
    def at(
        cls,
        count: jax.Array,
        b1: jax.typing.ArrayLike,
        b2: jax.typing.ArrayLike,
        eps: jax.typing.ArrayLike,
        dtype: jnp.dtype,
        options: _Options,
    ) -> _Scalars:
        # Cast so that a float64 or traced float32 hyperparameter never changes a
        # leaf's compute dtype; real parts, since inject_hyperparams makes them complex
        # for a complex parameter tree (validation refuses a nonzero imaginary part).
        b1, b2, eps = (jnp.real(jnp.asarray(x)).astype(dtype) for x in (b1, b2, eps))
        t = count.astype(dtype)
        one = jnp.ones([], dtype)
        correction = 1 - b1**t if options.bias_correction else one
        # Only Nesterov's look-ahead reads the next step's correction.
        nesterov = options.bias_correction and options.nesterov
        next_correction = 1 - b1 ** (t + 1) if nesterov else one
        return cls(count, b1, b2, eps, correction, next_correction)


def _leaf_update(
    g: jax.Array, m_stored: Any, u_stored: Any, s: _Scalars, *, options: _Options
) -> tuple[jax.Array, Any, Any]:
    """One leaf's step, in the compute dtype. Returns the update and the stored m, u."""
    cdt = _storage.compute_dtype(g.dtype, m_stored.dtype, u_stored.dtype)
    gc = g.astype(cdt)
    u_stored, last_step = _lazy.split(u_stored)
    m_prev, u_prev = _storage.read_moments(m_stored, u_stored, cdt, s.b1.dtype)
    floor = s.eps if options.eps_in_max else None
    keep = _Keep.of(gc, options)
    u_decay = None  # catch_up: the decay of the steps each row skipped
    if last_step is not None:
        m_prev, u_prev, last_step, u_decay, keep = keep.catch_up(
            m_prev, u_prev, last_step, u_stored, s, floor
        )

    # Algorithm 2 of Kingma & Ba (with eps in the max for eps_placement="max").
    m = s.b1 * m_prev + (1 - s.b1) * gc
    u = jnp.maximum(s.b2 * u_prev, jnp.abs(gc) if floor is None else jnp.abs(gc) + floor)
    if keep.mask is not None:
        # Selected before the division: selecting after it makes XLA copy the
        # donated state buffers (measured 5x slower on a 16M leaf).
        m = jnp.where(keep.mask, m, m_prev)
        u = jnp.where(keep.mask, u, u_prev)
    upd = keep.no_step_where_kept(_direction(m, u, gc, s, options))

    m_new, u_new = _storage.write_moments(
        m,
        u,
        m_stored,
        u_stored,
        step=s.step,
        b1=s.b1,
        b2=s.b2,
        touched=keep.mask,
        # Skipped elements must not size the 8-bit block scales either.
        grad=gc if keep.finite is None else jnp.where(keep.finite, gc, 0),
        floor=0.0 if floor is None else floor,
        u_decay=u_decay,
    )
    if last_step is not None:
        u_new = _lazy.StampedRows(u_new, last_step)
    return upd.astype(options.update_dtype(g.dtype, m_stored, u_stored)), m_new, u_new


def _direction(m: jax.Array, u: jax.Array, g: jax.Array, s: _Scalars, options: _Options) -> Any:
    """The bias-corrected ``m / (u + eps)``, or Nesterov's look-ahead form of it."""
    denom = u if options.eps_in_max else u + s.eps
    # u + eps == 0 only where eps == 0 and no gradient has been seen: no step there
    # (the paper's 0/0), instead of NaN. A NaN denominator (from a NaN gradient) is
    # not zero: the NaN shows in the update instead of freezing the element unseen.
    # With a concrete positive eps no denominator of a stepping element is zero
    # (kept elements are zeroed after this), so the guard, a compare and two
    # selects per element in every leaf's kernel, is left out.
    zero = None if options.eps_positive else denom == 0
    safe_denom = denom if zero is None else jnp.where(zero, 1, denom)
    if options.nesterov:
        # Each term over u before the sum: for gradients near the float maximum the
        # sum itself (up to about 1.5 |g|) would overflow.
        m_term = s.b1 * m / safe_denom
        g_term = (1 - s.b1) * g / safe_denom
        if options.bias_correction:
            upd = m_term / s.next_correction + g_term / s.correction
        else:
            upd = m_term + g_term
    elif options.bias_correction:
        upd = m / s.correction / safe_denom
    else:
        upd = m / safe_denom
    return upd if zero is None else jnp.where(zero, 0, upd)


@dataclasses.dataclass(frozen=True)
class _Keep:
    """Which elements keep their state and take no step this time (``None``: none).

    Rows without gradient with ``lazy_rows``, non-finite gradients with
    ``skip_nonfinite``.
    """

    rows: jax.Array | None  # lazy_rows: True on the rows that step
    finite: jax.Array | None  # skip_nonfinite: True where the gradient is finite
    stepped: jax.Array | None = None  # 8-bit catch_up: the rows with gradient

    @property
    def mask(self) -> jax.Array | None:
        """False where ``m`` and ``u`` stay as they were."""
        return _both(self.rows, self.finite)

    @classmethod
    def of(cls, g: jax.Array, options: _Options) -> _Keep:
        rows = None if options.lazy_rows is None else _lazy.rows_with_gradient(g)
        return cls(rows, jnp.isfinite(g) if options.skip_nonfinite else None)

    def catch_up(
        self,
        m: jax.Array,
        u: jax.Array,
        last_step: jax.Array,
        u_stored: Any,
        s: _Scalars,
        floor: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, _Keep]:
        """``lazy_rows="catch_up"``: the rows this step brings up to date first get the
        decay of the steps they skipped. With 8-bit state those are whole groups of
        rows (see ``_lazy``), whose state all advances while only the rows with
        gradient step.

        Returns the caught-up ``m`` and ``u``, the new stamps, each row's ``u`` decay
        factor and what to keep.
        """
        assert self.rows is not None
        rows_per_stamp = _lazy.group_rows(m.shape, u_stored)
        caught = _lazy.catch_up(
            self.rows,
            last_step,
            m,
            u,
            count=s.step,
            b1=s.b1,
            b2=s.b2,
            floor=floor,
            rows_per_stamp=rows_per_stamp,
        )
        keep = self if rows_per_stamp == 1 else _Keep(caught.advanced, self.finite, self.rows)
        return caught.m, caught.u, caught.last_step, caught.u_decay, keep

    def no_step_where_kept(self, upd: jax.Array) -> jax.Array:
        for where in (self.mask, self.stepped):
            if where is not None:
                upd = jnp.where(where, upd, 0)
        return upd


def _param_dtypes(treedef: Any, params: Any) -> list[jnp.dtype | None]:
    """Each parameter leaf's dtype, in the gradients' order; None for each where the
    parameters are not given or not shaped like the gradients (``optax.masked`` hands
    over masked-out nodes, ``packed()`` its buffers)."""
    leaves = None
    if params is not None:
        try:
            leaves = treedef.flatten_up_to(params)
        except (ValueError, TypeError):
            leaves = None
    if leaves is None:
        return [None] * treedef.num_leaves
    out = []
    for leaf in leaves:
        leaf = _wrapped.unwrap(leaf)
        dtype = getattr(leaf, "dtype", None)
        real = dtype is not None and jnp.issubdtype(dtype, jnp.floating)
        out.append(jnp.dtype(dtype) if real else None)  # complex: m's dtype differs
    return out


def _is_traced(*trees: Any) -> bool:
    """Whether any array in ``trees`` is a tracer (the step is being traced)."""
    return any(isinstance(x, Tracer) for x in jax.tree.leaves(trees))


def _both(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
    """``a & b``, where ``None`` stands for everywhere."""
    if a is None:
        return b
    return a if b is None else a & b
