"""The 32-element formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: layouts, tile dequantization and quantizers.

Block structs (little-endian), one block = 32 consecutive elements of a row:

    Q4_0  | d:f16 | qs:16 B |                     x[i] = d * (q[i] - 8)
    Q4_1  | d:f16 | m:f16 | qs:16 B |             x[i] = d * q[i] + m
    Q5_0  | d:f16 | qh:u32 | qs:16 B |            x[i] = d * (q[i] - 16)
    Q5_1  | d:f16 | m:f16 | qh:u32 | qs:16 B |    x[i] = d * q[i] + m
    Q8_0  | d:f16 | qs:32 x i8 |                  x[i] = d * q[i]

Nibbles of qs (4-bit formats): byte j holds element j in its low nibble and element j+16 in its high one:

    qs[j] = [ q[j+16] (bits 7..4) | q[j] (bits 3..0) ]          j = 0..15

High bits of Q5 (qh, one u32): bit i is bit 4 of element i, so q[i] = (nibble of i) | ((qh >> i) & 1) << 4.

The planes are the fields unchanged: d, m (float16 [..., n_blocks]), qh (uint32 [..., n_blocks]),
qs (uint8 [..., n_blocks*16], or int8 [..., n_blocks*32] for Q8_0).

The quantizers reproduce gguf-py's (`gguf.quants`), which matches ggml's reference quantizers, bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.quant.common import join_nibbles, mul_add, round_away, split_nibbles, true_div
from realm_jax.quant.block import Field, Format

F16, U8, I8, U32 = np.dtype(np.float16), np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.uint32)
_BLOCK = 32


def _blocks(a: jax.Array, per_block: int) -> jax.Array:
    return a.reshape(*a.shape[:-1], -1, per_block)


def _f32_per_block(a: jax.Array) -> jax.Array:
    """A per-block scale [..., n_blocks] as float32 [..., n_blocks, 1], to broadcast over a block."""
    return a.astype(jnp.float32)[..., None]


def high_bits(qh: jax.Array) -> jax.Array:
    """Q5 qh uint32 [..., n_blocks] -> bit 4 of each element, uint8 [..., n_blocks, 32]."""
    shifts = jnp.arange(_BLOCK, dtype=jnp.uint32)
    return ((qh[..., None] >> shifts) & 1).astype(jnp.uint8)


def _flatten(y: jax.Array) -> jax.Array:
    return y.reshape(*y.shape[:-2], -1)


# --- dequantization tiles: planes covering whole blocks -> float32 [..., n_blocks * 32] -------------
def tile_q4_0(p, *, exact: bool = False) -> jax.Array:
    del exact  # a single product per element: nothing to contract
    q = split_nibbles(p["qs"], 16).astype(jnp.int8) - 8
    return _flatten(_f32_per_block(p["d"]) * q.astype(jnp.float32))


def tile_q4_1(p, *, exact: bool = False) -> jax.Array:
    q = split_nibbles(p["qs"], 16).astype(jnp.float32)
    return _flatten(mul_add(_f32_per_block(p["d"]), q, _f32_per_block(p["m"]), exact=exact))


def tile_q5_0(p, *, exact: bool = False) -> jax.Array:
    del exact
    q = (split_nibbles(p["qs"], 16) | (high_bits(p["qh"]) << 4)).astype(jnp.int8) - 16
    return _flatten(_f32_per_block(p["d"]) * q.astype(jnp.float32))


def tile_q5_1(p, *, exact: bool = False) -> jax.Array:
    q = (split_nibbles(p["qs"], 16) | (high_bits(p["qh"]) << 4)).astype(jnp.float32)
    return _flatten(mul_add(_f32_per_block(p["d"]), q, _f32_per_block(p["m"]), exact=exact))


def tile_q8_0(p, *, exact: bool = False) -> jax.Array:
    del exact
    return _flatten(_f32_per_block(p["d"]) * _blocks(p["qs"], _BLOCK).astype(jnp.float32))


# --- quantizers: x float32 [..., cols] -> planes ------------------------------------------------
def _signed_absmax(x: jax.Array) -> jax.Array:
    """The element of largest magnitude (the first one on ties), keeping its sign: [..., n, 1]."""
    idx = jnp.argmax(jnp.abs(x), axis=-1, keepdims=True)
    return jnp.take_along_axis(x, idx, axis=-1)


def _inverse(d: jax.Array) -> jax.Array:
    return jnp.where(d == 0, jnp.float32(0), 1 / jnp.where(d == 0, jnp.float32(1), d))


def pack_high_bits(q: jax.Array) -> jax.Array:
    """Values 0..31 [..., n, 32] -> Q5 qh uint32 [..., n]: bit i = bit 4 of element i."""
    bits = (q.astype(jnp.uint32) >> 4) << jnp.arange(_BLOCK, dtype=jnp.uint32)
    return jnp.sum(bits, axis=-1, dtype=jnp.uint32)  # distinct bits: the sum is an OR


def _symmetric(x: jax.Array, levels: int) -> tuple[jax.Array, jax.Array]:
    """Q4_0 (levels=16) and Q5_0 (levels=32): d = max / -(levels/2), q = trunc(x/d + levels/2 + 0.5)."""
    d = _signed_absmax(x) / -(levels // 2)  # a power of two: exact
    q = jnp.trunc(mul_add(x, _inverse(d), jnp.float32(levels // 2 + 0.5), exact=True))
    return d[..., 0].astype(jnp.float16), jnp.clip(q, 0, levels - 1).astype(jnp.uint8)


def _affine(x: jax.Array, levels: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Q4_1 (levels=16) and Q5_1 (levels=32): d = (max-min)/(levels-1), q = trunc((x-min)/d + 0.5)."""
    lo, hi = jnp.min(x, axis=-1, keepdims=True), jnp.max(x, axis=-1, keepdims=True)
    d = true_div(hi - lo, levels - 1)
    q = jnp.trunc(mul_add(x - lo, _inverse(d), jnp.float32(0.5), exact=True))
    q = jnp.clip(q, 0, levels - 1).astype(jnp.uint8)
    return d[..., 0].astype(jnp.float16), lo[..., 0].astype(jnp.float16), q


@jax.jit
def quantize_q4_0(x: jax.Array) -> dict[str, jax.Array]:
    d, q = _symmetric(_blocks(x, _BLOCK), 16)
    return {"d": d, "qs": join_nibbles(q, 16)}


@jax.jit
def quantize_q4_1(x: jax.Array) -> dict[str, jax.Array]:
    d, m, q = _affine(_blocks(x, _BLOCK), 16)
    return {"d": d, "m": m, "qs": join_nibbles(q, 16)}


@jax.jit
def quantize_q5_0(x: jax.Array) -> dict[str, jax.Array]:
    d, q = _symmetric(_blocks(x, _BLOCK), 32)
    return {"d": d, "qh": pack_high_bits(q), "qs": join_nibbles(q & 0xF, 16)}


@jax.jit
def quantize_q5_1(x: jax.Array) -> dict[str, jax.Array]:
    d, m, q = _affine(_blocks(x, _BLOCK), 32)
    return {"d": d, "m": m, "qh": pack_high_bits(q), "qs": join_nibbles(q & 0xF, 16)}


@jax.jit
def quantize_q8_0(x: jax.Array) -> dict[str, jax.Array]:
    x = _blocks(x, _BLOCK)
    d = true_div(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 127)
    q = round_away(x * _inverse(d)).astype(jnp.int8)
    return {"d": d[..., 0].astype(jnp.float16), "qs": _flatten(q)}


FORMATS = (
    Format("Q4_0", 2, _BLOCK, 18, (Field("d", F16, 1), Field("qs", U8, 16)), tile_q4_0, quantize_q4_0),
    Format("Q4_1", 3, _BLOCK, 20, (Field("d", F16, 1), Field("m", F16, 1), Field("qs", U8, 16)),
           tile_q4_1, quantize_q4_1),
    Format("Q5_0", 6, _BLOCK, 22, (Field("d", F16, 1), Field("qh", U32, 1), Field("qs", U8, 16)),
           tile_q5_0, quantize_q5_0),
    Format("Q5_1", 7, _BLOCK, 24,
           (Field("d", F16, 1), Field("m", F16, 1), Field("qh", U32, 1), Field("qs", U8, 16)),
           tile_q5_1, quantize_q5_1),
    Format("Q8_0", 8, _BLOCK, 34, (Field("d", F16, 1), Field("qs", I8, _BLOCK)), tile_q8_0, quantize_q8_0),
)
