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
from realm_jax.quant import dequantize, to_dense
from helpers import assert_matmul_close, matmul_tolerance, random_qtensor, rms
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
        jax.block_until_ready(call(jnp.zeros((1, 64)), zero, w.planes["d"], short, fmt=np.int64(14), round=np.int64(0)))
    with pytest.raises(Exception, match="unknown format"):
        jax.block_until_ready(call(jnp.zeros((1, 64)), zero, w.planes["d"], w.planes["qs"], fmt=np.int64(99), round=np.int64(0)))
    with pytest.raises(Exception, match="unknown weight rounding"):
        jax.block_until_ready(call(jnp.zeros((1, 64)), zero, w.planes["d"], w.planes["qs"], fmt=np.int64(14),
                                   round=np.int64(7)))
    with pytest.raises(Exception, match="layer index is outside"):
        jax.block_until_ready(call(jnp.zeros((1, 64)), jnp.int32(1), w.planes["d"], w.planes["qs"], fmt=np.int64(14), round=np.int64(0)))


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


@pytest.mark.skipif(not {"avx2", "fma", "f16c", "bmi2"} <= native.cpu_flags(), reason="this CPU has no AVX2")
def test_forced_variants_run(tmp_path):
    """REALM_JAX_NATIVE_VARIANT=avx2 (or portable) makes every native kernel the model runs come from that
    build, on any machine that can execute it: the decode matmul and attention of a model on it agree with
    the XLA path; an unknown variant is a clear error, and "auto" stays on XLA."""
    code = """
        import jax, jax.numpy as jnp, numpy as np
        import realm_jax
        from realm_jax import native
        from realm_jax.quant import quantize, dequantize
        w = quantize(np.random.default_rng(0).standard_normal((40, 256)).astype(np.float32), "Q4_K")
        x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 256)), jnp.float32)
        f = jax.jit(native.matmul)
        print("target:", "realm_qmatmul_avx2" in f.lower(x, w).as_text(), native.vector_path())
        err = float(jnp.max(jnp.abs(f(x, w) - x @ dequantize(w).T)))
        print("matmul ok:", err < 1e-3)
        k = jnp.asarray(np.random.default_rng(2).standard_normal((2, 1, 8, 2, 32)), jnp.float32)
        q = jnp.asarray(np.random.default_rng(3).standard_normal((1, 1, 4, 32)), jnp.float32)
        pos = jnp.full((1, 1), 5, jnp.int32)
        got = native.decode_attention(q, k, k, 1, pos, False, scale=0.2, kv_len=8)
        want = realm_jax.ops.attention(q, k[1], k[1], pos, scale=0.2)
        print("attention ok:", float(jnp.max(jnp.abs(got - want))) < 1e-5)
    """
    out = _run(code, REALM_JAX_NATIVE_VARIANT="avx2")
    assert "target: True False" in out.stdout and "matmul ok: True" in out.stdout, out.stdout + out.stderr
    assert "attention ok: True" in out.stdout, out.stdout + out.stderr
    bad = _run("from realm_jax import native, linear; print(native.available(), native.reason()); "
               "print(linear.resolve('auto', 'cpu'))", REALM_JAX_NATIVE_VARIANT="sse9")
    assert "False" in bad.stdout and "must be one of" in bad.stdout and "xla" in bad.stdout, bad.stdout + bad.stderr
