"""Bit-exact conversions between float32, float16 and bfloat16, matching numpy / ml_dtypes on every backend.

XLA's own `astype` is not bit-exact for the edge cases: it quiets signalling NaNs (f16 0x7C01 -> f32
0x7FC02000 where numpy gives 0x7F802000) and XLA:CPU flushes f32 subnormals to zero in arithmetic. So
every conversion here is integer arithmetic on `lax.bitcast_convert_type` views, which no backend
rewrites. Rounding is to nearest, ties to even; overflow goes to ±Inf. The bit layouts:

    float32   s eeeeeeee mmmmmmmmmmmmmmmmmmmmmmm   bias 127
    float16   s eeeee    mmmmmmmmmm                bias 15
    bfloat16  s eeeeeeee mmmmmmm                   bias 127 (the top half of a float32)

NaNs follow the oracle, which is not the same in every direction:

    f16  -> f32   payload shifted up 13, signalling kept      (numpy)
    bf16 -> f32   payload shifted up 16, signalling kept      (ml_dtypes)
    f32  -> f16   payload's top 10 bits, signalling kept; a payload that would vanish becomes 1  (numpy)
    f32  -> bf16  sign | 0x7FC0, payload dropped              (ml_dtypes)
    f16  -> bf16  sign | 0x7FC0, as via f32                   (ml_dtypes)
    bf16 -> f16   sign | 0x7E00, payload dropped; not via f32 (ml_dtypes, Eigen's half rounding)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from realm_jax.errors import DTypeError

__all__ = ["bf16_to_f16", "convert", "f16_to_bf16", "f32_to_bf16", "f32_to_f16", "to_float32"]

F32, F16, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)
_NAMES = "float32, float16, bfloat16"


def _u32(v: int) -> np.uint32:
    return np.uint32(v)


def _bits(x: jax.Array, allowed: tuple[jnp.dtype, ...], name: str) -> jax.Array:
    """The bits of `x` as uint32 (16-bit formats zero-extended), after checking its dtype."""
    if x.dtype not in allowed:
        raise DTypeError(f"{name}: {x.dtype=} must be one of {', '.join(d.name for d in allowed)}")
    uint = jnp.uint32 if x.dtype == F32 else jnp.uint16
    return lax.bitcast_convert_type(x, uint).astype(jnp.uint32)


def _from_bits(bits: jax.Array, dtype: jnp.dtype) -> jax.Array:
    uint = jnp.uint32 if dtype == F32 else jnp.uint16
    return lax.bitcast_convert_type(bits.astype(uint), dtype)


def _f16_bits_to_f32_bits(h: jax.Array) -> jax.Array:
    sign = (h & _u32(0x8000)) << 16
    e = (h >> 10) & _u32(0x1F)
    m = h & _u32(0x3FF)
    normal = ((e + _u32(127 - 15)) << 23) | (m << 13)
    inf_nan = _u32(0x7F800000) | (m << 13)  # keeps the quiet bit as it is: a signalling NaN stays one
    # A subnormal m * 2^-24 is a normal f32: shift m's leading 1 up to the implicit-bit position (bit 10),
    # lowering the exponent by the shift n.
    n = lax.clz(m) - _u32(21)
    subnormal = ((_u32(127 - 14) - n) << 23) | (((m << n) & _u32(0x3FF)) << 13)
    tiny = jnp.where(m == 0, _u32(0), subnormal)
    return sign | jnp.where(e == 0, tiny, jnp.where(e == 31, inf_nan, normal))


def _f32_bits_to_f16_bits(u: jax.Array) -> jax.Array:
    sign = (u >> 16) & _u32(0x8000)
    a = u & _u32(0x7FFFFFFF)
    # Rounding: adding half an ulp less one, plus the kept lsb, carries exactly when RNE rounds up; a carry
    # out of the mantissa bumps the exponent, which is the right answer too.
    rebiased = a - _u32((127 - 15) << 23)  # wraps for a < 2^-14, which take `subnormal`
    normal = (rebiased + _u32(0xFFF) + ((a >> 13) & 1)) >> 13
    # Below 2^-14 the result is the integer round(|x| / 2^-24) = round(M / 2^s), M the 24-bit significand.
    # s >= 14 here; clamping it at 31 still rounds everything below 2^-25 to 0 (M < 2^24 < 2^30 = half).
    significand = (a & _u32(0x7FFFFF)) | _u32(0x800000)
    s = jnp.minimum(_u32(126) - (a >> 23), _u32(31))  # wraps (then clamps) for a >= 2^127, unused there
    subnormal = (significand + (_u32(1) << (s - 1)) - 1 + ((significand >> s) & 1)) >> s
    # 65520 = 65504 + half an ulp: from there on RNE gives 2^16, which f16 cannot hold.
    nan = _u32(0x7C00) | jnp.maximum((a & _u32(0x7FFFFF)) >> 13, _u32(1))
    h = jnp.where(a < _u32(0x38800000), subnormal, normal)
    h = jnp.where(a >= _u32(0x477FF000), _u32(0x7C00), h)
    return sign | jnp.where(a > _u32(0x7F800000), nan, h)


def _f32_bits_to_bf16_bits(u: jax.Array) -> jax.Array:
    # bf16 is the top half of f32: RNE on the low 16 bits. Inf stays Inf, a finite value past the largest
    # bf16 carries into the exponent and becomes Inf; only NaNs (which could round to Inf) are special.
    rounded = (u + _u32(0x7FFF) + ((u >> 16) & 1)) >> 16
    is_nan = (u & _u32(0x7FFFFFFF)) > _u32(0x7F800000)
    return jnp.where(is_nan, ((u >> 16) & _u32(0x8000)) | _u32(0x7FC0), rounded)


@jax.jit
def to_float32(x: jax.Array) -> jax.Array:
    """Widens float16 or bfloat16 to float32 exactly (every f16 and bf16 value is an f32 value).

    Args:
      x: float16 or bfloat16, any shape.
    Returns:
      float32, x's shape; NaN payloads (and the signalling bit) kept.
    """
    u = _bits(x, (F16, BF16), "to_float32")
    return _from_bits(u << 16 if x.dtype == BF16 else _f16_bits_to_f32_bits(u), F32)


@jax.jit
def f32_to_f16(x: jax.Array) -> jax.Array:
    """Rounds float32 to float16 (RNE, overflow to ±Inf, f16 subnormals) as numpy does. Same shape."""
    return _from_bits(_f32_bits_to_f16_bits(_bits(x, (F32,), "f32_to_f16")), F16)


@jax.jit
def f32_to_bf16(x: jax.Array) -> jax.Array:
    """Rounds float32 to bfloat16 (RNE, overflow to ±Inf, NaN -> sign | 0x7FC0) as ml_dtypes does."""
    return _from_bits(_f32_bits_to_bf16_bits(_bits(x, (F32,), "f32_to_bf16")), BF16)


@jax.jit
def f16_to_bf16(x: jax.Array) -> jax.Array:
    """Rounds float16 to bfloat16 as ml_dtypes does: via the exact f32 value, one rounding. Same shape."""
    u = _f16_bits_to_f32_bits(_bits(x, (F16,), "f16_to_bf16"))
    return _from_bits(_f32_bits_to_bf16_bits(u), BF16)


@jax.jit
def bf16_to_f16(x: jax.Array) -> jax.Array:
    """Rounds bfloat16 to float16 as ml_dtypes does: one rounding, but every NaN -> sign | 0x7E00."""
    u = _bits(x, (BF16,), "bf16_to_f16") << 16
    h = _f32_bits_to_f16_bits(u)
    is_nan = (u & _u32(0x7FFFFFFF)) > _u32(0x7F800000)
    return _from_bits(jnp.where(is_nan, (h & _u32(0x8000)) | _u32(0x7E00), h), F16)


_CONVERSIONS = {
    (F16, F32): to_float32,
    (BF16, F32): to_float32,
    (F32, F16): f32_to_f16,
    (F32, BF16): f32_to_bf16,
    (F16, BF16): f16_to_bf16,
    (BF16, F16): bf16_to_f16,
}


def convert(x: jax.Array, dtype) -> jax.Array:
    """Converts between float32, float16 and bfloat16 bit-exactly (see the module docstring). Jit-safe.

    Args:
      x: a float32, float16 or bfloat16 array (jax or numpy), any shape.
      dtype: the target, float32, float16 or bfloat16 (anything `jnp.dtype` takes).
    Returns:
      x's shape in `dtype`; x itself when it already has that dtype.
    Raises:
      DTypeError: either dtype is not one of the three.
    """
    try:
        dst = jnp.dtype(dtype)
    except TypeError as e:
        raise DTypeError(f"convert: {dtype=} is not a dtype; use one of {_NAMES}") from e
    src = jnp.dtype(x.dtype) if hasattr(x, "dtype") else jnp.asarray(x).dtype
    if src == dst and src in (F32, F16, BF16):
        return x
    if (src, dst) not in _CONVERSIONS:
        raise DTypeError(f"convert: x.dtype={src.name} -> dtype={dst.name} is not supported; use {_NAMES}")
    return _CONVERSIONS[src, dst](jnp.asarray(x))
