"""`Format`, the description of one GGUF block format: its struct layout, its planes and its math.

A GGUF tensor is an array of block structs. Kernels want planes instead: every field of the struct in an
array of its own (see `realm_jax.quant.qtensor`). `Format.split` and `Format.join` convert between the two
and are exact inverses on GGUF bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["Field", "Format", "Packing"]


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
        # One copy, whatever the field: planes never share memory with `blocks` (a reader reuses its buffer).
        raw = np.array(blocks[..., offset : offset + f.nbytes], order="C")
        # '<' dtypes: GGUF is little-endian whatever the host is (on a little-endian one, no second copy).
        out[f.name] = raw.view(np.dtype(f.dtype).newbyteorder("<")).astype(f.dtype, copy=False).reshape(*lead, -1)
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
      packing: set where the planes differ from the fields (Q4_K/Q5_K/Q3_K/IQ4_XS unpack their 6-bit scales).
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
