"""Meshes: one jax.sharding.Mesh with the named axes data / stage / model, checked against the devices."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from realm_jax.errors import MeshError

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


def make_mesh(shape: MeshShape | None = None, devices=None, **sizes: int) -> Mesh:
    """A Mesh over `devices` (default: all) with axes data, stage, model.

    Args:
      shape: the axis sizes, or give them as keywords (make_mesh(model=4)).
      devices: the devices to use, in order; their number must equal the product of the sizes.
    """
    shape = shape or MeshShape(**sizes)
    devices = list(jax.devices() if devices is None else devices)
    if shape.size != len(devices):
        raise MeshError(f"a mesh of data={shape.data} x stage={shape.stage} x model={shape.model} = {shape.size} "
                        f"devices does not match the {len(devices)} devices given")
    grid = np.array(devices, dtype=object).reshape(shape.data, shape.stage, shape.model)
    # Auto axes: XLA's partitioner places the collectives (a row-parallel matmul's all-reduce included).
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def mesh_shape(mesh: Mesh) -> MeshShape:
    """The data/stage/model sizes of a mesh (axes it lacks count as 1); MeshError for unknown axes."""
    unknown = set(mesh.axis_names) - set(AXES)
    if unknown:
        raise MeshError(f"mesh axes {sorted(unknown)} are not among {AXES}")
    return MeshShape(**{a: int(mesh.shape[a]) for a in mesh.axis_names})


__all__ = ["AXES", "MeshShape", "make_mesh", "mesh_shape"]
