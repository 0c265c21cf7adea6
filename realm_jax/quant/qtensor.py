"""`QTensor`, the struct-of-arrays form of a GGUF tensor.

A GGUF tensor is an array of block structs. Kernels want planes instead: every field of the struct in an
array of its own, with the same leading dims as the tensor and the blocks of a row laid end to end on the
last axis. A `QTensor` of logical shape ``(..., rows, cols)`` in a format with ``block_size`` B therefore
holds, per plane, an array of shape ``(..., rows, cols // B * per_block)``. Splitting N (rows) or K (cols)
on whole blocks is a plain slice of every plane, which is what sharding and kernel tiling need.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from realm_jax.errors import QTensorError
from realm_jax.inputs import shown
from realm_jax.quant.block import Format
from realm_jax.quant.table import get_format

__all__ = ["QTensor", "int_shape"]


def int_shape(shape: Any, what: str) -> tuple[int, ...]:
    """`shape` as a tuple of ints (any sequence of ints, numpy's included); QTensorError naming `what` for
    anything else (1.5, "32", True, an int alone)."""
    try:
        if isinstance(shape, (str, bytes)) or any(isinstance(d, (bool, np.bool_)) for d in shape):
            raise TypeError
        return tuple(operator.index(d) for d in shape)
    except TypeError:
        raise QTensorError(f"{what}: shape={shown(shape)} must be a tuple of ints") from None


@functools.partial(jax.tree_util.register_dataclass, data_fields=["planes"], meta_fields=["fmt", "shape", "axes"])
@dataclasses.dataclass(frozen=True)
class QTensor:
    """A quantized tensor as planes: a pytree whose leaves are the plane arrays.

    Attributes:
      fmt: the GGUF type name ("Q4_K", "F32", ...), static.
      shape: the logical shape (..., rows, cols), static; the order of `gguf.quants.dequantize`. Any sequence
        of ints is kept as a tuple of ints; anything else is a QTensorError at construction.
      planes: plane name -> array of shape (..., rows, cols // block_size * count); numpy on the host
        (as `read_gguf` returns them) or jax arrays on devices. Not checked at construction (jax rebuilds
        QTensors with placeholder leaves): `check` (which `dequantize`, `unpack` and `qmatmul`
        call) does.
      axes: the mesh axes its (rows, cols) are split over once placed on a mesh (None: not split), static:
        the Pallas kernels run per shard inside shard_map with it (`realm_jax.linear.pallas`).
    """

    fmt: str
    shape: tuple[int, ...]
    planes: dict[str, Any]
    axes: tuple[str | None, str | None] | None = None

    def __post_init__(self):
        # Only the static metadata is checked here: jax rebuilds a QTensor from its leaves (tracers, abstract
        # values, None or any placeholder) through this constructor, so the planes are checked by `check`.
        # shape is normalised to a tuple of ints, as a static field must be hashable.
        shape = self.shape
        if type(shape) is tuple and all(type(d) is int for d in shape):
            return
        object.__setattr__(self, "shape", int_shape(shape, "QTensor"))

    @property
    def format(self) -> Format:
        return get_format(self.fmt)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by the planes (on the device, once there)."""
        return sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in self.planes.values())

    @property
    def gguf_nbytes(self) -> int:
        """Bytes of the tensor in a GGUF file."""
        fmt = self.format
        return self.size // fmt.block_size * fmt.type_size

    def plane_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape each plane must have for this format and logical shape."""
        fmt = self.format
        n_blocks = self.shape[-1] // fmt.block_size
        return {p.name: (*self.shape[:-1], n_blocks * p.count) for p in fmt.planes}

    def check(self, what: str = "QTensor") -> QTensor:
        """Raise QTensorError unless the planes match the format and shape; return self."""
        fmt = self.format
        if not self.shape or min(self.shape) <= 0:
            raise QTensorError(f"{what}: shape={self.shape} must be a non-empty tuple of positive ints")
        if self.shape[-1] % fmt.block_size:
            raise QTensorError(f"{what}: cols={self.shape[-1]} must be a multiple of {fmt.name}'s "
                               f"block_size={fmt.block_size}")
        expected = {p.name: np.dtype(p.dtype) for p in fmt.planes}
        if not isinstance(self.planes, Mapping):
            raise QTensorError(f"{what}: planes must be a dict of {fmt.name}'s planes {sorted(expected)}, got "
                               f"{type(self.planes).__name__}")
        if set(self.planes) != set(expected):
            raise QTensorError(f"{what}: {fmt.name} planes must be {sorted(expected)}, got "
                               f"{sorted(map(str, self.planes))}")
        for name, shape in self.plane_shapes().items():
            plane = self.planes[name]
            if not _is_array(plane):
                raise QTensorError(f"{what}: {fmt.name} plane {name!r} must be an array (numpy or jax), got "
                                   f"{type(plane).__name__}")
            if tuple(plane.shape) != shape or np.dtype(plane.dtype) != expected[name]:
                raise QTensorError(f"{what}: {fmt.name} plane {name!r} must be {expected[name]}{list(shape)} for "
                                   f"shape={self.shape}, got {np.dtype(plane.dtype)}{list(plane.shape)}")
        return self

    def __repr__(self) -> str:
        return f"QTensor({self.fmt}, shape={self.shape})"


def _is_array(v) -> bool:
    """An array or an abstract one (a tracer, a ShapeDtypeStruct): a shape of ints and a numpy dtype."""
    try:
        np.dtype(v.dtype)
        return isinstance(v.shape, tuple) and all(isinstance(d, int) for d in v.shape)
    except (AttributeError, TypeError):
        return False
