"""The 4-bit non-linear formats IQ4_NL and IQ4_XS: layouts, tile dequantization, llama.cpp's quantizer.

Each 4-bit code indexes a fixed non-uniform codebook of 16 int8 values (denser near zero, where weights are):

    KVALUES = -127 -104 -83 -65 -49 -35 -22 -10 1 13 25 38 53 69 89 113         x = scale * KVALUES[q]

Block structs (little-endian):

    IQ4_NL  | d:f16 | qs:16 B |                                    32 elements, 18 B, 4.5 bits/weight
    IQ4_XS  | d:f16 | scales_h:u16 | scales_l:4 B | qs:128 B |     256 elements, 136 B, 4.25 bits/weight

Codes (qs): 16 bytes per 32 elements; byte j holds element j in its low nibble and element j+16 in its high one.
IQ4_NL: scale = d. IQ4_XS: 8 sub-blocks of 32, each with a 6-bit scale s (scale = d * (s - 32)), split as

    scales_l[i] = [ s(2i+1) bits 3:0 | s(2i) bits 3:0 ]        scales_h bits 2i+1:2i = s(i) bits 5:4

IQ4_XS's `scales` plane holds the 8 six-bit values unpacked (uint8 0..63); every other plane is the field.

The quantizer is llama.cpp's `quantize_iq4_nl` / `quantize_iq4_xs` without an importance matrix (ggml-quants.c
of llama-cpp-python 0.3.36, `quantize_row_iq4_nl_impl` with ntry=7: what `llama_model_quantize` writes, and
`quantize_row_iq4_xs_ref`), with `realm_jax.quant.kquantize`'s conventions for bit-exactness and its known
difference (XLA on CPU flushes subnormal floats to zero: rows of N(0, 1e-15) values differ, as for Q2_K and
Q3_K). (`quantize_row_iq4_nl_ref` is a cruder variant, ntry=-1, that no model file is written with.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from realm_jax.quant.block import Field, Format, Packing
from realm_jax.quant.common import lookup16, rounded, split_nibbles, true_div
from realm_jax.quant.kquantize import _F32, _GROUP_MAX_EPS, _nearest_int, _seq_first_max, _seq_sum, _superblocks

F16, U8, U16 = np.dtype(np.float16), np.dtype(np.uint8), np.dtype(np.uint16)
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
QK_K = 256
_NTRY = 7


def unpack_xs_scales(scales_h: np.ndarray, scales_l: np.ndarray) -> np.ndarray:
    """IQ4_XS scales_h uint16 [..., n], scales_l uint8 [..., n*4] -> 6-bit scales uint8 [..., n*8]."""
    low = (scales_l.reshape(*scales_l.shape[:-1], -1, 4, 1) >> np.array([0, 4], np.uint8)) & 0xF
    high = (scales_h[..., None] >> (2 * np.arange(8, dtype=np.uint16))) & 3
    return (low.reshape(*high.shape) | (high.astype(np.uint8) << 4)).reshape(*scales_h.shape[:-1], -1)


def pack_xs_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `unpack_xs_scales` (values must fit in 6 bits): (scales_h, scales_l)."""
    s = scales.astype(np.uint8).reshape(*scales.shape[:-1], -1, 8)
    scales_l = (s[..., 0::2] & 0xF) | ((s[..., 1::2] & 0xF) << 4)
    high = ((s >> 4) & 3).astype(np.uint16) << (2 * np.arange(8, dtype=np.uint16))
    scales_h = np.bitwise_or.reduce(high, axis=-1).astype(np.uint16)
    return scales_h, scales_l.reshape(*scales.shape[:-1], -1)


def _unpack_fields(fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"d": fields["d"], "scales": unpack_xs_scales(fields["scales_h"], fields["scales_l"]), "qs": fields["qs"]}


def _pack_planes(planes) -> dict[str, np.ndarray]:
    scales_h, scales_l = pack_xs_scales(planes["scales"])
    return {"d": planes["d"], "scales_h": scales_h, "scales_l": scales_l, "qs": planes["qs"]}


def _flatten(y: jax.Array) -> jax.Array:
    return y.reshape(*y.shape[:-2], -1)


def _values(qs: jax.Array) -> jax.Array:
    """qs uint8 [..., n*16] -> codebook values f32 [..., n, 32] in element order."""
    return lookup16(split_nibbles(qs, 16), KVALUES)


# --- dequantization tiles ---------------------------------------------------------------------------
def tile_iq4_nl(p, *, exact: bool = False) -> jax.Array:
    del exact  # one product per element
    return _flatten(p["d"].astype(jnp.float32)[..., None] * _values(p["qs"]))


def tile_iq4_xs(p, *, exact: bool = False) -> jax.Array:
    del exact  # (d * scale) * value: products only
    sc = p["scales"].reshape(*p["scales"].shape[:-1], -1, 8).astype(jnp.int8) - 32
    dl = p["d"].astype(jnp.float32)[..., None] * sc.astype(jnp.float32)  # [..., n, 8]
    return _flatten(dl.reshape(*dl.shape[:-2], -1)[..., None] * _values(p["qs"]))


# --- the quantizer ----------------------------------------------------------------------------------
def _best_index(x):
    """ggml's best_index_int8(16, KVALUES, x): the nearest codebook entry (ties to the upper one), 0 and 15
    outside the codebook's range, 15 for NaN."""
    kv = jnp.asarray(KVALUES, jnp.float32)
    mu = jnp.clip(jnp.sum(x[..., None] >= kv, axis=-1), 1, 15)  # kv[mu-1] <= x < kv[mu] inside the range
    lower = (x - kv[mu - 1]) < (kv[mu] - x)
    idx = jnp.where(lower, mu - 1, mu)
    idx = jnp.where(x <= kv[0], 0, jnp.where(x >= kv[15], 15, idx))
    return jnp.where(jnp.isnan(x), 15, idx)


def _sums(x, w, idx):
    """sum w*q*x and sum w*q*q in C's order, q = KVALUES[idx]."""
    q = jnp.asarray(KVALUES, jnp.float32)[idx]
    wq = rounded(w * q)
    return _seq_sum(rounded(wq * x)), _seq_sum(rounded(wq * q))


def _block_scales(xb):
    """The per-32 search of quantize_row_iq4_nl_impl (no importance matrix, ntry=7) on xb [M, 32]:
    (scale [M], amax [M])."""
    w = rounded(xb * xb)
    ax = jnp.abs(xb)
    amax = jnp.max(ax, axis=-1)
    mx = jnp.take_along_axis(xb, jnp.argmax(ax, axis=-1)[..., None], axis=-1)[..., 0]  # first |x| maximum
    d = true_div(-mx, _F32(KVALUES[0]))
    sumqx, sumq2 = _sums(xb, w, _best_index(true_div(_F32(1), d)[..., None] * xb))
    ok = sumq2 > 0
    d = jnp.where(ok, sumqx / jnp.where(ok, sumq2, _F32(1)), _F32(0))
    best = d * sumqx

    def step(carry, num):
        d, best = carry
        sumqx, sumq2 = _sums(xb, w, _best_index(true_div(num, mx)[..., None] * xb))
        a, b = rounded(sumqx * sumqx, best * sumq2)
        take = (sumq2 > 0) & (a > b)
        new = sumqx / jnp.where(sumq2 > 0, sumq2, _F32(1))
        return (jnp.where(take, new, d), jnp.where(take, new * sumqx, best)), None

    nums = np.arange(-_NTRY, _NTRY + 1, dtype=np.float32) + np.float32(KVALUES[0])  # (itry + values[0]), exact
    (d, _), _ = lax.scan(step, (d, best), jnp.asarray(nums))
    return jnp.where(amax < _GROUP_MAX_EPS, _F32(0), d), amax


def _inverse(d):
    return jnp.where(d != 0, true_div(_F32(1), jnp.where(d != 0, d, _F32(1))), _F32(0))


def _codes(xb, scale):
    """Codes [M, 32] of xb for the inverse scale [M] -> packed qs uint8 [M, 16]."""
    idx = _best_index(scale[..., None] * xb).astype(jnp.uint8)
    return idx[..., :16] | (idx[..., 16:] << 4)


@jax.jit
def quantize_iq4_nl(x):
    """Quantize to IQ4_NL as llama.cpp's quantize_iq4_nl without an importance matrix.

    Args:
      x: floating array [..., K], K a multiple of 32 (cast to f32 first).
    Returns:
      planes: d float16 [..., K/32]; qs uint8 [..., K/2].
    """
    xb, shape = _superblocks(x, "IQ4_NL", 32)
    scale, _ = _block_scales(xb)
    # An all-zero block: C leaves the codes of the search untouched, then rewrites them from id = 0 (code 8).
    qs = _codes(xb, _inverse(scale))
    n = shape[-1] // 32
    return {"d": scale.astype(jnp.float16).reshape(*shape[:-1], n), "qs": qs.reshape(*shape[:-1], n * 16)}


@jax.jit
def quantize_iq4_xs(x):
    """Quantize to IQ4_XS exactly as llama.cpp's quantize_row_iq4_xs_ref (quantize_iq4_xs, no importance matrix).

    Args:
      x: floating array [..., K], K a multiple of 256 (cast to f32 first).
    Returns:
      planes: d float16 [..., K/256]; scales uint8 [..., K/32] (6-bit values, s - 32 the signed scale);
      qs uint8 [..., K/2].
    """
    xb, shape = _superblocks(x, "IQ4_XS", QK_K, 32)
    scales, _ = _block_scales(xb)
    scales = scales.reshape(-1, 8)
    _, max_scale = _seq_first_max(scales, jnp.abs(scales))
    d = true_div(-max_scale, _F32(32))
    l = jnp.clip(_nearest_int(_inverse(d)[:, None] * scales), -32, 31)
    dl = d[:, None] * l.astype(jnp.float32)  # the f32 d, as C (not its f16 rounding)
    qs = _codes(xb, _inverse(dl).reshape(-1))
    n = shape[-1] // QK_K
    return {"d": d.astype(jnp.float16).reshape(*shape[:-1], n),
            "scales": (l + 32).astype(jnp.uint8).reshape(*shape[:-1], n * 8),
            "qs": qs.reshape(*shape[:-1], n * 128)}


FORMATS = (
    Format("IQ4_NL", 20, 32, 18, (Field("d", F16, 1), Field("qs", U8, 16)), tile_iq4_nl, quantize_iq4_nl),
    Format("IQ4_XS", 23, QK_K, 136,
           (Field("d", F16, 1), Field("scales_h", U16, 1), Field("scales_l", U8, 4), Field("qs", U8, 128)),
           tile_iq4_xs, quantize_iq4_xs,
           Packing((Field("d", F16, 1), Field("scales", U8, 8), Field("qs", U8, 128)), _unpack_fields,
                   _pack_planes)),
)
