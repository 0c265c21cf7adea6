"""Test helpers: random QTensors with sane scales, and the tolerance table."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from realm_jax.quant import QTensor, get_format, repack

REAL_MODELS = ("gemma3-270m-q4_k_m", "smollm2-135m-instruct-q4_1")  # conftest's `real_model_path`, test_gguf's check

# The one tolerance table: a dot of length K computed in `dtype` may differ from the f32 HIGHEST reference
# by TOL[dtype] * sqrt(K) * rms(x) * rms(w). Measured worst cases over every format, M in {1, 16, 128},
# K in {256, 4096} (in units of the dtype's eps): f32 46 eps (sequential f32 accumulation grows like K, the
# table's f32 entry of 84 eps covers K <= 4096), bf16 5.1 eps, f16 4.3 eps.
TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 4e-2, jnp.dtype(jnp.float16): 4e-3}


def matmul_tolerance(dtype, k: int, x_rms: float, w_rms: float) -> float:
    return TOL[jnp.dtype(dtype)] * math.sqrt(k) * x_rms * w_rms


def rms(a) -> float:
    a = np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)
    return float(np.sqrt(np.mean(np.square(a)))) if a.size else 0.0


def assert_matmul_close(y, x, w, *, compute_dtype, out_dtype, reference=None) -> None:
    """y (= x @ w^T computed in `compute_dtype`, f32 accumulation, rounded to `out_dtype`) against float64
    x @ w^T of the values given (w: the dequantized weight [N, K]), within the one tolerance table. The
    output dtype and shape are asserted first. `reference`: the float64 product, where the caller has it."""
    assert y.dtype == jnp.dtype(out_dtype), f"dtype {y.dtype}, expected {jnp.dtype(out_dtype)}"
    k = x.shape[-1]
    xs = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64).reshape(-1, k)
    ws = np.asarray(jnp.asarray(w).astype(jnp.float32), np.float64)
    assert y.shape == (*x.shape[:-1], ws.shape[0]), f"shape {y.shape}, expected {(*x.shape[:-1], ws.shape[0])}"
    want = xs @ ws.T if reference is None else np.asarray(reference, np.float64).reshape(xs.shape[0], -1)
    if not want.size:
        return
    tol = matmul_tolerance(compute_dtype, k, rms(xs), rms(ws))
    if jnp.dtype(out_dtype) != jnp.float32:  # the result is rounded to out_dtype at the end
        tol += float(np.max(np.abs(want))) * float(jnp.finfo(out_dtype).eps)
    err = float(np.max(np.abs(np.asarray(jnp.asarray(y).astype(jnp.float32), np.float64).reshape(want.shape) - want)))
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g}"


def _small_scales(fmt: str, raw: np.ndarray, rng: np.random.Generator) -> None:
    """Scales that are not float fields, set in place to small finite values: MXFP4's exponent byte, IQ1_M's
    f16 scale spread over the top nibbles of its four scale words; F64's doubles, and I32/I64 integers within
    f16's range (a weight a 16-bit params dtype can hold)."""
    lead = raw.shape[:-1]
    if fmt == "MXFP4":
        raw[..., 0] = rng.integers(119, 127, size=lead)  # 2^-9 .. 2^-2
    elif fmt == "IQ1_M":
        d = (np.abs(rng.standard_normal(lead)) * 0.02 + 1e-3).astype(np.float16).view(np.uint16)
        for i in range(4):  # word i's bits 15..12 hold d's bits 4i+3..4i
            raw[..., 49 + 2 * i] = (raw[..., 49 + 2 * i] & 0x0F) | (((d >> (4 * i)) & 0xF) << 4).astype(np.uint8)
    elif fmt == "F64":
        raw[...] = rng.standard_normal(lead).astype("<f8")[..., None].view(np.uint8)
    elif fmt in ("I32", "I64"):
        values = rng.integers(-(2**15), 2**15, size=lead).astype(f"<i{raw.shape[-1]}")
        raw[...] = values[..., None].view(np.uint8)


def random_blocks(fmt: str, n_rows: int, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random GGUF bytes (n_rows, n_blocks * type_size) whose scales hold small finite values."""
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
    _small_scales(fmt, raw, rng)
    return raw.reshape(n_rows, -1)


def random_qtensor(fmt: str, rows: int, cols: int, rng: np.random.Generator) -> QTensor:
    f = get_format(fmt)
    return repack(random_blocks(fmt, rows, cols // f.block_size, rng), fmt, (rows, cols))


def expected_distribution(logits, t, k, p):
    """The distribution llama.cpp's order gives one row of logits: top-k (0: off), then top-p on the
    probabilities of the logits, then the temperature t."""
    order = np.argsort(-logits, kind="stable")
    values = logits[order].astype(np.float64)
    probs = np.exp(values - values[0]) / np.exp(values - values[0]).sum()
    keep = np.ones(len(values), bool) if k == 0 else np.arange(len(values)) < k
    cum = np.cumsum(np.where(keep, probs, 0))
    keep &= (cum - probs < p) | (np.arange(len(values)) == 0)
    w = np.where(keep, np.exp((values - values[0]) / t), 0)
    out = np.zeros(len(values))
    out[order] = w / w.sum()
    return out
