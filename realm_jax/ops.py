"""Operations on quantized weights. `qmatmul` is the XLA path: the reference for the Pallas kernels and
the execution path on CPU.

Shapes: B... any leading dims of x, K the contraction (the weight's cols), N the weight's rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from realm_jax.errors import DTypeError, QTensorError, ShapeMismatchError
from realm_jax.quant import QTensor, dequantize_tile

__all__ = ["qmatmul"]

_FLOATS = (jnp.float32, jnp.float16, jnp.bfloat16)


def qmatmul(x: jax.Array, w: QTensor, *, compute_dtype=None) -> jax.Array:
    """y = x @ dequant(w)^T with f32 accumulation.

    Args:
      x: [B..., K] float32, float16 or bfloat16.
      w: a 2-D QTensor of logical shape (N, K), any supported format.
      compute_dtype: the dtype the weight is dequantized to and x is cast to before the dot; defaults
        to x.dtype. Accumulation is f32 whatever it is.

    Returns:
      [B..., N] in x.dtype.
    """
    if not isinstance(w, QTensor):
        raise QTensorError(f"qmatmul: w must be a QTensor, got {type(w).__name__}")
    w.check("qmatmul: w")
    x = jnp.asarray(x)
    if x.dtype not in _FLOATS:
        raise DTypeError(f"qmatmul: x.dtype={x.dtype} must be one of float32, float16, bfloat16")
    if w.ndim != 2:
        raise ShapeMismatchError(f"qmatmul: w.shape={w.shape} must be 2-D (N, K)")
    if x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ShapeMismatchError(f"qmatmul: x.shape={x.shape} must end in K={w.shape[1]} (w.shape={w.shape})")
    compute_dtype = jnp.dtype(x.dtype if compute_dtype is None else compute_dtype)
    if compute_dtype not in _FLOATS:
        raise DTypeError(f"qmatmul: compute_dtype={compute_dtype} must be one of float32, float16, bfloat16")
    return _qmatmul_xla(x, w, compute_dtype)


@functools.partial(jax.jit, static_argnames=("compute_dtype",))
def _qmatmul_xla(x: jax.Array, w: QTensor, compute_dtype) -> jax.Array:
    wd = dequantize_tile(w.fmt, w.planes, dtype=compute_dtype).reshape(w.shape)  # [N, K]
    y = lax.dot_general(
        x.astype(compute_dtype), wd, (((x.ndim - 1,), (1,)), ((), ())),
        precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
    )
    return y.astype(x.dtype)
