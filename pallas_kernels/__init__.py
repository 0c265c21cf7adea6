"""Fused dequant-matmul kernels in Pallas: y = x @ dequant(w)^T with w kept quantized in device memory.

One kernel body per backend, each calling the format's tile function from `realm_jax.quant` (one
definition of the math), and two families chosen by the number of rows of x: decode (M <= 16, a GEMV that
streams the weight once) and prefill (a GEMM on the tensor cores / MXU). Backends:

    "tpu"         Mosaic TPU (pallas_kernels.tpu)
    "triton"      the Pallas Triton GPU backend (pallas_kernels.triton)
    "mosaic_gpu"  Mosaic GPU for Hopper: plgpu.kernel, wgmma (pallas_kernels.mosaic_gpu)

On a GPU the default is "triton". Neither GPU backend has been timed yet (no GPU was at hand; see
BENCHMARKS.md); the choice rests on bytes moved: the Mosaic GPU kernels read the planes K-major and
transpose them on every call, a copy of the whole weight, where the Triton kernels read the planes as they
are stored. `benchmarks/kernels.py` times both on a GPU; the default follows that measurement.

On a CPU the kernels run in interpret mode (`interpret=True`, or a `pltpu.InterpretParams` for the TPU
kernels), which is how the test suite checks them against the XLA path of `realm_jax.ops.qmatmul`.

Use `realm_jax.ops.qmatmul(x, w, impl="pallas")` rather than `matmul` directly: it validates the inputs
and sends dense weights (F32/F16/BF16) to the plain dot.
"""

from __future__ import annotations

import warnings

import jax

from pallas_kernels import mosaic_gpu, tpu, triton
from pallas_kernels.mosaic_gpu import MosaicGpuTiling
from pallas_kernels.tiling import DECODE_ROWS, TpuTiling, TritonTiling, choose_tiling
from realm_jax.errors import UnsupportedFormatError
from realm_jax.quant import QTensor

__all__ = ["BACKENDS", "DECODE_ROWS", "MosaicGpuTiling", "QUANTIZED_FORMATS", "TpuTiling", "TritonTiling",
           "choose_tiling", "default_backend", "matmul"]

# Lowering a Triton kernel warns that the backend is deprecated, once per kernel; realm-jax knows (see
# pallas_kernels.triton) and does not repeat it to its users.
warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning)



def _mosaic_gpu(x, w, *, tiling, compute_dtype, out_dtype, interpret=False):
    kernel = mosaic_gpu.gemv if x.shape[0] <= DECODE_ROWS else mosaic_gpu.gemm
    return kernel(x, w, compute_dtype=compute_dtype, out_dtype=out_dtype, tiling=tiling, interpret=interpret)


BACKENDS = {"tpu": tpu.matmul, "triton": triton.matmul, "mosaic_gpu": _mosaic_gpu}
_TILING = {"tpu": TpuTiling, "triton": TritonTiling, "mosaic_gpu": MosaicGpuTiling}
QUANTIZED_FORMATS = ("Q4_K", "Q5_K", "Q6_K", "Q8_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def default_backend(platform: str | None = None) -> str:
    """The kernel backend for a JAX platform ("tpu", "gpu"/"cuda", or "cpu", where kernels are interpreted)."""
    platform = platform or jax.default_backend()
    if platform == "tpu" or platform == "cpu":
        return "tpu"  # on CPU: the TPU kernel in interpret mode
    if platform in ("gpu", "cuda"):
        return "triton"
    raise ValueError(f"no Pallas kernel backend for platform {platform!r}")


def matmul(x: jax.Array, w: QTensor, *, compute_dtype, out_dtype, backend: str | None = None,
           tiling: TpuTiling | TritonTiling | None = None, interpret=False) -> jax.Array:
    """x [M, K] @ dequant(w)^T -> [M, N] in out_dtype, accumulated in f32.

    Args:
      x: [M, K] float (validated by realm_jax.ops.qmatmul).
      w: a 2-D QTensor (N, K) in one of QUANTIZED_FORMATS.
      compute_dtype: the dtype of the dequantized tile and of x in the dot (f32, bf16 or f16).
      out_dtype: the dtype of the result.
      backend: "tpu", "triton" or "mosaic_gpu"; default: `default_backend()`.
      tiling: overrides `choose_tiling(backend, ...)`.
      interpret: run in interpret mode (True, or an InterpretParams of the backend) — on CPU.
    """
    if w.fmt not in QUANTIZED_FORMATS:
        raise UnsupportedFormatError(f"pallas_kernels.matmul: {w.fmt} weights have no fused kernel (dense formats "
                                     f"use the plain dot); kernels exist for {', '.join(QUANTIZED_FORMATS)}")
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"pallas_kernels.matmul: backend={backend!r} must be one of {sorted(BACKENDS)}")
    (m, k), n = x.shape, w.shape[0]
    tiling = tiling or choose_tiling(backend, w.fmt, m, n, k)
    if not isinstance(tiling, _TILING[backend]):
        raise ValueError(f"pallas_kernels.matmul: backend={backend!r} needs a {_TILING[backend].__name__}, "
                         f"got {tiling!r}")
    return BACKENDS[backend](x, w, tiling=tiling, compute_dtype=compute_dtype, out_dtype=out_dtype,
                             interpret=interpret)
