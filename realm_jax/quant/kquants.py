"""The k-quants Q4_K, Q5_K, Q6_K, Q8_K: layouts, repacking and tile dequantization.

A super-block covers 256 consecutive elements of a row. Block structs (little-endian):

    Q4_K  | d:f16 | dmin:f16 | scales:12 B | qs:128 B |              144 B, 4.5 bits/weight
    Q5_K  | d:f16 | dmin:f16 | scales:12 B | qh:32 B | qs:128 B |    176 B, 5.5 bits/weight
    Q6_K  | ql:128 B | qh:64 B | scales:16 x i8 | d:f16 |            210 B, 6.5625 bits/weight
    Q8_K  | d:f32 | qs:256 x i8 | bsums:16 x i16 |                   292 B (bsums: sums of 16 qs)

Q4_K and Q5_K: 8 sub-blocks of 32 elements, each with a 6-bit scale s and a 6-bit min m:
x = (d * s) * q - (dmin * m). The 16 six-bit values are packed into 12 bytes (bit 7 on the left):

    byte  0..3 :  s4..s7 bits 5:4 | s0..s3 bits 5:0        [ S S s s s s s s ]
    byte  4..7 :  m4..m7 bits 5:4 | m0..m3 bits 5:0        [ M M m m m m m m ]
    byte  8..11:  m4..m7 bits 3:0 | s4..s7 bits 3:0        [ m m m m s s s s ]

`scales` and `mins` planes hold these values unpacked (uint8 0..63, [..., n_superblocks * 8]); the other
planes keep their GGUF byte order.

Nibbles (Q4_K, Q5_K qs): 4 chunks of 32 bytes per super-block; chunk c byte j holds element 64c+j in its
low nibble and element 64c+32+j in its high nibble.
High bit (Q5_K qh, 32 bytes): bit b of byte j is bit 4 of element 32b+j.

Q6_K: 16 sub-blocks of 16 elements with int8 scales: x = (d * s) * (q - 32), q of 6 bits. Each half h of a
super-block (128 elements) uses ql[64h : 64h+64] and qh[32h : 32h+32]; for j = 0..31:

    element 128h + j      = ql[j]    bits 3:0 | qh[j] bits 1:0 << 4
    element 128h + j + 32 = ql[j+32] bits 3:0 | qh[j] bits 3:2 << 4
    element 128h + j + 64 = ql[j]    bits 7:4 | qh[j] bits 5:4 << 4
    element 128h + j + 96 = ql[j+32] bits 7:4 | qh[j] bits 7:6 << 4

Q8_K: x = d * q with an f32 d per super-block; it is llama.cpp's activation format, usable here as a
weight format too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.quant import kquantize
from realm_jax.quant.common import mul_add, split_nibbles
from realm_jax.quant.block import Field, Format, Packing

F16, F32, U8, I8, I16 = (np.dtype(t) for t in (np.float16, np.float32, np.uint8, np.int8, np.int16))
QK_K = 256


def unpack_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12-byte packed 6-bit scales/mins, uint8 [..., n*12] -> (scales, mins), each uint8 [..., n*8]."""
    q = packed.reshape(*packed.shape[:-1], -1, 3, 4)
    lo, mid, hi = q[..., 0, :], q[..., 1, :], q[..., 2, :]
    scales = np.concatenate([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], axis=-1)
    mins = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return scales.reshape(*packed.shape[:-1], -1), mins.reshape(*packed.shape[:-1], -1)


def pack_scales(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """The inverse of `unpack_scales` (values must fit in 6 bits)."""
    s = scales.astype(np.uint8).reshape(*scales.shape[:-1], -1, 2, 4)
    m = mins.astype(np.uint8).reshape(*mins.shape[:-1], -1, 2, 4)
    lo = (s[..., 0, :] & 63) | ((s[..., 1, :] >> 4) << 6)
    mid = (m[..., 0, :] & 63) | ((m[..., 1, :] >> 4) << 6)
    hi = (s[..., 1, :] & 0xF) | ((m[..., 1, :] & 0xF) << 4)
    return np.stack([lo, mid, hi], axis=-2).reshape(*scales.shape[:-1], -1)


def _unpack_fields(fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    planes = dict(fields)
    planes["scales"], planes["mins"] = unpack_scales(planes.pop("packed_scales"))
    return planes


def _pack_planes(planes) -> dict[str, np.ndarray]:
    fields = {k: v for k, v in planes.items() if k not in ("scales", "mins")}
    fields["packed_scales"] = pack_scales(planes["scales"], planes["mins"])
    return fields


# --- dequantization tiles: planes covering whole super-blocks -> float32 [..., n * 256] ----------
def _per_sub(scale: jax.Array, sub: jax.Array, n_sub: int) -> jax.Array:
    """super-block scale [..., n] times sub-block values [..., n*n_sub] -> f32 [..., n, n_sub, 1]."""
    sub = sub.reshape(*sub.shape[:-1], -1, n_sub).astype(jnp.float32)
    return (scale.astype(jnp.float32)[..., None] * sub)[..., None]


def _nibbles_k(qs: jax.Array) -> jax.Array:
    """Q4_K/Q5_K qs [..., n*128] -> 4-bit values [..., n, 8, 32] in element order."""
    q = split_nibbles(qs, 32)  # [..., n*4, 64]
    return q.reshape(*qs.shape[:-1], -1, 8, 32)


def _flatten(y: jax.Array) -> jax.Array:
    return y.reshape(*y.shape[:-3], -1)


def tile_q4_k(p, *, exact: bool = False) -> jax.Array:
    q = _nibbles_k(p["qs"]).astype(jnp.float32)
    dl, ml = _per_sub(p["d"], p["scales"], 8), _per_sub(p["dmin"], p["mins"], 8)
    return _flatten(mul_add(dl, q, -ml, exact=exact))


def q5_k_codes(qs: jax.Array, qh: jax.Array) -> jax.Array:
    """Q5_K qs [..., n*128], qh [..., n*32] -> its 5-bit codes, uint8 [..., n, 8, 32] in element order."""
    qh = qh.reshape(*qh.shape[:-1], qh.shape[-1] // 32, 1, 32)
    high = (qh >> jnp.arange(8, dtype=jnp.uint8)[:, None]) & 1  # [..., n, 8, 32]
    return _nibbles_k(qs) | (high << 4)


def q6_k_codes(ql: jax.Array, qh: jax.Array) -> jax.Array:
    """Q6_K ql [..., n*128], qh [..., n*64] -> its 6-bit codes q + 32, uint8 [..., n*2, 128] in element order
    (a half super-block a row)."""
    low = split_nibbles(ql, 64)  # [..., n*2, 128]
    qh = qh.reshape(*qh.shape[:-1], qh.shape[-1] // 32, 1, 32)
    high = (qh >> (2 * jnp.arange(4, dtype=jnp.uint8))[:, None]) & 3  # [..., n*2, 4, 32]
    return low | (high.reshape(*high.shape[:-2], 128) << 4)


def tile_q5_k(p, *, exact: bool = False) -> jax.Array:
    q = q5_k_codes(p["qs"], p["qh"]).astype(jnp.float32)
    dl, ml = _per_sub(p["d"], p["scales"], 8), _per_sub(p["dmin"], p["mins"], 8)
    return _flatten(mul_add(dl, q, -ml, exact=exact))


def tile_q6_k(p, *, exact: bool = False) -> jax.Array:
    del exact  # products only: nothing to contract
    q = q6_k_codes(p["ql"], p["qh"]).astype(jnp.int8) - 32
    q = q.reshape(*p["ql"].shape[:-1], -1, 16, 16).astype(jnp.float32)
    return _flatten(_per_sub(p["d"], p["scales"], 16) * q)


def tile_q8_k(p, *, exact: bool = False) -> jax.Array:
    del exact
    q = p["qs"].reshape(*p["qs"].shape[:-1], -1, 1, QK_K).astype(jnp.float32)
    return _flatten(p["d"].astype(jnp.float32)[..., None, None] * q)


_SCALE_PACKING = Packing(
    planes=(Field("d", F16, 1), Field("dmin", F16, 1), Field("scales", U8, 8), Field("mins", U8, 8)),
    unpack=_unpack_fields,
    pack=_pack_planes,
)


def _with_planes(packing: Packing, *extra: Field) -> Packing:
    return Packing(packing.planes + extra, packing.unpack, packing.pack)


FORMATS = (
    Format("Q4_K", 12, QK_K, 144,
           (Field("d", F16, 1), Field("dmin", F16, 1), Field("packed_scales", U8, 12), Field("qs", U8, 128)),
           tile_q4_k, kquantize.quantize_q4_k, _with_planes(_SCALE_PACKING, Field("qs", U8, 128))),
    Format("Q5_K", 13, QK_K, 176,
           (Field("d", F16, 1), Field("dmin", F16, 1), Field("packed_scales", U8, 12), Field("qh", U8, 32),
            Field("qs", U8, 128)),
           tile_q5_k, kquantize.quantize_q5_k,
           _with_planes(_SCALE_PACKING, Field("qh", U8, 32), Field("qs", U8, 128))),
    Format("Q6_K", 14, QK_K, 210,
           (Field("ql", U8, 128), Field("qh", U8, 64), Field("scales", I8, 16), Field("d", F16, 1)),
           tile_q6_k, kquantize.quantize_q6_k),
    Format("Q8_K", 15, QK_K, 292, (Field("d", F32, 1), Field("qs", I8, QK_K), Field("bsums", I16, 16)),
           tile_q8_k, kquantize.quantize_q8_k),
)
