"""quantize() for the formats gguf-py can produce: bit-exact with gguf.quants.quantize, and their RMS errors.

The k-quants' quantizers (llama.cpp's reference algorithms) are tested in test_kquantize.py.
"""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType

import realm_jax
from realm_jax.errors import ArgumentError, DTypeError, MemoryBudgetError, ShapeMismatchError, UnsupportedFormatError
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


# The largest f32 values each float format rounds to a finite value (the next f32 up rounds to inf).
LARGEST_FINITE = {"F16": [65519.996, -65519.996], "BF16": [65520.0, 65536.0, -1e6, 3.3961773e38, -3.3961773e38]}


@pytest.mark.parametrize("fmt", ["F16", "BF16"])
def test_float_edge_values_bit_exact(fmt):
    """Edge values, infinities and NaN payloads as gguf-py writes them (values past the format's range are
    refused instead: test_values_a_format_cannot_hold_are_refused)."""
    edges = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-40, 6e-8, 3e-8, 65504.0, *LARGEST_FINITE[fmt],
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


# --- arguments quantize and qmatmul cannot take ----------------------------------------------------------
BAD_X = [
    (None, DTypeError, r"x must be an array of floats, got NoneType"),
    ("hello", DTypeError, r"x must be an array of floats, got str"),
    ([["a"] * 64], DTypeError, r"x\.dtype=<U1 must be"),
    (np.array([[object()] * 64]), DTypeError, r"x\.dtype=object must be"),
    ([[1.0] * 64, [1.0] * 32], ShapeMismatchError, r"x must be a rectangular array, got a ragged list"),
    (np.ones((2, 64), np.longdouble), DTypeError, r"x\.dtype=float128 must be"),
]


@pytest.mark.parametrize("x, error, match", BAD_X, ids=["none", "str", "strings", "objects", "ragged", "longdouble"])
@pytest.mark.parametrize("op", ["quantize", "qmatmul"])
def test_bad_x_is_named(op, x, error, match):
    if op == "quantize":
        call = lambda: realm_jax.quantize(x, "Q4_0")  # noqa: E731
    else:
        w = realm_jax.quantize(np.ones((4, 64), np.float32), "Q8_0")
        call = lambda: realm_jax.qmatmul(x, w, impl="xla")  # noqa: E731
    with pytest.raises(error, match=f"^{op}: {match}"):
        call()


@pytest.mark.parametrize("name", ["compute_dtype", "out_dtype"])
def test_qmatmul_unknown_dtype_is_named(name):
    w = realm_jax.quantize(np.ones((4, 64), np.float32), "Q8_0")
    with pytest.raises(DTypeError, match=f"^qmatmul: {name}='zz' is not a dtype"):
        realm_jax.qmatmul(np.ones((2, 64), np.float32), w, impl="xla", **{name: "zz"})


def _with(value, at=(1, 40), dtype=np.float32, cols=256):
    x = np.random.default_rng(0).standard_normal((2, cols)).astype(dtype)
    x[at] = value
    return x


# Each of these was quantized without a word: NaN to 0 (Q4_K, Q6_K, Q3_K, IQ4_XS, MXFP4), inf or a block too
# large for the f16 scale to an inf or NaN block, a block far too large to a zero block (Q6_K, Q3_K, IQ4_XS),
# a value past F16's, BF16's or float32's range to inf.
CANNOT_HOLD = [
    (fmt, _with(np.nan), r"x\[1, 40\]=nan is not finite; " + fmt + " holds finite values only")
    for fmt in ["Q4_K", "Q6_K", "Q3_K", "IQ4_XS", "MXFP4", "Q8_0"]
] + [
    (fmt, _with(-np.inf), r"x\[1, 40\]=-inf is not finite") for fmt in ["Q4_K", "Q4_0", "Q8_0"]
] + [
    ("Q4_0", _with(1e6), r"the block x\[1, 32:64\] is too large for Q4_0: its max \|x\|=1e\+06 overflows its "
     r"float16 scale 'd'"),
    ("Q4_K", _with(3e38), r"the block x\[1, 0:256\] is too large for Q4_K: its max \|x\|=3e\+38 overflows its "
     r"float16 scale"),
    ("Q4_1", _with(1e9), r"the block x\[1, 32:64\] is too large for Q4_1: .* overflows its float16 scale 'd'"),
    *[(fmt, _with(1e20), r"the block x\[1, 0:256\] is too large for " + fmt + r": its max \|x\|=1e\+20 is past "
       r"2\.68\d*e\+08, more than any format with an f16 scale holds") for fmt in ["Q6_K", "Q3_K", "IQ4_XS"]],
    ("F16", _with(1e6), r"x\[1, 40\]=1e\+06 is past F16's range \(it would become inf\)"),
    ("F16", _with(65520.0), r"x\[1, 40\]=65520.0 is past F16's range"),
    ("BF16", _with(-3.4e38), r"x\[1, 40\]=-3.4e\+38 is past BF16's range \(it would become -inf\)"),
    ("F32", _with(1e300, dtype=np.float64), r"x\[1, 40\]=1e\+300 is past float32's range"),
    ("Q8_0", _with(-1e39, dtype=np.float64), r"x\[1, 40\]=-1e\+39 is past float32's range"),
]


@pytest.mark.parametrize("fmt, x, match", CANNOT_HOLD, ids=[f"{c[0]}-{i}" for i, c in enumerate(CANNOT_HOLD)])
def test_values_a_format_cannot_hold_are_refused(fmt, x, match):
    with pytest.raises(ArgumentError, match=f"^quantize: {match}"):
        realm_jax.quantize(x, fmt)
    if x.dtype == np.float32:  # traced, nothing is read: the same input traces as before
        assert jax.eval_shape(lambda v: realm_jax.quantize(v, fmt), x).shape == x.shape


def test_quantize_checks_memory_before_allocating():
    """A broadcast view of 2**45 floats holds 4 bytes; its device copy would hold 128 TiB."""
    x = np.broadcast_to(np.float32(1), (1 << 30, 1 << 15))
    with pytest.raises(MemoryBudgetError, match=r"^quantize: x\[1073741824, 32768\] to Q4_K needs at least "
                       r"\d+\.\d\d GiB .* more than the .* free"):
        realm_jax.quantize(x, "Q4_K")
