"""The operations every format of the table shares: repack, unpack, dequantize, quantize."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax import preflight
from realm_jax.errors import DTypeError, QTensorError, ShapeMismatchError, UnsupportedFormatError
from realm_jax.quant.checks import (as_array, check_dtype, check_fits, check_quantized, copied_bytes, is_concrete,
                                    to_float32)
from realm_jax.quant.qtensor import QTensor, int_shape
from realm_jax.quant.table import get_format

__all__ = ["DENSE_FORMATS", "concat_rows", "dequantize", "dequantize_tile", "quantize", "repack", "to_dense", "unpack"]

# The unquantized format that holds each float dtype.
DENSE_FORMATS = {jnp.dtype(jnp.float32): "F32", jnp.dtype(jnp.float16): "F16", jnp.dtype(jnp.bfloat16): "BF16"}


def repack(raw: np.ndarray, fmt: str, shape: tuple[int, ...], *, what: str = "tensor") -> QTensor:
    """GGUF bytes of a tensor -> a `QTensor` with numpy planes (lossless; `unpack` inverts it).

    Args:
      raw: the tensor's bytes, uint8, any shape with the right total size (as GGUF stores them).
      fmt: the GGUF type name.
      shape: the logical shape (..., rows, cols).
      what: how to name the tensor in errors (e.g. "model.gguf: blk.0.attn_q.weight").

    Returns:
      A QTensor whose planes are new arrays, never views of `raw` (a reader may reuse its buffer).
    """
    f = get_format(fmt)
    shape = int_shape(shape, what)  # ints only: 1.5 or "32" is no shape
    if not shape or min(shape) <= 0 or shape[-1] % f.block_size:
        raise QTensorError(f"{what}: shape={shape} is not a valid {fmt} shape (cols must be a positive "
                           f"multiple of block_size={f.block_size})")
    n_blocks = shape[-1] // f.block_size
    raw = np.asarray(raw)
    expected = math.prod(shape[:-1]) * n_blocks * f.type_size  # exact (np.prod would wrap past 2**63)
    if raw.dtype != np.uint8 or raw.size != expected:
        raise QTensorError(f"{what}: {fmt}{list(shape)} needs {expected} bytes (uint8), got {raw.size} "
                           f"({raw.dtype})")
    planes = f.split(raw.reshape(*shape[:-1], n_blocks, f.type_size))
    return QTensor(f.name, shape, planes)


def unpack(qt: QTensor) -> np.ndarray:
    """A `QTensor` -> its GGUF bytes, uint8 of shape (..., rows, bytes per row) as gguf-py's reader gives.

    Raises:
      MemoryBudgetError: the bytes do not fit in the host's free memory (planes of broadcast views can
        describe a tensor far larger than they hold).
    """
    if not isinstance(qt, QTensor):
        raise QTensorError(f"unpack: needs a QTensor, got {type(qt).__name__}")
    qt.check()
    f = qt.format
    need = math.prod(qt.shape[:-1]) * (qt.shape[-1] // f.block_size) * f.type_size
    preflight.check_fits(f"unpack of {qt.fmt}{list(qt.shape)}", need, free=preflight.host_free())
    if f.packing is not None:
        _check_packable(qt)
    blocks = f.join(qt.planes)
    return blocks.reshape(*qt.shape[:-1], -1)


def _check_packable(qt: QTensor, what: str | None = None) -> None:
    for name in ("scales", "mins"):  # the unpacked 6-bit values of the formats that pack them
        plane = qt.planes.get(name)
        if plane is None:
            continue
        # a plane on a device is reduced there: only its maximum comes to the host, not the plane
        top = jnp.max(plane) if isinstance(plane, jax.Array) else np.max(np.asarray(plane), initial=0)
        if int(top) > 63:
            raise QTensorError(f"{what or qt}: plane {name!r} holds values above 63, which do not fit in 6 bits")


def check_values(qt: QTensor, what: str) -> None:
    """QTensorError where a concrete QTensor's planes hold values its format cannot (the 6-bit scales and mins
    that Q3_K, Q4_K, Q5_K and IQ4_XS pack, past 63): the backends would read them differently (XLA's
    dequantization whole, the native kernels' 6 bits), so the product would depend on the backend. Planes
    made by `quantize` or read from a file always fit; traced ones are not read."""
    if qt.format.packing is not None and is_concrete(qt.planes):
        _check_packable(qt, what)


def dequantize_tile(fmt: str, planes, *, dtype=jnp.float32, exact: bool = False) -> jax.Array:
    """Dequantize a tile of planes covering whole blocks: [..., n_blocks * block_size] in `dtype`.

    This is the one definition of each format's math: `dequantize`, `qmatmul` and the Pallas kernels
    all call it. Values are computed in f32 and cast to `dtype` at the end.
    """
    f = get_format(fmt)
    with jax.named_scope("dequant"):
        if f.block_size == 1 and f.planes[0].count == 1 and not exact:  # a plain array: one cast, not two
            return jnp.asarray(planes["w"]).astype(dtype)
        return f.tile(planes, exact=exact).astype(dtype)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(qt: QTensor, dtype) -> jax.Array:
    return dequantize_tile(qt.fmt, qt.planes, dtype=dtype, exact=True).reshape(qt.shape)


def dequantize(qt: QTensor, dtype=jnp.float32) -> jax.Array:
    """A `QTensor` -> a dense array of its logical shape (..., rows, cols) in `dtype` (jit-compatible).

    With dtype=float32 the values are bit-identical to `gguf.quants.dequantize` of the same bytes.
    (On XLA:CPU one exception exists: a Q8_K block with a subnormal f32 scale, whose products XLA flushes
    to zero.)

    Raises:
      QTensorError: `qt` is not a well-formed QTensor (`QTensor.check`).
      DTypeError: `dtype` is not a floating dtype JAX holds (float64 needs jax_enable_x64).
      MemoryBudgetError: the result (and the copy of host planes to the device) does not fit the device's
        free memory; checked before anything is allocated, for concrete planes.
    """
    if not isinstance(qt, QTensor):
        raise QTensorError(f"dequantize: qt must be a QTensor, got {type(qt).__name__}")
    qt.check("dequantize: qt")
    check_values(qt, "dequantize: qt")
    dtype = check_dtype(dtype, "dequantize")
    if is_concrete(qt.planes):
        planes = list(qt.planes.values())
        check_fits(f"dequantize: {qt} to {dtype}", qt.size * dtype.itemsize + copied_bytes(planes), planes)
    return _dequantize(qt, dtype)


def to_dense(qt: QTensor, dtype) -> QTensor:
    """`qt` in the dense format of `dtype` (F32, F16 or BF16): its values dequantized, or just cast."""
    dtype = check_dtype(dtype, "to_dense")
    if dtype not in DENSE_FORMATS:
        raise DTypeError(f"to_dense: dtype={dtype} must be float32, float16 or bfloat16")
    return QTensor(DENSE_FORMATS[dtype], qt.shape, {"w": dequantize(qt, dtype)})


def quantize(x, fmt: str) -> QTensor:
    """A dense array (..., cols) -> a `QTensor` in format `fmt` with jax planes (runs on any device).

    Bit-exact with `gguf.quants.quantize` for F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0; llama.cpp's
    reference quantizers (`quantize_row_*_ref`) for Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, IQ4_XS and MXFP4, and
    its `quantize_iq4_nl` without an importance matrix for IQ4_NL. The other formats are read only
    (UnsupportedFormatError). Values are taken as f32.

    Raises:
      UnsupportedFormatError: `fmt` is unknown, or a format realm-jax only reads.
      DTypeError: `x` is not an array of floats (None, a string, ints, objects).
      ShapeMismatchError: `x` is ragged, or its last dim is not a positive multiple of the block size.
      ArgumentError (concrete `x` only; skipped under jit): a value the format cannot hold: a NaN or inf for a
        quantized format (F32, F16 and BF16 keep them), a finite value that would become inf (past float32's
        range, past F16's or BF16's, or a block too large for its f16 scale). It names the element or block.
      MemoryBudgetError (concrete `x` only): the device copy of x and the planes do not fit the device's free
        memory; checked before anything is allocated.
    """
    f = get_format(fmt)
    if f.quantize is None:
        raise UnsupportedFormatError(f"quantize: realm-jax cannot produce {fmt}")
    x = as_array(x, "quantize")
    if x.ndim == 0 or x.shape[-1] % f.block_size or min(x.shape) == 0:
        raise ShapeMismatchError(f"quantize: x.shape={x.shape} must have a last dim that is a positive "
                                 f"multiple of {fmt}'s block_size={f.block_size}")
    if is_concrete(x):  # what the device holds at least: x as f32 (where that is a new array) and the planes
        size = math.prod(x.shape)
        if isinstance(x, np.ndarray):
            x_bytes = copied_bytes([x], 4)
        else:
            x_bytes = 0 if x.dtype == jnp.float32 else size * 4
        plane_bytes = size // f.block_size * sum(p.nbytes for p in f.planes)
        check_fits(f"quantize: x{list(x.shape)} to {f.name}", x_bytes + plane_bytes, x)
    x32 = to_float32(x, "quantize")
    planes = dict(f.quantize(x32))
    if is_concrete(x32, planes):  # neither traced nor inside a jit that closes over a concrete x
        check_quantized(x32, planes, f, "quantize")
    return QTensor(f.name, tuple(x.shape), planes)


def concat_rows(qts) -> QTensor:
    """Stack 2-D QTensors of one format along their rows: (N1, K), (N2, K), ... -> (N1 + N2 + ..., K).
    Rows are independent in every format, so this is a concatenation of each plane."""
    qts = list(qts)
    fmts, cols = {qt.fmt for qt in qts}, {qt.shape[1:] for qt in qts}
    if len(fmts) != 1 or len(cols) != 1 or any(qt.ndim != 2 for qt in qts):
        raise QTensorError(f"concat_rows: needs 2-D QTensors of one format and width, got {qts}")
    import jax.numpy as jnp

    xp = np if all(isinstance(p, np.ndarray) for qt in qts for p in qt.planes.values()) else jnp
    planes = {}
    for name in qts[0].planes:
        parts = [qt.planes[name] for qt in qts]
        view = adjacent_view(parts) if xp is np else None  # parts placed side by side at load: no copy
        planes[name] = view if view is not None else xp.concatenate(parts, axis=0)
    return QTensor(qts[0].fmt, (sum(qt.shape[0] for qt in qts), qts[0].shape[1]), planes)


def adjacent_view(parts, *, stack: bool = False) -> np.ndarray | None:
    """The concatenation along axis 0 (or with `stack`, the stack on a new axis 0) of numpy arrays that lie
    one after another in memory, as a view of that memory, without a copy: `checkpoint.read_gguf` places the
    tensors that are joined or stacked into params this way. None where they do not (then copy)."""
    if not parts or not all(isinstance(p, np.ndarray) and p.flags.c_contiguous for p in parts):
        return None
    first = parts[0]
    if any(p.dtype != first.dtype or p.shape[int(not stack):] != first.shape[int(not stack):] for p in parts):
        return None
    if not stack and first.ndim == 0:
        return None

    def root(a):  # the array that owns the memory (through views and as_strided's wrappers)
        while getattr(a, "base", None) is not None:
            a = a.base
        return a

    owner = root(first)
    address = first.ctypes.data
    for p in parts:
        if root(p) is not owner or p.ctypes.data != address:
            return None
        address += p.nbytes
    if stack:
        shape, strides = (len(parts), *first.shape), (first.nbytes, *first.strides)
    else:
        shape, strides = (sum(p.shape[0] for p in parts), *first.shape[1:]), first.strides
    return np.lib.stride_tricks.as_strided(first, shape, strides, writeable=False)
