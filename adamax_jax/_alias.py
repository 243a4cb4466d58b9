"""Ready-to-use optimizers: thin ``optax.chain`` constructors over :func:`scale_by_adamax`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from adamax_jax import _validation
from adamax_jax._lazy import LazyRows
from adamax_jax._transform import EpsPlacement, scale_by_adamax


def adamax(
    learning_rate: optax.ScalarOrSchedule = 0.002,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    eps_placement: EpsPlacement = "denominator",
    bias_correction: bool = True,
    m_dtype: Any = None,
    u_dtype: Any = None,
    nesterov: bool = False,
    lazy_rows: LazyRows = False,
    skip_nonfinite: bool = False,
    state_bits: int | None = None,
    block_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The Adamax optimizer (Kingma & Ba 2015, Algorithm 2).

    .. math::

        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        u_t &= \max(\beta_2 u_{t-1}, |g_t|) \\
        \theta_t &= \theta_{t-1} - \frac{\eta_t}{1 - \beta_1^t}\,\frac{m_t}{u_t + \epsilon}

    Every element moves by at most about the learning rate per step, whatever the
    scale of its gradient. The defaults are the paper's (``lr=0.002``, ``b1=0.9``,
    ``b2=0.999``) with the textbook ``eps=1e-8`` in the denominator. Pass
    ``eps_placement="max"`` to reproduce ``optax.adamax`` and PyTorch.

    Args:
      learning_rate: A fixed step size or an optax schedule of the step count.
        Negative values are allowed and turn descent into ascent, as in optax.
      b1, b2, eps, eps_placement, bias_correction, m_dtype, u_dtype, nesterov,
        lazy_rows, skip_nonfinite, state_bits, block_size: See :func:`adamax_jax.scale_by_adamax`
        (``state_bits=8`` stores the moments in about 2 bytes per parameter).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`: ``scale_by_adamax`` chained with
      ``optax.scale_by_learning_rate``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import adamax_jax as ax
      >>> f = lambda x: jnp.sum((x - 3.0) ** 2)
      >>> opt = ax.adamax(learning_rate=0.1)
      >>> x = jnp.zeros(2)
      >>> state = opt.init(x)
      >>> for _ in range(100):
      ...     updates, state = opt.update(jax.grad(f)(x), state)
      ...     x = optax.apply_updates(x, updates)
      >>> bool(jnp.allclose(x, 3.0, atol=0.1))
      True

      With ``state_bits=8`` the moments of large leaves take 2 bytes per parameter
      (small leaves, such as biases, stay in float32):

      >>> opt = ax.adamax(1e-3, state_bits=8)
      >>> state = opt.init({"w": jnp.zeros((256, 256)), "b": jnp.zeros(256)})
      >>> state[0].u["w"].codes.dtype, state[0].u["w"].scales.shape, state[0].u["b"].dtype
      (dtype('uint8'), (256,), dtype('float32'))

    References:
      Kingma & Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, ICLR 2015.
    """
    # Negative learning rates are allowed, as in optax: they turn descent into ascent.
    _validation.check_finite("learning_rate", learning_rate)
    return optax.chain(
        scale_by_adamax(
            b1,
            b2,
            eps,
            eps_placement=eps_placement,
            bias_correction=bias_correction,
            m_dtype=m_dtype,
            u_dtype=u_dtype,
            nesterov=nesterov,
            lazy_rows=lazy_rows,
            skip_nonfinite=skip_nonfinite,
            state_bits=state_bits,
            block_size=block_size,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def adamaxw(
    learning_rate: optax.ScalarOrSchedule = 0.002,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    eps_placement: EpsPlacement = "denominator",
    bias_correction: bool = True,
    m_dtype: Any = None,
    u_dtype: Any = None,
    nesterov: bool = False,
    lazy_rows: LazyRows = False,
    skip_nonfinite: bool = False,
    state_bits: int | None = None,
    block_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adamax with decoupled weight decay (the AdamW recipe applied to Adamax).

    .. math::

        \theta_t = \theta_{t-1} - \eta_t \left(\frac{\hat m_t}{u_t + \epsilon}
                   + \lambda_t \theta_{t-1}\right)

    The decay :math:`\lambda` is multiplied by the learning rate, as in PyTorch's
    AdamW and ``optax.adamaxw`` (with ``eps_placement="max"`` this equals
    ``optax.adamaxw``). It is *decoupled*: it does not pass through the moments, so
    it is not rescaled by :math:`1/u`. For coupled L2 (PyTorch's Adamax
    ``weight_decay``) use :func:`adamax_jax.compat.torch_adamax` or chain
    ``optax.add_decayed_weights`` *before* :func:`scale_by_adamax`. The decay acts
    on every parameter the mask selects, also on rows that ``lazy_rows`` or
    elements that ``skip_nonfinite`` leave without an Adamax step.

    Args:
      learning_rate: Fixed step size or schedule.
      b1, b2, eps: See :func:`adamax_jax.scale_by_adamax`.
      weight_decay: Decay rate :math:`\lambda`, a float or a schedule.
      mask: A tree of booleans like the parameters (or a prefix of it), or a
        function of the parameters returning one; ``True`` where decay applies.
        Biases and normalisation scales are commonly excluded.
      eps_placement, bias_correction, m_dtype, u_dtype, nesterov, lazy_rows,
        skip_nonfinite, state_bits, block_size: See :func:`adamax_jax.scale_by_adamax`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`. Its ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import adamax_jax as ax
      >>> opt = ax.adamaxw(learning_rate=0.1, weight_decay=0.1)
      >>> params = {"w": jnp.ones(2)}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.zeros(2)}, state, params)
      >>> optax.apply_updates(params, updates)["w"]  # only the decay acts: 1 - 0.1 * 0.1
      Array([0.99, 0.99], dtype=float32)

    References:
      Loshchilov & Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.
    """
    # Negative learning rates are allowed, as in optax: they turn descent into ascent.
    _validation.check_finite("learning_rate", learning_rate)
    _validation.check_finite("weight_decay", weight_decay)
    return optax.chain(
        scale_by_adamax(
            b1,
            b2,
            eps,
            eps_placement=eps_placement,
            bias_correction=bias_correction,
            m_dtype=m_dtype,
            u_dtype=u_dtype,
            nesterov=nesterov,
            lazy_rows=lazy_rows,
            skip_nonfinite=skip_nonfinite,
            state_bits=state_bits,
            block_size=block_size,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def nadamax(
    learning_rate: optax.ScalarOrSchedule = 0.002,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    eps_placement: EpsPlacement = "denominator",
    bias_correction: bool = True,
    m_dtype: Any = None,
    u_dtype: Any = None,
    lazy_rows: LazyRows = False,
    skip_nonfinite: bool = False,
    state_bits: int | None = None,
    block_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""NAdamax: Adamax with a Nesterov look-ahead in the first moment.

    Equal to ``adamax(..., nesterov=True)``:

    .. math::

        \hat m_t = \frac{\beta_1 m_t}{1 - \beta_1^{t+1}}
                 + \frac{(1 - \beta_1) g_t}{1 - \beta_1^{t}}, \qquad
        \theta_t = \theta_{t-1} - \eta_t \frac{\hat m_t}{u_t + \epsilon}

    This is the NAdam form that ``optax.nadam`` uses, with Adamax's infinity norm
    in place of the root mean square.

    Args:
      learning_rate, b1, b2, eps, eps_placement, bias_correction, m_dtype, u_dtype,
        lazy_rows, skip_nonfinite, state_bits, block_size: See :func:`adamax`. The
        keywords are spelled out (not ``**kwargs``) so that
        ``optax.inject_hyperparams(nadamax)`` can bind them.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp
      >>> import adamax_jax as ax
      >>> opt = ax.nadamax(learning_rate=0.01)
      >>> state = opt.init(jnp.zeros(3))
      >>> updates, state = opt.update(jnp.ones(3), state)
      >>> updates.round(4)
      Array([-0.0147, -0.0147, -0.0147], dtype=float32)

    References:
      Dozat, `Incorporating Nesterov Momentum into Adam
      <https://openreview.net/pdf?id=OM0jvwB8jIp57ZJjtNEZ>`_, ICLR workshop 2016.
    """
    return adamax(
        learning_rate,
        b1,
        b2,
        eps,
        eps_placement=eps_placement,
        bias_correction=bias_correction,
        m_dtype=m_dtype,
        u_dtype=u_dtype,
        nesterov=True,
        lazy_rows=lazy_rows,
        skip_nonfinite=skip_nonfinite,
        state_bits=state_bits,
        block_size=block_size,
    )
