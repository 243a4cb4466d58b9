"""Where the optimizer state lives on a device mesh: beside its parameters, or split ZeRO-style.

Under ``jax.jit`` the layout of the state over a mesh decides how much memory each
device holds and which collectives XLA inserts, never the numbers: XLA keeps the
program's meaning whatever the layout. This module computes two useful layouts as
trees of :class:`jax.sharding.NamedSharding`, to pass as ``out_shardings`` to a
jitted ``init`` and training step.

State kept in host memory by :func:`adamax_jax.offload` gets the same layouts in
``pinned_host`` memory.

Inside ``shard_map`` each device instead runs the transform on its own shard.
Adamax's maths is elementwise, so that equals the full-array update, except where
an option looks beyond one element: ``lazy_rows`` tests only the part of a row a
device holds (when dimensions past the first are sharded), ``state_bits=8``
quantizes in per-shard blocks, and a chained ``optax.clip_by_global_norm`` sees
only its shard's norm. The partition specs of :func:`state_sharding` (``.spec``
of each sharding) serve as ``shard_map``'s ``in_specs``/``out_specs`` for state
shaped like its parameters; the per-shard block scales of ``state_bits=8`` have
no global layout, so keep 8-bit state under ``jit``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from adamax_jax import _leaves, _packed

__all__ = ["state_sharding"]

_Axes = tuple[str, ...]


def state_sharding(
    opt: optax.GradientTransformation,
    params: Any,
    mesh: Mesh,
    *,
    zero_axis: str | Sequence[str] | None = None,
) -> Any:
    """Shardings for ``opt.init(params)``: moments beside their parameters, or ZeRO-split.

    The result has the structure of ``opt.init(params)`` with a
    :class:`~jax.sharding.NamedSharding` on ``mesh`` at every array leaf. Pass it
    as ``out_shardings`` to ``jax.jit(opt.init)`` and as the state's
    ``in_shardings``/``out_shardings`` of the jitted training step, so the state
    is created in place (never gathered on one device) and keeps its layout.

    The state is located with :func:`optax.tree_utils.tree_map_params`, so this
    works for any optax transformation or chain, not only Adamax:

    * A state leaf inside a parameter-shaped subtree (Adamax's ``m`` and ``u``,
      momentum traces, ...) with the parameter's shape takes the parameter's
      partition spec.
    * With ``zero_axis``, such a leaf whose parameter is replicated along
      ``zero_axis`` is also split along it (ZeRO stage 1: each data-parallel
      replica keeps a slice of the optimizer state), on the first dimension that
      no mesh axis shards yet and whose size the axis size divides. The
      parameter's sharding of the other dimensions is kept, so gradients and
      moments still line up under explicit sharding. Leaves with no such
      dimension (scalars, dimensions that are small, odd-sized or already
      sharded) keep the parameter's spec.
    * A parameter-attached vector with one entry per row of a parameter of two
      or more dimensions (its shape is the parameter's first dimension, such as
      the step each row was last touched at with ``lazy_rows="catch_up"``) takes
      the spec of the parameter's first dimension, ZeRO split included. (So do
      the 8-bit block scales of a parameter whose rows are one block each: the
      layout of their blocks.)
    * Every other leaf (``count``, schedule states, and parameter-attached leaves
      of another shape, such as the per-block scales of 8-bit storage) is
      replicated, or with ``zero_axis`` split along it in the same way.
    * State of :func:`adamax_jax.packed`: its large leaves follow their parameters
      as above; a flat buffer of small leaves belongs to no single parameter, so
      it is replicated, or with ``zero_axis`` split along it when the axis size
      divides the buffer's length.

    * State that ``opt.init`` puts in host memory, as :func:`adamax_jax.offload`
      does, gets the same layouts with memory kind ``"pinned_host"``, so a jitted
      ``init`` creates it in host memory and the training step keeps it there.
      This is read off the traced ``init`` leaf by leaf (the memory space in each
      result's type), not off the transformation, so it holds wherever the
      offloaded transformation sits: inside ``optax.chain``, under
      ``optax.inject_hyperparams``, around a whole chain. Other leaves keep the
      default (device) memory.

    On a mesh with Explicit axes (``jax.make_mesh``'s default) the optimizer's
    step needs no further help: it returns the update in the gradient's layout
    and the state in the layout it was given (these shardings).

    XLA inserts the communication the layout implies: with ZeRO, a gradient is
    reduce-scattered to the moments' slices and the update all-gathered back to
    the parameter's layout. Adamax is elementwise, so every layout computes the
    same numbers.

    Use it for ``init`` in particular: ``jax.jit(opt.init)(params)`` without
    ``out_shardings`` creates zeros that never read the parameters, so on a mesh
    with automatic (not explicit) axes they land on one device, or replicated on
    all of them inside ``jax.set_mesh``.

    Parameter shardings are read from the leaves of ``params``: a
    :class:`~jax.sharding.NamedSharding` gives its partition spec; an unsharded or
    fully replicated leaf (a NumPy array, a single-device array, a
    :class:`jax.ShapeDtypeStruct` without sharding) counts as replicated.

    Args:
      opt: The optimizer, an :class:`optax.GradientTransformation` (or anything
        with an ``init`` that builds parameter-shaped state with ``jax.tree.map``).
      params: The parameters ``opt.init`` will see: arrays or
        :class:`jax.ShapeDtypeStruct`, placed with
        :class:`~jax.sharding.NamedSharding` on ``mesh`` where sharded.
      mesh: The device mesh the state is laid out on.
      zero_axis: ``None`` for moments that follow their parameters, or the name
        of a mesh axis (usually the data-parallel one), or a sequence of names,
        to split the state along it.

    Returns:
      A tree of :class:`~jax.sharding.NamedSharding` with the structure of
      ``opt.init(params)``.

    Raises:
      TypeError: If ``opt`` has no ``init``, ``mesh`` is not a
        :class:`jax.sharding.Mesh`, or a parameter carries a sharding that is
        neither a :class:`~jax.sharding.NamedSharding` nor fully replicated.
      ValueError: If ``zero_axis`` or a parameter's partition spec names an axis
        that ``mesh`` does not have, or a parameter was sharded over an axis of a
        different size.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> import adamax_jax as ax
      >>> mesh = jax.make_mesh((4, 2), ("data", "model"))
      >>> w = jax.device_put(jnp.zeros((64, 32)), NamedSharding(mesh, P(None, "model")))
      >>> opt = ax.adamax()
      >>> beside = ax.sharding.state_sharding(opt, {"w": w}, mesh)
      >>> beside[0].m["w"].spec == P(None, "model"), beside[0].count.spec == P()
      (True, True)
      >>> zero = ax.sharding.state_sharding(opt, {"w": w}, mesh, zero_axis="data")
      >>> zero[0].u["w"].spec == P("data", "model")
      True
      >>> state = jax.jit(opt.init, out_shardings=zero)({"w": w})
      >>> state[0].u["w"].addressable_shards[0].data.shape  # 1/8 of (64, 32)
      (16, 16)

    References:
      Rajbhandari et al., `ZeRO: Memory Optimizations Toward Training Trillion
      Parameter Models <https://arxiv.org/abs/1910.02054>`_, SC 2020.

      Xu et al., `Automatic Cross-Replica Sharding of Weight Update in
      Data-Parallel Training <https://arxiv.org/abs/2004.13336>`_, 2020.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if not callable(getattr(opt, "init", None)):
        raise TypeError(
            "opt must be an optax.GradientTransformation (an object with init), "
            f"got {type(opt).__name__}"
        )
    zero_axes = _check_zero_axis(zero_axis, mesh)

    param_leaves, param_treedef = jax.tree_util.tree_flatten_with_path(params)
    layouts = param_treedef.unflatten([_param_layout(path, p, mesh) for path, p in param_leaves])

    def other_leaf(leaf: Any) -> NamedSharding:
        return NamedSharding(
            mesh, _zero_split(PartitionSpec(), _leaves.shape_of(leaf), zero_axes, mesh)
        )

    def piece_sharding(piece: Any, layout: _ParamLayout) -> Any:
        # One parameter's piece of state: an array, or a node of arrays for compact
        # storage, whose leaves of another shape cannot follow the parameter's spec.
        def leaf_sharding(leaf: Any) -> NamedSharding:
            shape = _leaves.shape_of(leaf)
            spec = _zero_split(layout.spec, layout.shape, zero_axes, mesh)
            if shape == layout.shape:
                return NamedSharding(mesh, spec)
            if len(layout.shape) > 1 and shape == layout.shape[:1]:
                # One value per row (lazy_rows="catch_up"): laid out like axis 0.
                return NamedSharding(mesh, PartitionSpec(*[e for e in spec[:1] if e is not None]))
            return other_leaf(leaf)

        return jax.tree.map(leaf_sharding, piece)

    # Traced rather than jax.eval_shape'd: the jaxpr's output types also say which
    # memory each leaf is put in (host memory for the state of ax.offload).
    traced, state_shapes = jax.make_jaxpr(opt.init, return_shape=True)(params)
    shardings = optax.tree_utils.tree_map_params(
        opt,
        lambda subtree: _map_pieces(piece_sharding, subtree, layouts),
        state_shapes,
        # Hand over each parameter-shaped subtree whole: its pieces may be nodes.
        is_leaf=lambda _: True,
        transform_non_params=lambda subtree: jax.tree.map(other_leaf, subtree),
    )
    # One sharding per state leaf, in the order of the jaxpr's outputs.
    leaves, treedef = jax.tree.flatten(shardings)
    return treedef.unflatten(
        [
            sharding if kind is None else sharding.with_memory_kind(kind)
            for sharding, kind in zip(leaves, map(_memory_kind, traced.out_avals), strict=True)
        ]
    )


def _memory_kind(aval: Any) -> str | None:
    """The memory kind ``init`` puts a state leaf in: ``"pinned_host"`` or None (the default)."""
    if getattr(aval, "memory_space", None) == jax.memory.Space.Host:
        return "pinned_host"
    return None


@dataclasses.dataclass(frozen=True)
class _ParamLayout:
    """A parameter's shape and partition spec (a pytree leaf: not registered)."""

    shape: tuple[int, ...]
    dtype: Any
    spec: PartitionSpec


def _param_layout(path: Any, leaf: Any, mesh: Mesh) -> _ParamLayout:
    spec = _param_spec(path, leaf, mesh)  # first: it names a leaf it cannot read
    return _ParamLayout(_leaves.shape_of(leaf), _leaves.dtype_of(leaf), spec)


def _map_pieces(fn: Callable[[Any, _ParamLayout], Any], state: Any, layouts: Any) -> Any:
    """Applies ``fn(piece, layout)`` to each parameter's piece of a parameter-shaped ``state``.

    A piece may be a node (compact storage), so ``state`` is walked down the
    parameters' structure rather than flattened. A part of ``state`` with no
    leaves (``optax.MaskedNode`` for a masked-out subtree) is kept as it is.
    """
    if isinstance(layouts, _ParamLayout):
        return fn(state, layouts)
    if not jax.tree.leaves(state):
        return state
    if isinstance(state, _packed.PackedTree) and not isinstance(layouts, _packed.PackedTree):
        # ax.packed: large leaves keep their parameters' layout; a flat buffer of
        # small leaves has no parameter to follow and is replicated (or ZeRO-split).
        layouts = _packed.arrange_like_packed(
            jax.tree.leaves(layouts),
            state,
            lambda size: _ParamLayout((size,), None, PartitionSpec()),
        )
    state_children, state_node = _children(state)
    layout_children, layout_node = _children(layouts)
    if state_node != layout_node:
        raise ValueError(
            "a parameter-shaped part of the optimizer state does not "
            f"match the parameters: {state_node} in the state against {layout_node}"
        )
    return state_node.unflatten(
        [_map_pieces(fn, s, lay) for s, lay in zip(state_children, layout_children, strict=True)]
    )


def _children(node: Any) -> tuple[list[Any], Any]:
    """The direct children of a pytree node, and the one-level treedef that rebuilds it."""
    return jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)


def _check_zero_axis(zero_axis: str | Sequence[str] | None, mesh: Mesh) -> _Axes:
    if zero_axis is None:
        return ()
    axes = (zero_axis,) if isinstance(zero_axis, str) else zero_axis
    if not isinstance(axes, Sequence) or not axes or not all(isinstance(a, str) for a in axes):
        raise TypeError(
            f"zero_axis must be None, a mesh axis name or a sequence of names, got {zero_axis!r}"
        )
    axes = tuple(axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ValueError(
            f"zero_axis names {unknown} which the mesh does not have "
            f"(its axes are {tuple(mesh.axis_names)})"
        )
    return axes


def _entry_axes(entry: Any) -> _Axes:
    """The mesh axes one partition-spec entry shards a dimension over."""
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _param_spec(path: Any, leaf: Any, mesh: Mesh) -> PartitionSpec:
    """The partition spec a parameter leaf is laid out with, checked against ``mesh``."""
    where = _leaves.path_str(path)
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        return PartitionSpec()
    if not isinstance(sharding, NamedSharding):
        if sharding.is_fully_replicated:
            return PartitionSpec()
        raise TypeError(
            f"parameter {where} has a {type(sharding).__name__}; state_sharding needs "
            "parameters placed with jax.sharding.NamedSharding (or replicated)"
        )
    spec = sharding.spec
    for entry in spec:
        for axis in _entry_axes(entry):
            if axis not in mesh.axis_names:
                raise ValueError(
                    f"parameter {where} is sharded over mesh axis {axis!r}, which the mesh "
                    f"passed to state_sharding does not have (its axes are "
                    f"{tuple(mesh.axis_names)})"
                )
            if sharding.mesh.shape[axis] != mesh.shape[axis]:
                raise ValueError(
                    f"parameter {where} is sharded over mesh axis {axis!r} of size "
                    f"{sharding.mesh.shape[axis]}, but that axis has size {mesh.shape[axis]} "
                    "in the mesh passed to state_sharding"
                )
    return spec


def _zero_split(
    spec: PartitionSpec, shape: tuple[int, ...], zero_axes: _Axes, mesh: Mesh
) -> PartitionSpec:
    """``spec`` with ``zero_axes`` added on the first dimension they divide, if any."""
    if not zero_axes:
        return spec
    entries = list(spec) + [None] * (len(shape) - len(spec))
    used = {axis for entry in entries for axis in _entry_axes(entry)}
    n = math.prod(mesh.shape[a] for a in zero_axes)
    # Already split along the axis (e.g. fully sharded parameters), or nothing to split.
    if n == 1 or used.intersection(zero_axes):
        return spec
    for dim, (size, entry) in enumerate(zip(shape, entries, strict=True)):
        # Only a dimension no other axis shards: mixing axes on one dimension would
        # make gradients and moments disagree under explicit-sharding meshes.
        if entry is None and size > 0 and size % n == 0:
            entries[dim] = zero_axes[0] if len(zero_axes) == 1 else zero_axes
            while entries and entries[-1] is None:
                entries.pop()
            return PartitionSpec(*entries)
    return spec
