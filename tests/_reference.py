"""Independent float64 NumPy transcriptions of Adamax, written from the formulas.

These are the yardsticks the tests measure adamax_jax against. They follow the
seed documents (deep-ml #148's ``adamax_update``) and Kingma & Ba's Algorithm 2,
with the eps placement and bias correction as switches.
"""

from __future__ import annotations

import numpy as np


def adamax_update(
    params: np.ndarray,
    grads: np.ndarray,
    m: np.ndarray,
    u: np.ndarray,
    t: int,
    lr: float = 0.002,
    beta1: float = 0.9,
    beta2: float = 0.999,
    epsilon: float = 1e-8,
    *,
    eps_placement: str = "denominator",
    bias_correction: bool = True,
    nesterov: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Adamax step at step number ``t`` (1-based); returns (params, m, u).

    ``nesterov=True`` takes the NAdam-form numerator (Dozat 2016, as in optax.nadam):
    ``b1 m_t / (1 - b1**(t+1)) + (1 - b1) g_t / (1 - b1**t)``.
    """
    params, grads, m, u = (np.asarray(x, np.float64) for x in (params, grads, m, u))
    m = beta1 * m + (1.0 - beta1) * grads
    if eps_placement == "max":
        u = np.maximum(beta2 * u, np.abs(grads) + epsilon)
        denom = u
    else:
        u = np.maximum(beta2 * u, np.abs(grads))
        denom = u + epsilon
    if nesterov and bias_correction:
        m_hat = beta1 * m / (1.0 - beta1 ** (t + 1)) + (1.0 - beta1) * grads / (1.0 - beta1**t)
    elif nesterov:
        m_hat = beta1 * m + (1.0 - beta1) * grads
    else:
        m_hat = m / (1.0 - beta1**t) if bias_correction else m
    with np.errstate(divide="ignore", invalid="ignore"):
        step = np.where(denom > 0, m_hat / np.where(denom > 0, denom, 1.0), 0.0)
    return params - lr * step, m, u


def adamax_trajectory(params, grad_fn, steps, **kw):
    """Runs ``steps`` reference steps with gradients ``grad_fn(params)``."""
    p = np.asarray(params, np.float64)
    m = np.zeros_like(p)
    u = np.zeros_like(p)
    out = []
    for t in range(1, steps + 1):
        p, m, u = adamax_update(p, grad_fn(p), m, u, t, **kw)
        out.append(p)
    return np.stack(out), m, u


def step_bound(b1: float, b2: float, t: int) -> float:
    """Upper bound of |m_hat_t| / u_t for Adamax with b1 < b2 (Kingma & Ba, sec. 7.1)."""
    r = b1 / b2
    return (1 - b1) / (1 - b1**t) * (1 - r**t) / (1 - r)
