"""Collectives for users over one named mesh axis: broadcast, all_reduce, gather and scatter.

Per-device values are written as one global array whose leading dimension has one slice per device of
the axis (length n = the axis size), split over that axis; every function checks that layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from realm_jax.errors import CollectiveError, MeshError, ShapeMismatchError

__all__ = ["all_reduce", "broadcast", "gather", "scatter"]

_OPS = {"sum": lax.psum, "max": lax.pmax, "min": lax.pmin, "mean": lax.pmean}


def _axis_size(mesh: Mesh, axis: str) -> int:
    if axis not in mesh.axis_names:
        raise MeshError(f"axis {axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    return int(mesh.shape[axis])


def _per_device(x, mesh: Mesh, axis: str, what: str) -> jax.Array:
    n = _axis_size(mesh, axis)
    x = jnp.asarray(x)
    if x.ndim == 0 or x.shape[0] != n:
        raise ShapeMismatchError(f"{what}: x.shape={x.shape} must have a leading dim of {n}, one slice per device "
                                 f"of mesh axis {axis!r}")
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec(axis)))


def _run(mesh: Mesh, axis: str, body, in_spec: PartitionSpec, out_spec: PartitionSpec, x):
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=in_spec, out_specs=out_spec, check_vma=False))(x)


def all_reduce(x, mesh: Mesh, axis: str, op: str = "sum") -> jax.Array:
    """Reduce the per-device slices x[i] over `axis` ("sum", "max", "min", "mean"): one value, replicated."""
    if op not in _OPS:
        raise CollectiveError(f"all_reduce: op={op!r} must be one of {sorted(_OPS)}")
    x = _per_device(x, mesh, axis, "all_reduce")
    return _run(mesh, axis, lambda s: _OPS[op](s[0], axis), PartitionSpec(axis), PartitionSpec(), x)


def broadcast(x, mesh: Mesh, axis: str, root: int = 0) -> jax.Array:
    """Every device of `axis` gets the slice of device `root`: [n, ...] with every slice equal to x[root]."""
    n = _axis_size(mesh, axis)
    if not 0 <= root < n:
        raise MeshError(f"broadcast: root={root} must index the {n} devices of mesh axis {axis!r}")
    x = _per_device(x, mesh, axis, "broadcast")

    def body(s):
        mine = jnp.where(lax.axis_index(axis) == root, s, jnp.zeros_like(s))
        return lax.psum(mine, axis)  # only the root contributes: the sum is its value

    return _run(mesh, axis, body, PartitionSpec(axis), PartitionSpec(axis), x)


def gather(x, mesh: Mesh, axis: str) -> jax.Array:
    """All per-device slices on every device: the [n, ...] array, replicated over `axis`."""
    x = _per_device(x, mesh, axis, "gather")
    body = functools.partial(lax.all_gather, axis_name=axis, tiled=True)
    return _run(mesh, axis, body, PartitionSpec(axis), PartitionSpec(), x)


def scatter(x, mesh: Mesh, axis: str) -> jax.Array:
    """Split a replicated [n * k, ...] array so device i of `axis` holds rows [i*k, (i+1)*k)."""
    n = _axis_size(mesh, axis)
    x = jnp.asarray(x)
    if x.ndim == 0 or x.shape[0] % n:
        raise ShapeMismatchError(f"scatter: x.shape={x.shape} must have a leading dim divisible by the {n} devices "
                                 f"of mesh axis {axis!r}")
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec()))

    def body(full):
        k = full.shape[0] // n
        return lax.dynamic_slice_in_dim(full, lax.axis_index(axis) * k, k, axis=0)

    return _run(mesh, axis, body, PartitionSpec(), PartitionSpec(axis), x)
