"""Meshes: one jax.sharding.Mesh with the named axes data / stage / model, checked against the devices."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Set

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from realm_jax.errors import MeshError
from realm_jax.inputs import shown

AXES = ("data", "stage", "model")


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Sizes of the data, stage (pipeline) and model (tensor) axes."""

    data: int = 1
    stage: int = 1
    model: int = 1

    def __post_init__(self):
        for axis in AXES:
            size = getattr(self, axis)
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise MeshError(f"mesh axis {axis}={size!r} must be an int >= 1")

    @property
    def size(self) -> int:
        return self.data * self.stage * self.model


def _check_devices(devices, what: str) -> list[jax.Device]:
    """`devices` as a flat list of distinct jax devices; MeshError naming `what` otherwise. A device twice in a
    mesh passes JAX's Mesh, then fails deep inside dispatch (a bare AssertionError) at the first computation."""
    if isinstance(devices, np.ndarray):  # a Mesh's own grid, or a grid built by hand: any shape
        what = what if devices.ndim == 1 else f"{what}.flat"  # the indices below count in the flat order
        devices = devices.reshape(-1).tolist()
    elif isinstance(devices, (str, bytes, Mapping, Set)) or not isinstance(devices, Iterable):
        # A set would do, but in no order the caller chose: the order places each device on the axes.
        raise MeshError(f"{what} must be a list of jax devices (as jax.devices() gives), got {type(devices).__name__}")
    devices = list(devices)
    first: dict[jax.Device, int] = {}
    for i, d in enumerate(devices):
        if not isinstance(d, jax.Device):
            raise MeshError(f"{what}[{i}]={shown(d)} is a {type(d).__name__}, not a jax device")
        if d in first:
            raise MeshError(f"{what}: device {d!r} is given twice ({what}[{first[d]}] and [{i}]); a mesh holds each "
                            "device once")
        first[d] = i
    return devices


def make_mesh(shape: MeshShape | None = None, devices=None, **sizes: int) -> Mesh:
    """A Mesh over `devices` (default: all) with axes data, stage, model.

    Args:
      shape: the axis sizes, or give them as keywords instead (make_mesh(model=4)), not both.
      devices: the devices to use, in order, each once; their number must equal the product of the sizes.

    Raises:
      MeshError: an unknown axis, a shape that is not a MeshShape (`parse_mesh` reads "model=2,data=2"), sizes
        that are not ints >= 1, devices that are not distinct jax devices, or as many as the sizes ask for.
    """
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise MeshError(f"make_mesh: {', '.join(map(repr, unknown))} is not a mesh axis; the axes are "
                        f"{', '.join(AXES)}")
    if shape is None:
        shape = MeshShape(**sizes)
    elif not isinstance(shape, MeshShape):
        raise MeshError(f"make_mesh: shape={shown(shape)} must be a MeshShape; give the sizes as keywords "
                        "(make_mesh(model=2)) or parse text with parse_mesh('model=2')")
    elif sizes:  # which would win is a guess: refuse both
        raise MeshError(f"make_mesh: give shape={shape} or axis sizes {sizes}, not both")
    devices = _check_devices(jax.devices() if devices is None else devices, "devices")
    if shape.size != len(devices):
        raise MeshError(f"a mesh of data={shape.data} x stage={shape.stage} x model={shape.model} = {shape.size} "
                        f"devices does not match the {len(devices)} devices given")
    grid = np.array(devices, dtype=object).reshape(shape.data, shape.stage, shape.model)
    # Auto axes: XLA's partitioner places the collectives (a row-parallel matmul's all-reduce included).
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def mesh_shape(mesh: Mesh) -> MeshShape:
    """The data/stage/model sizes of a mesh (axes it lacks count as 1); MeshError for anything but a Mesh,
    unknown axes, or a device that is in it twice."""
    if not isinstance(mesh, Mesh):
        raise MeshError(f"mesh={shown(mesh)} must be a jax.sharding.Mesh, e.g. "
                        f"realm_jax.distributed.make_mesh(model=2), got {type(mesh).__name__}")
    _check_devices(mesh.devices, "mesh.devices")
    unknown = set(mesh.axis_names) - set(AXES)
    if unknown:
        raise MeshError(f"mesh axes {sorted(unknown)} are not among {AXES}")
    return MeshShape(**{a: int(mesh.shape[a]) for a in mesh.axis_names})


__all__ = ["AXES", "MeshShape", "make_mesh", "mesh_shape"]
