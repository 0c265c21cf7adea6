"""The plain array types besides F32/F16/BF16: the integers I8, I16, I32, I64 and the double F64.

GGUF stores them as little-endian arrays ("block size" 1); llama.cpp uses them for index and position tensors
and a few exotic weights. Their value as a float32 is numpy's `astype(np.float32)` (gguf-py has no dequantizer
for them: its reader hands out these arrays): exact for I8 and I16, round to nearest even for I32, I64 and F64
(F64: infinities past float32's range, subnormal results rounded, NaNs quieted keeping their top payload bits,
as x86's cvtsd2ss does).

Planes: I8, I16, I32 keep the array as `w`. JAX holds no 64-bit arrays unless x64 is turned on, so I64 and F64
keep each value as its two little-endian 32-bit words, `w` uint32 [..., 2 * cols] (low word first), and their
tile converts from the words with integer arithmetic. realm-jax reads these types; it does not write them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from realm_jax.quant.block import Field, Format

_U32 = jnp.uint32


def _u(v: int) -> jax.Array:
    return jnp.asarray(v, _U32)


def _shift_round(hi: jax.Array, lo: jax.Array, s: jax.Array) -> jax.Array:
    """The 64-bit hi:lo shifted right by s (1..64, as uint32), rounded to nearest even; the result must fit in
    32 bits. (XLA's shifts by 32 or more give 0.)"""
    q = jnp.where(s >= 32, hi >> (s - 32), (lo >> s) | (hi << (_u(32) - s)))
    b = s - 1  # the guard bit's position; the sticky bits lie below it
    guard = jnp.where(b >= 32, hi >> (b - 32), lo >> b) & 1
    sticky = jnp.where(b >= 32, (lo != 0) | ((hi & ((_u(1) << (b - 32)) - 1)) != 0), (lo & ((_u(1) << b) - 1)) != 0)
    return q + (guard & (sticky.astype(_U32) | (q & 1)))


def i64_to_f32(w: jax.Array) -> jax.Array:
    """int64 values as (low, high) uint32 words [..., 2n] -> float32 [..., n], rounded to nearest even."""
    lo, hi = w[..., 0::2], w[..., 1::2]
    neg = (hi >> 31) == 1
    # |value| as an unsigned 64-bit hi:lo (two's complement negation; -2^63 stays 2^63).
    nlo = ~lo + 1
    nhi = ~hi + (lo == 0).astype(_U32)
    lo, hi = jnp.where(neg, nlo, lo), jnp.where(neg, nhi, hi)
    msb = jnp.where(hi != 0, 63 - lax.clz(hi), 31 - lax.clz(lo)).astype(jnp.int32)  # -1 for 0
    s = jnp.clip(msb - 23, 1, 64).astype(_U32)
    q = _shift_round(hi, lo, s)  # 24 significant bits, or 2^24 after rounding up
    wide = lax.bitcast_convert_type(((msb + 127).astype(_U32) << 23) + q - _u(1 << 23), jnp.float32)
    small = lo.astype(jnp.float32)  # below 2^24: exact
    mag = jnp.where(msb >= 24, wide, small)
    return jnp.where(neg, -mag, mag)


def f64_to_f32(w: jax.Array) -> jax.Array:
    """float64 values as (low, high) uint32 words [..., 2n] -> float32 [..., n], as numpy's astype."""
    lo, hi = w[..., 0::2], w[..., 1::2]
    sign = hi & _u(0x80000000)
    e = ((hi >> 20) & 0x7FF).astype(jnp.int32)
    frac_hi = hi & _u(0xFFFFF)
    # Finite: the 53-bit significand (hidden bit set for normal doubles) scaled to float32's exponent range.
    # f32 exponent field e - 896 when >= 1 (29 bits shift out), else subnormal (more bits shift out).
    field = e - 896
    s = (29 + jnp.clip(1 - field, 0, 35)).astype(_U32)
    q = _shift_round(frac_hi | jnp.where(e > 0, _u(0x100000), _u(0)), lo, s)
    finite = jnp.where(field >= 1, (field.astype(_U32) << 23) + q - _u(1 << 23), q)
    finite = jnp.where(field >= 255, _u(0x7F800000), finite)  # the carry of a rounding overflows to inf too
    nan = _u(0x7FC00000) | (frac_hi << 3) | (lo >> 29)
    special = jnp.where((frac_hi | lo) == 0, _u(0x7F800000), nan)
    return lax.bitcast_convert_type(sign | jnp.where(e == 0x7FF, special, finite), jnp.float32)


def tile_cast(p, *, exact: bool = False) -> jax.Array:
    del exact  # one conversion, rounded to nearest even
    return jnp.asarray(p["w"]).astype(jnp.float32)


def tile_i64(p, *, exact: bool = False) -> jax.Array:
    del exact
    return i64_to_f32(p["w"])


def tile_f64(p, *, exact: bool = False) -> jax.Array:
    del exact
    return f64_to_f32(p["w"])


_WORDS = (Field("w", np.dtype(np.uint32), 2),)
FORMATS = (
    Format("I8", 24, 1, 1, (Field("w", np.dtype(np.int8), 1),), tile_cast),
    Format("I16", 25, 1, 2, (Field("w", np.dtype(np.int16), 1),), tile_cast),
    Format("I32", 26, 1, 4, (Field("w", np.dtype(np.int32), 1),), tile_cast),
    Format("I64", 27, 1, 8, _WORDS, tile_i64),
    Format("F64", 28, 1, 8, _WORDS, tile_f64),
)
