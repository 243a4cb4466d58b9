"""Packed mode: run any per-element optax transform on a few flat buffers.

Under ``jit`` every parameter leaf costs the optimizer one or more kernel
launches per step, whatever its size. A model with thousands of small leaves
(biases, norm scales, small heads) then spends its optimizer step dispatching
kernels rather than moving data. ``optax.flatten`` removes that by concatenating
*every* leaf into one vector, but it then copies the large leaves too, every
step, which costs memory bandwidth exactly where the model is biggest.

:func:`packed` concatenates only the leaves at or below a size threshold, one
flat buffer per dtype, and hands the large leaves to the inner transform as they
are: it pays for a copy only where the copy removes dispatch overhead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamax_jax import _explicit

DEFAULT_MAX_LEAF_SIZE = 8192


class PackedTree(NamedTuple):
    """What the inner transform of :func:`packed` sees in place of the parameters.

    Attributes:
      large: The leaves with more than ``max_leaf_size`` elements, unchanged, in
        the order of ``jax.tree.leaves``.
      small: For each dtype, keyed by its name (``"float32"``, ``"bfloat16"``,
        ...), the other leaves of that dtype raveled and concatenated in tree
        order: a 1-D array.
    """

    large: tuple[Any, ...]
    small: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where one leaf of the original tree lives in the :class:`PackedTree`."""

    shape: tuple[int, ...]
    size: int
    group: str | None  # dtype name of its flat buffer; None for a large leaf
    index: int  # position in PackedTree.large, or offset of the leaf in its buffer


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a list of leaves maps onto a :class:`PackedTree`: a function of shapes and dtypes."""

    slots: tuple[_Slot, ...]
    groups: tuple[str, ...]

    @classmethod
    def of(cls, leaves: list[Any], max_leaf_size: int) -> _Layout:
        slots, n_large, fill = [], 0, {}
        for leaf in leaves:
            shape = tuple(int(d) for d in np.shape(leaf))
            size = int(np.prod(shape, dtype=np.int64))
            if size > max_leaf_size:
                slots.append(_Slot(shape, size, None, n_large))
                n_large += 1
            else:
                group = jnp.dtype(leaf_dtype(leaf)).name
                offset = fill.get(group, 0)
                slots.append(_Slot(shape, size, group, offset))
                fill[group] = offset + size
        return cls(tuple(slots), tuple(sorted(fill)))

    def pack(self, leaves: list[Any]) -> PackedTree:
        large = tuple(leaf for leaf, s in zip(leaves, self.slots, strict=True) if s.group is None)
        parts: dict[str, list[Any]] = {g: [] for g in self.groups}
        for leaf, s in zip(leaves, self.slots, strict=True):
            if s.group is not None:
                # Explicit axes refuse to ravel a leaf sharded past its first dimension:
                # small leaves are gathered first (they are usually replicated anyway).
                parts[s.group].append(jnp.ravel(_explicit.replicated(leaf)))
        small = {g: p[0] if len(p) == 1 else jnp.concatenate(p) for g, p in parts.items()}
        return PackedTree(large, small)

    def unpack(self, tree: PackedTree, like: list[Any]) -> list[Any]:
        """The leaves of ``tree``, each laid out like its counterpart in ``like``."""
        out = []
        for s, leaf in zip(self.slots, like, strict=True):
            if s.group is None:
                piece = tree.large[s.index]
            else:
                piece = jax.lax.slice_in_dim(tree.small[s.group], s.index, s.index + s.size)
                piece = piece.reshape(s.shape)
            out.append(_explicit.laid_out_like(piece, leaf))
        return out


def arrange_like_packed(
    leaves: list[Any], packed_state: PackedTree, buffer: Callable[[int], Any]
) -> PackedTree:
    """Arranges one object per leaf as :func:`packed` arranged those leaves in ``packed_state``.

    ``leaves`` are the parameter leaves (or objects with their ``shape`` and
    ``dtype``) in tree order, and ``packed_state`` a :class:`PackedTree` that the
    inner transform's ``init`` built from them (a moment, say). Large leaves are
    returned in their place; each flat buffer becomes ``buffer(size)``. The
    threshold ``packed`` used is not stored, but is implied: the large leaves are
    the ``len(packed_state.large)`` largest.

    Raises:
      ValueError: If no threshold packs ``leaves`` into the buffers of ``packed_state``.
    """
    sizes = sorted((int(np.prod(np.shape(leaf), dtype=np.int64)) for leaf in leaves), reverse=True)
    n_large = len(packed_state.large)
    # Any threshold between the smallest large leaf and the largest small one packs alike.
    threshold = sizes[n_large] if n_large < len(sizes) else max(sizes[-1] - 1, 0)
    layout = _Layout.of(leaves, threshold)
    large = tuple(leaf for leaf, s in zip(leaves, layout.slots, strict=True) if s.group is None)
    totals = {g: sum(s.size for s in layout.slots if s.group == g) for g in layout.groups}
    if len(large) != n_large or set(totals) != set(packed_state.small):
        raise ValueError(
            "adamax_jax: the packed state does not match the parameters: it has "
            f"{n_large} large leaves and buffers {sorted(packed_state.small)}, but the "
            f"parameters pack into {len(large)} and {sorted(totals)}"
        )
    return PackedTree(large, {g: buffer(n) for g, n in totals.items()})


def leaf_dtype(leaf: Any) -> Any:
    """The dtype of a leaf that may be a Python scalar."""
    dtype = getattr(leaf, "dtype", None)
    # result_type, not np.asarray: a Python float is float32 unless x64 is on.
    return jnp.result_type(leaf) if dtype is None else dtype


def _shape_summary(tree: Any) -> str:
    pairs = jax.tree_util.tree_leaves_with_path(tree)
    return ", ".join(f"{jax.tree_util.keystr(p) or '<root>'}: {np.shape(x)}" for p, x in pairs)


def _mismatch(what: str) -> ValueError:
    return ValueError(
        f"adamax_jax.packed: the gradients do not pack like the parameters given to init "
        f"({what}). Gradients need the parameters' tree structure, shapes and dtypes, "
        "as jax.grad returns them."
    )


def _check_state_matches(
    inner: optax.GradientTransformation, packed_updates: PackedTree, state: Any
) -> None:
    """Raises ValueError if ``state`` was not made by ``init`` on parameters like the updates.

    A gradient tree unlike the parameters packs into buffers of other sizes. The
    inner transform would then fail deep in its maths with a broadcasting error,
    or broadcast silently against a size-1 buffer. Comparing the state with an
    abstract ``init`` (one trace, no computation) names the problem instead.
    """
    expected = jax.eval_shape(inner.init, packed_updates)
    exp_def = jax.tree.structure(expected)
    got_leaves, got_def = jax.tree.flatten(state)
    if exp_def != got_def:
        raise _mismatch(
            f"they pack to [{_shape_summary(packed_updates)}], for which the inner state would "
            f"have structure {exp_def}, not {got_def}"
        )
    for (path, e), g in zip(jax.tree_util.tree_leaves_with_path(expected), got_leaves, strict=True):
        if np.shape(e) != np.shape(g):
            raise _mismatch(
                f"they pack to [{_shape_summary(packed_updates)}], so the inner state leaf "
                f"{jax.tree_util.keystr(path)} would have shape {np.shape(e)}, not {np.shape(g)}"
            )


def packed(
    transform: optax.GradientTransformation,
    max_leaf_size: int = DEFAULT_MAX_LEAF_SIZE,
) -> optax.GradientTransformationExtraArgs:
    r"""Runs ``transform`` with small leaves packed into one flat buffer per dtype.

    Every leaf with at most ``max_leaf_size`` elements is raveled and
    concatenated with the other small leaves of its dtype; larger leaves pass
    through unchanged. ``transform`` sees a :class:`PackedTree`
    ``(large, small)`` in place of the gradients (and of the parameters, for
    ``init`` and when ``update`` is given them), and its updates are cut back
    into the original tree. For a transform that acts on each element on its
    own (Adamax, Adam, momentum, weight decay, learning-rate scaling, ...) the
    result is the same as ``transform`` on the original tree.

    This removes the per-leaf kernel launches that dominate a jitted step on a
    model with many small leaves, as ``optax.flatten`` does, but leaves the large
    leaves, where the memory traffic is, uncopied. On a 2-core CPU it matches
    ``optax.flatten`` on 1000 leaves of 1000 elements and plain optax on one
    leaf of 16M, and beats both on a mix of the two (see ``benchmarks/``).

    The state is ``transform``'s own state, made by its ``init`` on the packed
    tree: the same types as unpacked, with a :class:`PackedTree` wherever a tree
    like the parameters would be (``state[0].m`` of :func:`adamax_jax.adamax`,
    for instance). It keeps the dtypes and shapes ``init`` gave it, so it goes
    through ``lax.cond``, ``optax.apply_if_finite`` and ``optax.MultiSteps``.

    Notes:
      - Only for transforms that treat elements independently. One that looks at
        a leaf as a whole (per-leaf norms such as LAMB's trust ratio,
        Adafactor's factored moments, per-leaf clipping) would see a buffer that
        mixes many leaves.
      - Per-parameter options of ``transform`` that refer to the parameter tree,
        such as the ``mask`` of :func:`adamax_jax.adamaxw`, would see the packed
        tree; put them outside instead: ``optax.chain(packed(scale_by_adamax()),
        optax.add_decayed_weights(wd, mask), optax.scale_by_learning_rate(lr))``.
        ``optax.masked(packed(...), mask)`` works: masked-out leaves are not
        packed.
      - The state is not shaped like the parameters:
        ``optax.tree_utils.tree_map_params`` applies its function to each packed
        buffer and large leaf, and cannot pair them with parameter-shaped trees.
      - Gradients must have the parameters' structure, shapes and dtypes, as
        ``jax.grad`` gives them; anything else raises ``ValueError``.
      - With sharded parameters, keep ``max_leaf_size`` below the size of the
        sharded leaves: large leaves keep their sharding, and the packed
        buffers of small (typically replicated) leaves are laid out by XLA.
      - Packing costs a copy of each small leaf's gradient (into its buffer) and
        of its update (out of it) per step, about 16 bytes per element on top of
        Adamax's 28; below ``max_leaf_size`` the kernel launches it saves cost
        more.
      - XLA compiles one small unpacking kernel per packed leaf (as for
        ``optax.flatten``), where the unpacked optimizer shares kernels among
        leaves of one shape: on a 2-core CPU, about 10 s per thousand small
        leaves on top of the first, compiling, step.
      - With ``adamax(state_bits=8)``, a packed buffer is usually large enough
        for 8-bit state, which leaves under 4096 elements would not get on
        their own; its blocks of ``block_size`` then span leaf boundaries.

    Args:
      transform: The optax transformation to run packed.
      max_leaf_size: Leaves with at most this many elements are packed; larger
        ones are handed to ``transform`` as they are. ``0`` packs only empty
        leaves; a huge value packs all (like ``optax.flatten``, but with one
        buffer per dtype instead of promoting everything to one dtype). The
        default, 8192, sits below the break-even size on a 2-core CPU: packing
        leaves of 1K to 4K elements halves the step, 8K saves 15 to 25 %, 16K is
        about even (0.85x to 1.1x in two runs) and 32K costs 20 to 35 % (see
        ``python benchmarks/run.py --sweep``). On accelerators, where launches
        cost more, a larger value may pay.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`. ``update`` forwards
      ``params`` (packed the same way) and any extra keyword arguments to
      ``transform``.

    Raises:
      TypeError: At construction, if ``max_leaf_size`` is not an integer.
      ValueError: At construction, if ``max_leaf_size`` is negative; at update,
        if the gradients or params do not pack like the parameters given to
        ``init``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import adamax_jax as ax
      >>> params = {"w": jnp.ones((300, 200)), "b": jnp.zeros(200), "s": jnp.ones(3)}
      >>> opt = ax.packed(ax.adamax(learning_rate=0.1), max_leaf_size=1000)
      >>> state = opt.init(params)
      >>> m = state[0].m  # b and s share one buffer; w stays a leaf of its own
      >>> m.large[0].shape, m.small["float32"].shape
      ((300, 200), (203,))
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = opt.update(grads, state, params)
      >>> updates["b"].shape, updates["s"]
      ((200,), Array([-0.1, -0.1, -0.1], dtype=float32))

    References:
      ``optax.flatten``, which concatenates every leaf into one vector.
    """
    if isinstance(max_leaf_size, bool) or not isinstance(max_leaf_size, int | np.integer):
        raise TypeError(
            f"max_leaf_size must be an integer number of elements, got {max_leaf_size!r}"
        )
    if max_leaf_size < 0:
        raise ValueError(f"max_leaf_size must be >= 0, got {max_leaf_size}")
    max_leaf_size = int(max_leaf_size)
    inner = optax.with_extra_args_support(transform)

    def init_fn(params: optax.Params) -> optax.OptState:
        leaves = jax.tree.leaves(params)
        if not leaves:
            # Nothing to pack. Handing the tree over unchanged keeps the placeholder of
            # optax.tree_utils.tree_map_params (a tree without leaves) where it belongs.
            return inner.init(params)
        return inner.init(_Layout.of(leaves, max_leaf_size).pack(leaves))

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        leaves, treedef = jax.tree.flatten(updates)
        if not leaves:
            return inner.update(updates, state, params, **extra_args)
        layout = _Layout.of(leaves, max_leaf_size)
        packed_updates = layout.pack(leaves)
        _check_state_matches(inner, packed_updates, state)
        packed_params = None
        if params is not None:
            try:
                param_leaves = treedef.flatten_up_to(params)
            except (ValueError, TypeError) as e:
                raise ValueError(
                    "adamax_jax.packed: params do not have the tree structure of the "
                    f"gradients ({e})"
                ) from e
            for slot, p in zip(layout.slots, param_leaves, strict=True):
                if np.shape(p) != slot.shape:
                    raise ValueError(
                        f"adamax_jax.packed: a parameter has shape {np.shape(p)} but its "
                        f"gradient has shape {slot.shape}"
                    )
            packed_params = layout.pack(param_leaves)
        new_updates, state = inner.update(packed_updates, state, packed_params, **extra_args)
        # The inner transform maps the packed tree to one of the same structure.
        return treedef.unflatten(layout.unpack(cast(PackedTree, new_updates), leaves)), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
