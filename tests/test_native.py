"""The native CPU matmul kernel (realm_jax.native): every format, both builds (AVX-512 and portable), against a
float64 matmul of gguf-style dequantized weights; its build and failure modes. (The native backend of the
linear layer, which chooses between this kernel, the gemm and XLA's dot: tests/test_linear_native.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax
from realm_jax import native
from realm_jax.errors import ShapeMismatchError
from realm_jax.quant import dequantize, repack, to_dense
from helpers import assert_matmul_close, matmul_tolerance, random_blocks, random_qtensor, rms
from linear_base import pairwise

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native matmul unavailable: {native.reason()}")

FORMATS = list(native.FORMAT_IDS)
N = 37  # rows: not a multiple of the 16-row chunks the threads take


def check(x, w, compute_dtype=jnp.float32, out_dtype=jnp.float32, portable=False):
    y = jax.jit(lambda x, w: native.matmul(x, w, compute_dtype=compute_dtype, out_dtype=out_dtype,
                                           portable=portable))(x, w)
    # The products are exact in f32 whatever the compute dtype: only f32 accumulation (and the final
    # rounding to out_dtype) separates the kernel from float64 on x rounded to the compute dtype.
    assert_matmul_close(y, jnp.asarray(x).astype(compute_dtype), dequantize(w), compute_dtype=jnp.float32,
                        out_dtype=out_dtype)


# Every format with every row count (the kernel's 1-4 row blocks and a remainder), each in both builds:
# pairwise, not the full product.
CASES = [(r["fmt"], r["m"], r["portable"]) for r in pairwise({"fmt": FORMATS, "m": [1, 3, 4, 9],
                                                               "portable": [False, True]})]


@pytest.mark.parametrize("fmt,m,portable", CASES,
                         ids=[f"{f}-m{m}-{'portable' if p else 'vector'}" for f, m, p in CASES])
def test_every_format_matches_reference(fmt, m, portable, rng):
    k = 512 if m % 2 else 256
    w = random_qtensor(fmt, N, k, rng)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    check(x, w, portable=portable)


@pytest.mark.parametrize("compute_dtype,out_dtype", [(jnp.bfloat16, jnp.float32), (jnp.float16, jnp.float16),
                                                     (jnp.float32, jnp.bfloat16)])
@pytest.mark.parametrize("fmt", ["Q4_K", "Q6_K", "Q5_0", "Q8_0", "BF16"])
def test_compute_and_out_dtypes(fmt, compute_dtype, out_dtype, rng):
    w = random_qtensor(fmt, N, 1024, rng)
    x = jnp.asarray(rng.standard_normal((2, 5, 1024)), jnp.float32)  # leading dims are flattened and restored
    check(x, w, compute_dtype, out_dtype)


def test_many_rows_and_threads(rng):
    """Thousands of rows: many chunks over the thread pool, every row written once."""
    w = random_qtensor("Q4_K", 4099, 256, rng)
    x = jnp.asarray(rng.standard_normal((2, 256)), jnp.float32)
    check(x, w)


def test_builds_report_their_path():
    assert native.vector_path(portable=True) is False
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx512f " in flags and " avx512bw " in flags:
        assert native.vector_path() is True


def test_bad_operands_are_clear_errors(rng):
    w = random_qtensor("Q8_0", 8, 64, rng)
    with pytest.raises(ShapeMismatchError, match="must end in K=64"):
        native.matmul(jnp.zeros((1, 32)), w)
    odd = to_dense(random_qtensor("F32", 4, 40, rng), jnp.float32)  # K not a multiple of 32
    assert not native.supports(odd)
    with pytest.raises(ShapeMismatchError, match="not supported"):
        native.matmul(jnp.zeros((1, 40)), odd)


def test_kernel_rejects_mismatched_planes(rng):
    """The custom call checks what it is given: a plane of the wrong size is an error, not a bad read."""
    w = random_qtensor("Q8_0", 8, 64, rng)
    native.matmul(jnp.zeros((1, 64)), w)  # registered
    short, zero = w.planes["qs"][:4], jnp.int32(0)
    call = jax.ffi.ffi_call("realm_qmatmul", jax.ShapeDtypeStruct((1, 8), jnp.float32))
    with pytest.raises(Exception, match="plane's size"):
        jax.block_until_ready(call(jnp.zeros((1, 64)), zero, w.planes["d"], short, fmt=np.int64(14), round=np.int64(0),
                                   x16=np.int64(0)))
    with pytest.raises(Exception, match="unknown format"):
        jax.block_until_ready(call(jnp.zeros((1, 64)), zero, w.planes["d"], w.planes["qs"], fmt=np.int64(99),
                                   round=np.int64(0), x16=np.int64(0)))
    with pytest.raises(Exception, match="unknown weight rounding"):
        jax.block_until_ready(call(jnp.zeros((1, 64)), zero, w.planes["d"], w.planes["qs"], fmt=np.int64(14),
                                   round=np.int64(7), x16=np.int64(0)))
    with pytest.raises(Exception, match="layer index is outside"):
        jax.block_until_ready(call(jnp.zeros((1, 64)), jnp.int32(1), w.planes["d"], w.planes["qs"], fmt=np.int64(14),
                                   round=np.int64(0), x16=np.int64(0)))


# Q2_K and Q3_K at a 16-bit compute dtype: the integer path (kquants_low.h's dot_x16) on x quantized to int16
# codes per 256 elements. Rows of x: normal, all equal (every code 32767: the int16 products and int32 sums at
# their largest), one large element per block among small ones, zeros.
def _edge_weight(fmt: str, k: int, rng) -> object:
    """8 rows of fmt: random, then the largest codes with the largest (Q3_K: also the most negative) sub-block
    scales, d at f16's largest finite value and at its smallest subnormal, d = dmin = 0."""
    raw = random_blocks(fmt, 8, k // 256, rng).reshape(8, k // 256, -1)
    d = 80 if fmt == "Q2_K" else 108  # Q2_K: scales 16 | qs 64 | d | dmin;  Q3_K: hmask 32 | qs 64 | scales 12 | d
    raw[1, :, :d] = 0xFF  # Q2_K: codes 3, scales and mins 15; Q3_K: codes 3, scales 31
    raw[2, :, :d] = 0x0F if fmt == "Q2_K" else 0  # Q2_K: mins 0, qs nibbles; Q3_K: codes -4, scales -32
    raw[3, :, d : d + 2] = np.float16(65504).reshape(1).view(np.uint8)
    raw[4, :, d:] = np.tile(np.float16(2.0**-24).reshape(1).view(np.uint8), (raw.shape[-1] - d) // 2)
    raw[5, :, d:] = 0
    return repack(raw.reshape(8, -1), fmt, (8, k))


def _int16_x(x: np.ndarray) -> np.ndarray:
    """x as the integer path sees it, computed as kquants_low.h's XInt16 does (f32 32767 / max|x| per 256,
    round to nearest even), in float64: codes times max / 32767."""
    blocks = x.reshape(x.shape[0], -1, 256).astype(np.float32)
    amax = np.max(np.abs(blocks), axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(32767) / amax, np.float32(0))
    codes = np.rint(blocks * inv)
    return (codes.astype(np.float64) * (amax / np.float32(32767)).astype(np.float64)).reshape(x.shape)


# The vector build pairwise over formats, rows (the 1-4 row blocks and a remainder), super-blocks (one, three,
# and 17: the f16 factors are converted 16 super-blocks at a time) and the dtypes; the portable build (no
# integer path: the same checks bound its f32 path) twice.
INT16_GRID = {"fmt": ["Q2_K", "Q3_K"], "m": [1, 3, 4, 9], "k": [256, 768, 17 * 256], "compute": ["bfloat16", "float16"]}
INT16_CASES = [{**c, "portable": False} for c in pairwise(INT16_GRID)]
INT16_CASES += [{"fmt": "Q2_K", "m": 3, "k": 768, "compute": "bfloat16", "portable": True},
                {"fmt": "Q3_K", "m": 9, "k": 256, "compute": "float16", "portable": True}]


@pytest.mark.parametrize("case", INT16_CASES, ids=lambda c: f"{c['fmt']}-m{c['m']}-k{c['k']}-{c['compute']}-"
                                                           f"{'portable' if c['portable'] else 'vector'}")
def test_q2_k_q3_k_int16_path(case, rng):
    """The AVX-512 build's result is dequant(W) . (x as int16 codes) within f32 accumulation's tolerance (so
    the path ran, and its scales, mins, offsets and sums are right); every build is within the codes'
    rounding (a step of max|x| / 32767 per element, summed with |w|) of the float64 product; a row's result
    is the same alone as among the others; Inf/NaN scales give non-finite rows, as in the reference."""
    fmt, m, k, portable = case["fmt"], case["m"], case["k"], case["portable"]
    w = _edge_weight(fmt, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[1::4] = 1.0
    x[2::4, ::256] = 1e3
    x[3::4] = 0.0
    x = np.asarray(jnp.asarray(x, case["compute"]).astype(jnp.float32))
    f = jax.jit(lambda x, w: native.matmul(x, w, compute_dtype=case["compute"], out_dtype=jnp.float32,
                                           portable=portable))
    y = np.asarray(f(x, w), np.float64)
    wd = np.asarray(dequantize(w), np.float64)
    tol = matmul_tolerance(jnp.float32, k, rms(x), rms(wd))
    step = np.repeat(np.max(np.abs(x.reshape(m, -1, 256)), axis=-1) / 32767, 256, axis=-1)
    assert np.all(np.abs(y - x.astype(np.float64) @ wd.T) <= step @ np.abs(wd).T + tol)
    if not portable and native.vector_path():
        codes = _int16_x(x)
        assert float(np.max(np.abs(y - codes @ wd.T))) <= matmul_tolerance(jnp.float32, k, rms(codes), rms(wd))
    for i in range(m):
        np.testing.assert_array_equal(np.asarray(f(x[i : i + 1], w), np.float64), y[i : i + 1])
    bad = {name: np.asarray(p).copy() for name, p in w.planes.items()}
    bad["d"][6] = np.float16(np.inf)
    bad["d"][7, -1] = np.float16(np.nan)
    y = np.asarray(f(x, type(w)(fmt, w.shape, {n: jnp.asarray(p) for n, p in bad.items()})))
    assert not np.any(np.isfinite(y[:, 6:])) and np.all(np.isfinite(y[:, :6]))


def test_q2_k_int16_path_falls_back_on_nonfinite_or_tiny_x(rng):
    """x with an Inf, a NaN, or a block whose largest |x| is too small for int16 codes (32767 / max overflows):
    the call takes the f32 path, the f32 compute dtype's result on the same (rounded) x."""
    w = random_qtensor("Q2_K", N, 512, rng)
    bf16 = jax.jit(lambda x: native.matmul(x, w, compute_dtype=jnp.bfloat16, out_dtype=jnp.float32))
    exact = jax.jit(lambda x: native.matmul(x, w, out_dtype=jnp.float32))
    for special in (np.inf, np.nan, 1e-36):
        x = np.array(jnp.asarray(rng.standard_normal((3, 512)), jnp.bfloat16).astype(jnp.float32))
        if special == 1e-36:
            x[1, :256] = special
        x[1, 7] = special
        np.testing.assert_array_equal(np.asarray(bf16(x)), np.asarray(exact(x)))


@pytest.mark.parametrize("fmt", ["Q4_K", "Q8_0", "BF16"])
def test_layer_of_a_stack_read_in_place(fmt, rng):
    """Stacked planes [L, ...] and a (traced) layer index: layer i's product, as for the unstacked weight."""
    ws = [random_qtensor(fmt, N, 256, rng) for _ in range(3)]
    stacked = jax.tree.map(lambda *p: jnp.stack(p), *ws)
    x = jnp.asarray(rng.standard_normal((2, 256)), jnp.float32)
    f = jax.jit(lambda x, w, i: native.matmul(x, w, layer=i))
    for i, w in enumerate(ws):
        np.testing.assert_array_equal(np.asarray(f(x, stacked, jnp.int32(i))), np.asarray(native.matmul(x, w)))
    with pytest.raises(realm_jax.errors.QTensorError, match="one layer of a stack"):
        native.matmul(x, ws[0], layer=0)  # unstacked planes given a layer index


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})


def test_turned_off_or_unbuildable(tmp_path):
    """REALM_JAX_NATIVE=0 or a compiler that fails: "auto" stays on XLA, "native" names the cause."""
    code = """
        import realm_jax
        from realm_jax import native
        from realm_jax.linear import resolve
        print("auto:", resolve("auto", "cpu"), resolve("auto", "cpu"))
        print("attempts:", native._outcome.cache_info().misses)  # a failed build is not retried
        try:
            resolve("native", "cpu")
        except realm_jax.errors.NativeBuildError as e:
            print("error:", str(e).splitlines()[0])
    """
    off = _run(code, REALM_JAX_NATIVE="0")
    assert "auto: xla xla" in off.stdout and "turned off by REALM_JAX_NATIVE=0" in off.stdout, off.stderr
    broken = _run(code, CXX="false", REALM_JAX_CACHE=str(tmp_path))
    assert "auto: xla xla" in broken.stdout and "building qmatmul.cc, gemm.cc, attention.cc failed (false -O3" in broken.stdout, broken.stderr
    assert "attempts: 1" in broken.stdout, broken.stdout


@pytest.mark.parametrize("portable", [False, True], ids=["vector", "portable"])
@pytest.mark.parametrize("weight_dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("fmt", ["Q4_K", "Q6_K", "Q4_1", "F32"])
def test_weights_rounded_to_the_params_dtype(fmt, weight_dtype, portable, rng):
    """weight_dtype rounds each dequantized weight as converting it would (nearest even; for f16 also the
    subnormals and the overflow to Inf), in both builds."""
    w = random_qtensor(fmt, N, 256, rng)
    if fmt == "F32":  # values at f16's edges: subnormals, halfway cases, the largest finite, overflow
        edge = np.array([1e-6, 3e-5, 5.96e-8, 2.98e-8, 6.1e-5, 65504, 65519, -3e-5, 1 + 2**-11, 1 + 3 * 2**-11],
                        np.float32)
        vals = np.asarray(w.planes["w"]).copy()
        vals[:, : edge.size] = edge
        vals[0, edge.size : edge.size + 2] = [65520, 7e4]  # row 0 overflows to Inf in f16
        w = type(w)("F32", w.shape, {"w": jnp.asarray(vals)})
    x = jnp.asarray(rng.standard_normal((2, 256)), jnp.float32)
    y = np.asarray(jax.jit(lambda x, w: native.matmul(x, w, weight_dtype=weight_dtype, portable=portable))(x, w))
    wr = np.asarray(dequantize(w).astype(weight_dtype).astype(jnp.float32), np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # row 0 of F32/f16 holds Inf: its sums are Inf/NaN
        want = np.asarray(x, np.float64) @ wr.T
    finite = np.isfinite(want)
    assert np.array_equal(np.isfinite(y), finite)
    tol = matmul_tolerance(jnp.float32, 256, rms(x), rms(wr[np.isfinite(wr)]))
    assert float(np.max(np.abs(y[finite] - want[finite]))) <= tol


# The bf16 decode path (qmatmul.cc's dot_bf16: vdpbf16ps where the CPU has AVX512_BF16): block counts
# that are odd and past 16 (the legacy formats' factors are converted 16 blocks at a time), k-quants, the
# integer-path formats and dense ones, 1 to 9 rows (a block of 8 and a tail).
BF16_CASES = [("Q8_0", 32 * 19, 9), ("Q5_0", 32 * 3, 1), ("Q4_0", 32 * 17, 3), ("Q4_1", 32 * 33, 2),
              ("Q5_1", 32, 8), ("Q4_K", 256 * 3, 5), ("Q6_K", 256, 1), ("Q5_K", 512, 8), ("Q2_K", 256, 2),
              ("IQ4_XS", 256, 9), ("IQ4_NL", 32 * 5, 1), ("BF16", 96, 4), ("F32", 64, 1)]


@pytest.mark.parametrize("fmt,k,m", BF16_CASES, ids=lambda v: str(v))
def test_bf16_weights_against_bf16_x(fmt, k, m, rng):
    """Weights rounded to bf16 against an x of bf16 values (`native.matmul`'s weight_dtype bfloat16): the product of the
    rounded weights within f32 accumulation's tolerance, a row's result the same alone as among the others,
    an Inf scale giving non-finite rows as in the reference."""
    w = random_qtensor(fmt, N, k, rng)
    x = np.asarray(jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16).astype(jnp.float32))
    f = jax.jit(lambda x, w: native.matmul(x, w, compute_dtype=jnp.bfloat16, out_dtype=jnp.float32,
                                           weight_dtype=jnp.bfloat16))
    y = np.asarray(f(x, w), np.float64)
    wr = np.asarray(dequantize(w).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    tol = matmul_tolerance(jnp.float32, k, rms(x), rms(wr))
    assert float(np.max(np.abs(y - x.astype(np.float64) @ wr.T))) <= tol
    for i in range(m):
        np.testing.assert_array_equal(np.asarray(f(x[i : i + 1], w), np.float64), y[i : i + 1])
    scale = next((n for n in ("d", "w") if n in w.planes), None)
    if scale is not None:
        bad = {name: np.asarray(p).copy() for name, p in w.planes.items()}
        bad[scale][5] = np.inf
        y = np.asarray(f(x, type(w)(fmt, w.shape, {n: jnp.asarray(p) for n, p in bad.items()})))
        assert not np.any(np.isfinite(y[:, 5])) and np.all(np.isfinite(np.delete(y, 5, axis=1)))


# The exact codes against bf16 x (qmatmul.cc's dot_codes, where the CPU has AVX512_BF16; the f32 loop
# elsewhere): block counts odd and past 16, super-blocks of 256, 1 to 9 rows.
CODES_CASES = [("Q4_0", 32 * 17, 1), ("Q4_1", 32 * 33, 9), ("Q5_0", 32 * 3, 8), ("Q5_1", 32 * 19, 2),
               ("Q4_K", 256 * 3, 1), ("Q5_K", 512, 5), ("Q6_K", 768, 3)]


@pytest.mark.parametrize("fmt,k,m", CODES_CASES, ids=lambda v: str(v))
def test_exact_weights_against_bf16_x(fmt, k, m, rng):
    """weight_dtype float32 with a bf16 compute dtype for the formats of small codes: the product of the exact
    weights within f32 accumulation's tolerance, a row's result the same alone as among the others, an Inf
    scale giving non-finite rows; x with an Inf, a NaN or a value past 2^64 gives the f32 loop's result."""
    # every format of dot_codes is a case here, where the build has it (AVX512_BF16); none elsewhere
    assert native.exact_bf16_formats() == ({f for f, _, _ in CODES_CASES} if native.gemm_available() else set())
    w = random_qtensor(fmt, N, k, rng)
    x = np.asarray(jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16).astype(jnp.float32))
    f = jax.jit(lambda x, w: native.matmul(x, w, compute_dtype=jnp.bfloat16, out_dtype=jnp.float32))
    f32 = jax.jit(lambda x, w: native.matmul(x, w, out_dtype=jnp.float32))
    y = np.asarray(f(x, w), np.float64)
    wd = np.asarray(dequantize(w).astype(jnp.float32), np.float64)
    tol = matmul_tolerance(jnp.float32, k, rms(x), rms(wd))
    assert float(np.max(np.abs(y - x.astype(np.float64) @ wd.T))) <= tol
    for i in range(m):
        np.testing.assert_array_equal(np.asarray(f(x[i : i + 1], w), np.float64), y[i : i + 1])
    bad = {name: np.asarray(p).copy() for name, p in w.planes.items()}
    bad["d"][5] = np.inf
    y = np.asarray(f(x, type(w)(fmt, w.shape, {n: jnp.asarray(p) for n, p in bad.items()})))
    assert not np.any(np.isfinite(y[:, 5])) and np.all(np.isfinite(np.delete(y, 5, axis=1)))
    for special in (np.inf, np.nan, 2.0**70):
        xs = x.copy()
        xs[0, 3] = special
        np.testing.assert_array_equal(np.asarray(f(xs, w)), np.asarray(f32(xs, w)))


@pytest.mark.skipif(not {"avx2", "fma", "f16c", "bmi2"} <= native.cpu_flags(), reason="this CPU has no AVX2")
def test_forced_variants_run(tmp_path):
    """REALM_JAX_NATIVE_VARIANT=avx2 (or portable) makes every native kernel the model runs come from that
    build, on any machine that can execute it: the decode matmul and attention of a model on it agree with
    the XLA path; an unknown variant is a clear error, and "auto" stays on XLA."""
    code = """
        import functools, jax, jax.numpy as jnp, numpy as np
        import realm_jax
        from realm_jax import native
        from realm_jax.quant import quantize, dequantize
        x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 256)), jnp.float32)
        f = jax.jit(native.matmul)
        errs = {}
        for t in ("Q4_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q5_K", "Q6_K"):  # the compiler-vectorized groups
            w = quantize(np.random.default_rng(0).standard_normal((40, 256)).astype(np.float32), t)
            errs[t] = float(jnp.max(jnp.abs(f(x, w) - x @ dequantize(w).T)))
        print("target:", "realm_qmatmul_avx2" in f.lower(x, w).as_text(), native.vector_path())
        print("matmul ok:", max(errs.values()) < 1e-3, errs)
        k = jnp.asarray(np.random.default_rng(2).standard_normal((2, 1, 8, 2, 32)), jnp.float32)
        q = jnp.asarray(np.random.default_rng(3).standard_normal((1, 1, 4, 32)), jnp.float32)
        pos = jnp.full((1, 1), 5, jnp.int32)
        got = native.decode_attention(q, k, k, 1, pos, False, scale=0.2, kv_len=8)
        want = realm_jax.ops.attention(q, k[1], k[1], pos, scale=0.2)
        print("attention ok:", float(jnp.max(jnp.abs(got - want))) < 1e-5)
        xb = x.astype(jnp.bfloat16).astype(jnp.float32)  # no integer path here: bf16 x gives the f32 path's sums
        bf16 = jax.jit(functools.partial(native.matmul, compute_dtype=jnp.bfloat16))
        same = [bool(jnp.array_equal(bf16(xb, w2), f(xb, w2)))
                for w2 in (quantize(np.random.default_rng(4).standard_normal((40, 256)).astype(np.float32), t)
                           for t in ("Q2_K", "Q3_K"))]
        print("lowbit exact:", same)
    """
    out = _run(code, REALM_JAX_NATIVE_VARIANT="avx2")
    assert "target: True False" in out.stdout and "matmul ok: True" in out.stdout, out.stdout + out.stderr
    assert "attention ok: True" in out.stdout and "lowbit exact: [True, True]" in out.stdout, out.stdout + out.stderr
    # a name that is no build is the user's error, not a build that fails: "auto" would go on ~4x slower on XLA
    bad = _run("from realm_jax import linear\ntry:\n    linear.resolve('auto', 'cpu')\n"
               "except Exception as e:\n    print(type(e).__name__, e)", REALM_JAX_NATIVE_VARIANT="sse9")
    assert "ArgumentError REALM_JAX_NATIVE_VARIANT='sse9' must be one of native, avx2, portable" in bad.stdout, \
        bad.stdout + bad.stderr
