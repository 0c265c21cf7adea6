"""`QTensor`, the struct-of-arrays form of a GGUF tensor, and `Format`, the description of one block format.

A GGUF tensor is an array of block structs. Kernels want planes instead: every field of the struct in an
array of its own, with the same leading dims as the tensor and the blocks of a row laid end to end on the
last axis. A `QTensor` of logical shape ``(..., rows, cols)`` in a format with ``block_size`` B therefore
holds, per plane, an array of shape ``(..., rows, cols // B * per_block)``. Splitting N (rows) or K (cols)
on whole blocks is a plain slice of every plane, which is what sharding and kernel tiling need.

Repacking is lossless: `Format.split` and `Format.join` are exact inverses on GGUF bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from realm_jax.errors import QTensorError

__all__ = ["Field", "Format", "Packing", "QTensor"]


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of a GGUF block struct, in on-disk order: `nbytes` bytes read as `count` x `dtype`."""

    name: str
    dtype: np.dtype
    count: int

    @property
    def nbytes(self) -> int:
        return np.dtype(self.dtype).itemsize * self.count


def _split_fields(fields: tuple[Field, ...], blocks: np.ndarray) -> dict[str, np.ndarray]:
    """(..., n_blocks, type_size) uint8 -> {field: (..., n_blocks * count)} in the field's dtype."""
    out, offset = {}, 0
    lead = blocks.shape[:-2]
    for f in fields:
        raw = np.ascontiguousarray(blocks[..., offset : offset + f.nbytes])
        # '<' dtypes: GGUF is little-endian whatever the host is.
        out[f.name] = raw.view(np.dtype(f.dtype).newbyteorder("<")).astype(f.dtype).reshape(*lead, -1)
        offset += f.nbytes
    return out


def _join_fields(fields: tuple[Field, ...], planes: Mapping[str, np.ndarray]) -> np.ndarray:
    """The inverse of `_split_fields`: {field: (..., n_blocks * count)} -> (..., n_blocks, type_size) uint8."""
    parts = []
    for f in fields:
        arr = np.asarray(planes[f.name]).astype(np.dtype(f.dtype).newbyteorder("<"))
        parts.append(arr.reshape(*arr.shape[:-1], -1, f.count).view(np.uint8))
    return np.concatenate(parts, axis=-1)


@dataclasses.dataclass(frozen=True)
class Packing:
    """For a format whose planes are not its fields: the planes, and the exact conversions both ways."""

    planes: tuple[Field, ...]
    unpack: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]  # fields -> planes
    pack: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]  # planes -> fields


@dataclasses.dataclass(frozen=True)
class Format:
    """A GGUF block format: its struct layout, its planes, and its math.

    Attributes:
      name: the GGUF type name ("Q4_K").
      ggml_type: the ggml type id stored in GGUF files.
      block_size: elements per block.
      type_size: bytes per block on disk.
      fields: the block struct's fields in on-disk order.
      tile: the dequantization of a tile: planes holding whole blocks -> float32 [..., n_blocks * block_size].
        ``tile(planes, exact=True)`` evaluates every product and sum in the order gguf-py does, without FMA
        contraction (bit-exact); ``exact=False`` leaves the compiler free to fuse (kernels, matmuls).
      quantize: x float32 [..., cols] -> planes (jnp), or None where realm-jax cannot produce the format.
      packing: set where the planes differ from the fields (Q4_K/Q5_K unpack their 12-byte 6-bit scales).
    """

    name: str
    ggml_type: int
    block_size: int
    type_size: int
    fields: tuple[Field, ...]
    tile: Callable[..., jax.Array]
    quantize: Callable[[jax.Array], dict[str, jax.Array]] | None = None
    packing: Packing | None = None

    def __post_init__(self):
        assert sum(f.nbytes for f in self.fields) == self.type_size, self.name

    @property
    def planes(self) -> tuple[Field, ...]:
        return self.packing.planes if self.packing else self.fields

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def split(self, blocks: np.ndarray) -> dict[str, np.ndarray]:
        """GGUF blocks (..., n_blocks, type_size) uint8 -> planes (numpy)."""
        fields = _split_fields(self.fields, blocks)
        return self.packing.unpack(fields) if self.packing else fields

    def join(self, planes: Mapping[str, Any]) -> np.ndarray:
        """Planes -> GGUF blocks (..., n_blocks, type_size) uint8: the exact inverse of `split`."""
        planes = {k: np.asarray(v) for k, v in planes.items()}
        fields = self.packing.pack(planes) if self.packing else planes
        return _join_fields(self.fields, fields)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["planes"], meta_fields=["fmt", "shape", "axes"])
@dataclasses.dataclass(frozen=True)
class QTensor:
    """A quantized tensor as planes: a pytree whose leaves are the plane arrays.

    Attributes:
      fmt: the GGUF type name ("Q4_K", "F32", ...), static.
      shape: the logical shape (..., rows, cols), static; the order of `gguf.quants.dequantize`.
      planes: plane name -> array of shape (..., rows, cols // block_size * count); numpy on the host
        (as `read_gguf` returns them) or jax arrays on devices.
      axes: the mesh axes its (rows, cols) are split over once placed on a mesh (None: not split), static:
        the fused kernels run per shard inside shard_map with it (`realm_jax.ops.qmatmul`).
    """

    fmt: str
    shape: tuple[int, ...]
    planes: dict[str, Any]
    axes: tuple[str | None, str | None] | None = None

    @property
    def format(self) -> Format:
        from realm_jax.quant.formats import get_format

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
        if not self.shape or any((not isinstance(d, int)) or d <= 0 for d in self.shape):
            raise QTensorError(f"{what}: shape={self.shape} must be a non-empty tuple of positive ints")
        if self.shape[-1] % fmt.block_size:
            raise QTensorError(f"{what}: cols={self.shape[-1]} must be a multiple of {fmt.name}'s "
                               f"block_size={fmt.block_size}")
        expected = {p.name: np.dtype(p.dtype) for p in fmt.planes}
        if set(self.planes) != set(expected):
            raise QTensorError(f"{what}: {fmt.name} planes must be {sorted(expected)}, got {sorted(self.planes)}")
        for name, shape in self.plane_shapes().items():
            plane = self.planes[name]
            if tuple(plane.shape) != shape or np.dtype(plane.dtype) != expected[name]:
                raise QTensorError(f"{what}: {fmt.name} plane {name!r} must be {expected[name]}{list(shape)} for "
                                   f"shape={self.shape}, got {np.dtype(plane.dtype)}{list(plane.shape)}")
        return self

    def __repr__(self) -> str:
        return f"QTensor({self.fmt}, shape={self.shape})"
