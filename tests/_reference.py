"""Independent float64 NumPy transcriptions of Adamax, written from the formulas.

These are the yardsticks the tests measure adamax_jax against: the one transcription
every test shares, so that a convention is written down once. They follow the seed
documents (deep-ml #148's ``adamax_update``) and Kingma & Ba's Algorithm 2, with the
eps placement, bias correction, Nesterov numerator, decoupled weight decay
(AdamW-style, as ``adamaxw``) and TensorFlow's sparse rows as switches. Nothing here
imports adamax_jax.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

# A hyperparameter: a constant, or a schedule of the 0-based step count (as optax's).
Hyper = float | Callable[[int], float]


def adamax_update(
    params: Any,
    grads: Any,
    m: Any,
    u: Any,
    t: int,
    lr: float = 0.002,
    beta1: float = 0.9,
    beta2: float = 0.999,
    epsilon: float = 1e-8,
    *,
    eps_placement: str = "denominator",
    bias_correction: bool = True,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    rows: np.ndarray | None = None,
    lazy: str = "freeze",
    skip_nonfinite: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Adamax step at step number ``t`` (1-based); returns (params, m, u).

    ``nesterov=True`` takes the NAdam-form numerator (Dozat 2016, as in optax.nadam):
    ``b1 m_t / (1 - b1**(t+1)) + (1 - b1) g_t / (1 - b1**t)``.
    ``weight_decay`` is decoupled (Loshchilov & Hutter): ``lr * weight_decay * params``
    of the previous parameters is subtracted beside the Adamax step, outside the
    moments, on every element. Complex parameters use the modulus, ``u`` is real.

    Elements that take no Adamax step (their step is zero, the decay still applies):

    * ``rows`` (booleans along axis 0): only those rows step. With ``lazy="freeze"``
      (TensorFlow's sparse update) the other rows keep their moments; with
      ``lazy="catch_up"`` the moments are dense Adamax's (every row's moments evolve,
      on a zero gradient where the row has none) and only the step is lazy.
    * ``skip_nonfinite``: elements whose gradient is NaN or infinite keep their
      moments.
    """
    real = np.float64
    cplx = any(np.iscomplexobj(x) for x in (params, grads, m))
    kind = np.complex128 if cplx else real
    params, grads, m = (np.asarray(x, kind) for x in (params, grads, m))
    u = np.asarray(u, real)
    finite = np.isfinite(grads) if skip_nonfinite else np.ones(grads.shape, bool)
    g = np.where(finite, grads, 0)
    new_m = beta1 * m + (1.0 - beta1) * g
    if eps_placement == "max":
        new_u = np.maximum(beta2 * u, np.abs(g) + epsilon)
        denom = new_u
    else:
        new_u = np.maximum(beta2 * u, np.abs(g))
        denom = new_u + epsilon
    if nesterov and bias_correction:
        m_hat = beta1 * new_m / (1.0 - beta1 ** (t + 1)) + (1.0 - beta1) * g / (1.0 - beta1**t)
    elif nesterov:
        m_hat = beta1 * new_m + (1.0 - beta1) * g
    else:
        m_hat = new_m / (1.0 - beta1**t) if bias_correction else new_m
    with np.errstate(divide="ignore", invalid="ignore"):
        step = np.where(denom > 0, m_hat / np.where(denom > 0, denom, 1.0), 0.0)
    new_m, new_u = np.where(finite, new_m, m), np.where(finite, new_u, u)
    stepping = finite
    if rows is not None:
        # One flag per row along axis 0; a 0-d leaf is one row.
        touched = np.reshape(np.asarray(rows, bool), params.shape[:1] + (1,) * (params.ndim - 1))
        stepping = stepping & touched
        if lazy == "freeze":
            new_m, new_u = np.where(touched, new_m, m), np.where(touched, new_u, u)
        elif lazy != "catch_up":
            raise ValueError(f"unknown lazy mode {lazy!r}")
    new_params = params - lr * np.where(stepping, step, 0) - lr * weight_decay * params
    return new_params, new_m, new_u


def _at(value: Hyper, count: int) -> float:
    return float(value(count)) if callable(value) else float(value)


def adamax_trajectory(
    params: Any,
    grad_fn: Callable[[Any], Any],
    steps: int,
    *,
    lr: Hyper = 0.002,
    weight_decay: Hyper = 0.0,
    **kw: Any,
) -> tuple[Any, Any, Any]:
    """Runs ``steps`` reference steps with gradients ``grad_fn(params)``.

    ``params`` is an array or a dict of arrays (``grad_fn`` then takes and returns a
    dict, so leaves may interact); ``lr`` and ``weight_decay`` may be schedules of the
    0-based count. Returns (params after each step stacked on a leading axis, final
    m, final u), with the same structure as ``params``.
    """
    tree = isinstance(params, dict)
    p = {k: np.asarray(v, np.float64) for k, v in (params if tree else {"": params}).items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    u = {k: np.zeros_like(v) for k, v in p.items()}
    path: dict[str, list[np.ndarray]] = {k: [] for k in p}
    for t in range(1, steps + 1):
        g = grad_fn(p) if tree else {"": grad_fn(p[""])}
        lr_t, wd_t = _at(lr, t - 1), _at(weight_decay, t - 1)
        for k in p:
            p[k], m[k], u[k] = adamax_update(
                p[k], g[k], m[k], u[k], t, lr_t, weight_decay=wd_t, **kw
            )
            path[k].append(p[k])
    out = {k: np.stack(v) for k, v in path.items()}
    return (out, m, u) if tree else (out[""], m[""], u[""])


def step_bound(b1: float, b2: float, t: int) -> float:
    """Upper bound of |m_hat_t| / u_t for Adamax with b1 < b2 (Kingma & Ba, sec. 7.1)."""
    r = b1 / b2
    return (1 - b1) / (1 - b1**t) * (1 - r**t) / (1 - r)


def direction_bound(
    b1: float, b2: float, t: np.ndarray, *, nesterov: bool, bias_correction: bool
) -> np.ndarray:
    """Upper bound of |direction_t| for each step number in ``t`` (float64).

    |m_t| <= (1 - b1) * u_t * S_t with S_t = sum_{j<t} (b1/b2)^j, because
    |g_k| <= u_t / b2^(t-k). The plain step divides by 1 - b1^t; the Nesterov step
    is b1 * m_t / (1 - b1^(t+1)) + (1 - b1) * g_t / (1 - b1^t) with |g_t| <= u_t.
    With lazy rows a row that has stepped k <= t times has |m| <= (1 - b1) u S_k
    and S_k <= S_t, while the bias correction takes the global t: the same bound.
    """
    t = np.asarray(t, np.float64)
    r = b1 / b2
    s = (1 - r**t) / (1 - r)  # b1 < b2, so r < 1
    if not bias_correction:
        plain = (1 - b1) * s
        return b1 * plain + (1 - b1) if nesterov else plain
    if not nesterov:
        return np.array([step_bound(b1, b2, int(k)) for k in t])
    return b1 * (1 - b1) * s / (1 - b1 ** (t + 1)) + (1 - b1) / (1 - b1**t)
