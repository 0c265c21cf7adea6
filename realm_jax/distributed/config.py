"""DistributedConfig: the parallelism strategy, the mesh shape over data / stage / model, and how this process
joins the others (process count, this process's id, the coordinator's address).

The strategy names which axes are larger than one, so a strategy and a mesh shape must agree:

    none      data = stage = model = 1            tensor    only model > 1 (heads and MLP columns)
    data      only data > 1 (the batch)           pipeline  only stage > 1 (the layer stack)
    hybrid    two or more axes > 1

Give either one and the other follows: `DistributedConfig(strategy="tensor")` puts every device on `model`;
`DistributedConfig(mesh=MeshShape(data=2, model=2))` is "hybrid".
"""

from __future__ import annotations

import dataclasses
import re

from realm_jax.distributed.mesh import AXES, MeshShape
from realm_jax.errors import CoordinatorError, MeshError
from realm_jax.inputs import shown

STRATEGIES = ("none", "tensor", "pipeline", "data", "hybrid")
_STRATEGY_AXIS = {"tensor": "model", "pipeline": "stage", "data": "data"}
_STRATEGY_NEEDS = {"none": "it needs data = stage = model = 1", "tensor": "it needs only model > 1",
                   "pipeline": "it needs only stage > 1", "data": "it needs only data > 1",
                   "hybrid": "it needs two or more axes > 1"}


def strategy_of(shape: MeshShape) -> str:
    """The strategy a mesh shape implements: the one axis larger than 1, "hybrid" for several, else "none"."""
    split = [axis for axis in AXES if getattr(shape, axis) > 1]
    if len(split) > 1:
        return "hybrid"
    return next(s for s, axis in _STRATEGY_AXIS.items() if axis == split[0]) if split else "none"


def parse_mesh(spec: str) -> MeshShape:
    """A mesh shape from text such as "model=2,data=2" (axes left out are 1)."""
    if not isinstance(spec, str):
        raise MeshError(f"mesh spec={shown(spec)} must be a str such as 'model=2,data=2', got {type(spec).__name__}")
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        axis, eq, size = part.strip().partition("=")
        if not eq or axis not in AXES:
            raise MeshError(f"mesh {spec!r}: {part.strip()!r} is not AXIS=SIZE with AXIS one of {', '.join(AXES)}")
        if axis in sizes:
            raise MeshError(f"mesh {spec!r}: axis {axis!r} is given twice")
        if re.fullmatch(r"[0-9]+", size.strip()) is None:  # int() also takes "2_0" and "٢"
            raise MeshError(f"mesh {spec!r}: the size of {axis!r} must be an int, got {size!r}")
        sizes[axis] = int(size)
    return MeshShape(**sizes)


def check_host(host: str, what: str) -> str:
    """A host name or IPv4 address (ASCII, no space, no colon), or an IPv6 address in brackets ([::1])."""
    ok = isinstance(host, str) and re.fullmatch(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]", host) is not None
    if not ok:
        raise CoordinatorError(f"{what}: host {shown(host)} must be a host name or an IPv4 address, or an IPv6 "
                               "address in brackets ([::1])")
    return host


def _check_address(address: str) -> None:
    host, colon, port = address.rpartition(":")
    # ASCII digits only: str.isdigit also takes "²³" and "١٢٣٤"
    if not colon or re.fullmatch(r"[0-9]{1,5}", port) is None or not 0 < int(port) < 65536:
        raise CoordinatorError(f"coordinator_address={shown(address)} must be HOST:PORT with a port in 1..65535")
    check_host(host, f"coordinator_address={shown(address)}")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How one model is spread over devices and processes.

    Attributes:
      strategy: one of STRATEGIES; None takes it from `mesh` ("none" when both are None).
      mesh: the data / stage / model sizes; None puts all devices on the strategy's axis (see `shape_for`).
      num_processes, process_id, coordinator_address ("HOST:PORT" of process 0): explicit membership of a
        multi-process run. All three None: JAX's cluster detection (Slurm, Open MPI, Kubernetes) decides, or
        this is a single process.
    """

    strategy: str | None = None
    mesh: MeshShape | None = None
    num_processes: int | None = None
    process_id: int | None = None
    coordinator_address: str | None = None

    def __post_init__(self):
        if self.mesh is not None and not isinstance(self.mesh, MeshShape):
            raise MeshError(f"mesh={self.mesh!r} must be a MeshShape (or parse_mesh('model=2,data=2'))")
        if self.strategy is None:
            object.__setattr__(self, "strategy", "none" if self.mesh is None else strategy_of(self.mesh))
        if self.strategy not in STRATEGIES:
            raise MeshError(f"strategy={self.strategy!r} must be one of {', '.join(STRATEGIES)}")
        if self.mesh is not None and strategy_of(self.mesh) != self.strategy:
            m = self.mesh
            raise MeshError(f"strategy={self.strategy!r} does not match the mesh data={m.data} x stage={m.stage} x "
                            f"model={m.model}, which is {strategy_of(m)!r} ({_STRATEGY_NEEDS[self.strategy]})")
        self._check_processes()

    def _check_processes(self) -> None:
        n, rank, address = self.num_processes, self.process_id, self.coordinator_address
        if n is None:
            if rank is not None or address is not None:
                raise CoordinatorError(f"process_id={rank!r} and coordinator_address={address!r} need "
                                       "num_processes too (or leave all three to the cluster's detection)")
            return
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise CoordinatorError(f"num_processes={n!r} must be an int >= 1")
        if rank is None and n > 1:
            raise CoordinatorError(f"num_processes={n} needs this process's process_id")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < n):
            raise CoordinatorError(f"process_id={rank!r} must be an int in [0, num_processes={n})")
        if address is None and n > 1:
            raise CoordinatorError(f"num_processes={n} needs coordinator_address (HOST:PORT of process 0)")
        if address is not None:
            _check_address(address)

    @property
    def explicit(self) -> bool:
        """True when the process membership is given here rather than detected from a cluster."""
        return self.num_processes is not None

    def shape_for(self, n_devices: int) -> MeshShape:
        """The mesh shape over `n_devices` devices: `mesh` if given, else all of them on the strategy's axis."""
        if self.mesh is not None:
            return self.mesh
        if self.strategy == "none":
            return MeshShape()
        if self.strategy == "hybrid":
            raise MeshError("strategy='hybrid' needs a mesh shape, e.g. parse_mesh('data=2,model=2')")
        if n_devices < 2:
            raise MeshError(f"strategy={self.strategy!r} needs at least 2 devices, found {n_devices}")
        return MeshShape(**{_STRATEGY_AXIS[self.strategy]: n_devices})


__all__ = ["STRATEGIES", "DistributedConfig", "parse_mesh", "strategy_of"]
