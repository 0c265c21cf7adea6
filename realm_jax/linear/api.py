"""The linear layer's registry and dispatch: which backend serves a weight, chosen once at load.

`resolve(impl, platform)` turns the user's `impl=` (on `load` and the CLI) into the preferred backend;
`choose` keeps it for a weight whose format and shape it supports and routes any other weight to the XLA
reference, with the reason (`realm-jax inspect` shows it, `load` logs it at debug level); `prepare` then
lays the weight out for that backend. The model multiplies with `matmul` / `glu` on prepared weights and
never names a backend.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from realm_jax.errors import (ArgumentError, DTypeError, NativeBuildError, QTensorError, ShapeMismatchError,
                              ShardingError)
from realm_jax.inputs import shown
from realm_jax.linear.base import ACTIVATIONS, XLA, Backend, Prepared, XlaWeight, load_interpreter, place_qtensor
from realm_jax.linear.blocks import TRITON_BLOCKS
from realm_jax.linear.mosaic_gpu import MOSAIC_GPU
from realm_jax.linear.mosaic_tpu import MOSAIC_TPU
from realm_jax.linear.native import NATIVE
from realm_jax.linear.triton import TRITON
from realm_jax.precision import Policy
from realm_jax.quant import DENSE_FORMATS, QTensor, concat_rows, get_format
from realm_jax.quant.formats import check_values
from realm_jax.quant.checks import as_array, check_fits, copied_bytes, is_concrete

__all__ = ["BACKENDS", "IMPLS", "REFERENCE", "Choice", "backend_of", "choose", "concat", "describe", "glu", "matmul",
           "place", "plan", "prepare", "products", "decode_attention", "qmatmul", "resolve", "split_stacked"]

log = logging.getLogger("realm_jax.linear")

BACKENDS: dict[str, Backend] = {b.name: b for b in (XLA, NATIVE, TRITON, TRITON_BLOCKS, MOSAIC_GPU, MOSAIC_TPU)}
REFERENCE = XLA.name  # the backend every other one is checked against and falls back on
# "auto": the platform's best; "pallas": the platform's Pallas kernels (interpreted on a CPU).
IMPLS = ("auto", "pallas", "xla", "native", "triton", "triton_blocks", "mosaic_gpu", "mosaic_tpu")
_PALLAS = {"gpu": "triton", "cuda": "triton", "tpu": "mosaic_tpu", "cpu": "mosaic_tpu"}
_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def resolve(impl: str, platform: str | None = None, *, devices: int = 1) -> str:
    """The backend that `impl` prefers for a model's weights on a JAX platform, params spread over
    `devices`.

    "auto" is the Pallas kernels on GPU and TPU; on CPU, the native matmul (`realm_jax.native`) where it
    builds and the params sit on one device, else the XLA reference. "pallas" is the platform's Pallas
    backend (on a CPU the TPU kernels in interpret mode). "native" anywhere but one CPU device is an error:
    it is a CPU custom call XLA cannot split over a mesh."""
    if impl not in IMPLS:
        raise ArgumentError(f"impl={shown(impl)} must be one of {', '.join(IMPLS)}")
    platform = platform or jax.default_backend()
    if impl == "auto":
        if platform != "cpu":
            return _PALLAS.get(platform, "xla")
        from realm_jax import native

        return "native" if devices == 1 and native.available() else "xla"
    if impl == "pallas":
        return _PALLAS.get(platform, "xla")
    backend = BACKENDS[impl]
    if impl == "native":
        if devices > 1:
            raise ShardingError(f"impl='native' runs on one CPU device, not on a mesh of {devices} (XLA cannot "
                                f"split its custom call): use impl='xla' or 'auto'")
        if platform != "cpu":
            raise NativeBuildError(f"impl='native' runs on one CPU device, not on {platform}: use impl='auto'")
        from realm_jax import native

        if not native.available():
            raise NativeBuildError(native.reason())
    elif not backend.runs_on(platform):
        raise ArgumentError(f"impl={impl!r} runs on {', '.join(backend.platforms)}, not on {platform}")
    return impl


@dataclasses.dataclass(frozen=True)
class Choice:
    """The backend that serves a weight, and why it is not the preferred one (None when it is)."""

    backend: str
    reason: str | None = None


def choose(fmt: str, shape: tuple[int, ...], preferred: str) -> Choice:
    """Who multiplies by a weight of format `fmt` (a name in the format table) and logical shape (N, K)
    when `preferred` (a backend name, as `resolve` gives) is asked: it, if its declaration and shape rules
    allow, else the XLA reference with the reason."""
    backend = BACKENDS[preferred]
    reason = backend.unsupported(get_format(fmt), tuple(shape))
    return Choice(preferred) if reason is None else Choice(REFERENCE, reason)


def plan(fmt: str, shape: tuple[int, ...], policy: Policy, *, impl: str,
         many_rows: bool = True) -> tuple[Choice, str]:
    """Who would serve a weight of this format and shape under `impl` (a backend name) and `policy`, and how
    (`describe`), from its shape alone: `prepare` traced by `jax.eval_shape`, no data read or computed."""
    f = get_format(fmt)
    blocks = shape[-1] // f.block_size
    planes = {p.name: jax.ShapeDtypeStruct((*shape[:-1], blocks * p.count), p.dtype) for p in f.planes}
    choice = choose(fmt, shape, impl)
    backend = BACKENDS[choice.backend]
    qt = QTensor(fmt, tuple(shape), planes)
    return choice, backend.describe(jax.eval_shape(lambda q: backend.prepare(q, policy, many_rows=many_rows), qt))


def prepare(qt: QTensor, policy: Policy, *, impl: str, many_rows: bool = True, what: str | None = None) -> Prepared:
    """qt prepared once, at load, by the backend `choose` picks for it under `impl` (a backend name).
    Traceable: under `jax.eval_shape` it gives the prepared weight's shapes without computing them."""
    choice = choose(qt.fmt, qt.shape, impl)
    backend = BACKENDS[choice.backend]
    if backend.interprets and jax.default_backend() == "cpu":
        load_interpreter()  # before the model's first jitted call: else its next call compiles it again
    w = backend.prepare(qt, policy, many_rows=many_rows)
    if log.isEnabledFor(logging.DEBUG):
        why = f" ({choice.reason})" if choice.reason else ""
        log.debug("%s: %s%s -> %s%s", what or "weight", qt.fmt, list(qt.shape), backend.describe(w), why)
    return w


def backend_of(w: Prepared) -> Backend:
    return BACKENDS[w.backend]


def describe(w: Prepared) -> str:
    """How a prepared weight is served, e.g. "native (1-8 rows), native bf16 gemm (more, from the planes)"."""
    return backend_of(w).describe(w)


def _check(x, w, compute_dtype, out_dtype, what: str, *, impl: str | None = None):
    """x as a jax array and the two dtypes, once the operands are checked and (for concrete ones) the memory
    the product materialises is known to fit. `impl`: qmatmul's, for a QTensor w (None: the XLA reference
    multiplies it, as `matmul` does)."""
    if isinstance(w, QTensor):
        w.check(f"{what}: w")
        check_values(w, f"{what}: w")
    elif not isinstance(w, Prepared):
        raise QTensorError(f"{what}: w must be a QTensor or a prepared weight (realm_jax.linear.Prepared), got "
                           f"{type(w).__name__}")
    x = as_array(x, what, dtypes=_FLOATS)  # not on the device yet: a broadcast view stays one until checked
    if w.ndim != 2:
        raise ShapeMismatchError(f"{what}: w.shape={w.shape} must be 2-D (N, K)")
    if x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ShapeMismatchError(f"{what}: x.shape={x.shape} must end in K={w.shape[1]} (w.shape={w.shape})")
    dtypes = []
    for name, dt in (("compute_dtype", compute_dtype), ("out_dtype", out_dtype)):
        try:
            dt = jnp.dtype(x.dtype if dt is None else dt)
        except TypeError:
            raise DTypeError(f"{what}: {name}={shown(dt)} is not a dtype") from None
        if dt not in _FLOATS:
            raise DTypeError(f"{what}: {name}={dt} must be one of float32, float16, bfloat16")
        dtypes.append(dt)
    compute_dtype, out_dtype = dtypes
    if is_concrete(x, w):
        _check_fits(x, w, compute_dtype, out_dtype, what, impl)
    return jnp.asarray(x), compute_dtype, out_dtype


def _check_fits(x, w, compute_dtype, out_dtype, what: str, impl: str | None) -> None:
    """MemoryBudgetError unless the product's output, the device copies of host operands and, where the XLA
    reference serves w, w dequantized to compute_dtype fit (a lower bound of what it holds)."""
    n, k = w.shape
    rows = math.prod(x.shape[:-1])
    need = rows * n * out_dtype.itemsize + copied_bytes([x, *jax.tree.leaves(w)])
    if isinstance(w, QTensor):
        reference = impl is None or choose(w.fmt, w.shape, resolve(impl)).backend == REFERENCE
    else:
        reference = isinstance(w, XlaWeight)
    if reference and w.fmt != DENSE_FORMATS.get(compute_dtype):  # a weight dense in compute_dtype is used as is
        need += n * k * compute_dtype.itemsize
    check_fits(f"{what}: x{list(x.shape)} @ {w}^T", need, (x, w))


def _rows(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


def matmul(x: jax.Array, w, *, compute_dtype=None, out_dtype=None) -> jax.Array:
    """y = x @ dequant(w)^T by the backend that prepared w, f32 accumulation.

    Args:
      x: [B..., K] float32, float16 or bfloat16.
      w: a prepared weight (`prepare`); a QTensor is multiplied by the XLA reference as stored.
      compute_dtype: the dtype the weight is dequantized to and x is cast to before the dot; defaults to
        x.dtype. Accumulation is f32 whatever it is.
      out_dtype: the dtype of y; defaults to x.dtype.

    Returns:
      [B..., N] in out_dtype.
    """
    x, compute_dtype, out_dtype = _check(x, w, compute_dtype, out_dtype, "qmatmul")
    if isinstance(w, QTensor):
        w = XlaWeight(w)
    y = backend_of(w).matmul(_rows(x), w, compute_dtype=compute_dtype, out_dtype=out_dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


def glu(x: jax.Array, w, activation: str, *, compute_dtype=None) -> jax.Array:
    """A gated FFN's hidden activations act(x @ gate^T) * (x @ up^T) from its fused gate|up weight w
    [2F, K] (gate rows first), `activation` "silu" (SwiGLU) or "gelu_tanh" (GeGLU): [B..., F], in f32,
    or in the compute dtype where the backend applies the activation in its epilogue (the down
    projection's input either way)."""
    x, compute_dtype, _ = _check(x, w, compute_dtype, None, "glu")
    if activation not in ACTIVATIONS:
        raise ArgumentError(f"glu: activation={activation!r} must be one of {list(ACTIVATIONS)}")
    if isinstance(w, QTensor):
        w = XlaWeight(w)
    y = backend_of(w).glu(_rows(x), w, activation, compute_dtype=compute_dtype)
    return y.reshape(*x.shape[:-1], w.shape[0] // 2)


def qmatmul(x: jax.Array, w, *, compute_dtype=None, out_dtype=None, impl: str = "auto") -> jax.Array:
    """y = x @ dequant(w)^T with f32 accumulation, for a QTensor as stored or a prepared weight.

    Args:
      x: [B..., K] float32, float16 or bfloat16.
      w: a 2-D QTensor of logical shape (N, K), any format of the table, multiplied by the backend
        `impl` picks for it (`choose`; no load-time layout); or a prepared weight (what `load` builds),
        which its own backend multiplies whatever `impl` says.
      compute_dtype, out_dtype: as `matmul`.
      impl: "auto" (the platform's best backend: `resolve`), "pallas", or a backend's name ("xla",
        "native", "triton", "triton_blocks", "mosaic_gpu", "mosaic_tpu"). On a CPU the Pallas kernels run in
        interpret mode. A format or shape a backend does not support goes to the XLA reference.

    Returns:
      [B..., N] in out_dtype.

    Raises:
      QTensorError: w is not a well-formed QTensor or prepared weight.
      DTypeError: x is not an array of float32/float16/bfloat16 (None, a string, ints, objects), or
        compute_dtype/out_dtype is not one of those dtypes.
      ShapeMismatchError: x is ragged, or its last dim is not w's K.
      MemoryBudgetError (concrete operands only): the output, the device copies of host operands and, where the
        XLA reference multiplies, w dequantized to compute_dtype do not fit; checked before anything is allocated.
    """
    x, compute_dtype, out_dtype = _check(x, w, compute_dtype, out_dtype, "qmatmul", impl=impl)
    if isinstance(w, QTensor):
        backend = BACKENDS[choose(w.fmt, w.shape, resolve(impl)).backend]
        w = backend.view(w, compute_dtype)
    return matmul(x, w, compute_dtype=compute_dtype, out_dtype=out_dtype)


def concat(ws: list[Prepared]) -> Prepared | None:
    """Weights stacked along their rows (fused q|k|v, gate|up: one matmul instead of three reads the same
    bytes with fewer dispatches), or None where their backends or layouts differ."""
    if all(isinstance(w, QTensor) for w in ws):  # weights as stored (the XLA reference multiplies them)
        return concat_rows(ws) if len({w.fmt for w in ws}) == 1 else None
    if not all(isinstance(w, Prepared) for w in ws) or len({(type(w), w.backend) for w in ws}) != 1:
        return None
    return backend_of(ws[0]).concat(list(ws))


def place(w, spec, mesh, what: str):
    """A QTensor or a prepared weight on `mesh`, split by `spec` (a PartitionSpec over its logical axes:
    [layers,] rows, cols) as its backend lays it out; an impossible split is a ShardingError naming `what`."""
    if isinstance(w, QTensor):
        return place_qtensor(w, spec, mesh, what)
    return backend_of(w).place(w, spec, mesh, what)


def _is_prepared(v) -> bool:
    return isinstance(v, Prepared)


def split_stacked(params: Any) -> tuple[Any, Callable[[Any, jax.Array], Any]]:
    """A stacked run of layers' params split for `lax.scan`: what the scan slices per layer, and a function
    (one layer's slice, its index) -> that layer's params, putting back what backends read in place from
    the whole stack (`Backend.stacked`)."""
    leaves, treedef = jax.tree.flatten(params, is_leaf=_is_prepared)
    parts = [backend_of(v).stacked(v) if _is_prepared(v) else (v, None) for v in leaves]
    whole = [w for _, w in parts]

    def rejoin(layer_params, index):
        sliced = jax.tree.flatten(layer_params, is_leaf=_is_prepared)[0]
        return treedef.unflatten([backend_of(v).unstack(v, w, index) if w is not None else v
                                  for v, w in zip(sliced, whole)])

    return treedef.unflatten([s for s, _ in parts]), rejoin


def products(impl: str):
    """Attention's prefill products on the preferred backend `impl`, where it has them (a function for
    `realm_jax.ops.attention`'s `products`), else None (XLA's dots)."""
    return getattr(BACKENDS.get(impl), "products", None)


def decode_attention(impl: str):
    """A decode step's attention over the stacked KV cache read in place, on the preferred backend `impl`
    where it has it: a function (q, k_cache, v_cache, scores_dtype) -> the attention function for these
    operands (`realm_jax.native.decode_attention`'s signature) or None; else None (XLA's dots on a copy of
    the layer's cache)."""
    return getattr(BACKENDS.get(impl), "decode_attention", None)
