"""Distributed inference: meshes over data / stage / model, and the sharding rules.

Available: tensor parallelism over the `model` axis of one mesh of local devices
(`realm_jax.load(path, mesh=make_mesh(model=4))`). Pipeline (`stage`), data parallelism and several hosts
are not available yet: a mesh with stage or data > 1 is refused with a clear error.
"""

from realm_jax.distributed.mesh import AXES, MeshShape, make_mesh, mesh_shape
from realm_jax.distributed.rules import PARAM_AXES, RULES, cache_sharding, shard_params

__all__ = ["AXES", "MeshShape", "PARAM_AXES", "RULES", "cache_sharding", "make_mesh", "mesh_shape", "shard_params"]
