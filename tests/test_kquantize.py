"""The k-quant quantizers (realm_jax/quant/kquantize.py): plane layout, edge cases, error, and bytes
identical to llama.cpp's quantize_row_*_ref (the last only where llama-cpp-python is installed)."""

from __future__ import annotations

import ctypes
import importlib.util
import pathlib

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax.errors import DTypeError, ShapeMismatchError
from realm_jax.quant import FORMATS as QFORMATS
from realm_jax.quant import kquantize

QK = 256
FORMATS = ("Q4_K", "Q5_K", "Q6_K", "Q8_K")
QUANTIZE = {"Q4_K": kquantize.quantize_q4_k, "Q5_K": kquantize.quantize_q5_k,
            "Q6_K": kquantize.quantize_q6_k, "Q8_K": kquantize.quantize_q8_k}
# plane -> (dtype, count per 256-element super-block)
PLANES = {
    "Q4_K": {"d": (np.float16, 1), "dmin": (np.float16, 1), "scales": (np.uint8, 8), "mins": (np.uint8, 8),
             "qs": (np.uint8, 128)},
    "Q5_K": {"d": (np.float16, 1), "dmin": (np.float16, 1), "scales": (np.uint8, 8), "mins": (np.uint8, 8),
             "qh": (np.uint8, 32), "qs": (np.uint8, 128)},
    "Q6_K": {"d": (np.float16, 1), "scales": (np.int8, 16), "ql": (np.uint8, 128), "qh": (np.uint8, 64)},
    "Q8_K": {"d": (np.float32, 1), "qs": (np.int8, 256), "bsums": (np.int16, 16)},
}
TYPE_SIZE = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "Q8_K": 292}  # bytes per super-block
# Largest |error| of a dequantized element, as a fraction of its super-block's max |x| (edge-case data).
MAX_ERR = {"Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.03, "Q8_K": 0.005}
# RMS error of quantize -> dequantize on np.random.default_rng(0).standard_normal((64, 4096)) f32 (f64 mean).
# OURS: this module. LLAMA: libggml's quantize_row_<fmt>_ref on the same data (llama-cpp-python 0.3.36,
# libggml-base.so through ctypes as in `_llama_bytes` below), its bytes dequantized by gguf.quants.dequantize
# (Q8_K: d * qs), measured once on x86-64. They are equal because the bytes are.
RMS_OURS = {"Q4_K": 0.07155249226370508, "Q5_K": 0.03622316413606692, "Q6_K": 0.01777637829764165,
            "Q8_K": 0.006991849410293546}
RMS_LLAMA = {"Q4_K": 0.07155249226370508, "Q5_K": 0.03622316413606692, "Q6_K": 0.01777637829764165,
             "Q8_K": 0.006991849410293546}


# --- GGUF bytes and dequantization --------------------------------------------------------------------------
def pack_blocks(fmt: str, planes: dict) -> np.ndarray:
    """Planes of x [rows, K] -> GGUF bytes uint8 [rows, K/256 * type_size] (realm_jax.quant's packer)."""
    rows = np.asarray(planes["d"]).shape[0]
    return QFORMATS[fmt].join(planes).reshape(rows, -1)


def dequantize(fmt: str, planes: dict) -> np.ndarray:
    """Planes of x [rows, K] -> float32 [rows, K] (gguf-py, which matches llama.cpp's dequantizers)."""
    if fmt == "Q8_K":
        d, qs = np.asarray(planes["d"]), np.asarray(planes["qs"])
        return (np.repeat(d, QK, axis=-1) * qs.astype(np.float32)).astype(np.float32)
    return gguf.quants.dequantize(pack_blocks(fmt, planes), gguf.GGMLQuantizationType[fmt])


def quantize(fmt: str, x: np.ndarray) -> dict:
    return {k: np.asarray(v) for k, v in QUANTIZE[fmt](jnp.asarray(x)).items()}


# --- edge-case data: [rows, 512], one row per case ---------------------------------------------------------
def _edge_rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    n = rng.standard_normal(512).astype(np.float32)
    outlier = n * 0.01
    outlier[300] = 50.0
    return {
        "zeros": np.zeros(512, np.float32),
        "constant": np.full(512, 0.75, np.float32),
        "negative_constant": np.full(512, -3.0, np.float32),
        "negative_only": -np.abs(n) - 0.5,
        "positive_only": np.abs(n) + 0.5,
        "huge": n * 3e5,
        "small": n * 1e-3,
        "tiny": n * 1e-12,
        "outlier": outlier,
        "normal": n,
    }


EDGE = _edge_rows()


def test_planes_shapes_and_dtypes():
    x = np.random.default_rng(0).standard_normal((2, 3, 512)).astype(np.float32)
    for fmt in FORMATS:
        planes = QUANTIZE[fmt](x)
        assert set(planes) == set(PLANES[fmt]), fmt
        for name, (dtype, count) in PLANES[fmt].items():
            assert planes[name].dtype == dtype, (fmt, name)
            assert planes[name].shape == (2, 3, 2 * count), (fmt, name)
        for shape in [(256,), (0, 512)]:
            planes = QUANTIZE[fmt](jnp.zeros(shape, jnp.float32))
            for name, (dtype, count) in PLANES[fmt].items():
                assert planes[name].shape == (*shape[:-1], shape[-1] // QK * count), (fmt, name, shape)


@pytest.mark.parametrize("fmt", FORMATS)
def test_validation(fmt):
    with pytest.raises(ShapeMismatchError, match=r"x.shape=\(4, 100\)"):
        QUANTIZE[fmt](jnp.zeros((4, 100), jnp.float32))
    with pytest.raises(DTypeError, match="x.dtype"):
        QUANTIZE[fmt](jnp.zeros((4, 256), jnp.int32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_edge_cases(fmt):
    x = np.stack(list(EDGE.values()))
    planes = quantize(fmt, x)
    y = dequantize(fmt, planes)
    assert y.dtype == np.float32
    for i, case in enumerate(EDGE):
        assert np.all(np.isfinite(y[i])), (fmt, case)
        if case == "tiny" and fmt != "Q8_K":  # as in llama.cpp, the f16 super-block scale underflows to 0
            assert np.all(y[i] == 0), fmt
            continue
        xb, yb = x[i].reshape(-1, QK), y[i].reshape(-1, QK)
        bound = MAX_ERR[fmt] * np.abs(xb).max(axis=1, keepdims=True)
        assert np.all(np.abs(yb - xb) <= bound), (fmt, case, np.abs(yb - xb).max(), bound.max())
    zero = list(EDGE).index("zeros")
    assert np.all(y[zero] == 0), fmt
    if fmt != "Q8_K":
        for case in ("constant", "negative_constant"):
            np.testing.assert_allclose(y[list(EDGE).index(case)], x[list(EDGE).index(case)], rtol=2e-3,
                                       err_msg=f"{fmt} {case}")


def test_bf16_input_is_quantized_as_its_f32_values():
    x = np.random.default_rng(2).standard_normal((2, 256)).astype(np.float32)
    xb = jnp.asarray(x, jnp.bfloat16)
    for fmt in FORMATS:
        a, b = QUANTIZE[fmt](xb), QUANTIZE[fmt](xb.astype(jnp.float32))
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=f"{fmt} {k}")


def _normal_data() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_rms_error_matches_llama_cpp(fmt):
    x = _normal_data()
    rms = float(np.sqrt(np.mean((dequantize(fmt, quantize(fmt, x)) - x) ** 2, dtype=np.float64)))
    assert rms == pytest.approx(RMS_OURS[fmt], rel=1e-6)
    assert rms == pytest.approx(RMS_LLAMA[fmt], rel=0.01)


# --- bytes against libggml (optional) -----------------------------------------------------------------------
def _libggml_base() -> ctypes.CDLL:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install 'realm-jax[llama]'")
    pkg = pathlib.Path(importlib.util.find_spec("llama_cpp").origin).parent
    libs = sorted(pkg.glob("lib/libggml-base.*"))
    if not libs:
        pytest.skip(f"no libggml-base shared library under {pkg / 'lib'}")
    return ctypes.CDLL(str(libs[0]))


def _llama_bytes(lib: ctypes.CDLL, fmt: str, x: np.ndarray) -> np.ndarray:
    """libggml's quantize_row_<fmt>_ref of each row of x [rows, K] -> GGUF bytes [rows, K/256*type_size]."""
    fn = getattr(lib, f"quantize_row_{fmt[:2].lower()}_K_ref")
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // QK * TYPE_SIZE[fmt]), np.uint8)  # zeroed: Q8_K leaves bsums
    fn(x.ctypes.data, out.ctypes.data, x.size)                                  # of all-zero blocks unset
    return out


def _varied_data() -> np.ndarray:
    """[96, 4096] f32: normal, heavy-tailed, scaled, sparse, constant, zero, tiny and huge rows."""
    rng = np.random.default_rng(3)
    n = lambda r: rng.standard_normal((r, 4096)).astype(np.float32)  # noqa: E731
    scale = np.exp(rng.uniform(-8, 8, (8, 1))).astype(np.float32)
    sparse = n(8) * (rng.random((8, 4096)) < 0.05)
    constant = np.repeat(rng.standard_normal((8, 1)), 4096, axis=1)
    halves = n(8)
    halves[:, ::2] = 0
    rows = [n(16), rng.standard_t(2, (16, 4096)), rng.standard_cauchy((8, 4096)), n(8) * scale, sparse,
            constant, np.zeros((4, 4096)), n(4) * 1e-15, n(4) * 1e6, np.abs(n(4)), -np.abs(n(4)) - 1, halves,
            np.round(n(4) * 4) / 4]
    return np.concatenate(rows).astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bit_exact_with_libggml(fmt):
    lib = _libggml_base()
    x = _varied_data()
    ours = pack_blocks(fmt, quantize(fmt, x))
    ref = _llama_bytes(lib, fmt, x)
    bad = np.nonzero(np.any(ours.reshape(-1, TYPE_SIZE[fmt]) != ref.reshape(-1, TYPE_SIZE[fmt]), axis=1))[0]
    assert bad.size == 0, f"{fmt}: {bad.size} of {ref.size // TYPE_SIZE[fmt]} super-blocks differ, first {bad[:8]}"
