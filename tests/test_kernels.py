"""The Pallas kernels (pallas_kernels) against the XLA path of qmatmul, in interpret mode on CPU, and their
lowering for TPU (Mosaic) and CUDA (Triton, abstract H100) at the shapes of real models."""

from __future__ import annotations

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

import pallas_kernels
import realm_jax
from pallas_kernels import QUANTIZED_FORMATS, TpuTiling, choose_tiling
from realm_jax.errors import ShapeMismatchError, UnsupportedFormatError
from realm_jax.quant import QTensor, get_format
from helpers import matmul_tolerance, random_qtensor

N = 200  # not a multiple of any block_n: every call has a ragged tail
M_VALUES = (1, 2, 7, 16, 64, 256)  # decode (<= 16) and prefill
K_VALUES = (256, 1024, 4096)  # one super-block .. 4096
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
H100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                                                     platform="gpu"))


def rms(a) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(a, np.float64)))))


def check_against_xla(x, w, compute_dtype, out_dtype, interpret=True, **kernel_args):
    y = pallas_kernels.matmul(x, w, compute_dtype=compute_dtype, out_dtype=out_dtype, interpret=interpret,
                              **kernel_args)
    assert y.dtype == jnp.dtype(out_dtype)
    assert y.shape == (x.shape[0], w.shape[0])
    want = np.asarray(realm_jax.qmatmul(x, w, compute_dtype=compute_dtype, out_dtype=jnp.float32, impl="xla"))
    tol = matmul_tolerance(compute_dtype, w.shape[1], rms(x), rms(realm_jax.dequantize(w)))
    if jnp.dtype(out_dtype) != jnp.float32:  # both results are rounded to out_dtype at the end
        tol += float(np.max(np.abs(want))) * float(jnp.finfo(out_dtype).eps)
    err = float(np.max(np.abs(np.asarray(y, np.float32) - want)))
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g}"


# Every format x every M (both families) x every compute dtype, K cycling through one super-block .. 4096.
CASES = [(fmt, m, dt, K_VALUES[i % len(K_VALUES)])
         for i, (fmt, m, dt) in enumerate(itertools.product(QUANTIZED_FORMATS, M_VALUES, DTYPES))]


@pytest.mark.parametrize("backend", ["tpu", "triton"])
@pytest.mark.parametrize("fmt,m,compute_dtype,k", CASES,
                         ids=[f"{f}-m{m}-{jnp.dtype(d).name}-k{k}" for f, m, d, k in CASES])
def test_interpret_matches_xla(backend, fmt, m, compute_dtype, k, rng):
    w = random_qtensor(fmt, N, k, rng)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    check_against_xla(x, w, compute_dtype, jnp.float32, backend=backend)


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("m", [1, 64])
def test_half_precision_inputs_and_outputs(out_dtype, m, rng):
    w = random_qtensor("Q4_K", N, 512, rng)
    x = jnp.asarray(rng.standard_normal((m, 512)), out_dtype)
    for backend in ("tpu", "triton"):
        check_against_xla(x, w, out_dtype, out_dtype, backend=backend)


@pytest.mark.parametrize("fmt,m", [("Q4_K", 1), ("Q6_K", 7), ("Q5_0", 16), ("Q8_0", 40), ("Q5_K", 256)])
def test_no_out_of_bounds_reads(fmt, m, rng):
    """The ragged tail is padded, never read past: the checking interpreter raises on any such read."""
    k = 1024
    w, x = random_qtensor(fmt, N, k, rng), jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    check_against_xla(x, w, jnp.float32, jnp.float32, backend="tpu",
                      interpret=pltpu.InterpretParams(out_of_bounds_reads="raise"))


def test_ragged_tail_and_explicit_tiling(rng):
    w = random_qtensor("Q8_0", 130, 640, rng)  # K=640: no 256-multiple divides it, one K tile on TPU
    x = jnp.asarray(rng.standard_normal((3, 640)), jnp.float32)
    check_against_xla(x, w, jnp.float32, jnp.float32, backend="tpu")
    check_against_xla(x, w, jnp.float32, jnp.float32, backend="triton")  # K tiles of 128
    check_against_xla(x, w, jnp.float32, jnp.float32, backend="tpu", tiling=TpuTiling(block_m=8, block_n=128, block_k=128))
    with pytest.raises(ValueError, match="TritonTiling"):
        pallas_kernels.matmul(x, w, compute_dtype=jnp.float32, out_dtype=jnp.float32, backend="triton",
                              tiling=TpuTiling(block_m=8, block_n=128, block_k=128), interpret=True)


def test_tiling_heuristic_obeys_backend_rules():
    for fmt, m, n, k in itertools.product(QUANTIZED_FORMATS, (1, 7, 16, 17, 512, 2048), (200, 4096, 14336),
                                          (256, 576, 640, 4096, 14336)):
        block = get_format(fmt).block_size
        if k % block:
            with pytest.raises(ShapeMismatchError, match="block_size"):
                choose_tiling("tpu", fmt, m, n, k)
            continue
        t = choose_tiling("tpu", fmt, m, n, k)
        assert k % t.block_k == 0 and t.block_k % block == 0 and t.block_m % 8 == 0 and t.block_n % 128 == 0
        assert t.block_m >= m if m <= pallas_kernels.DECODE_ROWS else t.block_m <= 256
        g = choose_tiling("triton", fmt, m, n, k)
        for size in (g.block_m, g.block_n, g.block_k):
            assert size & (size - 1) == 0, g
        assert k % g.block_k == 0 and g.block_k % block == 0
        for p in get_format(fmt).planes:  # each plane's tile width is a power of two too
            width = g.block_k // block * p.count
            assert width & (width - 1) == 0, (fmt, p.name, g)


def abstract_weight(fmt: str, n: int, k: int) -> QTensor:
    f = get_format(fmt)
    planes = {p.name: jax.ShapeDtypeStruct((n, k // f.block_size * p.count), p.dtype) for p in f.planes}
    return QTensor(fmt, (n, k), planes)


# The projections of an 8B llama: (N, K) = q (4096, 4096), kv (1024, 4096), up/gate (14336, 4096),
# down (4096, 14336).
LOWER_CASES = [(fmt, m, nk) for fmt in QUANTIZED_FORMATS for m in (1, 16, 512)
               for nk in ((4096, 4096), (1024, 4096), (4096, 14336))]


@pytest.mark.parametrize("fmt,m,nk", LOWER_CASES, ids=[f"{f}-m{m}-{n}x{k}" for f, m, (n, k) in LOWER_CASES])
def test_lowers_for_tpu_and_cuda(fmt, m, nk):
    n, k = nk
    w, x = abstract_weight(fmt, n, k), jax.ShapeDtypeStruct((m, k), jnp.bfloat16)

    def kernel(backend):
        return jax.jit(functools.partial(pallas_kernels.matmul, compute_dtype=jnp.bfloat16, out_dtype=jnp.bfloat16,
                                         backend=backend))

    tpu = jax.export.export(kernel("tpu"), platforms=["tpu"])(x, w).mlir_module()
    assert re.findall(r"custom_call @(\w+)", tpu) == ["tpu_custom_call"]
    with use_abstract_mesh(H100):
        cuda = kernel("triton").trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"custom_call @([\w$.]+)", cuda) == ["__gpu$xla.gpu.triton"]


def test_qmatmul_dispatch(rng):
    w = random_qtensor("Q4_K", N, 512, rng)
    x = jnp.asarray(rng.standard_normal((2, 3, 512)), jnp.bfloat16)
    xla = realm_jax.qmatmul(x, w, impl="xla")
    from realm_jax import native

    cpu = "native" if native.available() else "xla"  # auto on CPU: the native matmul where it builds
    assert jnp.array_equal(realm_jax.qmatmul(x, w), realm_jax.qmatmul(x, w, impl=cpu))
    fused = realm_jax.qmatmul(x, w, impl="pallas", compute_dtype=jnp.float32)  # interpret mode on CPU
    assert fused.dtype == jnp.bfloat16 and fused.shape == (2, 3, N)
    want = realm_jax.qmatmul(x, w, impl="xla", compute_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)
    dense = random_qtensor("BF16", N, 512, rng)  # dense weights take the plain dot under every impl
    assert jnp.array_equal(realm_jax.qmatmul(x, dense, impl="pallas"), realm_jax.qmatmul(x, dense, impl="xla"))
    with pytest.raises(ValueError, match="impl='fast'"):
        realm_jax.qmatmul(x, w, impl="fast")


def test_split_weight_needs_its_mesh_and_load_checks_impl(rng, tmp_path):
    import dataclasses

    from realm_jax.errors import ShardingError

    w = dataclasses.replace(random_qtensor("Q4_K", N, 512, rng), axes=("model", None))
    with pytest.raises(ShardingError, match="lacks: call it under jax.set_mesh"):
        realm_jax.qmatmul(jnp.ones((1, 512), jnp.float32), w, impl="pallas")
    with pytest.raises(ValueError, match="impl='cuda' must be one of auto, pallas, xla"):
        realm_jax.load(tmp_path / "missing.gguf", impl="cuda")


def test_kernel_argument_errors(rng):
    x = jnp.ones((1, 256), jnp.float32)
    with pytest.raises(UnsupportedFormatError, match="F16 weights have no fused kernel"):
        pallas_kernels.matmul(x, random_qtensor("F16", 8, 256, rng), compute_dtype=jnp.float32,
                              out_dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match="backend='cuda'"):
        pallas_kernels.matmul(x, random_qtensor("Q4_K", 8, 256, rng), compute_dtype=jnp.float32,
                              out_dtype=jnp.float32, backend="cuda", interpret=True)


ON_DEVICE = jax.default_backend() in ("gpu", "tpu")


@pytest.mark.skipif(not ON_DEVICE, reason="compiled kernels need a GPU or TPU (CPU runs them in interpret mode above)")
@pytest.mark.parametrize("fmt", QUANTIZED_FORMATS)
def test_compiled_on_device(fmt, rng):
    backends = ["tpu"] if jax.default_backend() == "tpu" else [b for b in pallas_kernels.BACKENDS if b != "tpu"]
    w = random_qtensor(fmt, 1000, 4096, rng)
    for m, compute_dtype, backend in itertools.product((1, 7, 16, 256), DTYPES, backends):
        x = jnp.asarray(rng.standard_normal((m, 4096)), jnp.float32)
        check_against_xla(x, w, compute_dtype, jnp.float32, interpret=False, backend=backend)


@pytest.mark.parametrize("m", [2, 64])
def test_mosaic_gpu_through_the_dispatch(m, rng):
    """The Mosaic GPU kernels (tested in full in test_mosaic_gpu.py) behind pallas_kernels.matmul."""
    w = random_qtensor("Q4_K", 160, 512, rng)
    x = jnp.asarray(rng.standard_normal((m, 512)), jnp.float32)
    check_against_xla(x, w, jnp.bfloat16, jnp.float32, backend="mosaic_gpu")
