"""qmatmul (the XLA path) against an f32 HIGHEST matmul of the dequantized weight."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax
from realm_jax.errors import DTypeError, QTensorError, ShapeMismatchError
from realm_jax.quant import FORMATS, get_format, repack
from helpers import matmul_tolerance, random_qtensor

N = 40  # not a multiple of any tile


def reference(x: np.ndarray, w) -> np.ndarray:
    wd = realm_jax.dequantize(w)
    return np.asarray(jnp.matmul(jnp.asarray(x, jnp.float32), wd.T, precision=jax.lax.Precision.HIGHEST))


def rms(a) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(a, np.float64)))))


def check(x, w, compute_dtype=None):
    y = realm_jax.qmatmul(x, w, compute_dtype=compute_dtype)
    assert y.dtype == x.dtype
    assert realm_jax.qmatmul(x, w, compute_dtype=compute_dtype, out_dtype=jnp.float32).dtype == jnp.float32
    assert y.shape == (*x.shape[:-1], w.shape[0])
    ref = reference(np.asarray(x, np.float32), w)
    tol = matmul_tolerance(compute_dtype or x.dtype, w.shape[1], rms(np.asarray(x, np.float32)),
                           rms(realm_jax.dequantize(w)))
    if x.dtype != jnp.float32:  # the output is rounded to x.dtype too
        tol += 2 * float(np.max(np.abs(ref))) * float(jnp.finfo(x.dtype).eps)
    err = float(np.max(np.abs(np.asarray(y, np.float32) - ref)))
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g}"


def k_values(fmt):
    block = get_format(fmt).block_size
    return sorted({max(block, 256), 4096} if block > 1 else {256, 4096})


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("m", [1, 3, 16, 128])
def test_f32_all_formats(fmt, m, rng):
    for k in k_values(fmt):
        w = random_qtensor(fmt, N, k, rng)
        check(rng.standard_normal((m, k)).astype(np.float32), w)


@pytest.mark.parametrize("fmt", ["Q4_K", "Q6_K", "Q8_0", "Q5_1", "BF16"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("m", [1, 2, 16, 40])  # both operand orders of the XLA path
def test_half_precision(fmt, dtype, m, rng):
    w = random_qtensor(fmt, N, 1024, rng)
    x = jnp.asarray(rng.standard_normal((m, 1024)), dtype)
    check(x, w)
    check(jnp.asarray(x, jnp.float32), w, compute_dtype=dtype)


def test_one_block_and_leading_dims(rng):
    w = random_qtensor("Q4_K", 3, 256, rng)
    check(rng.standard_normal((2, 5, 256)).astype(np.float32), w)
    check(rng.standard_normal((256,)).astype(np.float32), w)


def test_validation(rng):
    w = random_qtensor("Q8_0", 8, 64, rng)
    with pytest.raises(ShapeMismatchError, match="must end in K=64"):
        realm_jax.qmatmul(np.zeros((2, 32), np.float32), w)
    with pytest.raises(DTypeError, match="int32"):
        realm_jax.qmatmul(np.zeros((2, 64), np.int32), w)
    with pytest.raises(DTypeError, match="compute_dtype"):
        realm_jax.qmatmul(np.zeros((2, 64), np.float32), w, compute_dtype=jnp.int8)
    with pytest.raises(QTensorError, match="must be a QTensor"):
        realm_jax.qmatmul(np.zeros((2, 64), np.float32), np.zeros((8, 64), np.float32))
    stacked = repack(np.zeros((2 * 8 * 2 * 34,), np.uint8), "Q8_0", (2, 8, 64))
    with pytest.raises(ShapeMismatchError, match="2-D"):
        realm_jax.qmatmul(np.zeros((2, 64), np.float32), stacked)
    broken = realm_jax.QTensor("Q8_0", (8, 64), {"d": w.planes["d"]})
    with pytest.raises(QTensorError, match="planes must be"):
        realm_jax.qmatmul(np.zeros((2, 64), np.float32), broken)
