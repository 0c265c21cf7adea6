"""The microscaling 4-bit float formats MXFP4 (OCP MX, gpt-oss) and NVFP4: layouts, tiles, MXFP4's quantizer.

Every code is an E2M1 float (sign, 2 exponent bits, 1 mantissa bit), held doubled as an integer so that it
multiplies exactly:

    E2M1 = 0 1 2 3 4 6 8 12 0 -1 -2 -3 -4 -6 -8 -12       (codes 0..15; the value is E2M1[q] / 2 * 2^e)

Block structs:

    MXFP4  | e:u8 | qs:16 B |               32 elements, 17 B, 4.25 bits/weight
    NVFP4  | d:4 x u8 | qs:32 B |           64 elements, 36 B, 4.5 bits/weight (4 sub-blocks of 16)

MXFP4: x = E2M1[q] * 2^(e - 128), e an E8M0 exponent (the scale 2^(e - 127), halved for the doubled codes; e = 0
and 1 give subnormal scales). Codes: byte j holds element j in its low nibble and element j+16 in its high one.

NVFP4: sub-block s has an unsigned E4M3 scale byte d[s] = [ ignored (7) | exponent (6..3) | mantissa (2..0) ]:
scale = (1 + m/8) * 2^(E - 7) / 2, or m * 2^-9 / 2 for E = 0, and 0 for the bytes 0x00 and 0x7F (as gguf-py and
ggml_ue4m3_to_fp32). x = scale * E2M1[q]; codes: 8 bytes per sub-block, byte j holds element j (low nibble)
and j+8 (high). The planes are the fields.

The quantizer is llama.cpp's quantize_row_mxfp4_ref (ggml-quants.c of llama-cpp-python 0.3.36). Its
`floorf(log2f(amax))` is computed exactly from the bits of amax, with the values just below a power of two
that a correctly rounded log2f rounds up to it (glibc's log2f) taken from a table; as in
`realm_jax.quant.kquantize`, XLA on CPU flushes subnormal floats to zero, so blocks whose largest |x| is below
2^-123 (a subnormal scale) may differ from libggml.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from realm_jax.quant.block import Field, Format
from realm_jax.quant.common import lookup16, split_nibbles
from realm_jax.quant.kquantize import _superblocks

U8 = np.dtype(np.uint8)
E2M1 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)  # doubled E2M1 values


def ue4m3_half(byte: np.ndarray) -> np.ndarray:
    """NVFP4's scale byte -> float32 (the E4M3 value halved, 0 for 0x00 and 0x7F; bit 7 ignored)."""
    byte = np.asarray(byte, np.uint8)
    exp, man = (byte >> 3).astype(np.int32) & 0xF, (byte & 7).astype(np.int32)
    # Exact in float64, then exactly representable in float32.
    value = np.where(exp == 0, man * 2.0**-10, (8 + man) * np.exp2(exp - 11.0))
    return np.where((byte == 0) | (byte == 0x7F), 0.0, value).astype(np.float32)


UE4M3 = ue4m3_half(np.arange(256))  # the 256 scale values, indexed by the byte


def _ldexp(x: jax.Array, n: jax.Array) -> jax.Array:
    """x * 2^n for normal or zero f32 x and int32 n, built from the bits: exact wherever the result is
    representable, subnormal results included (XLA:CPU's multiply flushes those to zero); inf past f32's range."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    sign, mag = bits & jnp.uint32(0x80000000), bits & jnp.uint32(0x7FFFFFFF)
    field = (mag >> 23).astype(jnp.int32) + n
    normal = mag + (n.astype(jnp.uint32) << 23)  # wraps modulo 2^32 as C's unsigned add: exact for 1 <= field < 255
    mant = (mag & jnp.uint32(0x7FFFFF)) | jnp.uint32(0x800000)
    sub = mant >> jnp.clip(1 - field, 0, 31).astype(jnp.uint32)  # only zero bits shift out for these x
    out = jnp.where(field >= 255, jnp.uint32(0x7F800000), jnp.where(field >= 1, normal, sub))
    return lax.bitcast_convert_type(sign | jnp.where(mag == 0, jnp.uint32(0), out), jnp.float32)


def e8m0_half(e: jax.Array) -> jax.Array:
    """MXFP4's scale byte -> 2^(e - 128) as float32 (ggml_e8m0_to_fp32_half; subnormal for e < 2)."""
    e = e.astype(jnp.uint32)
    bits = jnp.where(e < 2, jnp.uint32(0x00200000) << e, (e - 1) << 23)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _flatten(y: jax.Array) -> jax.Array:
    return y.reshape(*y.shape[:-2], -1)


# --- dequantization tiles ---------------------------------------------------------------------------
def tile_mxfp4(p, *, exact: bool = False) -> jax.Array:
    codes = lookup16(split_nibbles(p["qs"], 16), E2M1)  # [..., n, 32]
    e = p["e"].astype(jnp.int32)[..., None]
    if exact:  # the product built from the bits: a subnormal scale would be flushed to zero by XLA:CPU
        return _flatten(_ldexp(codes, e - 128))
    return _flatten(e8m0_half(p["e"])[..., None] * codes)


def tile_nvfp4(p, *, exact: bool = False) -> jax.Array:
    del exact  # one product per element, of normal values
    d = jnp.asarray(UE4M3)[p["d"].astype(jnp.int32)]  # [..., n*4]
    codes = jnp.asarray(E2M1, jnp.float32)[split_nibbles(p["qs"], 8).astype(jnp.int32)]  # [..., n*4, 16]
    return _flatten(d[..., None] * codes)


# --- MXFP4's quantizer ------------------------------------------------------------------------------
@functools.cache
def _round_up_thresholds() -> np.ndarray:
    """int32 [278]: entry k + 149 holds the bits of the smallest float below 2^k whose correctly rounded
    log2 is k (floor(log2f(x)) = k from there on), for k = -148..128 (the last entry is unused)."""
    out = np.zeros(278, np.int64)
    for k in range(-148, 129):
        top = np.float64(2.0) ** k
        bits = int(np.float32(top).view(np.uint32)) if k < 128 else 0x7F800000
        x = bits
        while x > 0 and np.float32(np.log2(np.float64(np.uint32(x - 1).view(np.float32)))) >= k:
            x -= 1
        out[k + 149] = x
    return out.astype(np.int32)


def _floor_log2f(bits: jax.Array) -> jax.Array:
    """floorf(log2f(a)) for a > 0 finite, from the bits of a (int32): its binary exponent, plus one within the
    few floats below the next power of two that log2f rounds up to it."""
    field = bits >> 23
    lz = lax.clz(bits & 0x7FFFFF)  # subnormals: the exponent of the leading mantissa bit
    exponent = jnp.where(field > 0, field - 127, (31 - lz) - 149)
    thresholds = jnp.asarray(_round_up_thresholds())
    return exponent + (bits >= thresholds[exponent + 150]).astype(jnp.int32)


def _best_index(x, d):
    """ggml's best_index_mxfp4: the first code whose E2M1 * d is nearest to x (strict <)."""
    best, best_err = jnp.zeros(x.shape, jnp.int32), jnp.abs(_F32_0 * d - x)
    for i in range(1, 16):
        err = jnp.abs(jnp.float32(E2M1[i]) * d - x)
        take = err < best_err
        best, best_err = jnp.where(take, i, best), jnp.where(take, err, best_err)
    return best


_F32_0 = np.float32(0)


@jax.jit
def quantize_mxfp4(x):
    """Quantize to MXFP4 as llama.cpp's quantize_row_mxfp4_ref.

    Args:
      x: floating array [..., K], K a multiple of 32 (cast to f32 first).
    Returns:
      planes: e uint8 [..., K/32]; qs uint8 [..., K/2].
    """
    xb, shape = _superblocks(x, "MXFP4", 32)
    # amax as C finds it (`if (amax < fabsf(v))`: NaNs never win), compared as bits so that subnormals count.
    mag = lax.bitcast_convert_type(xb, jnp.int32) & 0x7FFFFFFF
    amax = jnp.max(jnp.where(mag > 0x7F800000, 0, mag), axis=-1)
    # (uint8_t)(floor(log2f(amax)) - 2 + 127): x86 converts through int32 (an infinite amax gives 0).
    e = jnp.where(amax >= 0x7F800000, 0, _floor_log2f(jnp.maximum(amax, 1)) + 125)
    e = jnp.where(amax > 0, e & 0xFF, 0)
    d = e8m0_half(e)[:, None]
    idx = _best_index(xb, d).astype(jnp.uint8)
    qs = idx[:, :16] | (idx[:, 16:] << 4)
    n = shape[-1] // 32
    return {"e": e.astype(jnp.uint8).reshape(*shape[:-1], n), "qs": qs.reshape(*shape[:-1], n * 16)}


FORMATS = (
    Format("MXFP4", 39, 32, 17, (Field("e", U8, 1), Field("qs", U8, 16)), tile_mxfp4, quantize_mxfp4),
    Format("NVFP4", 40, 64, 36, (Field("d", U8, 4), Field("qs", U8, 32)), tile_nvfp4),
)
