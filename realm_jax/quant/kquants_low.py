"""The 2- and 3-bit k-quants Q2_K and Q3_K: layouts, tile dequantization, llama.cpp's reference quantizers.

A super-block covers 256 consecutive elements of a row, in 16 sub-blocks of 16. Block structs (little-endian):

    Q2_K  | scales:16 B | qs:64 B | d:f16 | dmin:f16 |           84 B, 2.625 bits/weight
    Q3_K  | hmask:32 B | qs:64 B | scales:12 B | d:f16 |        110 B, 3.4375 bits/weight

Two-bit codes (qs of both): 2 chunks of 32 bytes per super-block; bits 2k+1:2k of byte j of chunk c hold
element 128c + 32k + j:

    qs[32c + j] = [ q(128c+96+j) | q(128c+64+j) | q(128c+32+j) | q(128c+j) ]     (2 bits each, high to low)

Q2_K: sub-block s has a 4-bit scale and a 4-bit min in scales[s] = [ min (7..4) | scale (3..0) ]:
x = (d * scale) * q - (dmin * min), q of 2 bits.

Q3_K: q = (2-bit code) - 4 * (1 - h), h = bit k of hmask[j] for element 32k + j (k = 0..7): x = (d * (s - 32)) * q
with a 6-bit scale s per sub-block, packed in 12 bytes (bit 7 on the left; s0..s15):

    byte  0..7 :  s8..s15 bits 3:0 | s0..s7 bits 3:0            [ S S S S s s s s ]
    byte  8..11:  byte 8+i = s(12+i) | s(8+i) | s(4+i) | s(i), bits 5:4 each, high to low

The `scales` plane of Q3_K holds the 16 six-bit values unpacked (uint8 0..63, s - 32 is the signed scale);
every other plane is the field as stored.

The quantizers follow `quantize_row_q2_K_ref` / `quantize_row_q3_K_ref` of ggml-quants.c (llama.cpp as
vendored by llama-cpp-python 0.3.36; what `llama_model_quantize` writes without an importance matrix) with
the conventions of `realm_jax.quant.kquantize` (C's summation order, products rounded before adds, true
divisions, nearest_int bit for bit, first-winner ties), including its known difference: XLA on CPU flushes
subnormal floats to zero, libggml does not (measured: rows of N(0, 1e-15) values, whose products of three
values are subnormal, differ; rows of N(0, s) for s from 3e-4 to 1e6 match).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from realm_jax.quant.block import Field, Format, Packing
from realm_jax.quant.common import mul_add, rounded, true_div
from realm_jax.quant.kquantize import (
    QK_K, _F32, _GROUP_MAX_EPS, _make_qkx2_quants, _nearest_int, _planes, _recip, _seq_first_max, _seq_sum,
    _superblocks,
)

F16, U8 = np.dtype(np.float16), np.dtype(np.uint8)


def _codes(qs: jax.Array) -> jax.Array:
    """qs uint8 [..., n*64] -> 2-bit codes uint8 [..., n, 16, 16] in element order (sub-blocks of 16)."""
    q = qs.reshape(*qs.shape[:-1], -1, 2, 1, 32)
    shifts = jnp.arange(0, 8, 2, dtype=jnp.uint8)[:, None]  # [4, 1]: the four 2-bit codes of a byte (an iota:
    # a kernel captures no constant array)
    return ((q >> shifts) & 3).reshape(*qs.shape[:-1], -1, 16, 16)


def _pack_codes(lq: jax.Array) -> jax.Array:
    """The inverse of `_codes`: codes [N, 256] (values 0..3) -> qs uint8 [N, 64]."""
    q = lq.astype(jnp.uint8).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _flatten(y: jax.Array) -> jax.Array:
    return y.reshape(*y.shape[:-3], -1)


# --- Q3_K's 12-byte scales -------------------------------------------------------------------------
def unpack_q3_scales(packed: np.ndarray) -> np.ndarray:
    """12-byte packed 6-bit scales uint8 [..., n*12] -> uint8 [..., n*16] (values 0..63)."""
    p = packed.reshape(*packed.shape[:-1], -1, 12)
    low = np.concatenate([p[..., :8] & 0xF, p[..., :8] >> 4], axis=-1)  # s0..s15 bits 3:0
    high = (p[..., 8:12, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3  # [..., n, 4 (byte i), 4 (quarter r)]
    high = np.swapaxes(high, -1, -2).reshape(*p.shape[:-1], 16)  # s(4r + i)
    return (low | (high << 4)).reshape(*packed.shape[:-1], -1)


def pack_q3_scales(scales: np.ndarray) -> np.ndarray:
    """The inverse of `unpack_q3_scales` (values must fit in 6 bits)."""
    s = scales.astype(np.uint8).reshape(*scales.shape[:-1], -1, 16)
    low = (s[..., :8] & 0xF) | ((s[..., 8:] & 0xF) << 4)
    quarters = ((s >> 4) & 3).reshape(*s.shape[:-1], 4, 4)  # [..., n, r, i] = bits 5:4 of s(4r + i)
    high = np.bitwise_or.reduce(quarters << np.array([0, 2, 4, 6], np.uint8)[:, None], axis=-2)
    return np.concatenate([low, high.astype(np.uint8)], axis=-1).reshape(*scales.shape[:-1], -1)


def _unpack_fields(fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    planes = dict(fields)
    planes["scales"] = unpack_q3_scales(planes.pop("packed_scales"))
    return planes


def _pack_planes(planes) -> dict[str, np.ndarray]:
    fields = {k: v for k, v in planes.items() if k != "scales"}
    fields["packed_scales"] = pack_q3_scales(planes["scales"])
    return fields


# --- dequantization tiles: planes covering whole super-blocks -> float32 [..., n * 256] ----------
def tile_q2_k(p, *, exact: bool = False) -> jax.Array:
    sc = p["scales"].reshape(*p["scales"].shape[:-1], -1, 16)
    dl = (p["d"].astype(jnp.float32)[..., None] * (sc & 0xF).astype(jnp.float32))[..., None]
    ml = (p["dmin"].astype(jnp.float32)[..., None] * (sc >> 4).astype(jnp.float32))[..., None]
    return _flatten(mul_add(dl, _codes(p["qs"]).astype(jnp.float32), -ml, exact=exact))


def tile_q3_k(p, *, exact: bool = False) -> jax.Array:
    del exact  # products only: nothing to contract
    sc = p["scales"].reshape(*p["scales"].shape[:-1], -1, 16).astype(jnp.int8) - 32
    dl = (p["d"].astype(jnp.float32)[..., None] * sc.astype(jnp.float32))[..., None]
    hm = p["hmask"].reshape(*p["hmask"].shape[:-1], -1, 1, 32)
    high = ((hm >> jnp.arange(8, dtype=jnp.uint8)[:, None]) & 1).reshape(*hm.shape[:-3], -1, 16, 16)
    q = _codes(p["qs"]).astype(jnp.int8) - 4 * (1 - high.astype(jnp.int8))
    return _flatten(dl * q.astype(jnp.float32))


# --- quantizers ------------------------------------------------------------------------------------------
@jax.jit
def quantize_q2_k(x):
    """Quantize to Q2_K exactly as llama.cpp's quantize_row_q2_K_ref.

    Args:
      x: floating array [..., K], K a multiple of 256 (cast to f32 first).
    Returns:
      planes: scales uint8 [..., K/16] (min << 4 | scale); qs uint8 [..., K/4]; d, dmin float16 [..., K/256].
    """
    xb, shape = _superblocks(x, "Q2_K")
    xs = xb.reshape(-1, 16, 16)
    scales, mins, lq = _make_qkx2_quants(xs, jnp.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
    max_scale, _ = _seq_first_max(scales, scales)
    max_min, _ = _seq_first_max(mins, mins)
    has_scale, has_min = max_scale > 0, max_min > 0
    ls = jnp.where(has_scale[:, None], _nearest_int(true_div(_F32(15), max_scale)[:, None] * scales), 0)
    lm = jnp.where(has_min[:, None], _nearest_int(true_div(_F32(15), max_min)[:, None] * mins), 0)
    byte = (ls & 0xFF) | ((lm << 4) & 0xFF)  # C stores into uint8_t
    d = jnp.where(has_scale, true_div(max_scale, _F32(15)), _F32(0)).astype(jnp.float16)
    dmin = jnp.where(has_min, true_div(max_min, _F32(15)), _F32(0)).astype(jnp.float16)
    # Requantize with the stored scales; sub-blocks whose scale is 0 keep make_qkx2_quants' codes.
    dq = d.astype(jnp.float32)[:, None] * (byte & 0xF).astype(jnp.float32)
    dm = dmin.astype(jnp.float32)[:, None] * (byte >> 4).astype(jnp.float32)
    lnew = jnp.clip(_nearest_int(true_div(xs + dm[..., None], dq[..., None])), 0, 3)
    lq = jnp.where((dq == 0)[..., None], lq, lnew)
    return _planes(shape, scales=byte.astype(jnp.uint8), qs=_pack_codes(lq), d=d, dmin=dmin)


def _make_q3_quants(x, nmax: int):
    """make_q3_quants(do_rmse=true) on rows x [M, n]: (scale [M], L int32 [M, n] in 0..2*nmax-1)."""
    ax = jnp.abs(x)
    amax = jnp.max(ax, axis=-1)
    mx = jnp.take_along_axis(x, jnp.argmax(ax, axis=-1)[..., None], axis=-1)[..., 0]  # first |x| maximum
    iscale = true_div(_F32(-nmax), mx)
    lq = jnp.clip(_nearest_int(iscale[..., None] * x), -nmax, nmax - 1)
    w = rounded(x * x)
    wx = rounded(w * x)
    lf = lq.astype(jnp.float32)
    sumlx, suml2 = _seq_sum(rounded(wx * lf)), _seq_sum(rounded(rounded(w * lf) * lf))

    def step(t, carry):
        # C's `for (itry < 5) for (i < n)`, one element a step. C stops after a pass that changes nothing;
        # such a pass leaves the state as it was, so running all five passes gives the same codes.
        sumlx, suml2, lq = carry
        i = t % x.shape[-1]
        xi, wi, wxi = (lax.dynamic_index_in_dim(a, i, axis=-1, keepdims=False) for a in (x, w, wx))
        li = lax.dynamic_index_in_dim(lq, i, axis=-1, keepdims=False)
        lf = li.astype(jnp.float32)
        slx = sumlx - rounded(wxi * lf)
        sl2 = suml2 - rounded(rounded(wi * lf) * lf)
        new = jnp.clip(_nearest_int(true_div(rounded(xi * sl2), slx)), -nmax, nmax - 1)
        nf = new.astype(jnp.float32)
        slx2 = slx + rounded(wxi * nf)
        sl22 = sl2 + rounded(rounded(wi * nf) * nf)
        a, b = rounded(rounded(slx2 * slx2) * suml2), rounded(rounded(sumlx * sumlx) * sl22)
        take = (slx > 0) & (new != li) & (sl22 > 0) & (a > b)
        lq = lax.dynamic_update_index_in_dim(lq, jnp.where(take, new, li), i, axis=-1)
        return jnp.where(take, slx2, sumlx), jnp.where(take, sl22, suml2), lq

    sumlx, suml2, lq = lax.fori_loop(0, 5 * x.shape[-1], step, (sumlx, suml2, lq))
    scale = jnp.where(suml2 > 0, sumlx / jnp.where(suml2 > 0, suml2, _F32(1)), _F32(0))
    zero = amax < _GROUP_MAX_EPS  # C returns early with L = 0 (not offset by nmax)
    return jnp.where(zero, _F32(0), scale), jnp.where(zero[..., None], 0, lq + nmax)


@jax.jit
def quantize_q3_k(x):
    """Quantize to Q3_K exactly as llama.cpp's quantize_row_q3_K_ref.

    Args:
      x: floating array [..., K], K a multiple of 256 (cast to f32 first).
    Returns:
      planes: hmask uint8 [..., K/8]; qs uint8 [..., K/4]; scales uint8 [..., K/16] (6-bit values, s - 32 the
      signed scale); d float16 [..., K/256].
    """
    xb, shape = _superblocks(x, "Q3_K")
    xs = xb.reshape(-1, 16, 16)
    scales, lq = _make_q3_quants(xs, 4)
    _, max_scale = _seq_first_max(scales, jnp.abs(scales))
    nonzero = max_scale != 0
    iscale = true_div(_F32(-32), jnp.where(nonzero, max_scale, _F32(1)))
    raw = jnp.clip(_nearest_int(iscale[:, None] * scales), -32, 31) + 32
    raw = jnp.where(nonzero[:, None], raw, 0)  # C zeroes the 12 bytes: s = 0, i.e. a scale of -32 * d = -0
    d = jnp.where(nonzero, _recip(iscale), _F32(0)).astype(jnp.float16)
    dq = d.astype(jnp.float32)[:, None] * (raw - 32).astype(jnp.float32)
    lnew = jnp.clip(_nearest_int(true_div(xs, dq[..., None])), -4, 3) + 4
    lq = jnp.where((dq == 0)[..., None], lq, lnew).reshape(-1, QK_K)
    high = (lq > 3).reshape(-1, 8, 32).astype(jnp.uint8)  # element 32k + j -> bit k of hmask[j]
    hmask = sum(high[:, k] << k for k in range(8)).astype(jnp.uint8)
    return _planes(shape, hmask=hmask, qs=_pack_codes(lq & 3), scales=raw.astype(jnp.uint8), d=d)


FORMATS = (
    Format("Q2_K", 10, QK_K, 84,
           (Field("scales", U8, 16), Field("qs", U8, 64), Field("d", F16, 1), Field("dmin", F16, 1)),
           tile_q2_k, quantize_q2_k),
    Format("Q3_K", 11, QK_K, 110,
           (Field("hmask", U8, 32), Field("qs", U8, 64), Field("packed_scales", U8, 12), Field("d", F16, 1)),
           tile_q3_k, quantize_q3_k,
           Packing((Field("hmask", U8, 32), Field("qs", U8, 64), Field("scales", U8, 16), Field("d", F16, 1)),
                   _unpack_fields, _pack_planes)),
)
