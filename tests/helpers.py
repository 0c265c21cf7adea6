"""Test helpers: random QTensors with sane scales, and the tolerance table."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from realm_jax.quant import QTensor, get_format, repack

# The one tolerance table: a dot of length K computed in `dtype` may differ from the f32 HIGHEST reference
# by TOL[dtype] * sqrt(K) * rms(x) * rms(w). Measured worst cases over every format, M in {1, 16, 128},
# K in {256, 4096} (in units of the dtype's eps): f32 46 eps (sequential f32 accumulation grows like K, the
# table's f32 entry of 84 eps covers K <= 4096), bf16 5.1 eps, f16 4.3 eps.
TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 4e-2, jnp.dtype(jnp.float16): 4e-3}


def matmul_tolerance(dtype, k: int, x_rms: float, w_rms: float) -> float:
    return TOL[jnp.dtype(dtype)] * math.sqrt(k) * x_rms * w_rms


def random_blocks(fmt: str, n_rows: int, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random GGUF bytes (n_rows, n_blocks * type_size) whose float fields hold small finite values."""
    f = get_format(fmt)
    raw = rng.integers(0, 256, size=(n_rows, n_blocks, f.type_size), dtype=np.uint8)
    offset = 0
    for field in f.fields:
        dt = np.dtype(field.dtype)
        if dt.kind == "f" or dt.name == "bfloat16":
            scale = 1.0 if f.block_size == 1 else 0.02
            values = (rng.standard_normal((n_rows, n_blocks, field.count)) * scale).astype(dt)
            raw[..., offset : offset + field.nbytes] = values.view(np.uint8).reshape(n_rows, n_blocks, -1)
        offset += field.nbytes
    return raw.reshape(n_rows, -1)


def random_qtensor(fmt: str, rows: int, cols: int, rng: np.random.Generator) -> QTensor:
    f = get_format(fmt)
    return repack(random_blocks(fmt, rows, cols // f.block_size, rng), fmt, (rows, cols))
