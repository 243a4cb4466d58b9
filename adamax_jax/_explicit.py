"""Running the optimizer's per-leaf maths on meshes with Explicit axes.

Since JAX 0.10, ``jax.make_mesh`` gives Explicit axes by default: every array's
sharding is part of its type, and an operation whose output layout is ambiguous
(flattening a leaf sharded on its second dimension into 8-bit blocks, selecting
between a gradient laid out like its parameter and moments split ZeRO-style) is a
``ShardingTypeError`` at trace time, where an Auto mesh lets XLA choose.

Adamax's maths is elementwise and its result does not depend on the layout, so
the library does not hand-place every intermediate value. It runs each leaf's
step as on an Auto mesh, inside :func:`jax.sharding.auto_axes`, and gives the
results the layouts the caller chose: the update that of the gradient, the new
state that of the old. This is the explicit output sharding that sharding in types
asks for, supplied by the library, and on Auto meshes (or without a mesh) nothing
changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec


def _sharding(x: Any) -> NamedSharding | None:
    """The sharding in ``x``'s type, or None where it has no mesh."""
    try:
        sharding = getattr(jax.typeof(x), "sharding", None)
    except TypeError:  # not an array-like: no layout to follow
        return None
    if not isinstance(sharding, NamedSharding) or sharding.mesh.empty:
        return None
    return sharding


def common_mesh(tree: Any, where: str) -> Any:
    """The abstract mesh the arrays of ``tree`` live on, or None.

    Raises:
      ValueError: If the arrays live on different meshes, naming ``where`` (the
        leaf) and the meshes' axes: no layout of the step can follow both.
    """
    mesh = None
    for leaf in jax.tree.leaves(tree):
        sharding = _sharding(leaf)
        if sharding is None:
            continue
        if mesh is None:
            mesh = sharding.mesh
        elif sharding.mesh != mesh:
            raise ValueError(
                f"{where} mixes arrays on two meshes, with axes "
                f"{_describe(mesh)} and {_describe(sharding.mesh)}; put the parameters, "
                "gradients and optimizer state on one mesh (see ax.sharding.state_sharding)"
            )
    return mesh


def _describe(mesh: Any) -> str:
    axes = zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types, strict=True)
    return "{" + ", ".join(f"{name!r}: {size} ({kind.name})" for name, size, kind in axes) + "}"


def run_as_auto(fn: Callable[..., Any], *args: Any, out_like: Any, where: str) -> Any:
    """``fn(*args)``, laid out by XLA where ``args`` carry Explicit mesh axes.

    On a mesh with Explicit axes, ``fn`` runs inside :func:`jax.sharding.auto_axes`
    over those axes and its results are resharded to the shardings of
    ``out_like`` (a tree with the structure of the results). Anywhere else this is
    just ``fn(*args)``.
    """
    # out_like only says where results go (here: some of the args), so the mesh is
    # read off the args alone; each leaf's step pays this at trace time.
    mesh = common_mesh(args, where)
    if mesh is None or not mesh.explicit_axes:
        return fn(*args)

    def layout(like: Any) -> NamedSharding:
        sharding = _sharding(like)
        return NamedSharding(mesh, PartitionSpec()) if sharding is None else sharding

    out_sharding = jax.tree.map(layout, out_like)
    return jax.sharding.auto_axes(fn, axes=mesh.explicit_axes, out_sharding=out_sharding)(*args)


def replicated(x: jax.Array) -> jax.Array:
    """``x`` gathered onto every device where an Explicit axis shards it.

    For reshapes that mix a sharded dimension with others (``jnp.ravel`` of a
    leaf sharded on its second dimension), which sharding in types refuses.
    """
    sharding = _sharding(x)
    if sharding is None or not _uses_explicit_axis(sharding):
        return x
    return jax.sharding.reshard(x, NamedSharding(sharding.mesh, PartitionSpec()))


def laid_out_like(x: jax.Array, like: Any) -> jax.Array:
    """``x`` resharded to the layout of ``like`` where that uses an Explicit axis."""
    sharding = _sharding(like)
    if sharding is None or not sharding.mesh.explicit_axes or _sharding(x) == sharding:
        return x
    return jax.sharding.reshard(x, sharding)


def _uses_explicit_axis(sharding: NamedSharding) -> bool:
    explicit = set(sharding.mesh.explicit_axes)
    for entry in sharding.spec:
        names = (entry,) if isinstance(entry, str) else entry
        if isinstance(names, tuple) and explicit.intersection(names):
            return True
    return False
