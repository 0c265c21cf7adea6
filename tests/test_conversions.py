"""conversions: f32 / f16 / bf16, bit-exact against numpy and ml_dtypes (the oracle), NaN payloads included.

Every 16-bit pattern is checked exhaustively; f32 -> 16-bit on an edge sweep (powers of two, neighbours,
every rounding midpoint of both formats, the f16 subnormal and overflow boundaries, f32 subnormals, NaNs)
plus 1M seeded random bit patterns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from realm_jax.conversions import bf16_to_f16, convert, f16_to_bf16, f32_to_bf16, f32_to_f16, to_float32
from realm_jax.errors import DTypeError

F32, F16, BF16 = np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)
UINT = {4: np.uint32, 2: np.uint16}


def oracle(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and overflow casts are the point here
        return np.asarray(x).astype(dtype)


def assert_bits_equal(got, want: np.ndarray, x: np.ndarray) -> None:
    got = np.asarray(got)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    g, w = got.view(UINT[got.itemsize]), want.view(UINT[want.itemsize])
    xb = np.asarray(x).view(UINT[np.asarray(x).itemsize])
    bad = np.flatnonzero(g.ravel() != w.ravel())
    first = ", ".join(f"{xb.flat[i]:#x} -> {g.flat[i]:#x} (want {w.flat[i]:#x})" for i in bad[:8])
    assert bad.size == 0, f"{bad.size} of {g.size} differ: {first}"


def all_16bit(dtype: np.dtype) -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype)


@pytest.mark.parametrize(
    "fn, src, dst",
    [(to_float32, F16, F32), (to_float32, BF16, F32), (f16_to_bf16, F16, BF16), (bf16_to_f16, BF16, F16)],
    ids=["f16->f32", "bf16->f32", "f16->bf16", "bf16->f16"],
)
def test_every_16bit_pattern(fn, src, dst):
    x = all_16bit(src)
    want = oracle(x, dst)
    assert_bits_equal(fn(jnp.asarray(x)), want, x)
    assert_bits_equal(convert(jnp.asarray(x), dst), want, x)


def f32_bits(*words: int) -> np.ndarray:
    return np.array(words, dtype=np.uint32).view(np.float32)


def midpoints(dtype: np.dtype) -> np.ndarray:
    """Every value of `dtype` (finite, >= 0) as f32 and the f32 midpoints between neighbours (all exact)."""
    v = np.sort(oracle(all_16bit(dtype), F32))
    v = v[np.isfinite(v) & (v >= 0)].astype(np.float64)
    top = v[-1] + (v[-1] - v[-2])  # the next value the format would have: midway to it, ties go to Inf
    return np.concatenate([v, (v[:-1] + v[1:]) / 2, [(v[-1] + top) / 2]]).astype(np.float32)


def edge_f32() -> np.ndarray:
    inf = np.float32(np.inf)
    powers = np.ldexp(np.float32(1), np.arange(-149, 128)).astype(np.float32)  # 2^-149 (subnormal) .. 2^127
    named = np.array(
        [0.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-26, 2.0**-14, 2.0**-14 - 2.0**-25, 2.0**-14 - 2.0**-24,
         65504.0, 65520.0, 65519.0, 65536.0, 1.0, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8,
         1.0 + 3 * 2.0**-8, np.finfo(np.float32).max, np.finfo(np.float32).smallest_normal],
        dtype=np.float32,
    )  # fmt: skip
    subnormals = f32_bits(1, 2, 3, 0x7FFF, 0x8000, 0x8001, 0x18000, 0x400000, 0x7FFFFF)
    finite = np.concatenate([powers, named, subnormals, midpoints(F16), midpoints(BF16)])
    with np.errstate(over="ignore"):  # the neighbour above f32 max is Inf, as wanted
        finite = np.concatenate([finite, np.nextafter(finite, inf), np.nextafter(finite, -inf), [inf]])
    payloads = [1 << k for k in range(23)] + [0x1FFF, 0x2000, 0x7FFF, 0x8000, 0x3FFFFF, 0x7FFFFF, 0x5555]
    quiet_bit = 0x400000
    nans = np.array([0x7F800000 | p | q for p in payloads for q in (0, quiet_bit)], dtype=np.uint32)
    x = np.concatenate([finite.view(np.uint32), nans])
    return np.concatenate([x, x | np.uint32(0x80000000)]).view(np.float32)


def random_f32(n: int = 1 << 20) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 1 << 32, size=n, dtype=np.uint32).view(np.float32)


@pytest.mark.parametrize("fn, dst", [(f32_to_f16, F16), (f32_to_bf16, BF16)], ids=["f32->f16", "f32->bf16"])
@pytest.mark.parametrize("values", [edge_f32, random_f32], ids=["edges", "random-bits"])
def test_f32_to_16bit(fn, dst, values):
    x = values()
    want = oracle(x, dst)
    assert_bits_equal(fn(jnp.asarray(x)), want, x)
    assert_bits_equal(convert(jnp.asarray(x), dst), want, x)


def test_edge_sweep_covers_the_cases():
    x = edge_f32()
    bits = x.view(np.uint32)
    h = oracle(x, F16)
    assert np.isnan(x).sum() >= 100 and ((bits & 0x7FC00000) == 0x7F800000).sum() >= 40  # signalling NaNs
    assert (np.abs(x) == np.float32(2.0**-149)).any() and (np.abs(x) == np.finfo(np.float32).max).any()
    assert (h.view(np.uint16) & 0x7FFF == 1).any() and np.isinf(h[np.isfinite(x)]).any()


@pytest.mark.parametrize("shape", [(), (0,), (3, 5), (2, 1, 7)])
@pytest.mark.parametrize("src", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("dst", [F32, F16, BF16], ids=str)
def test_convert_under_jit(src, dst, shape):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32).astype(src)
    got = jax.jit(convert, static_argnames="dtype")(jnp.asarray(x), dtype=dst)
    assert got.dtype == dst
    assert got.shape == shape
    assert_bits_equal(got, oracle(x, dst), x)


def test_convert_is_identity_for_equal_dtypes():
    x = jnp.arange(4, dtype=jnp.bfloat16)
    assert convert(x, "bfloat16") is x


@pytest.mark.parametrize(
    "x, dtype, named",
    [
        (np.arange(3, dtype=np.int32), F16, "int32"),
        (np.arange(3, dtype=np.int32), np.int32, "int32"),
        (np.ones(3, np.float64), F32, "float64"),
        (np.ones(3, np.float32), np.int8, "int8"),
        (np.ones(3, np.float32), "float64", "float64"),
        (np.ones(3, np.float32), "no-such-dtype", "no-such-dtype"),
    ],
)
def test_convert_rejects_other_dtypes(x, dtype, named):
    with pytest.raises(DTypeError, match=named):
        convert(x, dtype)


@pytest.mark.parametrize(
    "fn, bad",
    [(to_float32, F32), (f32_to_f16, F16), (f32_to_bf16, BF16), (f16_to_bf16, BF16), (bf16_to_f16, F16)],
)
def test_named_conversions_check_their_source(fn, bad):
    with pytest.raises(DTypeError, match=bad.name):
        fn(jnp.ones(4, bad))
