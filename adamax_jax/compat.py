r"""Adamax as other frameworks define it, step for step, as optax transformations.

Each constructor here takes another framework's own argument names and defaults
and reproduces its update rule, so a model ported to JAX follows the same
trajectory. All of them are :func:`optax.chain` compositions over the one core
transform, :func:`adamax_jax.scale_by_adamax`; none is a separate copy of the
algorithm.

* :func:`torch_adamax`: epsilon inside the max; coupled L2 decay, ``g += wd * p``;
  ``maximize``; complex parameters as pairs of reals.
* :func:`keras_adamax`: epsilon in the denominator; decoupled decay,
  ``p -= lr * wd * p`` before the step; Keras's defaults (``lr=1e-3``, ``eps=1e-7``).
* :func:`mlx_adamax`: epsilon in the denominator; no bias correction.
* :func:`paper_adamax`: Kingma & Ba's Algorithm 2, with no epsilon at all.

Learning rates (and Keras's weight decay) also accept an optax schedule, a
function of the 0-based step count; PyTorch's ``LRScheduler``, Keras's
``LearningRateSchedule`` and MLX's schedules index steps the same way, so use the
optax schedule of the same shape (for example ``optax.exponential_decay`` for
Keras's ``ExponentialDecay``).

The match is exact maths, not bitwise equality: the frameworks round in their
own order, so two float32 trajectories drift apart slowly (at most about 2e-6 over
300 steps in the parity tests, ``tests/test_compat_parity.py``). Where a framework computes in the
parameter's dtype, half-precision parameters differ more: the core always
computes in at least float32 and rounds only when it stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from adamax_jax import _leaves, _validation
from adamax_jax._transform import scale_by_adamax

__all__ = ["keras_adamax", "mlx_adamax", "paper_adamax", "torch_adamax"]

Betas = tuple[jax.typing.ArrayLike, jax.typing.ArrayLike] | Sequence[jax.typing.ArrayLike]


def torch_adamax(
    lr: optax.ScalarOrSchedule = 2e-3,
    betas: Betas = (0.9, 0.999),
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""``torch.optim.Adamax``, step for step.

    .. math::

        g_t &\leftarrow \pm g_t + \lambda \theta_{t-1}
              \quad (- \text{ if maximize}) \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        u_t &= \max(\beta_2 u_{t-1}, |g_t| + \epsilon) \\
        \theta_t &= \theta_{t-1} - \frac{\eta}{1 - \beta_1^t}\,\frac{m_t}{u_t}

    The decay is PyTorch's coupled L2: it is added to the gradient, so it passes
    through both moments and is divided by :math:`u_t` (unlike
    :func:`adamax_jax.adamaxw` and Keras). :math:`\epsilon` sits inside the max,
    where it acts as a floor on :math:`u_t` that never decays (as in
    ``optax.adamax``).

    Complex parameters are treated as PyTorch treats them, as pairs of real
    numbers: the real and imaginary parts get separate moments, so for a complex
    leaf of shape ``s`` the state holds float arrays of shape ``s + (2,)``. (The
    core :func:`adamax_jax.scale_by_adamax` instead uses the modulus,
    :math:`u_t = \max(\beta_2 u_{t-1}, |g_t|)`.) PyTorch's ``Tensor.grad`` of a
    real loss of a complex parameter is the conjugate of what ``jax.grad``
    returns: pass ``jnp.conj(jax.grad(loss)(params))`` to descend the same way.

    Per-parameter-group options map to :func:`optax.multi_transform` (one
    ``torch_adamax`` per group); ``foreach``, ``capturable`` and
    ``differentiable`` only choose PyTorch kernels and have no equivalent here.

    Args:
      lr: Learning rate :math:`\eta`, non-negative, or an optax schedule of the
        step count (the equivalent of a PyTorch ``LRScheduler`` stepped once per
        optimizer step).
      betas: ``(beta1, beta2)``, each in ``[0, 1)``.
      eps: Non-negative :math:`\epsilon`, added to :math:`|g_t|` inside the max.
      weight_decay: Non-negative L2 coefficient :math:`\lambda`, or a schedule.
        When it is not the number 0, ``update`` needs ``params``.
      maximize: Ascend the objective instead of descending it.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: For a concrete argument outside the range PyTorch accepts.
      TypeError: For ``betas`` that is not a pair, or a non-boolean ``maximize``.

    Example:
      With a zero gradient only the L2 term acts, and it is normalised by
      :math:`u_t` (decoupled decay would give 0.99 and 0.9801 here):

      >>> import jax.numpy as jnp, optax
      >>> from adamax_jax import compat
      >>> opt = compat.torch_adamax(lr=0.1, weight_decay=0.1)
      >>> params = jnp.array([1.0])
      >>> state = opt.init(params)
      >>> for _ in range(2):
      ...     updates, state = opt.update(jnp.zeros(1), state, params)
      ...     params = optax.apply_updates(params, updates)
      ...     print(params.round(4))
      [0.9]
      [0.8052]

    References:
      PyTorch, `torch.optim.Adamax
      <https://pytorch.org/docs/stable/generated/torch.optim.Adamax.html>`_.
    """
    b1, b2 = _unpack_betas("betas", betas)
    _validation.check_range("lr", _scalar_or_none(lr), low=0.0, high=float("inf"))
    _validation.check_range("betas[0]", b1, low=0.0, high=1.0, high_inclusive=False)
    _validation.check_range("betas[1]", b2, low=0.0, high=1.0, high_inclusive=False)
    _validation.check_range("eps", eps, low=0.0, high=float("inf"))
    _check_weight_decay("weight_decay", weight_decay)
    if not isinstance(maximize, bool):
        raise TypeError(f"maximize must be True or False, got {maximize!r}")

    return optax.chain(
        # PyTorch negates the gradient first, then adds the decay term.
        optax.scale(-1.0) if maximize else optax.identity(),
        _weight_decay(weight_decay),
        _complex_as_real_pairs(scale_by_adamax(b1, b2, eps, eps_placement="max")),
        optax.scale_by_learning_rate(lr),
    )


def keras_adamax(
    learning_rate: optax.ScalarOrSchedule = 0.001,
    beta_1: jax.typing.ArrayLike = 0.9,
    beta_2: jax.typing.ArrayLike = 0.999,
    epsilon: jax.typing.ArrayLike = 1e-7,
    weight_decay: optax.ScalarOrSchedule | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""``keras.optimizers.Adamax`` (Keras 3), step for step.

    .. math::

        \theta' &= \theta_{t-1} - \eta_t \lambda \theta_{t-1} \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        u_t &= \max(\beta_2 u_{t-1}, |g_t|) \\
        \theta_t &= \theta' - \frac{\eta_t}{1 - \beta_1^t}\,\frac{m_t}{u_t + \epsilon}

    Keras applies its weight decay to the variable *before* the step, decoupled
    from the moments and multiplied by the learning rate; since the gradient was
    taken at :math:`\theta_{t-1}`, that is :func:`adamax_jax.adamaxw` with the
    epsilon in the denominator. Keras's defaults differ from the paper's:
    ``learning_rate=0.001`` and ``epsilon=1e-7``.

    Not reproduced: Keras computes the step in the variable's dtype, including
    :math:`\beta_1^t`, so with bfloat16 or float16 variables its steps carry that
    dtype's rounding (its first bfloat16 step is ``-0.0019684`` for a learning rate
    of 0.002); here the step is computed in float32 and rounded once when applied.
    Keras's other optimizer options map to optax: ``clipvalue`` to
    :func:`optax.clip`, ``global_clipnorm`` to :func:`optax.clip_by_global_norm`
    (chain them first), ``gradient_accumulation_steps`` to :class:`optax.MultiSteps`,
    ``use_ema`` to :func:`optax.ema` on the parameters, and
    ``exclude_from_weight_decay`` to :func:`optax.multi_transform` with a
    ``keras_adamax`` without ``weight_decay`` for the excluded leaves.

    Args:
      learning_rate: Learning rate :math:`\eta_t`, or an optax schedule of the
        step count. It also scales the decay.
      beta_1: Decay rate of the first moment, in ``[0, 1)``.
      beta_2: Decay rate of the infinity norm, in ``[0, 1]``.
      epsilon: Non-negative :math:`\epsilon`, added to :math:`u_t`.
      weight_decay: ``None`` (no decay, the default) or a non-negative rate
        :math:`\lambda` (or schedule). When it is set (and not the number 0),
        ``update`` needs ``params``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: For a concrete argument out of range.

    Example:
      With a zero gradient only the decay acts: ``1 - 0.1 * 0.1`` per step.

      >>> import jax.numpy as jnp, optax
      >>> from adamax_jax import compat
      >>> opt = compat.keras_adamax(learning_rate=0.1, weight_decay=0.1)
      >>> params = jnp.array([1.0])
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jnp.zeros(1), state, params)
      >>> optax.apply_updates(params, updates)
      Array([0.99], dtype=float32)

    References:
      Keras, `Adamax <https://keras.io/api/optimizers/adamax/>`_.
    """
    _validation.check_finite("learning_rate", _scalar_or_none(learning_rate))
    _validation.check_range("beta_1", beta_1, low=0.0, high=1.0, high_inclusive=False)
    _validation.check_range("beta_2", beta_2, low=0.0, high=1.0)
    _validation.check_range("epsilon", epsilon, low=0.0, high=float("inf"))
    if weight_decay is not None:
        _check_weight_decay("weight_decay", weight_decay)

    decay = _weight_decay(0.0 if weight_decay is None else weight_decay)
    return optax.chain(
        scale_by_adamax(beta_1, beta_2, epsilon, eps_placement="denominator"),
        # Decay after the core, before the learning rate: the step becomes
        # -lr * (direction + wd * theta), Keras's two assignments in one.
        decay,
        optax.scale_by_learning_rate(learning_rate),
    )


def mlx_adamax(
    learning_rate: optax.ScalarOrSchedule,
    betas: Betas = (0.9, 0.999),
    eps: jax.typing.ArrayLike = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    r"""``mlx.optimizers.Adamax``, step for step: Adamax without bias correction.

    .. math::

        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        u_t &= \max(\beta_2 u_{t-1}, |g_t|) \\
        \theta_t &= \theta_{t-1} - \eta_t \frac{m_t}{u_t + \epsilon}

    MLX omits the bias correction :math:`1/(1-\beta_1^t)`, so its first steps are
    shorter than the paper's (the first by a factor :math:`1-\beta_1`) and the
    two agree only once :math:`\beta_1^t` is negligible. As in MLX, the learning
    rate has no default.

    Args:
      learning_rate: Learning rate :math:`\eta_t`, or an optax schedule of the
        step count (MLX's schedules are functions of the same 0-based count).
      betas: ``(beta1, beta2)``: ``beta1`` in ``[0, 1)``, ``beta2`` in ``[0, 1]``.
      eps: Non-negative :math:`\epsilon`, added to :math:`u_t`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: For a concrete argument out of range.
      TypeError: For ``betas`` that is not a pair.

    Example:
      The first step is :math:`1 - \beta_1` of the learning rate:

      >>> import jax.numpy as jnp
      >>> from adamax_jax import compat
      >>> opt = compat.mlx_adamax(learning_rate=0.1)
      >>> state = opt.init(jnp.zeros(2))
      >>> updates, state = opt.update(jnp.array([3.0, -0.5]), state)
      >>> updates
      Array([-0.01,  0.01], dtype=float32)

    References:
      MLX, `mlx.optimizers.Adamax
      <https://ml-explore.github.io/mlx/build/html/python/optimizers/_autosummary/mlx.optimizers.Adamax.html>`_.
    """
    b1, b2 = _unpack_betas("betas", betas)
    _validation.check_finite("learning_rate", _scalar_or_none(learning_rate))
    _validation.check_range("betas[0]", b1, low=0.0, high=1.0, high_inclusive=False)
    _validation.check_range("betas[1]", b2, low=0.0, high=1.0)
    _validation.check_range("eps", eps, low=0.0, high=float("inf"))
    return optax.chain(
        scale_by_adamax(b1, b2, eps, eps_placement="denominator", bias_correction=False),
        optax.scale_by_learning_rate(learning_rate),
    )


def paper_adamax(
    alpha: optax.ScalarOrSchedule = 0.002,
    beta1: jax.typing.ArrayLike = 0.9,
    beta2: jax.typing.ArrayLike = 0.999,
) -> optax.GradientTransformationExtraArgs:
    r"""Adamax exactly as Kingma & Ba (2015) state it: Algorithm 2, no epsilon.

    .. math::

        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        u_t &= \max(\beta_2 u_{t-1}, |g_t|) \\
        \theta_t &= \theta_{t-1} - \frac{\alpha}{1 - \beta_1^t}\,\frac{m_t}{u_t}

    Without an epsilon no gradient is too small to get a full step: the bound
    :math:`|\hat m_t| / u_t \le 1` at :math:`t = 1` holds with equality, so a
    gradient of ``1e-8`` moves its parameter by :math:`\alpha`, where every
    library's epsilon shrinks that step. An element that has had no nonzero
    gradient yet has :math:`u_t = 0`; the paper's :math:`0/0` is taken as a zero
    step there (every library does the same), never NaN.

    Args:
      alpha: Step size :math:`\alpha`, or an optax schedule of the step count.
      beta1: Decay rate of the first moment, in ``[0, 1)``.
      beta2: Decay rate of the infinity norm, in ``[0, 1]``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: For a concrete argument out of range.

    Example:
      Every element with a nonzero gradient moves by exactly ``alpha``, however
      small its gradient; the last one has none and stays put:

      >>> import jax.numpy as jnp
      >>> from adamax_jax import compat
      >>> opt = compat.paper_adamax()
      >>> state = opt.init(jnp.zeros(4))
      >>> updates, state = opt.update(jnp.array([1e-6, 1e-7, 1e-8, 0.0]), state)
      >>> updates
      Array([-0.002, -0.002, -0.002,  0.   ], dtype=float32)

    References:
      Kingma & Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, ICLR 2015 (Algorithm 2, section 7.1).
    """
    _validation.check_finite("alpha", _scalar_or_none(alpha))
    _validation.check_range("beta1", beta1, low=0.0, high=1.0, high_inclusive=False)
    _validation.check_range("beta2", beta2, low=0.0, high=1.0)
    return optax.chain(
        scale_by_adamax(beta1, beta2, 0.0, eps_placement="denominator"),
        optax.scale_by_learning_rate(alpha),
    )


# ---------------------------------------------------------------------------
# Private helpers.


def _scalar_or_none(value: Any) -> Any:
    # Schedules are checked where they are evaluated, not here.
    return None if callable(value) else value


def _is_python_zero(value: Any) -> bool:
    # Only a Python number decides the chain's structure: optax.inject_hyperparams
    # hands the factory arrays (traced under jit), and init and update must build
    # the same chain whatever their values.
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def _check_weight_decay(name: str, value: Any) -> None:
    _validation.check_range(name, _scalar_or_none(value), low=0.0, high=float("inf"))


def _unpack_betas(name: str, betas: Any) -> tuple[Any, Any]:
    if isinstance(betas, str | bytes) or not hasattr(betas, "__len__"):
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    if len(betas) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {len(betas)} values")
    return betas[0], betas[1]


def _weight_decay(weight_decay: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """Adds ``wd * theta`` to the updates; skipped (no params needed) for a literal 0.

    Where it sits in the chain makes it PyTorch's coupled L2 term (before the
    core) or Keras' decoupled decay (after it)."""
    if _is_python_zero(weight_decay):
        return optax.identity()
    return optax.add_decayed_weights(weight_decay)


def _is_complex(x: Any) -> bool:
    return jnp.issubdtype(_leaves.dtype_of(x), jnp.complexfloating)


def _to_real_pairs(x: Any) -> Any:
    """A complex leaf as a real array with a trailing axis of (real, imaginary)."""
    if not _is_complex(x):
        return x
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((*x.shape, 2), jnp.finfo(x.dtype).dtype)
    return jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)


def _complex_as_real_pairs(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs ``inner`` on complex leaves viewed as pairs of reals (``torch.view_as_real``).

    Real leaves pass through untouched, so for real parameters this is ``inner``.
    """

    def init_fn(params: optax.Params) -> optax.OptState:
        return inner.init(jax.tree.map(_to_real_pairs, params))

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.OptState]:
        real_params = None if params is None else jax.tree.map(_to_real_pairs, params)
        real_updates, state = inner.update(
            jax.tree.map(_to_real_pairs, updates), state, real_params
        )

        def back(new: jax.Array, like: jax.Array) -> jax.Array:
            if not _is_complex(like):
                return new
            return jax.lax.complex(new[..., 0], new[..., 1]).astype(like.dtype)

        return jax.tree.map(back, real_updates, updates), state

    return optax.GradientTransformation(init_fn, update_fn)
