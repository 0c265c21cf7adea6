"""The linear layer: y = x @ dequant(w)^T for every weight of a model, by one registry of backends.

    xla          the reference: dequantize with jnp, then XLA's dot (every format, every platform)
    native       realm_jax.native's C++ kernels on one CPU device (decode on the planes as stored; prefill
                 on the same planes dequantized a panel at a time, or a dense copy)
    triton       the Pallas Triton kernels (GPU) on one layout, the lanes: the decode GEMV, the block-dot GEMM
                 (Q4_K, Q5_K, Q6_K at 3-16 rows of x) and the tensor-core GEMM
    triton_blocks  the Pallas Triton block-dot decode GEMM for nine formats on a layout of its own
                 (GPU; a candidate beside triton's decode kernels, chosen with impl="triton_blocks")
    mosaic_gpu   the Pallas Mosaic GPU kernels (Hopper)
    mosaic_tpu   the Pallas Mosaic TPU kernels (TPU)

Each backend lives in its own module and declares what it supports (formats of the table, platforms,
rows); `api.choose` picks one per weight, once, at load (`prepare`), routing a weight its preferred
backend cannot take to the reference with the reason; the model then calls `matmul` and `glu` on the
prepared weights and never names a backend. `qmatmul` multiplies a QTensor as stored (no load-time
layout), for one-off products and checks.
"""

from realm_jax.linear.api import (
    BACKENDS,
    IMPLS,
    REFERENCE,
    Choice,
    backend_of,
    choose,
    concat,
    decode_attention,
    describe,
    glu,
    matmul,
    place,
    plan,
    prepare,
    products,
    qmatmul,
    resolve,
    split_stacked,
)
from realm_jax.linear.base import ACTIVATIONS, Backend, Prepared, gated

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "IMPLS",
    "REFERENCE",
    "Backend",
    "Choice",
    "Prepared",
    "backend_of",
    "choose",
    "concat",
    "decode_attention",
    "describe",
    "gated",
    "glu",
    "matmul",
    "place",
    "plan",
    "prepare",
    "products",
    "qmatmul",
    "resolve",
    "split_stacked",
]
