"""Inline PTX that the Pallas Triton kernels share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

__all__ = ["fma"]


def fma(a, b, c, *, interpret: bool) -> jax.Array:
    """a * b + c in f32, rounded once (`fma.rn.f32`), broadcast to one shape. Written out because XLA's own
    Triton, which compiles the kernels on a device, does not contract a multiply and an add into an FFMA as
    pip's triton does (`scripts/kernel_report.py --compiler xla`: the block-dot GEMM's block scales took an
    FMUL and an FADD an output, Q4_0 1.85 instructions a weight at one row of x against 1.61). In interpret
    mode (CPU) the multiply and the add, each rounded, as jnp writes them."""
    a, b, c = jnp.broadcast_arrays(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                                   jnp.asarray(c, jnp.float32))
    if interpret:
        return a * b + c
    [out] = pltriton.elementwise_inline_asm(
        "fma.rn.f32 $0, $1, $2, $3;", args=[a, b, c], constraints="=f,f,f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])
    return out
