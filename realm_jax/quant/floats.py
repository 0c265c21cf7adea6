"""Unquantized formats F32, F16, BF16: one plane `w` holding the values themselves.

GGUF stores them as plain little-endian arrays; "block size" 1. Dequantization widens to f32 exactly
(every f16 and bf16 value, subnormals included, is an f32 value); the exact path goes through
`realm_jax.conversions`, which also keeps NaN payloads as gguf-py does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from realm_jax.conversions import f32_to_f16, to_float32
from realm_jax.quant.block import Field, Format

BF16 = np.dtype(ml_dtypes.bfloat16)


def tile_float(p, *, exact: bool = False) -> jax.Array:
    w = jnp.asarray(p["w"])
    if exact and w.dtype != jnp.float32:  # XLA's convert quiets signalling NaNs; gguf-py keeps their bits
        return to_float32(w)
    return w.astype(jnp.float32)


@jax.jit
def quantize_f32(x: jax.Array) -> dict[str, jax.Array]:
    return {"w": x.astype(jnp.float32)}


@jax.jit
def quantize_f16(x: jax.Array) -> dict[str, jax.Array]:
    return {"w": f32_to_f16(x.astype(jnp.float32))}  # numpy's rounding, NaN payloads included


@jax.jit
def quantize_bf16(x: jax.Array) -> dict[str, jax.Array]:
    """f32 -> bf16 as ggml_compute_fp32_to_bf16 (and gguf-py): NaNs quieted keeping their top bits, RNE."""
    u32 = functools.partial(jnp.asarray, dtype=jnp.uint32)
    n = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    is_nan = (n & u32(0x7FFFFFFF)) > u32(0x7F800000)
    quiet = (n & u32(0xFFFF0000)) | u32(64 << 16)
    rounded = (n + (u32(0x7FFF) + ((n >> 16) & 1))) >> 16  # wraps only for NaNs, which take `quiet`
    bits = jnp.where(is_nan, quiet >> 16, rounded).astype(jnp.uint16)
    return {"w": lax.bitcast_convert_type(bits, jnp.bfloat16)}


FORMATS = (
    Format("F32", 0, 1, 4, (Field("w", np.dtype(np.float32), 1),), tile_float, quantize_f32),
    Format("F16", 1, 1, 2, (Field("w", np.dtype(np.float16), 1),), tile_float, quantize_f16),
    Format("BF16", 30, 1, 2, (Field("w", BF16, 1),), tile_float, quantize_bf16),
)
