"""Distributed inference: meshes over data / stage / model, the sharding rules, and several processes (hosts).

On one mesh of devices: tensor parallelism over `model`, pipeline parallelism over `stage` (the layers cut
by `create_model_shards`, microbatches moved with ppermute, `bubble_fraction` reported) and data parallelism
over `data` (batches padded to a multiple of it), in any combination
(`realm_jax.load(path, mesh=make_mesh(data=2, stage=2, model=2))`); a `DistributedConfig` names the strategy
(none, tensor, pipeline, data, hybrid) and the mesh shape, and checks that they agree. `collective_bytes`
reads the bytes moved by collectives from a compiled program.

Several processes: `join` brings them together through `jax.distributed.initialize` (explicit process
count, id and coordinator address, or Slurm / Open MPI / Kubernetes detection) and returns a `Coordinator`
(rank, world size, devices, peers, shutdown); `global_mesh` builds the mesh over every process's devices;
`realm-jax launch` (`launch.run_local`, `launch.cluster_commands`) starts and supervises the processes on
one host or prints each host's command. A lost peer ends every process in bounded time with a message that
names it. Collectives for users over a named axis: broadcast, all_reduce, gather, scatter.
"""

from realm_jax.distributed.collectives import all_reduce, broadcast, gather, scatter
from realm_jax.distributed.config import STRATEGIES, DistributedConfig, parse_mesh, strategy_of
from realm_jax.distributed.coordinator import (EXIT_PEER_LOST, Coordinator, Peer, cluster_environment, global_mesh,
                                               join, plan_mesh)
from realm_jax.distributed.hlo import collective_bytes
from realm_jax.distributed.mesh import AXES, MeshShape, make_mesh, mesh_shape
from realm_jax.distributed.pipeline import bubble_fraction, create_model_shards
from realm_jax.distributed.rules import PARAM_AXES, RULES, cache_sharding, shard_params

__all__ = ["AXES", "EXIT_PEER_LOST", "PARAM_AXES", "RULES", "STRATEGIES", "Coordinator", "DistributedConfig",
           "MeshShape", "Peer", "all_reduce", "broadcast", "bubble_fraction", "cache_sharding", "cluster_environment",
           "collective_bytes", "create_model_shards", "gather", "global_mesh", "join", "make_mesh", "mesh_shape",
           "parse_mesh", "plan_mesh", "scatter", "shard_params", "strategy_of"]
