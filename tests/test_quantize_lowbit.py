"""The quantizers of Q2_K, Q3_K (realm_jax/quant/kquants_low.py), IQ4_NL, IQ4_XS (iq4.py) and MXFP4 (mxfp.py):
plane layout, validation, edge cases, error against llama.cpp's, and bytes identical to libggml's (the last only
where llama-cpp-python is installed)."""

from __future__ import annotations

import ctypes
import functools

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax.errors import ArgumentError, DTypeError, ShapeMismatchError
from realm_jax.quant import FORMATS, QTensor, dequantize, quantize, unpack
from test_kquantize import EDGE, _libggml_base, _varied_data

QUANTIZED = ["Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "MXFP4"]
# libggml's entry points for a whole tensor without an importance matrix: what llama_model_quantize calls,
# the reference quantizers (quantize_row_*_ref) for all but IQ4_NL, whose _ref variant (ntry=-1) no file is
# written with.
LIBGGML = {"Q2_K": "quantize_q2_K", "Q3_K": "quantize_q3_K", "IQ4_NL": "quantize_iq4_nl", "IQ4_XS": "quantize_iq4_xs",
           "MXFP4": "quantize_mxfp4"}
# Largest |error| of a dequantized element as a fraction of its block's max |x| on the edge-case data (measured
# 0.284, 0.143, 0.125, 0.084, 0.248).
MAX_ERR = {"Q2_K": 0.3, "Q3_K": 0.15, "IQ4_NL": 0.13, "IQ4_XS": 0.09, "MXFP4": 0.25}
# RMS error of quantize -> dequantize on np.random.default_rng(0).standard_normal((10, 512)) f32 (f64 mean): (this module's quantizers, libggml's on the
# same data dequantized by gguf-py), measured once on x86-64 (llama-cpp-python 0.3.36). They are equal because
# the bytes are.
RMS = {"Q2_K": (0.29015738063075663, 0.29015738063075663), "Q3_K": (0.15036907291788665, 0.15036907291788665),
       "IQ4_NL": (0.07539107404564928, 0.07539107404564928), "IQ4_XS": (0.07603659022940472, 0.07603659022940472),
       "MXFP4": (0.11474168630885782, 0.11474168630885782)}


def roundtrip(fmt: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    qt = quantize(jnp.asarray(x), fmt)
    return unpack(qt), np.asarray(dequantize(qt))


EDGE_X = np.stack(list(EDGE.values())).reshape(-1, 512)
RMS_X = np.random.default_rng(0).standard_normal((10, 512)).astype(np.float32)
VARIED_X = _varied_data()  # [96, 4096]
ROWS = (len(EDGE_X), len(RMS_X), VARIED_X.size // 512)  # rows of 512 of each, in the stack below


@functools.cache
def stacked(fmt: str):
    """The three tests' data in one quantization (one compilation a format): the edge cases, the RMS data and
    the varied rows as rows of 512, stacked [4, 197, 512] (leading dims, as a stack of layers has). Returns
    (the QTensor, its bytes and its dequantized values as rows of 512, split into the three parts)."""
    x = np.concatenate([EDGE_X, RMS_X, VARIED_X.reshape(-1, 512)]).reshape(4, -1, 512)
    f = FORMATS[fmt]
    # The format's own quantizer, as libggml's: the varied rows' 1e6-scaled blocks overflow Q2_K's f16 scale to
    # inf in both, and `quantize` refuses them (`test_values_a_format_cannot_hold_are_refused`).
    qt = QTensor(fmt, x.shape, f.quantize(jnp.asarray(x)))
    raw = unpack(qt).reshape(-1, 512 // f.block_size * f.type_size)
    y = np.asarray(dequantize(qt)).reshape(-1, 512)
    cuts = np.cumsum(ROWS)[:-1]
    return qt, np.split(raw, cuts), np.split(y, cuts)


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_edge_cases_and_planes(fmt):
    f = FORMATS[fmt]
    qt, _, (y, _, _) = stacked(fmt)
    assert qt.shape == (4, sum(ROWS) // 4, 512)
    qt.check()  # every plane of the format, in its dtype and shape
    assert unpack(qt).shape == (*qt.shape[:2], 512 // f.block_size * f.type_size)
    x, y = EDGE_X.reshape(len(EDGE), -1), y.reshape(len(EDGE), -1)
    for i, case in enumerate(EDGE):
        assert np.all(np.isfinite(y[i])), (fmt, case)
        if case == "tiny" and fmt != "MXFP4":  # the f16 scale underflows to 0, as in llama.cpp
            assert np.all(np.abs(y[i]) <= 1e-11), fmt
            continue
        xb, yb = x[i].reshape(-1, f.block_size), y[i].reshape(-1, f.block_size)
        bound = MAX_ERR[fmt] * np.abs(xb).max(axis=1, keepdims=True)
        assert np.all(np.abs(yb - xb) <= bound), (fmt, case, np.abs(yb - xb).max(), bound.max())
    assert np.all(y[list(EDGE).index("zeros")] == 0), fmt
    with pytest.raises(ShapeMismatchError, match=r"x.shape=\(4, 100\)"):
        quantize(np.zeros((4, 100), np.float32), fmt)
    with pytest.raises(DTypeError, match="dtype"):
        quantize(np.zeros((4, 256), np.int32), fmt)


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_rms_error_matches_llama_cpp(fmt):
    _, _, (_, y, _) = stacked(fmt)
    rms = float(np.sqrt(np.mean((y - RMS_X) ** 2, dtype=np.float64)))
    ours, llama = RMS[fmt]
    assert rms == pytest.approx(ours, rel=1e-6)
    assert rms <= 1.02 * llama


def _llama_bytes(fmt: str, x: np.ndarray) -> np.ndarray:
    fn = getattr(_libggml_base(), LIBGGML[fmt])
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    fn.restype = ctypes.c_size_t
    f = FORMATS[fmt]
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // f.block_size * f.type_size), np.uint8)
    fn(x.ctypes.data, out.ctypes.data, x.shape[0], x.shape[1], None)
    return out


def _differing_blocks(fmt: str, ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    size = FORMATS[fmt].type_size
    return np.nonzero(np.any(ours.reshape(-1, size) != ref.reshape(-1, size), axis=1))[0]


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_bit_exact_with_libggml(fmt):
    """Normal, heavy-tailed, scaled, sparse, constant, zero and huge rows: every block as libggml writes it.
    The rows of N(0, 1e-15) values are the known difference (XLA:CPU flushes the subnormal products of three
    such values to zero, libggml does not): there only the dequantized magnitudes are checked."""
    x = VARIED_X
    tiny = np.zeros(x.shape[0], bool)
    tiny[68:72] = True  # _varied_data's n(4) * 1e-15 rows
    _, (_, _, ours), (_, _, y) = stacked(fmt)
    ours, y = ours.reshape(x.shape[0], -1), y.reshape(x.shape)
    ref = _llama_bytes(fmt, x)
    bad = _differing_blocks(fmt, ours[~tiny], ref[~tiny])
    assert bad.size == 0, f"{fmt}: {bad.size} blocks differ, first {bad[:8]}"
    want = gguf.quants.dequantize(ref[tiny], gguf.GGMLQuantizationType[fmt])
    assert np.max(np.abs(y[tiny] - want)) <= 1e-13


def test_mxfp4_exponent_at_powers_of_two(rng):
    """MXFP4's floor(log2f(amax)): block maxima just below powers of two (which log2f rounds up to them),
    from 2^-122 to 2^127, and subnormal ones (an infinite one is refused: `test_infinite_x_is_refused`)."""
    rows = []
    for k in range(-120, 128, 4):
        for j in (1, 2, 3, 8, 21, 55, 144):
            top = np.uint32(np.float32(2.0**k).view(np.uint32) - j).view(np.float32)
            b = (rng.standard_normal(32) * top / 4).astype(np.float32)
            b[rng.integers(32)] = top * rng.choice([-1, 1])
            rows.append(b)
    rows += [rng.standard_normal(32) * s for s in (1e-38, 1e-39, 1e-41, 1e-44)]
    x = np.array(rows, np.float32)
    ours, _ = roundtrip("MXFP4", x)
    ref = _llama_bytes("MXFP4", x)
    np.testing.assert_array_equal(ours[:, 0], ref[:, 0])  # every exponent
    normal = np.abs(x).min(axis=1) >= np.float32(2.0**-126)  # XLA:CPU reads subnormal inputs as zero
    assert _differing_blocks("MXFP4", ours[normal], ref[normal]).size == 0


def test_infinite_x_is_refused():
    """llama.cpp quantizes an infinite block to something; a block that cannot be represented is refused here."""
    with pytest.raises(ArgumentError, match=r"x\[0, 0\]=inf is not finite"):
        quantize(np.full((1, 32), np.inf, np.float32), "MXFP4")

