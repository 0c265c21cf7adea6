"""The native CPU backend: `realm_jax.native`'s C++ kernels (XLA FFI custom calls) on one CPU device.

Decode (up to `realm_jax.native.MAX_ROWS` rows of x) runs the native matmul on the weight's planes as
stored in the file. More rows (prefill) run the native gemm on the same planes, dequantizing a panel
of the weight at a time: in bf16 (`realm_jax.native.qgemm`) where the policy's params and compute dtypes
are both bf16 and the CPU has AVX512_BF16, in f32 (`realm_jax.native.qgemm_f32`) where both are f32 (the
auto policy on CPUs without AVX512_BF16), else XLA's dot on a dense copy in the params dtype (f16, mixed
policies). So under the bf16 and f32 policies the weights are held once, as stored. Inside a scan over
stacked layers the kernels read layer i of the stack where it lies (`stacked` / `unstack`): XLA would copy
each layer's weight out on every step (2.6 ms of a 12 ms gemma3 decode step, 5.7 ms of its 128-token
prefill).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from realm_jax import native as kernels
from realm_jax.errors import QTensorError, ShardingError
from realm_jax.linear.base import Backend, Prepared, xla_matmul
from realm_jax.precision import Policy
from realm_jax.quant import Format, QTensor, concat_rows, to_dense

__all__ = ["NATIVE", "Native", "NativeWeight"]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["packed", "dense", "layer"],
                   meta_fields=["dtype", "gemm", "int8"])
@dataclasses.dataclass(frozen=True)
class NativeWeight(Prepared):
    """A linear layer's weight for the native backend.

    Attributes:
      packed: what the native matmul reads for up to MAX_ROWS rows of x (decode): the planes as stored in
        the file, or the policy's dense dtype for weights stored dense. None in the sliced half of a
        stacked weight (`Native.stacked`).
      dense: the same weight dense in the policy's dtype, for XLA's dot on more rows (prefill); None where
        the native gemm serves them (`gemm`), where only few rows are ever multiplied at speed (the output
        projection: a prefill needs only the last position's logits), or where `packed` is dense already.
      layer: None, or (inside a scan over stacked layers) a traced int32 scalar: `packed`'s planes are
        then the whole stack [L, ...] and the kernels read layer `layer` where it lies.
      dtype: (static, a name) "bfloat16" where `load`'s policy holds params and computes in bf16 on a CPU
        with AVX512_BF16, else "float32": what prefill's gemm rounds each weight to. Decode multiplies a
        quantized weight's exact values whatever the dtype (`decode_weight_dtype`); a dense one is stored
        in the dtype already.
      gemm: (static) more than MAX_ROWS rows of the weight's compute dtype run the native gemm on
        `packed`: with dtype bfloat16 `realm_jax.native.qgemm` (the weight rounded to bf16 panel by panel,
        as a bf16 copy holds it), with float32 `realm_jax.native.qgemm_f32` (the weight exact, f32 sums).
      int8: (static) the bf16 gemm takes its int8 product (`realm_jax.native.int8_prefill`, decided when
        the weight is prepared, so that a compiled prefill never depends on the environment at trace time).
    """

    backend: ClassVar[str] = "native"
    packed: QTensor | None
    dense: QTensor | None = None
    layer: jax.Array | None = None
    dtype: str = "float32"
    gemm: bool = False
    int8: bool = False

    @property
    def fmt(self) -> str:
        return (self.packed or self.dense).fmt

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.packed or self.dense).shape

    def __repr__(self) -> str:
        stacked = "" if self.layer is None else ", one layer of a stack"
        return (f"NativeWeight({self.fmt}, shape={self.shape}, dense={self.dense is not None}, "
                f"gemm={self.gemm}{stacked})")


def decode_weight_dtype(w: NativeWeight) -> str:
    """The weight_dtype of `realm_jax.native.matmul` for w's decode: "float32" (the exact weights) for every
    quantized format, w.dtype for a dense weight (held in that dtype already). Rounding each dequantized
    weight to bf16 for vdpbf16ps (weight_dtype "bfloat16", `dot_bf16`) costs a conversion per 32 weights
    and made one row of x 1.0-3.3x slower than the exact weights (the formats of small codes on vdpbf16ps
    as they are, `exact_bf16_formats`; the others in f32), and 2-8 rows 0.96-2.9x as fast, on an Intel Xeon
    (BENCHMARKS.md, "Issue 18: decode's prefetch compiled per format"). The exact product is also closer to
    f32's."""
    return "float32" if w.packed.format.block_size > 1 else w.dtype


def _gemm_rows(w: NativeWeight, compute_dtype, m: int) -> bool:
    """Whether m rows go to the native gemm: a weight prepared for it, the compute dtype it was prepared for
    (bf16: `qgemm`, f32: `qgemm_f32`) and more rows than the decode kernel takes."""
    return w.gemm and jnp.dtype(compute_dtype) == jnp.dtype(w.dtype) and m > kernels.MAX_ROWS


class Native(Backend):
    name = "native"
    platforms = ("cpu",)
    formats = frozenset(kernels.FORMAT_IDS)  # the formats qmatmul.cc implements
    max_rows = kernels.MAX_ROWS

    def unsupported(self, fmt: Format, shape: tuple[int, ...]) -> str | None:
        reason = super().unsupported(fmt, shape)
        if reason is None and shape[-1] % 32:
            reason = f"native: K={shape[-1]} is not a multiple of 32"
        return reason

    def prepare(self, qt: QTensor, policy: Policy, *, many_rows: bool = True) -> NativeWeight:
        # Decode multiplies a quantized weight's exact values (`decode_weight_dtype`); prefill's gemm or
        # the dense copy for XLA's dot rounds them to the params dtype.
        # Prefill (many rows) runs the native gemm on the planes under a bf16 policy where the CPU has
        # AVX512_BF16 and under the f32 policy anywhere (gemm_f32.h), so that no dense copy is made.
        quantized = qt.format.block_size > 1
        bf16 = policy.params == policy.compute == jnp.bfloat16 and kernels.gemm_available()
        f32 = policy.params == policy.compute == jnp.float32
        gemm = many_rows and (bf16 or f32)
        # REALM_JAX_NATIVE_PREFILL is read (and a bad value refused) here, at load, not at the first prompt.
        int8 = gemm and quantized and bf16 and kernels.int8_prefill(qt.fmt)
        dtype = "bfloat16" if bf16 else "float32"
        if quantized and (gemm or not many_rows):
            return NativeWeight(qt, dtype=dtype, gemm=gemm, int8=int8)
        dense = to_dense(qt, policy.params)
        packed = qt if quantized else dense
        return NativeWeight(packed, dense if quantized and many_rows else None, dtype=dtype, gemm=gemm)

    def view(self, qt: QTensor, compute_dtype) -> NativeWeight:
        return NativeWeight(qt, dtype=jnp.dtype(compute_dtype).name)

    def matmul(self, x, w: NativeWeight, *, compute_dtype, out_dtype) -> jax.Array:
        platform = jax.default_backend()
        if platform != "cpu":
            raise ValueError(f"qmatmul: a NativeWeight ({w}) runs on CPU only, not on {platform}")
        m = x.shape[0]
        if _gemm_rows(w, compute_dtype, m):
            if w.dtype == "float32":
                return kernels.qgemm_f32(x, w.packed, out_dtype=out_dtype, layer=w.layer)
            return kernels.qgemm(x, w.packed, out_dtype=out_dtype, layer=w.layer, int8=w.int8)
        if m > kernels.MAX_ROWS:
            dense_stored = w.packed.format.block_size == 1 and w.layer is None
            big = w.dense if w.dense is not None else w.packed if dense_stored else None
            if big is not None:
                return xla_matmul(x, big, compute_dtype, out_dtype)
        return kernels.matmul(x, w.packed, compute_dtype=compute_dtype, out_dtype=out_dtype,
                              weight_dtype=decode_weight_dtype(w), layer=w.layer)

    def glu(self, x, w: NativeWeight, activation: str, *, compute_dtype) -> jax.Array:
        # The gemm applies the activation in its epilogue and hands back bf16: the down projection's input
        # in the bf16 compute dtype, without a pass over the f32 [M, 2F] product.
        if _gemm_rows(w, compute_dtype, x.shape[0]) and w.dtype == "bfloat16" \
                and w.shape[0] % (2 * kernels.PANEL) == 0 \
                and activation in kernels.GLU_ACTS and jax.default_backend() == "cpu":
            return kernels.qgemm(x, w.packed, out_dtype=jnp.float32, layer=w.layer, glu=activation, int8=w.int8)
        return super().glu(x, w, activation, compute_dtype=compute_dtype)

    def concat(self, ws: list[NativeWeight]) -> NativeWeight | None:
        if len({(w.fmt, w.dtype, w.dense is None, w.gemm, w.int8) for w in ws}) != 1:
            return None
        if any(w.layer is not None or w.packed is None for w in ws):
            raise QTensorError(f"native: cannot fuse weights read from a stack of layers: {ws}")
        dense = None if ws[0].dense is None else concat_rows([w.dense for w in ws])
        return NativeWeight(concat_rows([w.packed for w in ws]), dense, dtype=ws[0].dtype, gemm=ws[0].gemm,
                            int8=ws[0].int8)

    def stacked(self, w: NativeWeight) -> tuple[NativeWeight, Any]:
        # The planes stay whole (the kernels read layer i in place); the dense copy (prefill's where the
        # gemm does not run) is sliced as usual, and a dense-stored weight goes both ways (whole for the
        # kernels, sliced for the dot; XLA drops the slice nothing reads).
        dense = w.dense
        if dense is None and w.packed.format.block_size == 1 and not w.gemm:
            dense = w.packed
        return NativeWeight(None, dense, dtype=w.dtype, gemm=w.gemm, int8=w.int8), w.packed

    def unstack(self, sliced: NativeWeight, whole: Any, index: jax.Array) -> NativeWeight:
        return NativeWeight(whole, sliced.dense, index, sliced.dtype, sliced.gemm, sliced.int8)

    def place(self, w, spec, mesh, what):
        raise ShardingError(f"{what}: the native backend's {w} runs on one CPU device, not on a mesh")

    def describe(self, w: NativeWeight | None = None) -> str:
        decode = f"native (1-{kernels.MAX_ROWS} rows)"
        if w is None:
            return decode
        if w.gemm:
            product = "int8" if w.int8 else "bf16" if w.dtype == "bfloat16" else "f32"
            return f"{decode}, native {product} gemm (more, from the planes)"
        if w.dense is not None:
            return f"{decode}, xla (more, dense {w.dense.fmt} copy)"
        return decode if w.packed.format.block_size > 1 else f"{decode}, xla (more)"

    def products(self, rows, k, v, scores_dtype):
        """Attention's two products on the native bf16 gemm, for a prefill (`realm_jax.ops.attention`'s
        `products`): where rows [B, K, M, H] has more than MAX_ROWS rows per kv head, bf16 inputs, f32
        scores, even head and key lengths and at most _ATTENTION_BLOCKS batch x kv-head blocks, a
        function (a [B, K, M, J], w [B, N, K, J]) -> a @ w^T [B, K, M, N] f32, w packed per block (a
        transpose of a few hundred KB); else None."""
        if jax.default_backend() != "cpu":
            return None
        b, kv, m, h = rows.shape
        if m <= kernels.MAX_ROWS or b * kv > _ATTENTION_BLOCKS or jnp.dtype(scores_dtype) != jnp.float32 \
                or any(a.dtype != jnp.bfloat16 for a in (rows, k, v)) or h % 2 or k.shape[1] % 2 \
                or not kernels.gemm_available():
            return None

        def product(a, w):
            n = w.shape[1]
            out = [[kernels.gemm(a[i, j], kernels.pack_panels(w[i, :, j]), n, out_dtype=jnp.float32)
                    for j in range(kv)] for i in range(b)]
            return jnp.stack([jnp.stack(r) for r in out])

        return product


    def decode_attention(self, q, k_cache, v_cache, scores_dtype):
        """Attention for a decode step (at most MAX_ROWS queries per sequence) on the stacked cache read in
        place (`realm_jax.native.decode_attention`), where the scores are f32 and the cache holds the
        queries' dtype, bf16 or f32 (XLA's path would round the cache to it); else None."""
        if jax.default_backend() != "cpu" or q.shape[1] > kernels.MAX_ROWS or jnp.dtype(scores_dtype) != jnp.float32 \
                or not k_cache.dtype == v_cache.dtype == q.dtype or q.dtype not in (jnp.bfloat16, jnp.float32) \
                or not kernels.available():
            return None
        return kernels.decode_attention


_ATTENTION_BLOCKS = 8  # batch x kv heads up to which the native products are unrolled

NATIVE = Native()
