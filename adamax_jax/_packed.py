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
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamax_jax import _explicit, _leaves, _validation

DEFAULT_MAX_LEAF_SIZE = 8192


@dataclasses.dataclass(frozen=True)
class PackedTree:
    """What the inner transform of :func:`packed` sees in place of the parameters.

    Attributes:
      large: The leaves with more than ``max_leaf_size`` elements, unchanged, in
        the order of ``jax.tree.leaves``.
      small: For each dtype of the parameters given to ``init``, keyed by its name
        (``"float32"``, ``"bfloat16"``, ...), the other leaves of that dtype raveled
        and concatenated in tree order: a 1-D array.
      leaf_groups: For each leaf of the original tree, in the order of
        ``jax.tree.leaves``, the key of the buffer in ``small`` that holds it, or
        ``None`` for a large leaf. Static (part of the tree structure): it is how
        ``update``, which may be called without the parameters, packs gradients of
        another dtype (float32 gradients of bfloat16 parameters) like the
        parameters.
    """

    large: tuple[Any, ...]
    small: dict[str, Any]
    leaf_groups: tuple[str | None, ...] = dataclasses.field(repr=False, metadata={"static": True})


jax.tree_util.register_dataclass(PackedTree)


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where one leaf of the original tree lives in the :class:`PackedTree`."""

    shape: tuple[int, ...]
    size: int
    group: str | None  # key of its flat buffer; None for a large leaf
    index: int  # position in PackedTree.large, or offset of the leaf in its buffer


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a list of leaves maps onto a :class:`PackedTree`: a group per leaf, and shapes."""

    slots: tuple[_Slot, ...]
    leaf_groups: tuple[str | None, ...]
    groups: tuple[str, ...]

    @classmethod
    def of(cls, leaves: list[Any], max_leaf_size: int) -> _Layout:
        """The layout ``init`` gives ``leaves``: small leaves grouped by their dtype."""
        return cls.recorded(
            tuple(
                None if _size(np.shape(leaf)) > max_leaf_size else _leaves.dtype_of(leaf).name
                for leaf in leaves
            ),
            leaves,
        )

    @classmethod
    def recorded(cls, leaf_groups: tuple[str | None, ...], leaves: list[Any]) -> _Layout:
        """The layout ``leaf_groups`` (one group per leaf) gives leaves shaped like ``leaves``."""
        slots, n_large, fill = [], 0, {}
        for group, leaf in zip(leaf_groups, leaves, strict=True):
            shape = tuple(int(d) for d in np.shape(leaf))
            size = _size(shape)
            if group is None:
                slots.append(_Slot(shape, size, None, n_large))
                n_large += 1
            else:
                offset = fill.get(group, 0)
                slots.append(_Slot(shape, size, group, offset))
                fill[group] = offset + size
        return cls(tuple(slots), leaf_groups, tuple(sorted(fill)))

    def buffer_dtypes(self, leaves: list[Any]) -> dict[str, Any]:
        """The dtype each buffer holds ``leaves`` in: their promoted dtype in that group.

        Leaves of one group share a dtype at ``init``; gradients may not (float32 and
        bfloat16 gradients of two bfloat16 parameters), and a buffer needs one.
        """
        dtypes: dict[str, list[Any]] = {g: [] for g in self.groups}
        for leaf, s in zip(leaves, self.slots, strict=True):
            if s.group is not None:
                dtypes[s.group].append(_leaves.dtype_of(leaf))
        # Dtypes, not arrays: a Python-scalar leaf must not make a buffer weakly typed.
        return {g: jnp.result_type(*d) for g, d in dtypes.items()}  # no group is empty

    def pack(self, leaves: list[Any]) -> PackedTree:
        large = tuple(leaf for leaf, s in zip(leaves, self.slots, strict=True) if s.group is None)
        dtypes = self.buffer_dtypes(leaves)
        if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves):
            # Abstract parameters (optax's harnesses init on them): abstract buffers.
            sizes = {g: sum(s.size for s in self.slots if s.group == g) for g in self.groups}
            small_abstract = {g: jax.ShapeDtypeStruct((n,), dtypes[g]) for g, n in sizes.items()}
            return PackedTree(large, small_abstract, self.leaf_groups)
        parts: dict[str, list[Any]] = {g: [] for g in self.groups}
        for leaf, s in zip(leaves, self.slots, strict=True):
            if s.group is not None:
                # Explicit axes refuse to ravel a leaf sharded past its first dimension:
                # small leaves are gathered first (they are usually replicated anyway).
                flat = jnp.ravel(_explicit.replicated(leaf))
                parts[s.group].append(flat.astype(dtypes[s.group]))
        small = {g: p[0] if len(p) == 1 else jnp.concatenate(p) for g, p in parts.items()}
        return PackedTree(large, small, self.leaf_groups)

    def unpack(self, tree: PackedTree, like: list[Any]) -> list[Any]:
        """The leaves of ``tree``, each laid out like its counterpart in ``like``.

        A leaf of ``like`` that was promoted into its buffer (see :meth:`buffer_dtypes`)
        gets its piece back in its dtype promoted with its parameter's, as a transform
        whose state takes the parameters' dtype (adamax_jax's own, optax's) would give
        it unpacked.
        """
        dtypes = self.buffer_dtypes(like)
        out = []
        for s, leaf in zip(self.slots, like, strict=True):
            if s.group is None:
                piece = tree.large[s.index]
            else:
                piece = jax.lax.slice_in_dim(tree.small[s.group], s.index, s.index + s.size)
                piece = piece.reshape(s.shape)
                own = jnp.promote_types(_leaves.dtype_of(leaf), jnp.dtype(s.group))
                if own != dtypes[s.group]:
                    piece = piece.astype(own)
            out.append(_explicit.laid_out_like(piece, leaf))
        return out


def _packed_nodes(tree: Any) -> list[PackedTree]:
    """The :class:`PackedTree` nodes in ``tree`` (a packed state or parameters)."""
    nodes = jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, PackedTree))
    return [n for n in nodes if isinstance(n, PackedTree)]


def holds_packed(tree: Any) -> bool:
    """Whether ``tree`` holds a :class:`PackedTree` node."""
    return bool(_packed_nodes(tree))


def packs_leaves(tree: Any) -> bool:
    """Whether ``tree`` holds a :class:`PackedTree` with leaves packed into a buffer."""
    return any(g is not None for n in _packed_nodes(tree) for g in n.leaf_groups)


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def arrange_like_packed(
    leaves: list[Any], packed_state: PackedTree, buffer: Callable[[int], Any]
) -> PackedTree:
    """Arranges one object per leaf as :func:`packed` arranged those leaves in ``packed_state``.

    ``leaves`` are the parameter leaves (or objects with their ``shape``) in tree
    order, and ``packed_state`` a :class:`PackedTree` that the inner transform's
    ``init`` built from them (a moment, say). Large leaves are returned in their
    place; each flat buffer becomes ``buffer(size)``. The result has the tree
    structure of ``packed_state``.

    Raises:
      ValueError: If ``leaves`` do not pack into the buffers of ``packed_state``.
    """
    record = packed_state.leaf_groups
    if len(record) != len(leaves):
        raise ValueError(
            "the packed state does not match the parameters: it was made "
            f"from {len(record)} leaves, and the parameters have {len(leaves)}"
        )
    layout = _Layout.recorded(record, leaves)
    large = tuple(leaf for leaf, s in zip(leaves, layout.slots, strict=True) if s.group is None)
    totals = {g: sum(s.size for s in layout.slots if s.group == g) for g in layout.groups}
    if len(large) != len(packed_state.large) or set(totals) != set(packed_state.small):
        raise ValueError(
            "the packed state does not match the parameters: it has "
            f"{len(packed_state.large)} large leaves and buffers {sorted(packed_state.small)}, "
            f"but the parameters pack into {len(large)} and {sorted(totals)}"
        )
    return PackedTree(large, {g: buffer(n) for g, n in totals.items()}, record)


def _shape_summary(tree: Any) -> str:
    pairs = jax.tree_util.tree_leaves_with_path(tree)
    return ", ".join(f"{_leaves.path_str(p)}: {np.shape(x)}" for p, x in pairs)


def _mismatch(what: str) -> ValueError:
    return ValueError(
        f"packed(): the gradients do not pack like the parameters given to init "
        f"({what}). Gradients need the parameters' tree structure and shapes, and dtypes "
        "of the same kind (any real float for a real float parameter), as jax.grad "
        "returns them."
    )


def _recorded_groups(state: Any, n_leaves: int) -> tuple[str | None, ...] | None:
    """The layout ``init`` recorded in the packed parts of ``state``; None if it has none.

    A stateless transform (``optax.scale``) keeps no packed tree, and then any
    layout that packs gradients and parameters alike will do.
    """
    records = {n.leaf_groups for n in _packed_nodes(state)}
    if not records:
        return None
    if len(records) > 1:
        raise _mismatch("the state holds packed trees of different layouts")
    (record,) = records
    if len(record) != n_leaves:
        raise _mismatch(
            f"the state was made from {len(record)} parameter leaves, and there are "
            f"{n_leaves} gradient leaves"
        )
    return record


def _same_kind(dtype: Any, group: str) -> bool:
    """Whether a gradient of ``dtype`` may share the buffer of ``group``'s parameters."""
    dtype, like = jnp.dtype(dtype), jnp.dtype(group)
    return dtype == like or any(
        jnp.issubdtype(dtype, kind) and jnp.issubdtype(like, kind)
        for kind in (jnp.floating, jnp.complexfloating)
    )


def _check_dtypes(paths: list[Any], leaves: list[Any], layout: _Layout) -> None:
    """Raises ValueError for a small gradient that its parameter's buffer cannot hold.

    Any real float may join a real float buffer (promoted, then cast back), as the
    unpacked optimizer takes float32 gradients of bfloat16 parameters. An integer
    or complex gradient of a real parameter would turn the whole buffer, and every
    other leaf's step in it, into another kind of number.
    """
    for path, leaf, slot in zip(paths, leaves, layout.slots, strict=True):
        if slot.group is not None and not _same_kind(_leaves.dtype_of(leaf), slot.group):
            raise _mismatch(
                f"the gradient {_leaves.path_str(path)} is "
                f"{_leaves.dtype_of(leaf).name} and its parameter {slot.group}"
            )


def _mask_error() -> ValueError:
    return ValueError(
        "packed(): the transform masks or partitions the parameters (optax.masked, "
        "the mask of adamaxw or optax.add_decayed_weights, optax.partition, "
        "optax.multi_transform). Inside packed() that mask would be applied to the packed "
        "buffers, not to your parameters, and select other elements than you meant. Apply "
        "it outside packed() instead: optax.chain(ax.packed(ax.scale_by_adamax()), "
        "optax.add_decayed_weights(weight_decay, mask), optax.scale_by_learning_rate(lr)) "
        "for a weight-decay mask, or optax.masked(ax.packed(...), mask)."
    )


def _has_mask(state: Any) -> bool:
    nodes = jax.tree.leaves(state, is_leaf=lambda n: isinstance(n, optax.MaskedState))
    return any(isinstance(n, optax.MaskedState) for n in nodes)


def _init_packed(
    inner: optax.GradientTransformation, params: Any, packed_params: PackedTree
) -> Any:
    """``inner.init`` on the packed tree, refusing a transform that the packing would change.

    A mask (or partition) inside ``inner`` refers to the parameter tree. As a
    callable it would run on the packed tree and, on 1-D buffers, select other
    elements without a word; as a tree it no longer matches. Either way the state
    holds an ``optax.MaskedState``, which ``inner.init`` on the real parameters
    shows when the packed ``init`` fails.
    """
    try:
        state = inner.init(cast(optax.Params, packed_params))  # a pytree like any other
    except _validation.UnsupportedCombination:
        raise  # already names the combination and what to do
    except Exception as error:
        try:
            unpacked = jax.eval_shape(inner.init, params)
        except Exception:  # noqa: BLE001 (any failure: the parameters fail as well)
            unpacked = None
        if unpacked is None:
            raise  # not the packing's doing: the original error, untouched
        if _has_mask(unpacked):
            raise _mask_error() from error
        raise ValueError(
            "packed(): the transform's init accepts the parameters but not their "
            f"packed form ({type(error).__name__}: {error}). packed() is only for transforms "
            "that treat elements independently and do not refer to the parameter tree's "
            "structure or names."
        ) from error
    if _has_mask(state):
        raise _mask_error()
    return state


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
        tree and select other elements than meant. ``init`` refuses any
        ``optax.masked`` inside (so also ``add_decayed_weights(mask=...)``,
        ``optax.partition``, ``optax.multi_transform``) with a ``ValueError``;
        put them outside instead: ``optax.chain(packed(scale_by_adamax()),
        optax.add_decayed_weights(wd, mask), optax.scale_by_learning_rate(lr))``.
        ``optax.masked(packed(...), mask)`` works: masked-out leaves are not
        packed.
      - The state is not shaped like the parameters:
        ``optax.tree_utils.tree_map_params`` applies its function to each packed
        buffer and large leaf, and cannot pair them with parameter-shaped trees.
      - Gradients must have the parameters' structure and shapes, as ``jax.grad``
        gives them, but may have other float dtypes: they are packed by the
        parameters' dtypes recorded at ``init`` (float32 gradients of bfloat16
        parameters join the bfloat16 parameters' buffer, which then holds them
        in float32), so that the state keeps the dtypes ``init`` gave it, as
        unpacked. Where gradients of several dtypes share a buffer, it holds
        them in their promoted dtype and each update is cast back at the end to
        its gradient's dtype promoted with its parameter's, the dtype
        :func:`adamax_jax.adamax` and ``optax.adam`` give it unpacked (their
        state has the parameters' dtype): rounded once, where unpacked
        :func:`adamax_jax.adamax` may round after its core step and again after
        the learning rate (1 ulp apart). A stateless transform (``optax.sgd``)
        then gives a bfloat16 gradient of a float32 parameter a float32 update,
        where unpacked it keeps bfloat16. Other structures, shapes, or integer
        or complex gradients of real parameters raise ``ValueError``.
      - With sharded parameters, keep ``max_leaf_size`` below the size of the
        sharded leaves: large leaves keep their sharding, and the packed
        buffers of small (typically replicated) leaves are laid out by XLA.
      - Packing costs a copy of each small leaf's gradient (into its buffer) and
        of its update (out of it) per step, about 16 bytes per element on top of
        Adamax's 28; below ``max_leaf_size`` the kernel launches it saves cost
        more.
      - XLA compiles one small unpacking kernel per packed leaf (as for
        ``optax.flatten``), and on CPU slices of one shared buffer compile
        slowly: about 12 ms each on a 2-core CPU, against about 4 ms per leaf
        for the whole unpacked float32 step. Packing saves step time on many
        small leaves, not compile time (``benchmarks/compile_time.py``).
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
      ValueError: At construction, if ``max_leaf_size`` is negative; at ``init``,
        if ``transform`` masks or partitions the parameters (see Notes) or its
        ``init`` fails only on the packed tree; at update, if the gradients or
        params do not pack like the parameters given to ``init``.

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
        if holds_packed(params):
            raise _validation.UnsupportedCombination(
                "packed(): the parameters are already packed (a PackedTree), as they are "
                "inside another packed(); packed(packed(...)) would pack the buffers again. "
                "Use one packed() around the transform."
            )
        leaves = jax.tree.leaves(params)
        if not leaves:
            # Nothing to pack. Handing the tree over unchanged keeps the placeholder of
            # optax.tree_utils.tree_map_params (a tree without leaves) where it belongs.
            return inner.init(params)
        return _init_packed(inner, params, _Layout.of(leaves, max_leaf_size).pack(leaves))

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
        if not paths_and_leaves:
            return inner.update(updates, state, params, **extra_args)
        paths = [p for p, _ in paths_and_leaves]
        leaves = [x for _, x in paths_and_leaves]
        param_leaves = None
        if params is not None:
            try:
                param_leaves = treedef.flatten_up_to(params)
            except (ValueError, TypeError) as e:
                raise ValueError(
                    f"packed(): params do not have the tree structure of the gradients ({e})"
                ) from e
            for path, g, p in zip(paths, leaves, param_leaves, strict=True):
                if np.shape(p) != np.shape(g):
                    raise ValueError(
                        f"packed(): the parameter {_leaves.path_str(path)} has "
                        f"shape {np.shape(p)} but its gradient has shape {np.shape(g)}"
                    )
        # Pack as init did, by the parameters' dtypes, which the gradients need not share.
        record = _recorded_groups(state, len(leaves))
        if record is None:
            layout = _Layout.of(leaves if param_leaves is None else param_leaves, max_leaf_size)
        else:
            layout = _Layout.recorded(record, leaves)
        _check_dtypes(paths, leaves, layout)
        packed_updates = layout.pack(leaves)
        _check_state_matches(inner, packed_updates, state)
        packed_params = None if param_leaves is None else layout.pack(param_leaves)
        new_updates, state = inner.update(
            cast(optax.Updates, packed_updates),
            state,
            cast(optax.Params | None, packed_params),
            **extra_args,
        )
        # The inner transform maps the packed tree to one of the same structure.
        return treedef.unflatten(layout.unpack(cast(PackedTree, new_updates), leaves)), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
