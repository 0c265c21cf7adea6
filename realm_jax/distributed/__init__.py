"""Distributed inference: meshes over data / stage / model, and the sharding rules.

Available on one mesh of local devices: tensor parallelism over `model` and data parallelism over `data`
(batches padded to a multiple of it), alone or together (`realm_jax.load(path, mesh=make_mesh(data=2,
model=4))`). Pipeline parallelism (`stage`) and several hosts are not available yet: a mesh with stage > 1
is refused with a clear error. Collectives for users over a named axis: broadcast, all_reduce, gather,
scatter.
"""

from realm_jax.distributed.collectives import all_reduce, broadcast, gather, scatter
from realm_jax.distributed.mesh import AXES, MeshShape, make_mesh, mesh_shape
from realm_jax.distributed.rules import PARAM_AXES, RULES, cache_sharding, shard_params

__all__ = ["AXES", "MeshShape", "PARAM_AXES", "RULES", "all_reduce", "broadcast", "cache_sharding", "gather",
           "make_mesh", "mesh_shape", "scatter", "shard_params"]
