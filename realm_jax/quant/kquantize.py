"""llama.cpp's reference k-quant quantizers (Q4_K, Q5_K, Q6_K, Q8_K) in jnp, vectorized over blocks.

They follow `quantize_row_{q4,q5,q6,q8}_K_ref` of ggml/src/ggml-quants.c (llama.cpp as vendored by
llama-cpp-python 0.3.36) step by step, to reproduce its bytes exactly:

* every sum over the elements of a block is accumulated in C's order (an unrolled loop over the element
  index, vectorized across blocks), never with jnp.sum's tree;
* libggml's ggml-base is built without -mfma, so each C product is rounded before it is added. XLA contracts
  a*b+c into an FMA (on CPU too), so products that feed an add go through `rounded` first;
* XLA rewrites x / broadcast(d) into x * broadcast(1/d); `true_div` materializes the divisor to keep a true
  division;
* `_nearest_int` is C's 12582912 trick bit for bit (round half to even, same wrap-around out of range);
* searches keep C's strict `<` / `>` tie rules (first winner stays).

Known difference: XLA on CPU flushes subnormal floats to zero (FTZ/DAZ), libggml does not. Blocks of N(0, s)
data match for s >= 1e-30; at s ~ 1e-36 and below (values near or under the f32 subnormal range) some blocks
differ, and they all match libggml run with FTZ+DAZ set. Not checked on GPU.
"""

from __future__ import annotations

import math

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from realm_jax.errors import DTypeError, ShapeMismatchError
from realm_jax.quant.common import rounded, true_div

__all__ = ["quantize_q4_k", "quantize_q5_k", "quantize_q6_k", "quantize_q8_k"]

QK_K = 256
_GROUP_MAX_EPS = np.float32(1e-15)
_ROUND_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer in the low mantissa bits
_F32 = np.float32


def _recip(a):
    """1 / a with a materialized (XLA would rewrite 1 / (b / c) into c / b, which rounds differently)."""
    return _F32(1) / rounded(a)


def _nearest_int(f):
    """ggml's nearest_int: int32 of f rounded half to even (|f| <= 4194303; C's wrap-around beyond)."""
    bits = lax.bitcast_convert_type(rounded(f) + _ROUND_MAGIC, jnp.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _seq_sum(p, start=None):
    """C's `for (i...) acc += p[i]` over the last axis, from `start` (an array) or from 0."""
    acc = jnp.zeros(p.shape[:-1], jnp.float32) if start is None else start
    for i in range(p.shape[-1]):
        acc = acc + p[..., i]
    return acc


def _seq_first_max(v, key):
    """C's `if (key[j] > best) {best = key[j]; val = v[j];}` from best = 0, over the last axis."""
    best, val = jnp.zeros(key.shape[:-1], jnp.float32), jnp.zeros(v.shape[:-1], jnp.float32)
    for j in range(key.shape[-1]):
        take = key[..., j] > best
        best, val = jnp.where(take, key[..., j], best), jnp.where(take, v[..., j], val)
    return best, val


def _weighted_error(w, scale, lq, mn, x, use_mad: bool = False):
    """sum_i w_i * (scale * l_i + min - x_i)^2 in C's order (use_mad: |...| instead of the square)."""
    diff = (rounded(scale[..., None] * lq) + mn[..., None]) - x
    return _seq_sum(rounded(w * (jnp.abs(diff) if use_mad else diff * diff)))


def _make_qkx2_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool = False):
    """make_qkx2_quants on rows x [M, n] with weights w: (scale [M], min [M], L int32 [M, n]).

    `min` is returned as C's `the_min`, i.e. the negated offset (>= 0 for data with negative values).
    """
    mn = jnp.min(x, axis=-1)
    mx = jnp.max(x, axis=-1)
    sum_w = _seq_sum(w[..., 1:], w[..., 0])
    wx = rounded(w * x)
    sum_x = _seq_sum(wx[..., 1:], wx[..., 0])
    mn = jnp.where(mn > 0, _F32(0), mn)
    flat = mx == mn
    iscale = _F32(nmax) / (mx - mn)
    scale = _recip(iscale)
    lq = jnp.clip(_nearest_int(iscale[..., None] * (x - mn[..., None])), 0, nmax)
    best = _weighted_error(w, scale, lq.astype(jnp.float32), mn, x, use_mad)

    def step(carry, num):
        # As in C, a step that wins moves `min`, which later steps measure from.
        best, scale, mn_best, lq = carry
        la = jnp.clip(_nearest_int((num / (mx - mn_best))[..., None] * (x - mn_best[..., None])), 0, nmax)
        lf = la.astype(jnp.float32)
        wl = rounded(w * lf)
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(rounded(wl * lf)), _seq_sum(rounded(wl * x))
        a, b = rounded(sum_w * sum_l2, sum_l * sum_l)
        det = a - b
        a, b, c, d = rounded(sum_w * sum_xl, sum_x * sum_l, sum_l2 * sum_x, sum_l * sum_xl)
        this_scale, this_min = (a - b) / det, (c - d) / det
        clamp = this_min > 0
        this_scale = jnp.where(clamp, sum_xl / sum_l2, this_scale)
        this_min = jnp.where(clamp, _F32(0), this_min)
        err = _weighted_error(w, this_scale, lf, this_min, x, use_mad)
        take = (det > 0) & (err < best)
        return (jnp.where(take, err, best), jnp.where(take, this_scale, scale),
                jnp.where(take, this_min, mn_best), jnp.where(take[..., None], la, lq)), None

    # rmin + rdelta*is + nmax, rounded as C does in f32.
    nums = np.array([(_F32(rmin) + _F32(rdelta) * _F32(i)) + _F32(nmax) for i in range(nstep + 1)], np.float32)
    (_, scale, mn_best, lq), _ = lax.scan(step, (best, scale, mn, lq), jnp.asarray(nums))
    return (jnp.where(flat, _F32(0), scale), jnp.where(flat, -mn, -mn_best),
            jnp.where(flat[..., None], 0, lq))


def _make_qx_quants_rmse1(x, nmax: int):
    """make_qx_quants(rmse_type=1, qw=NULL) on rows x [M, n]: (scale [M], L int32 [M, n] in 0..2*nmax-1)."""
    ax = jnp.abs(x)
    amax = jnp.max(ax, axis=-1)
    mx = jnp.take_along_axis(x, jnp.argmax(ax, axis=-1)[..., None], axis=-1)[..., 0]  # first |x| maximum
    w = x * x

    def sums(iscale):
        l = jnp.clip(_nearest_int(iscale[..., None] * x), -nmax, nmax - 1)
        lf = l.astype(jnp.float32)
        return _seq_sum(rounded(w * x * lf)), _seq_sum(rounded(w * lf * lf)), l + nmax

    sumlx, suml2, lq = sums(_F32(-nmax) / mx)
    scale = jnp.where(suml2 != 0, sumlx / suml2, _F32(0))
    best = scale * sumlx

    def step(carry, num):
        scale, best, lq = carry
        sumlx, suml2, la = sums(num / mx)
        a, b = rounded(sumlx * sumlx, best * suml2)
        take = (suml2 > 0) & (a > b)
        new_scale = sumlx / suml2
        return (jnp.where(take, new_scale, scale), jnp.where(take, new_scale * sumlx, best),
                jnp.where(take[..., None], la, lq)), None

    nums = np.array([-(_F32(nmax) + _F32(0.1) * _F32(i)) for i in range(-9, 10) if i], np.float32)
    (scale, _, lq), _ = lax.scan(step, (scale, best, lq), jnp.asarray(nums))
    zero = amax < _GROUP_MAX_EPS
    return jnp.where(zero, _F32(0), scale), jnp.where(zero[..., None], 0, lq)


def _superblocks(x, fmt: str, block: int = QK_K, width: int | None = None):
    """Validate x [..., K] (K a multiple of `block`) and return it as f32 rows [N, width or block] (super-blocks,
    or their sub-blocks), with its shape."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise DTypeError(f"{x.dtype=}: {fmt} quantizes floating-point input only ({x.shape=})")
    if x.ndim == 0 or x.shape[-1] % block:
        raise ShapeMismatchError(f"{x.shape=}: the last dim must be a multiple of {block} for {fmt}")
    return x.astype(jnp.float32).reshape(-1, width or block), x.shape


def _planes(shape, **planes):
    """Per-super-block planes [N, ...] -> [*shape[:-1], per-row size] (explicit sizes: N may be 0)."""
    n_sb = shape[-1] // QK_K
    return {k: v.reshape(*shape[:-1], n_sb * math.prod(v.shape[1:])) for k, v in planes.items()}


def _quantize_q45_k(xb, nmax: int, rmin: float, nstep: int):
    """Q4_K / Q5_K on super-blocks [N, 256] -> d, dmin f16 [N]; scales, mins u8 [N, 8]; L int32 [N, 256]."""
    xs = xb.reshape(-1, 8, 32)
    av_x = jnp.sqrt(_seq_sum(rounded(xs * xs)) / _F32(32))
    w = av_x[..., None] + jnp.abs(xs)
    scales, mins, lq = _make_qkx2_quants(xs, w, nmax, rmin, 0.1, nstep)
    max_scale, _ = _seq_first_max(scales, scales)
    max_min, _ = _seq_first_max(mins, mins)
    inv_scale = jnp.where(max_scale > 0, _F32(63) / max_scale, _F32(0))
    inv_min = jnp.where(max_min > 0, _F32(63) / max_min, _F32(0))
    ls = jnp.minimum(_nearest_int(inv_scale[..., None] * scales) & 0xFF, 63)  # C stores into uint8_t
    lm = jnp.minimum(_nearest_int(inv_min[..., None] * mins) & 0xFF, 63)
    d = true_div(max_scale, _F32(63)).astype(jnp.float16)
    dmin = true_div(max_min, _F32(63)).astype(jnp.float16)
    # Requantize with the stored (fp16 and 6-bit) scales; sub-blocks whose scale is 0 keep their L.
    ds = d.astype(jnp.float32)[..., None] * ls.astype(jnp.float32)
    dm = rounded(dmin.astype(jnp.float32)[..., None] * lm.astype(jnp.float32))
    lnew = jnp.clip(_nearest_int(true_div(xs + dm[..., None], ds[..., None])), 0, nmax)
    lq = jnp.where((ds == 0)[..., None], lq, lnew)
    return d, dmin, ls.astype(jnp.uint8), lm.astype(jnp.uint8), lq.reshape(-1, QK_K)


def _nibbles(lq):
    """L [N, 256] (values < 16 used) -> qs [N, 128]: chunk c byte j = L[64c+j] | L[64c+32+j] << 4."""
    q = (lq & 0xF).astype(jnp.uint8).reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, QK_K // 2)


def pack_q5_k_high(lq):
    """Q5_K codes [..., 256 n] (values < 32) -> qh uint8 [..., 32 n]: bit b of byte j is bit 4 of element
    32 b + j of the super-block."""
    lead, n = lq.shape[:-1], lq.shape[-1] // QK_K  # explicit sizes: a -1 fails for no rows
    high = ((lq >> 4) & 1).astype(jnp.uint8).reshape(*lead, n, 8, 32)
    return functools.reduce(jnp.bitwise_or, [high[..., b, :] << b for b in range(8)]).reshape(*lead, n * 32)


def pack_q6_k(lq):
    """Q6_K codes [..., 256 n] (q + 32, values < 64) -> (ql uint8 [..., 128 n], qh uint8 [..., 64 n]) in GGUF
    byte order: a half super-block's four groups g of 32, ql[32 (g % 2) + j] nibble g // 2, qh[j] bits 2g."""
    lead, halves = lq.shape[:-1], lq.shape[-1] // 128  # explicit sizes: a -1 fails for no rows
    q = lq.astype(jnp.uint8).reshape(*lead, halves, 4, 32)
    lo, hi = q & 0xF, q >> 4
    ql = jnp.concatenate([lo[..., 0, :] | (lo[..., 2, :] << 4), lo[..., 1, :] | (lo[..., 3, :] << 4)], axis=-1)
    qh = functools.reduce(jnp.bitwise_or, [hi[..., g, :] << (2 * g) for g in range(4)])
    return ql.reshape(*lead, halves * 64), qh.reshape(*lead, halves * 32)


@jax.jit
def quantize_q4_k(x):
    """Quantize to Q4_K exactly as llama.cpp's quantize_row_q4_K_ref.

    Args:
      x: floating array [..., K], K a multiple of 256 (cast to f32 first).
    Returns:
      planes: d, dmin float16 [..., K/256]; scales, mins uint8 [..., K/32] (6-bit values, sub-block order);
      qs uint8 [..., K/2] in GGUF byte order.
    """
    xb, shape = _superblocks(x, "Q4_K")
    d, dmin, sc, mn, lq = _quantize_q45_k(xb, 15, -1.0, 20)
    return _planes(shape, d=d, dmin=dmin, scales=sc, mins=mn, qs=_nibbles(lq))


@jax.jit
def quantize_q5_k(x):
    """Quantize to Q5_K exactly as llama.cpp's quantize_row_q5_K_ref.

    Args:
      x: floating array [..., K], K a multiple of 256 (cast to f32 first).
    Returns:
      planes: d, dmin float16 [..., K/256]; scales, mins uint8 [..., K/32]; qh uint8 [..., K/8] (bit b of
      byte j is bit 4 of element 32b+j of the super-block); qs uint8 [..., K/2] (low 4 bits, as Q4_K).
    """
    xb, shape = _superblocks(x, "Q5_K")
    d, dmin, sc, mn, lq = _quantize_q45_k(xb, 31, -0.5, 15)
    return _planes(shape, d=d, dmin=dmin, scales=sc, mins=mn, qh=pack_q5_k_high(lq), qs=_nibbles(lq))


@jax.jit
def quantize_q6_k(x):
    """Quantize to Q6_K exactly as llama.cpp's quantize_row_q6_K_ref.

    Args:
      x: floating array [..., K], K a multiple of 256 (cast to f32 first).
    Returns:
      planes: d float16 [..., K/256]; scales int8 [..., K/16]; ql uint8 [..., K/2]; qh uint8 [..., K/4],
      in GGUF byte order (element = (ql nibble | 2 qh bits << 4) - 32).
    """
    xb, shape = _superblocks(x, "Q6_K")
    xs = xb.reshape(-1, 16, 16)
    scales, lq = _make_qx_quants_rmse1(xs, 32)
    max_abs, max_scale = _seq_first_max(scales, jnp.abs(scales))
    iscale = _F32(-128) / max_scale
    d = _recip(iscale).astype(jnp.float16)
    sc = jnp.minimum(_nearest_int(iscale[..., None] * scales), 127).astype(jnp.int8)
    ds = d.astype(jnp.float32)[..., None] * sc.astype(jnp.float32)
    lnew = jnp.clip(_nearest_int(true_div(xs, ds[..., None])), -32, 31) + 32
    lq = jnp.where((ds == 0)[..., None], lq, lnew)
    zero = max_abs < _GROUP_MAX_EPS  # C zeroes the whole block
    lq = jnp.where(zero[:, None, None], 0, lq).astype(jnp.uint8).reshape(xs.shape[0], QK_K)
    ql, qh = pack_q6_k(lq)
    d = jnp.where(zero, jnp.float16(0), d)
    return _planes(shape, d=d, scales=jnp.where(zero[:, None], jnp.int8(0), sc), ql=ql, qh=qh)


@jax.jit
def quantize_q8_k(x):
    """Quantize to Q8_K exactly as llama.cpp's quantize_row_q8_K_ref (bsums are 0 for all-zero blocks).

    Args:
      x: floating array [..., K], K a multiple of 256 (cast to f32 first).
    Returns:
      planes: d float32 [..., K/256]; qs int8 [..., K]; bsums int16 [..., K/16] (sums of 16 qs).
    """
    xb, shape = _superblocks(x, "Q8_K")
    ax = jnp.abs(xb)
    zero = jnp.max(ax, axis=-1) == 0
    mx = jnp.take_along_axis(xb, jnp.argmax(ax, axis=-1)[:, None], axis=-1)[:, 0]  # first |x| maximum
    iscale = _F32(-127) / mx
    qs = jnp.minimum(_nearest_int(iscale[:, None] * xb), 127).astype(jnp.int8)
    qs = jnp.where(zero[:, None], jnp.int8(0), qs)
    bsums = qs.astype(jnp.int32).reshape(-1, 16, 16).sum(-1).astype(jnp.int16)
    d = jnp.where(zero, _F32(0), _recip(iscale))
    return _planes(shape, d=d, qs=qs, bsums=bsums)
