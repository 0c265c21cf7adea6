"""Mosaic GPU kernels (pallas_kernels.mosaic_gpu): the Mosaic GPU interpreter on CPU against the XLA path
(`realm_jax.ops.qmatmul`), and lowering for an abstract H100 at real shapes.

The interpreter runs about 0.1 s per pipeline step, so the full format list runs at small sizes and a
representative subset covers the dtype x M x K grid; N is never a multiple of the 128-row tile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_kernels import mosaic_gpu
from pallas_kernels.mosaic_gpu import FORMATS, MosaicGpuTiling, gemm, gemv, tiling_for
from realm_jax.errors import DTypeError, UnsupportedFormatError
from realm_jax.ops import qmatmul
from realm_jax.quant import QTensor, dequantize, get_format, quantize
from helpers import matmul_tolerance, random_qtensor

F32, BF16, F16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)
KERNELS = {"gemv": gemv, "gemm": gemm}


def _rms(a) -> float:
    return float(jnp.sqrt(jnp.mean(jnp.square(jnp.asarray(a, jnp.float32)))))


def _check(kernel: str, fmt: str, m: int, n: int, k: int, compute_dtype, out_dtype=jnp.float32, seed=0,
           interpret=True):
    rng = np.random.default_rng(seed)
    w = random_qtensor(fmt, n, k, rng)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    y = KERNELS[kernel](x, w, compute_dtype=compute_dtype, out_dtype=out_dtype, interpret=interpret)
    assert y.dtype == jnp.dtype(out_dtype)
    assert y.shape == (m, n)
    ref = qmatmul(x, w, compute_dtype=compute_dtype, out_dtype=jnp.float32)
    tol = matmul_tolerance(compute_dtype, k, _rms(x), _rms(dequantize(w)))
    # The output cast adds half an ulp of out_dtype on top of the matmul's own error.
    tol += float(jnp.max(jnp.abs(ref))) * float(jnp.finfo(out_dtype).eps)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=0, atol=tol)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemv_every_format(fmt):
    _check("gemv", fmt, m=2, n=160, k=512, compute_dtype=BF16)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_every_format(fmt):
    _check("gemm", fmt, m=64, n=160, k=256, compute_dtype=F16, out_dtype=jnp.bfloat16)


@pytest.mark.parametrize("fmt,m,k,compute_dtype", [
    ("Q4_K", 1, 256, F32),  # one super-block
    ("Q4_K", 16, 4096, BF16),  # split K over 8 CTAs
    ("Q6_K", 7, 1024, F16),
    ("Q5_K", 16, 512, F32),
    ("Q8_0", 1, 4096, BF16),
    ("Q4_0", 7, 768, F32),  # K padded to the split
    ("Q5_1", 16, 256, F16),
])
def test_gemv_grid(fmt, m, k, compute_dtype):
    _check("gemv", fmt, m=m, n=100, k=k, compute_dtype=compute_dtype)


@pytest.mark.parametrize("fmt,m,k,compute_dtype", [
    ("Q4_K", 256, 256, BF16),
    ("Q6_K", 64, 2048, BF16),
    ("Q8_0", 100, 512, F16),  # M padded to the wgmma tile
    ("Q4_1", 64, 512, F32),  # f32 goes to the FMA kernel (wgmma has no f32, only tf32)
])
def test_gemm_grid(fmt, m, k, compute_dtype):
    _check("gemm", fmt, m=m, n=100, k=k, compute_dtype=compute_dtype)


@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_no_races(kernel):
    """The staging of the dequantized tile (gemm) and the pipelined reads are race-free (the detector raises)."""
    _check(kernel, "Q4_K", m=64 if kernel == "gemm" else 3, n=130, k=512, compute_dtype=BF16,
           interpret=plgpu.InterpretGPUParams(detect_races=True))


def test_gemv_matches_on_a_real_quantization():
    """Weights quantized by realm-jax (not random bytes), with an explicit tiling of two 128-row tiles."""
    rng = np.random.default_rng(3)
    w = quantize(jnp.asarray(rng.standard_normal((200, 512)) * 0.05, jnp.float32), "Q5_1")
    x = jnp.asarray(rng.standard_normal((3, 512)), jnp.bfloat16)
    y = gemv(x, w, tiling=MosaicGpuTiling(block_n=256, splits=2), interpret=True)
    assert y.dtype == jnp.bfloat16
    ref = qmatmul(x, w)
    tol = matmul_tolerance(BF16, 512, _rms(x), _rms(dequantize(w))) + _rms(ref) * 2 * float(jnp.finfo(BF16).eps) * 8
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=0, atol=tol)


# --- tiling ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_heuristic_tilings_are_valid(fmt):
    for kernel in ("gemv", "gemm"):
        for m, n, k in ((1, 4096, 4096), (16, 14336, 4096), (512, 4096, 14336), (1, 100, 256)):
            t = tiling_for(fmt, m, n, k, kernel=kernel)
            t.check(fmt)
            if kernel == "gemm":
                assert mosaic_gpu._gemm_smem_bytes(fmt, t, BF16) <= mosaic_gpu._SMEM_BYTES


def test_heuristic_fills_the_gpu_at_decode():
    t = tiling_for("Q4_K", 1, 4096, 4096, kernel="gemv")
    assert 4096 // t.block_n * t.splits >= 132


def test_bad_tilings_raise():
    with pytest.raises(ValueError, match="block_k"):
        MosaicGpuTiling(block_k=100).check("Q4_0")
    with pytest.raises(ValueError, match="block_k"):
        MosaicGpuTiling(block_k=128).check("Q4_K")
    with pytest.raises(ValueError, match="TMA"):
        MosaicGpuTiling(block_k=512).check("Q8_0")
    with pytest.raises(ValueError, match="block_n"):
        MosaicGpuTiling(block_n=64).check("Q4_0")
    with pytest.raises(TypeError):
        MosaicGpuTiling(128)  # keyword-only
    w = random_qtensor("Q8_0", 128, 512, np.random.default_rng(0))
    with pytest.raises(ValueError, match="shared memory"):
        gemm(jnp.ones((128, 512), jnp.bfloat16), w, tiling=MosaicGpuTiling(block_m=128, max_concurrent_steps=4))


def test_unsupported_inputs_raise():
    dense = quantize(jnp.ones((128, 256)), "F16")
    with pytest.raises(UnsupportedFormatError, match="F16"):
        gemv(jnp.ones((1, 256)), dense)
    w = random_qtensor("Q4_0", 128, 256, np.random.default_rng(0))
    with pytest.raises(DTypeError, match="compute_dtype"):
        gemv(jnp.ones((1, 256)), w, compute_dtype=jnp.int8)


# --- lowering for CUDA (an abstract H100) at real shapes ---------------------------------------------
_H100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3",
                                                                   num_cores=132, platform="gpu"))


def _lower(kernel: str, fmt: str, m: int, n: int, k: int, compute_dtype) -> str:
    f = get_format(fmt)
    planes = {p.name: jax.ShapeDtypeStruct((n, k // f.block_size * p.count), p.dtype) for p in f.planes}
    fn = KERNELS[kernel]
    with use_abstract_mesh(_H100):
        lowered = jax.jit(lambda x, p: fn(x, QTensor(fmt, (n, k), p), compute_dtype=compute_dtype)).trace(
            jax.ShapeDtypeStruct((m, k), compute_dtype), planes).lower(lowering_platforms=("cuda",))
    return lowered.as_text()


@pytest.mark.parametrize("fmt", FORMATS)
def test_lowers_for_cuda(fmt):
    assert "mosaic_gpu" in _lower("gemv", fmt, 1, 4096, 4096, BF16)
    assert "mosaic_gpu" in _lower("gemm", fmt, 512, 4096, 4096, BF16)


@pytest.mark.parametrize("m", [8, 16])
def test_gemv_lowers_for_cuda_at_more_rows(m):
    assert "mosaic_gpu" in _lower("gemv", "Q4_K", m, 4096, 4096, F16)


def test_tiling_is_hashable_and_frozen():
    t = MosaicGpuTiling()
    hash(t)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.block_n = 256
