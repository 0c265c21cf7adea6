"""Block formats: registry, lossless repack, and dequantization bit-exact against gguf-py."""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

import realm_jax
from realm_jax.errors import DTypeError, MemoryBudgetError, QTensorError, UnsupportedFormatError
from realm_jax.gguf import open_gguf
from realm_jax.quant import FORMATS, QTensor, dequantize, get_format, repack, unpack
from helpers import random_blocks

ALL = list(FORMATS)
# gguf-py has no dequantizer for Q8_K, nor for the plain integer and F64 types: its reader hands those out as
# numpy arrays, whose float32 values are numpy's astype.
PLAIN = {"I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "F64": np.float64}


def bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(np.uint32)


def assert_bit_identical(got, ref):
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.dtype == np.float32
    assert got.shape == ref.shape
    mismatch = bits(got) != bits(ref)
    assert not mismatch.any(), f"{mismatch.sum()} of {mismatch.size} values differ, first at {np.argwhere(mismatch)[0]}"


def dequant_q8_k_numpy(raw: np.ndarray) -> np.ndarray:
    """ggml's dequantize_row_q8_K transcribed: y[j] = d * qs[j], d an f32 per 256 elements."""
    blocks = raw.reshape(-1, 292)
    d = blocks[:, :4].copy().view("<f4").astype(np.float32)
    qs = blocks[:, 4:260].copy().view(np.int8).astype(np.float32)
    with np.errstate(over="ignore"):
        return (d * qs).reshape(*raw.shape[:-1], -1)


def reference(raw: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "Q8_K":
        return dequant_q8_k_numpy(raw)
    if fmt in PLAIN:
        with np.errstate(invalid="ignore", over="ignore"):
            return np.ascontiguousarray(raw).view(np.dtype(PLAIN[fmt]).newbyteorder("<")).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        return gguf.quants.dequantize(raw, GGMLQuantizationType[fmt])


@pytest.mark.parametrize("fmt", ALL)
def test_registry_matches_ggml(fmt):
    f = get_format(fmt)
    assert f.ggml_type == GGMLQuantizationType[fmt].value
    assert (f.block_size, f.type_size) == GGML_QUANT_SIZES[GGMLQuantizationType[fmt]]


def test_unknown_format_is_named():
    with pytest.raises(UnsupportedFormatError, match="Q1_0.*supported: F32"):
        get_format("Q1_0")


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("n_blocks", [1, 5])
def test_random_bytes_dequantize_bit_exact_and_roundtrip(fmt, n_blocks, rng):
    """Uniformly random bytes: every bit pattern of every field, NaN/Inf/subnormal scales included."""
    f = get_format(fmt)
    raw = rng.integers(0, 256, size=(7, n_blocks * f.type_size), dtype=np.uint8)
    if fmt == "Q8_K":  # XLA:CPU flushes f32 subnormal products to zero: keep d normal (see dequantize's doc)
        blocks = raw.reshape(7, n_blocks, 292)
        blocks[..., :4] = (rng.standard_normal((7, n_blocks, 1)) * 1e-3).astype("<f4").view(np.uint8)
    qt = repack(raw, fmt, (7, n_blocks * f.block_size))
    assert np.array_equal(unpack(qt), raw)
    assert not any(np.shares_memory(p, raw) for p in qt.planes.values())  # read_gguf reuses its buffer
    ref = reference(raw, fmt)
    got = dequantize(qt)
    assert got.shape == (7, n_blocks * f.block_size)
    np.testing.assert_array_equal(np.isnan(np.asarray(got)), np.isnan(ref))
    assert_bit_identical(np.where(np.isnan(ref), 0, got), np.where(np.isnan(ref), 0, ref))


def _scale_fields(fmt):
    """(byte offset, field) of each f16/f32 scale field of the block struct."""
    out, offset = [], 0
    for field in get_format(fmt).fields:
        if np.dtype(field.dtype).kind == "f":
            out.append((offset, field))
        offset += field.nbytes
    return out


SPECIAL_F16 = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00, 0x0200],
                       dtype=np.uint16)


@pytest.mark.parametrize("fmt", [f for f in ALL if get_format(f).block_size > 1])
def test_special_scales_bit_exact(fmt, rng):
    """All-zero blocks, and scales that are zero, +-subnormal, the smallest normal, +-65504."""
    f = get_format(fmt)
    n = len(SPECIAL_F16)
    raw = rng.integers(0, 256, size=(n + 1, f.type_size), dtype=np.uint8)
    raw[n] = 0  # an all-zero block
    for offset, field in _scale_fields(fmt):
        if field.dtype == np.float16:
            raw[:n, offset : offset + 2] = SPECIAL_F16.view(np.uint8).reshape(n, 2)
        else:  # Q8_K's f32 d: extreme normal values
            d = np.array([0, -0.0, 1.17549435e-38, -1.17549435e-38, 3.4e38, 1e-30, 1, -1, 1e-5, 65504] * 1,
                         dtype="<f4")[:n]
            raw[:n, offset : offset + 4] = d.view(np.uint8).reshape(n, 4)
    qt = repack(raw.reshape(1, -1), fmt, (1, (n + 1) * f.block_size))
    assert np.array_equal(unpack(qt), raw.reshape(1, -1))
    assert_bit_identical(dequantize(qt), reference(raw.reshape(1, -1), fmt))
    assert not np.asarray(dequantize(qt))[0, -f.block_size:].any()


def _bit_exact_with_nans(got, ref):
    got, ref = np.asarray(got), np.asarray(ref)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert_bit_identical(np.where(np.isnan(ref), 0, got), np.where(np.isnan(ref), 0, ref))


@pytest.mark.parametrize("fmt,offset,count", [("MXFP4", 0, 1), ("NVFP4", 0, 4)])
def test_every_scale_byte(fmt, offset, count, rng):
    """Every value of MXFP4's E8M0 exponent (subnormal scales at 0 and 1, products past f32's range at 255) and
    of NVFP4's E4M3 scale bytes (0x7F reads as 0, bit 7 is ignored)."""
    f = get_format(fmt)
    raw = rng.integers(0, 256, size=(256 // count, f.type_size), dtype=np.uint8)
    raw[:, offset : offset + count] = np.arange(256, dtype=np.uint8).reshape(-1, count)
    qt = repack(raw.reshape(1, -1), fmt, (1, raw.shape[0] * f.block_size))
    _bit_exact_with_nans(dequantize(qt), reference(raw.reshape(1, -1), fmt))


def test_iq1_m_scale_across_nibbles(rng):
    """IQ1_M's f16 scale, spread over the top nibbles of its four scale words: zero, subnormal, extreme, Inf
    and NaN patterns."""
    d = np.concatenate([SPECIAL_F16, np.array([0x7C00, 0xFC00, 0x7E01, 0x3555], np.uint16)])
    raw = rng.integers(0, 256, size=(d.size, 56), dtype=np.uint8)
    for i in range(4):  # word i (bytes 48 + 2i, 49 + 2i): bits 15..12 hold d's bits 4i+3..4i
        raw[:, 49 + 2 * i] = (raw[:, 49 + 2 * i] & 0x0F) | (((d >> (4 * i)) & 0xF) << 4).astype(np.uint8)
    qt = repack(raw.reshape(1, -1), "IQ1_M", (1, d.size * 256))
    assert np.array_equal(unpack(qt), raw.reshape(1, -1))
    _bit_exact_with_nans(dequantize(qt), reference(raw.reshape(1, -1), "IQ1_M"))


_I64_EDGES = [0, 1, -1, 2**24, 2**24 + 1, 2**24 + 3, -(2**24) - 1, 2**25 + 2, 2**25 + 6, 2**53 + 1, 2**62 + 2**38,
              2**62 + 2**38 + 1, 2**63 - 1, -(2**63), -(2**63) + 1, 2**31, 2**32 - 1, 2**32, 2**32 + 2**8 + 1,
              -(2**40) - 2**16 - 1, 12345678901234567]
_F64_EDGES = [0.0, -0.0, 1.0, 1 + 2**-24, 1 + 2**-23 + 2**-24, 1 + 2**-24 + 2**-50, 3.4028234663852886e38,
              3.4028235677973366e38, 3.402823669209385e38, 1e39, -1e300, 2.0**-126, 2.0**-127 * 3, 2.0**-149,
              2.0**-150, 2.0**-150 * 1.0000001, 2.0**-151, 1.5 * 2.0**-149, 2.5 * 2.0**-149, 5e-324, -1e-310,
              float("inf"), float("-inf"), 0.1, -2.0 / 3]


@pytest.mark.parametrize("fmt", ["I64", "F64", "I32"])
def test_plain_types_round_as_numpy(fmt, rng):
    """Nearest-even rounding at the 24-bit edge, overflow, f32 subnormals and halfway cases, the extremes, and
    (F64) NaN payloads, as numpy's astype(np.float32)."""
    dtype = {"I64": "<i8", "F64": "<f8", "I32": "<i4"}[fmt]
    if fmt == "F64":
        nans = np.array([0x7FF0000000000001, 0x7FF8000000000000, 0xFFF4000012345678, 0x7FFFFFFFFFFFFFFF],
                        np.uint64).view("<f8")
        values = np.concatenate([np.array(_F64_EDGES, "<f8"), nans, rng.standard_normal(64) * 1e20])
    elif fmt == "I64":
        values = np.concatenate([np.array(_I64_EDGES, "<i8"), rng.integers(-(2**63), 2**63 - 1, 64, "<i8")])
    else:
        values = np.concatenate([np.array([2**31 - 1, -(2**31), 2**24 + 1, 16777217 * 3], "<i4"),
                                 rng.integers(-(2**31), 2**31 - 1, 64, "<i4")])
    raw = values.astype(dtype).view(np.uint8).reshape(1, -1)
    qt = repack(raw, fmt, (1, values.size))
    assert np.array_equal(unpack(qt), raw)
    got, ref = np.asarray(dequantize(qt)), reference(raw, fmt)
    assert_bit_identical(got, ref)  # NaN payloads included


@pytest.mark.parametrize("fmt", ["F16", "BF16"])
def test_every_16bit_pattern(fmt):
    """All 65,536 patterns widen exactly to f32, NaN payloads included (as gguf-py)."""
    patterns = np.arange(65536, dtype=np.uint16)
    qt = repack(patterns.view(np.uint8).reshape(1, -1), fmt, (1, 65536))
    want = patterns.view(np.float16 if fmt == "F16" else ml_dtypes.bfloat16).astype(np.float32)[None]
    assert_bit_identical(dequantize(qt), want)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dequantize_to_half_dtypes(dtype, rng):
    raw = random_blocks("Q4_K", 3, 2, rng)
    qt = repack(raw, "Q4_K", (3, 512))
    got = dequantize(qt, dtype)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(dequantize(qt)).astype(dtype))


def test_dequantize_is_jittable_and_qtensor_is_a_pytree(rng):
    qt = repack(random_blocks("Q5_K", 2, 1, rng), "Q5_K", (2, 256))
    leaves, treedef = jax.tree_util.tree_flatten(qt)
    assert len(leaves) == 6
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert again.fmt == "Q5_K" and again.shape == (2, 256)
    on_device = jax.device_put(qt)
    jitted = jax.jit(lambda t: realm_jax.dequantize(t) * 2)(on_device)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(dequantize(qt)) * 2)


def test_three_dim_tensor(rng):
    """Leading dims are kept (MoE expert stacks are 3-D in GGUF)."""
    raw = random_blocks("Q8_0", 6, 2, rng)
    qt = repack(raw, "Q8_0", (2, 3, 64))
    assert qt.planes["qs"].shape == (2, 3, 64) and qt.planes["d"].shape == (2, 3, 2)
    assert_bit_identical(dequantize(qt), reference(raw, "Q8_0").reshape(2, 3, 64))
    assert np.array_equal(unpack(qt).reshape(6, -1), raw)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda p: p.pop("qs"), "planes must be"),
        (lambda p: p.update(qs=p["qs"][:, :-1]), "plane 'qs' must be uint8"),
        (lambda p: p.update(d=p["d"].astype(np.float32)), "plane 'd' must be float16"),
        (lambda p: p.update(extra=p["d"]), "planes must be"),
    ],
)
def test_malformed_qtensor_is_rejected(mutate, match, rng):
    qt = repack(random_blocks("Q4_K", 2, 1, rng), "Q4_K", (2, 256))
    planes = dict(qt.planes)
    mutate(planes)
    with pytest.raises(QTensorError, match=match):
        dequantize(QTensor("Q4_K", (2, 256), planes))


@pytest.mark.parametrize(
    "planes, match",
    [
        (None, r"planes must be a dict of Q4_0's planes \['d', 'qs'\], got NoneType"),
        ([("d", 1), ("qs", 2)], r"planes must be a dict of Q4_0's planes \['d', 'qs'\], got list"),
        ({"d": [[1.0]], "qs": np.zeros((1, 16), np.uint8)}, r"Q4_0 plane 'd' must be an array \(numpy or jax\), "
         r"got list"),
        ({"d": np.ones((1, 1), np.float16), "qs": None}, r"Q4_0 plane 'qs' must be an array .*, got NoneType"),
    ],
    ids=["none", "list", "list-plane", "none-plane"],
)
def test_planes_that_are_not_arrays_are_named(planes, match):
    with pytest.raises(QTensorError, match=f"^dequantize: qt: {match}"):
        dequantize(QTensor("Q4_0", (1, 32), planes))


@pytest.mark.parametrize("shape", [256, "ab", (True, 32), (1.0, 32), None, (2, None)])
def test_qtensor_shape_must_be_ints(shape):
    with pytest.raises(QTensorError, match=r"^QTensor: shape=.* must be a tuple of ints"):
        QTensor("Q4_0", shape, {})


def test_qtensor_shape_is_kept_as_a_tuple_and_rebuilt_from_any_leaves(rng):
    planes = repack(random_blocks("Q4_0", 2, 1, rng), "Q4_0", (2, 32)).planes
    qt = QTensor("Q4_0", [np.int64(2), 32], planes)
    assert qt.shape == (2, 32) and all(type(d) is int for d in qt.shape)  # hashable: a static field
    assert jax.tree.map(lambda p: None, qt).planes == {"d": None, "qs": None}  # jax rebuilds with placeholders
    assert jax.eval_shape(dequantize, qt).shape == (2, 32)


@pytest.mark.parametrize(
    "qt, dtype, error, match",
    [
        (np.ones((2, 32), np.float32), jnp.float32, QTensorError, r"qt must be a QTensor, got ndarray"),
        (None, jnp.float32, QTensorError, r"qt must be a QTensor, got NoneType"),
        ("Q4_0", "foo", DTypeError, r"dtype='foo' is not a dtype"),
        ("Q4_0", np.float64, DTypeError, r"dtype=float64 needs jax_enable_x64"),  # JAX would return float32
    ],
    ids=["ndarray", "none", "unknown-dtype", "float64"],
)
def test_dequantize_bad_arguments_are_named(qt, dtype, error, match, rng):
    if isinstance(qt, str):  # a valid one
        qt = repack(random_blocks("Q4_0", 2, 1, rng), "Q4_0", (2, 32))
    with pytest.raises(error, match=f"^dequantize: {match}"):
        dequantize(qt, dtype)


def _huge_q8_0() -> QTensor:
    """A Q8_0 tensor of 2**39 values whose planes are broadcast views: they hold 3 bytes, dense it is 2 TiB."""
    n, k = 1 << 24, 1 << 15
    return QTensor("Q8_0", (n, k), {"d": np.broadcast_to(np.float16(1), (n, k // 32)),
                                    "qs": np.broadcast_to(np.int8(1), (n, k))})


@pytest.mark.parametrize("op", ["dequantize", "qmatmul", "unpack"])
def test_huge_results_are_refused_before_allocating(op):
    qt = _huge_q8_0()
    if op == "unpack":  # its GGUF bytes: 34 bytes a block, 544 GiB
        with pytest.raises(MemoryBudgetError, match=r"^unpack of Q8_0\[16777216, 32768\] needs at least 544\.00 GiB"):
            unpack(qt)
        return
    with pytest.raises(MemoryBudgetError, match=rf"^{op}: .*QTensor\(Q8_0, shape=\(16777216, 32768\)\).* needs "
                       r"at least \d+\.\d\d GiB .* more than the .* free"):
        if op == "dequantize":
            dequantize(qt)
        else:
            realm_jax.qmatmul(np.ones((1, 1 << 15), np.float32), qt, impl="xla")


def test_bad_shapes_are_rejected(rng):
    raw = random_blocks("Q4_0", 2, 1, rng)
    with pytest.raises(QTensorError, match="block_size=32"):
        repack(raw, "Q4_0", (2, 33))
    with pytest.raises(QTensorError, match="needs 72 bytes"):
        repack(raw, "Q4_0", (4, 32))
    qt = repack(raw, "Q4_0", (2, 32))
    with pytest.raises(QTensorError, match="block_size"):
        dequantize(QTensor("Q4_0", (2, 31), qt.planes))
    for shape in (32, (1.5, 32), "32", (True, 32)):  # ints only, as QTensor takes them (1.5 was taken as 1)
        with pytest.raises(QTensorError, match=r"shape=.* must be a tuple of ints"):
            repack(raw, "Q4_0", shape)
    with pytest.raises(QTensorError, match=r"Q4_0\[8589934592, 2147483648, 32\] needs 332041393326771929088 bytes"):
        repack(np.zeros(0, np.uint8), "Q4_0", (2**33, 2**31, 32))  # np.prod's int64 wrapped to 0 bytes
    with pytest.raises(QTensorError, match="unpack: needs a QTensor, got ndarray"):
        unpack(np.zeros(3))


def test_unpack_refuses_scales_wider_than_6_bits(rng):
    qt = repack(random_blocks("Q4_K", 1, 1, rng), "Q4_K", (1, 256))
    planes = dict(qt.planes, scales=np.full((1, 8), 64, np.uint8))
    with pytest.raises(QTensorError, match="6 bits"):
        unpack(QTensor("Q4_K", (1, 256), planes))


def test_real_models_bit_exact_and_lossless(real_model_path):
    """Every tensor of both real models: repack -> unpack gives the file's bytes; and the first tensor of each
    format and shape (the layers repeat the first ones': 10 of gemma3's 236 tensors, 6 of
    SmolLM2's 272), dequantize gives gguf-py's values bit for bit (gguf-py's numpy dequantization of every
    tensor took ~25 s). The bytes, names, types and shapes come from realm_jax.gguf's parser, which
    test_gguf checks against gguf-py's GGUFReader (whose parse of gemma3's 262k-token vocabulary alone
    takes ~9 s)."""
    _, tensors = realm_jax.read_gguf(real_model_path)
    seen = set()
    with open_gguf(real_model_path) as f:
        assert set(tensors) == set(f.tensors)
        for name, info in f.tensors.items():
            qt = tensors[name]
            raw = f.read_tensor(name).reshape(*info.shape[:-1], -1)  # uint8 rows, as gguf-py's reader gives
            assert qt.fmt == info.type_name and qt.shape == info.shape, name
            assert np.array_equal(unpack(qt).reshape(-1).view(np.uint8), raw.reshape(-1)), name
            if (qt.fmt, qt.shape) in seen:
                continue
            seen.add((qt.fmt, qt.shape))
            ref = gguf.quants.dequantize(raw, GGMLQuantizationType(info.ggml_type))
            got = np.asarray(dequantize(qt))
            assert got.shape == ref.shape, name
            assert np.array_equal(bits(got), bits(ref)), name
    assert {fmt for fmt, _ in seen} >= {"F32", "Q8_0"}


@pytest.mark.parametrize("fmt", ["Q3_K", "Q4_K", "Q5_K", "IQ4_XS"])
def test_six_bit_scales_past_63_are_refused(fmt):
    """A hand-built QTensor whose 6-bit scales do not fit 6 bits: XLA's dequantization would read them whole
    and the native kernels their 6 bits (two answers), so dequantize and qmatmul refuse it."""
    w = realm_jax.quantize(np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32), fmt)
    planes = {k: np.array(v) for k, v in w.planes.items()}
    planes["scales"][0, 0] = 200
    bad = realm_jax.QTensor(fmt, w.shape, planes)
    with pytest.raises(QTensorError, match="dequantize: qt: plane 'scales' holds values above 63"):
        realm_jax.dequantize(bad)
    with pytest.raises(QTensorError, match="qmatmul: w: plane 'scales' holds values above 63"):
        realm_jax.qmatmul(np.ones((1, 256), np.float32), bad, impl="xla")

