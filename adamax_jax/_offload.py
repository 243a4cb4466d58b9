"""Optimizer state kept in host memory between steps: :func:`offload`.

An accelerator's own memory (HBM) is the scarce one: parameters, gradients and the
activations of the backward pass compete for it, and the optimizer state is often the
largest single item (Adamax in float32 keeps 8 bytes per parameter, twice the
parameters). The state is needed only once per step, by the update, after the
gradients exist. JAX's memory kinds let it live in the host's ``pinned_host`` memory
the rest of the time: the update copies it to the device, computes, and copies the
new state back, all inside the one jitted training step, so XLA sees the copies and
can schedule them.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import numpy as np
import optax

__all__ = ["offload"]

# Where the state lives between steps and where the update computes. Space.Host is
# the host memory that devices copy to and from directly ("pinned_host").
_HOST = jax.memory.Space.Host
_DEVICE = jax.memory.Space.Device


def _is_array(leaf: Any) -> bool:
    # jax.Array covers tracers. Python scalars and other leaves are left as they are:
    # they live in no device memory, and converting them would change their type.
    return isinstance(leaf, jax.Array | np.ndarray | np.generic)


def _to(space: Any, state: Any) -> Any:
    """``state`` with every array leaf placed in ``space``, sharding unchanged."""
    return jax.tree.map(lambda x: jax.device_put(x, space) if _is_array(x) else x, state)


def _describe(obj: Any) -> str:
    """What ``obj`` is, for the error that refuses it, with what to pass instead."""
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        name = f"{obj.__module__}.{obj.__qualname__}"
        return (
            f"the function {name}; call it to build the transformation "
            f"(offload({obj.__qualname__}(...)), not offload({obj.__qualname__}))"
        )
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    kind = type(obj).__qualname__
    if type(obj).__module__ != "builtins":
        kind = f"{type(obj).__module__}.{kind}"
    text = repr(obj)
    what = f"{kind} {text if len(text) <= 60 else text[:57] + '...'}"
    if callable(getattr(obj, "gradient_transformation", None)):  # optax.MultiSteps
        return f"{what}; pass its .gradient_transformation()"
    if callable(getattr(obj, "init", None)) and callable(getattr(obj, "update", None)):
        return f"{what}; wrap it as optax.GradientTransformation(obj.init, obj.update)"
    return what


def offload(transform: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Keeps ``transform``'s state in host memory between steps.

    The state that ``transform.init`` builds is placed in the host's
    ``pinned_host`` memory, the host memory that devices copy to and from
    directly. ``update`` copies the state to the device, runs
    ``transform.update`` there, and copies the new state back to host memory.
    Called inside the jitted training step, both copies are part of the one
    compiled program. The state then takes no device memory between steps, and
    none during the forward and backward passes, where activations set the peak,
    unless XLA starts the copy early to hide it (below).
    The numbers are ``transform``'s own: the copies move bits and change none
    (tested bit for bit against the unwrapped optimizer for float32, bfloat16 and
    8-bit Adamax state, ``lazy_rows="catch_up"``, :func:`adamax_jax.packed`,
    ``optax.adam`` and ``optax.inject_hyperparams``).

    The state is ``transform``'s own state, the same tree and types (no new
    node type), so a checkpoint of it loads into the offloaded or the unwrapped
    optimizer alike. Where each leaf lives is a property of the arrays, so
    :func:`adamax_jax.sharding.state_sharding` finds it by tracing ``init``:
    every leaf that ``offload`` placed on the host gets a host-memory sharding,
    also when the offloaded transform sits inside ``optax.chain`` or another
    wrapper. Nothing marks the transformation itself.

    **Where the state goes, and when.**

    * ``init`` returns the state in host memory, eagerly (the state is made on
      the device first, then copied: the device briefly holds it all) or under
      ``jax.jit``. For a large model, jit it with the host-memory shardings of
      :func:`~adamax_jax.sharding.state_sharding` as ``out_shardings``, so that
      each device creates only its own shard.
    * ``update`` under ``jax.jit`` adds a copy to the device before the update
      and one back after it. The copy in depends only on the state, which is an
      argument of the step, so on GPU and TPU XLA's scheduler can start it
      before the backward pass ends and hide it (on CPU, host and device memory
      are the same RAM). The new state is put in host memory by ``update``
      itself, so it lands there whatever the step's ``out_shardings`` say.
    * ``update`` outside ``jit`` does the same with eager copies.
    * A state that arrives in device memory (restored from a checkpoint without
      shardings, say) is updated all the same and returned in host memory.

    **Donating the state.** ``jax.jit(step, donate_argnums=...)`` lets XLA
    reuse the old state's buffers for the new one. Give the jitted step the
    ``out_shardings`` of all its results, the state's from ``state_sharding``
    (or use a mesh with Explicit axes, ``jax.make_mesh``'s default, where JAX
    derives them). JAX 0.10 pairs each donated input with a result of the same
    shape and dtype, and where a result's sharding is unknown it ignores memory
    kinds: on one device, or with Auto mesh axes, a host-memory buffer can then
    be paired with a device-memory result (or the reverse), and the process
    aborts in C++ ("PjRtBuffer's memory kind does not match sharding's memory
    kind") or raises ``JaxRuntimeError`` ("Memory kind mismatch"). The
    ``update`` cannot see how it is jitted, so it cannot refuse this itself;
    see the how-to page "Optimizer state in host memory" for what is safe.

    **Composing.** ``offload`` wraps any transformation: a chain, a wrapper
    such as ``optax.inject_hyperparams`` or ``optax.apply_if_finite``,
    :func:`adamax_jax.packed`, or ``optax.MultiSteps(...).gradient_transformation()``
    (its gradient accumulator then lives on the host too). Put it outermost,
    so that everything that computes on the state runs on the device.
    ``optax.chain(..., offload(tx), ...)`` works as well, since the chain only
    passes the state through. A wrapper outside ``offload`` that computes on
    the state itself sees host-memory arrays: ``optax.MultiSteps(offload(tx))``
    is refused by its ``lax.cond`` (the branches' states end up in different
    memories), and ``optax.apply_if_finite(offload(tx))`` works on CPU, where
    host and device memory are the same RAM, and is not tested on GPU or TPU.

    Args:
      transform: The optax transformation whose state to keep in host memory:
        an :class:`optax.GradientTransformation` or
        :class:`optax.GradientTransformationExtraArgs`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with ``transform``'s
      maths and state. ``update`` forwards ``params`` and any extra keyword
      arguments to ``transform``.

    Raises:
      TypeError: At construction, if ``transform`` is not an
        :class:`optax.GradientTransformation`, naming what it got (an optimizer
        constructor that was not called, such as ``ax.adamax``, is named as
        such).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import adamax_jax as ax
      >>> opt = ax.offload(ax.adamax(learning_rate=0.1))
      >>> params = {"w": jnp.ones((4, 3))}
      >>> state = opt.init(params)
      >>> state[0].m["w"].sharding.memory_kind
      'pinned_host'
      >>> updates, state = jax.jit(opt.update)({"w": jnp.ones((4, 3))}, state, params)
      >>> updates["w"].sharding.memory_kind, state[0].u["w"].sharding.memory_kind
      ('device', 'pinned_host')
      >>> updates["w"][0]
      Array([-0.1, -0.1, -0.1], dtype=float32)

    References:
      MaxText's ``optimizer_memory_host_offload`` option
      (`AI-Hypercomputer/maxtext <https://github.com/AI-Hypercomputer/maxtext>`_),
      which keeps the optimizer state in ``pinned_host`` memory in the same way.

      AXLearn's ``offload_optimizer``
      (`apple/axlearn <https://github.com/apple/axlearn>`_), a wrapper of a
      partitioned optax-style optimizer that offloads its state with memory kinds.

      torchao's ``CPUOffloadOptimizer``
      (`pytorch/ao <https://github.com/pytorch/ao>`_), the PyTorch counterpart:
      the state and the optimizer step live on the CPU, and gradients and
      parameters cross the link instead.
    """
    if not isinstance(transform, optax.GradientTransformation):
        raise TypeError(
            "offload() wraps an optax.GradientTransformation, such as ax.adamax(1e-3) "
            f"or optax.chain(...); got {_describe(transform)}"
        )
    inner = optax.with_extra_args_support(transform)

    def init_fn(params: optax.Params) -> optax.OptState:
        return _to(_HOST, inner.init(params))

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        updates, state = inner.update(updates, _to(_DEVICE, state), params, **extra_args)
        return updates, _to(_HOST, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
