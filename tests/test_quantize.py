"""quantize() for the formats gguf-py can produce: bit-exact with gguf.quants.quantize, and their RMS errors.

The k-quants' quantizers (llama.cpp's reference algorithms) are tested in test_kquantize.py.
"""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType

import realm_jax
from realm_jax.errors import DTypeError, ShapeMismatchError, UnsupportedFormatError
from realm_jax.quant import unpack

GGUF_PY_FORMATS = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]

# quantize -> dequantize RMS error on np.random.default_rng(0).standard_normal((64, 4096)) in f32.
# llama.cpp's reference quantizers give the same figures: gguf-py is bit-exact with them for these formats
# (FACTS.md), and realm-jax is bit-exact with gguf-py (asserted below), so the 1% bound is met exactly.
RMS_N01 = {
    "F16": 2.075069e-04,
    "BF16": 1.662837e-03,
    "Q4_0": 8.620417e-02,
    "Q4_1": 7.835941e-02,
    "Q5_0": 4.288012e-02,
    "Q5_1": 3.797678e-02,
    "Q8_0": 5.369297e-03,
}


def gguf_bytes(x: np.ndarray, fmt: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf.quants.quantize(x, GGMLQuantizationType[fmt]).reshape(-1).view(np.uint8)


def ours(x: np.ndarray, fmt: str) -> np.ndarray:
    return unpack(realm_jax.quantize(x, fmt)).reshape(-1).view(np.uint8)


def varied_rows(rng: np.random.Generator, cols: int = 256) -> np.ndarray:
    """Rows that hit the edge cases of the scale search: zeros, constants, ties, outliers, magnitudes."""
    n = rng.standard_normal((12, cols)).astype(np.float32)
    rows = [
        n[0],
        n[1] * 1e-3,
        n[2] * 1e4,
        np.zeros(cols),
        np.full(cols, 0.37),
        np.full(cols, -2.5),
        -np.abs(n[3]),
        np.abs(n[4]),
        np.where(np.arange(cols) % 32 == 5, 40.0, n[5] * 0.01),  # one outlier per block
        np.tile([1.0, -1.0], cols // 2),  # ties between +max and -max: the first one wins
        np.round(n[6] * 4) / 4,  # values on the quantization grid
        n[7] * 1e-30,
        rng.standard_t(2, cols),  # heavy tails
    ]
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("fmt", GGUF_PY_FORMATS)
def test_bit_exact_with_gguf_py(fmt, rng):
    shapes = [(16, 1024), (256, 32), (300, 256)]  # XLA's rewrites of a division depend on the shapes
    for x in [rng.standard_normal(s).astype(np.float32) for s in shapes] + [varied_rows(rng)]:
        np.testing.assert_array_equal(ours(x, fmt), gguf_bytes(x, fmt))


@pytest.mark.parametrize("fmt", ["F16", "BF16"])
def test_float_edge_values_bit_exact(fmt):
    edges = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-40, 6e-8, 3e-8, 65504.0, 65520.0, 65536.0, -1e6, 3.4e38,
                      np.inf, -np.inf, 1.0 + 2**-9, 1.0 + 3 * 2**-9, 1.0 + 2**-8, 2.0**-133], dtype=np.float32)
    nans = np.array([0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7FBFFFFF], dtype=np.uint32).view(np.float32)
    x = np.concatenate([edges, nans])[None]
    np.testing.assert_array_equal(ours(x, fmt), gguf_bytes(x, fmt))  # NaN payloads included


@pytest.mark.parametrize("fmt", GGUF_PY_FORMATS)
def test_rms_error_on_normal_data(fmt):
    x = np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32)
    qt = realm_jax.quantize(x, fmt)
    assert qt.fmt == fmt and qt.shape == x.shape
    rms = float(np.sqrt(np.mean((np.asarray(realm_jax.dequantize(qt), np.float64) - x) ** 2)))
    assert rms == pytest.approx(RMS_N01[fmt], rel=1e-5)


def test_quantize_leading_dims_and_jax_input(rng):
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    qt = realm_jax.quantize(jnp.asarray(x), "Q8_0")
    assert qt.shape == (2, 3, 64) and qt.planes["qs"].shape == (2, 3, 64)
    np.testing.assert_array_equal(ours(x, "Q8_0"), gguf_bytes(x, "Q8_0"))


def test_quantize_validates_inputs():
    with pytest.raises(ShapeMismatchError, match="block_size=32"):
        realm_jax.quantize(np.zeros((2, 48), np.float32), "Q4_0")
    with pytest.raises(DTypeError, match="int32"):
        realm_jax.quantize(np.zeros((2, 64), np.int32), "Q4_0")
    with pytest.raises(UnsupportedFormatError, match="cannot produce IQ2_XXS"):  # a type realm-jax only reads
        realm_jax.quantize(np.zeros((2, 256), np.float32), "IQ2_XXS")
