"""How a QTensor's planes reach a kernel: which planes it reads, their width per K tile, and ragged N.

Every plane of a 2-D QTensor (N, K) is [N, K / block_size * count]: a tile of block_k columns of the
weight is the column slice [k * width, (k + 1) * width) of each plane, width = block_k / block_size * count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from realm_jax.quant import QTensor, get_format

__all__ = ["PlaneTile", "kernel_planes", "plane_tiles", "with_row_tail"]


def kernel_planes(fmt: str) -> tuple[str, ...]:
    """The planes the dequantization reads (Q8_K's bsums, sums for integer dot products, are not)."""
    return tuple(p.name for p in get_format(fmt).planes if not (fmt == "Q8_K" and p.name == "bsums"))


@dataclasses.dataclass(frozen=True)
class PlaneTile:
    """One plane as a kernel sees it: `width` columns per K tile; `whole_row` planes arrive as
    [rows, K / block_k, width] with the whole row in one block (TPU, for widths that are not lane-aligned)."""

    name: str
    width: int
    whole_row: bool


def plane_tiles(fmt: str, block_k: int, k: int, *, lane: int | None) -> tuple[PlaneTile, ...]:
    """The planes of `fmt` for K tiles of `block_k`; with `lane` set, planes whose tile width is neither
    a multiple of `lane` nor the whole row are read as whole rows (they are the small per-block scales)."""
    f = get_format(fmt)
    tiles = []
    for p in f.planes:
        if p.name not in kernel_planes(fmt):
            continue
        width = block_k // f.block_size * p.count
        whole_row = lane is not None and width % lane != 0 and block_k != k
        tiles.append(PlaneTile(p.name, width, whole_row))
    return tuple(tiles)


def with_row_tail(call: Callable[[dict, int], jax.Array], w: QTensor, block_n: int) -> jax.Array:
    """Run `call(planes, n_rows)` (-> [M, n_rows]) over whole blocks of `block_n` rows of `w`, and over
    the rows that do not fill a block, zero-padded to one block; results joined along N.

    The whole-block part reads `w`'s planes in place (its grid stops short of the tail); only the tail,
    fewer than `block_n` rows, is copied. Zero planes dequantize to zero in every format.
    """
    n = w.shape[0]
    main = n - n % block_n
    planes = {name: w.planes[name] for name in kernel_planes(w.fmt)}
    parts = []
    if main:
        parts.append(call(planes, main))
    if n > main:
        tail = {name: jnp.pad(p[main:], ((0, block_n - (n - main)), (0, 0))) for name, p in planes.items()}
        parts.append(call(tail, block_n)[:, : n - main])
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
