"""The operations of the inference path: `qmatmul` (the XLA path, the reference for the Pallas kernels and
for the native CPU kernels), `glu` (a gated FFN's gate|up with its activation), `embed`, `rms_norm`, `rope`
and `attention`.

Shapes: B batch, T tokens, S key positions, N query heads, K kv heads (or the contraction, in qmatmul),
G query heads per kv head, H head dim, D model width, R rotated dims.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from realm_jax.errors import DTypeError, NativeBuildError, QTensorError, ShapeMismatchError, ShardingError
from realm_jax.quant import QTensor, dequantize_tile

__all__ = ["IMPLS", "attention", "embed", "qmatmul", "resolve_impl", "rms_norm", "rope", "rope_tables"]

_FLOATS = (jnp.float32, jnp.float16, jnp.bfloat16)


def qmatmul(x: jax.Array, w, *, compute_dtype=None, out_dtype=None, impl: str = "auto") -> jax.Array:
    """y = x @ dequant(w)^T with f32 accumulation.

    Args:
      x: [B..., K] float32, float16 or bfloat16.
      w: a 2-D QTensor of logical shape (N, K), any supported format; or a `realm_jax.native.NativeWeight`
        (what `load` builds for impl "native"), which takes the native path whatever `impl` says.
      compute_dtype: the dtype the weight is dequantized to and x is cast to before the dot; defaults
        to x.dtype. Accumulation is f32 whatever it is.
      out_dtype: the dtype of y; defaults to x.dtype.
      impl: "xla" (dequantize with jnp, then a dot), "pallas" (the fused kernels of `pallas_kernels`;
        on CPU in interpret mode), "native" (CPU: `realm_jax.native`'s kernel reading the planes, for up
        to `native.MAX_ROWS` rows of x; the XLA path for more) or "auto": the kernels on GPU and TPU,
        "native" on CPU where it builds, else "xla". Under "pallas" dense weights (F32/F16/BF16) take the
        plain dot.

    Returns:
      [B..., N] in out_dtype.
    """
    from realm_jax.native import NativeWeight

    if not isinstance(w, (QTensor, NativeWeight)):
        raise QTensorError(f"qmatmul: w must be a QTensor or a NativeWeight, got {type(w).__name__}")
    # (A NativeWeight read in place from a stack of layers is checked by native.matmul.)
    parts = ((w.packed if w.layer is None else None), w.dense) if isinstance(w, NativeWeight) else (w,)
    for part in parts:
        if part is not None:
            part.check("qmatmul: w")
    x = jnp.asarray(x)
    if x.dtype not in _FLOATS:
        raise DTypeError(f"qmatmul: x.dtype={x.dtype} must be one of float32, float16, bfloat16")
    if w.ndim != 2:
        raise ShapeMismatchError(f"qmatmul: w.shape={w.shape} must be 2-D (N, K)")
    if x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ShapeMismatchError(f"qmatmul: x.shape={x.shape} must end in K={w.shape[1]} (w.shape={w.shape})")
    compute_dtype = jnp.dtype(x.dtype if compute_dtype is None else compute_dtype)
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    for name, dt in (("compute_dtype", compute_dtype), ("out_dtype", out_dtype)):
        if dt not in _FLOATS:
            raise DTypeError(f"qmatmul: {name}={dt} must be one of float32, float16, bfloat16")
    platform = jax.default_backend()
    if isinstance(w, NativeWeight):
        return _qmatmul_native(x, w, compute_dtype, out_dtype, platform)
    impl = resolve_impl(impl, platform)
    if impl == "native":
        from realm_jax import native

        if native.supports(w):  # the weight dequantized to the compute dtype, as the XLA path does
            return _qmatmul_native(x, NativeWeight(w, dtype=compute_dtype.name), compute_dtype, out_dtype, platform)
    if impl == "pallas" and w.format.block_size > 1:
        if w.axes is not None:
            return _qmatmul_pallas_sharded(x, w, compute_dtype, out_dtype, interpret=platform == "cpu")
        return _qmatmul_pallas(x, w, compute_dtype, out_dtype, interpret=platform == "cpu")
    return _qmatmul_xla(x, w, compute_dtype, out_dtype)


IMPLS = ("auto", "pallas", "xla", "native")


def resolve_impl(impl: str, platform: str | None = None, *, devices: int = 1) -> str:
    """"pallas", "xla" or "native" for `impl` on a JAX platform, for params spread over `devices`.

    "auto" is the fused kernels on GPU and TPU; on CPU, the native matmul (`realm_jax.native`) where it
    builds and the params sit on one device, else the XLA path (the kernels only interpret on CPU).
    "native" elsewhere is an error: it is a CPU custom call XLA cannot split over a mesh."""
    if impl not in IMPLS:
        raise ValueError(f"qmatmul: impl={impl!r} must be one of {', '.join(IMPLS)}")
    platform = platform or jax.default_backend()
    if impl == "native":
        if devices > 1:
            raise ShardingError(f"impl='native' runs on one CPU device, not on a mesh of {devices} (XLA cannot "
                                f"split its custom call): use impl='xla' or 'auto'")
        if platform != "cpu":
            raise NativeBuildError(f"impl='native' runs on one CPU device, not on {platform}: use impl='auto'")
        from realm_jax import native

        if not native.available():
            raise NativeBuildError(native.reason())
        return impl
    if impl == "auto":
        if platform != "cpu":
            return "pallas"
        from realm_jax import native

        return "native" if devices == 1 and native.available() else "xla"
    return impl


def _takes_gemm(x, w, compute_dtype) -> bool:
    """Whether `w @ x` goes to the native bf16 gemm: a NativeWeight with bf16 panels, a bf16 compute
    dtype and more rows of x than the decode kernel takes (native.MAX_ROWS)."""
    from realm_jax import native
    from realm_jax.native import NativeWeight

    return isinstance(w, NativeWeight) and w.panels is not None and compute_dtype == jnp.bfloat16 \
        and math.prod(x.shape[:-1]) > native.MAX_ROWS


def _qmatmul_native(x, w, compute_dtype, out_dtype, platform: str) -> jax.Array:
    """A NativeWeight: the native kernel on its packed planes for few rows; for more, the native bf16 gemm
    on its panels (bf16 compute), else XLA's dot on its dense copy (or the kernel again where there is
    neither and the packed weight is quantized)."""
    from realm_jax import native

    if platform != "cpu":
        raise ValueError(f"qmatmul: a NativeWeight ({w}) runs on CPU only, not on {platform}")
    if _takes_gemm(x, w, compute_dtype):
        return native.gemm(x, w.panels, w.shape[0], out_dtype=out_dtype, layer=w.layer)
    if math.prod(x.shape[:-1]) > native.MAX_ROWS:
        big = w.dense if w.dense is not None else w.packed if w.packed.format.block_size == 1 and w.layer is None \
            else None
        if big is not None:
            return _qmatmul_xla(x, big, compute_dtype, out_dtype)
    return native.matmul(x, w.packed, compute_dtype=compute_dtype, out_dtype=out_dtype, weight_dtype=w.dtype,
                         layer=w.layer)


_GATE_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


def gated(gate: jax.Array, up: jax.Array, activation: str) -> jax.Array:
    """act(gate) * up, `activation` "silu" (SwiGLU) or "gelu_tanh" (GeGLU)."""
    if activation not in _GATE_ACTIVATIONS:
        raise ValueError(f"glu: activation={activation!r} must be one of {list(_GATE_ACTIVATIONS)}")
    return _GATE_ACTIVATIONS[activation](gate) * up


def glu(x: jax.Array, w, activation: str, *, compute_dtype=None, impl: str = "auto") -> jax.Array:
    """A gated FFN's hidden activations act(x @ gate^T) * (x @ up^T) from its fused gate|up weight w
    [2F, K] (gate rows first), `activation` "silu" (SwiGLU) or "gelu_tanh" (GeGLU), in f32 (gate and up
    accumulate in f32). On a NativeWeight with bf16 panels past native.MAX_ROWS rows the native gemm
    applies the activation in its epilogue and hands back bf16: the down projection's input in the bf16
    compute dtype, without a pass over the f32 [.., 2F] product."""
    from realm_jax import native

    if activation not in _GATE_ACTIVATIONS:
        raise ValueError(f"glu: activation={activation!r} must be one of {list(_GATE_ACTIVATIONS)}")
    compute_dtype = jnp.dtype(x.dtype if compute_dtype is None else compute_dtype)
    if _takes_gemm(x, w, compute_dtype) and w.shape[0] % (2 * native.PANEL) == 0 and jax.default_backend() == "cpu":
        return native.gemm(x, w.panels, w.shape[0], out_dtype=jnp.float32, layer=w.layer, glu=activation)
    gate, up = jnp.split(qmatmul(x, w, compute_dtype=compute_dtype, out_dtype=jnp.float32, impl=impl), 2, axis=-1)
    return gated(gate, up, activation)


@functools.partial(jax.jit, static_argnames=("compute_dtype", "out_dtype", "interpret"))
def _qmatmul_pallas(x: jax.Array, w: QTensor, compute_dtype, out_dtype, interpret: bool) -> jax.Array:
    import pallas_kernels

    rows = x.reshape(-1, x.shape[-1])
    y = pallas_kernels.matmul(rows, w, compute_dtype=compute_dtype, out_dtype=out_dtype, interpret=interpret)
    return y.reshape(*x.shape[:-1], -1)


_FEW_ROWS = 16  # up to this many rows of x (decode), the weight goes on the left of the dot


@functools.partial(jax.jit, static_argnames=("compute_dtype", "out_dtype"))
def _qmatmul_xla(x: jax.Array, w: QTensor, compute_dtype, out_dtype) -> jax.Array:
    wd = dequantize_tile(w.fmt, w.planes, dtype=compute_dtype).reshape(w.shape)  # [N, K]
    rows = x.reshape(-1, x.shape[-1]).astype(compute_dtype)  # [M, K]
    contract = (((1,), (1,)), ((), ()))
    # HIGHEST keeps f32 dots in f32 on GPU/TPU; for 16-bit inputs it means nothing but sends XLA:CPU off
    # its bf16 kernel onto a convert-to-f32 path (measured 165 ms against 12 ms).
    precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None
    m = rows.shape[0]
    if m <= _FEW_ROWS and not (m == 1 and compute_dtype == jnp.float32):
        # XLA:CPU, measured on a (262144, 640) bf16 weight: x @ W^T with one row converts all of W to f32
        # on every call (166 ms); W @ x^T with x padded to two rows takes the fast kernel (12 ms). A single
        # f32 row is fastest as x @ W^T (XLA's own memory-bound matrix-vector kernel).
        padded = jnp.concatenate([rows, rows]) if m == 1 else rows
        y = lax.dot_general(wd, padded, contract, precision=precision, preferred_element_type=jnp.float32).T[:m]
    else:
        y = lax.dot_general(rows, wd, contract, precision=precision, preferred_element_type=jnp.float32)
    return y.reshape(*x.shape[:-1], -1).astype(out_dtype)


def _qmatmul_pallas_sharded(x: jax.Array, w: QTensor, compute_dtype, out_dtype, interpret: bool) -> jax.Array:
    """The fused kernel per shard of a weight split over mesh axes (w.axes): XLA cannot partition a kernel,
    so each device multiplies its own blocks inside shard_map. Rows split (column-parallel): each device
    computes its slice of the outputs. Columns split (row-parallel): x arrives split the same way and the
    partial products are summed with one psum (Megatron's all-reduce). Needs the mesh in context
    (`jax.set_mesh`), as `realm_jax.load` arranges."""
    mesh = jax.sharding.get_abstract_mesh()
    rows_axis, cols_axis = w.axes
    missing = [a for a in w.axes if a is not None and a not in mesh.axis_names]
    if missing:
        raise ShardingError(f"qmatmul: w={w} is split over mesh axes {missing}, which the mesh in context "
                            f"({dict(mesh.shape) or 'none'}) lacks: call it under jax.set_mesh(mesh)")
    n_rows = w.shape[0] // (mesh.shape[rows_axis] if rows_axis else 1)
    n_cols = w.shape[1] // (mesh.shape[cols_axis] if cols_axis else 1)
    lead = (None,) * (x.ndim - 1)

    def local(x, planes):
        y = _qmatmul_pallas(x, QTensor(w.fmt, (n_rows, n_cols), planes), compute_dtype,
                            jnp.float32 if cols_axis else out_dtype, interpret)
        return lax.psum(y, cols_axis).astype(out_dtype) if cols_axis else y

    split = PartitionSpec(rows_axis, cols_axis)
    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(*lead, cols_axis), {k: split for k in w.planes}),
                         out_specs=PartitionSpec(*lead, rows_axis), axis_names={a for a in w.axes if a},
                         check_vma=False)(x, w.planes)


def embed(ids: jax.Array, table: QTensor, dtype=jnp.float32) -> jax.Array:
    """Rows `ids` of a (V, D) table, dequantized: [B..., D] in `dtype`. Only the gathered rows are
    dequantized, so a quantized vocabulary stays quantized."""
    planes = {name: jnp.take(p, ids, axis=0) for name, p in table.planes.items()}
    return dequantize_tile(table.fmt, planes, dtype=dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype=jnp.float32) -> jax.Array:
    """x / rms(x) * weight over the last axis, computed in `dtype` (f32 by default: a sum of squares in
    bf16 loses the small terms, in f16 it overflows) and returned in x.dtype."""
    xf = x.astype(dtype)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + jnp.asarray(eps, dtype))
    return (y * weight.astype(dtype)).astype(x.dtype)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles, [B, T, 1, R/2] each, materialized once so that the q and k
    rotations that share them do not each re-evaluate them per element (XLA fuses the transcendental
    functions into every consumer: 10 of gemma3's 73 ms prefill)."""
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B, T, 1, R/2]
    return lax.optimization_barrier((jnp.cos(angles), jnp.sin(angles)))


def rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, *, neox: bool,
         tables: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Rotary embedding of x [B, T, N, H] at positions [B, T], with inv_freq [R/2] for the first R dims.

    `neox` rotates the pairs (i, i + R/2), as GPT-NeoX, Qwen2 and Gemma; otherwise the adjacent pairs
    (2i, 2i+1), which is what llama-architecture GGUF files expect (llama.cpp permutes q/k at conversion).
    Dims past R pass through unrotated. `tables`: `rope_tables(positions, inv_freq)`, when already computed.
    """
    rot = 2 * inv_freq.shape[-1]
    cos, sin = rope_tables(positions, inv_freq) if tables is None else tables
    xr, rest = x[..., :rot].astype(jnp.float32), x[..., rot:]
    if neox:
        a, b = xr[..., : rot // 2], xr[..., rot // 2 :]
        out = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    else:
        pairs = xr.reshape(*xr.shape[:-1], rot // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(xr.shape)
    return jnp.concatenate([out.astype(x.dtype), rest], axis=-1) if rest.shape[-1] else out.astype(x.dtype)


_QUERY_CHUNK = 512  # prefill attends in blocks of this many queries: scores stay O(chunk * S), not O(T * S)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, query_pos: jax.Array, *, scale: float, window: int = 0,
              local=None, scores_dtype=jnp.float32, chunk: int = _QUERY_CHUNK, impl: str = "auto") -> jax.Array:
    """Causal grouped-query attention over a cache.

    Args:
      q: [B, T, N, H]; k: [B, S, K, H]; v: [B, S, K, Hv]. N must be a multiple of K; query head n reads
        kv head n // (N / K). Key j holds position j.
      query_pos: [B, T] the queries' positions: a query attends to keys at positions <= its own.
      window: with `local` true (a traced bool is fine), only the last `window` positions are attended.
      scores_dtype: the dtype of scores and softmax (f32 by default: long rows need its range).
      chunk: queries per block; longer prefills run block by block (lax.map) to bound the scores' memory.
      impl: "native" runs prefill's two products (bf16 inputs, f32 scores) on the native bf16 gemm;
        anything else, XLA's dots.

    Returns:
      [B, T, N, Hv] in q.dtype.
    """
    b, t, n, h = q.shape
    if t <= chunk:
        return _attend(q, k, v, query_pos, scale, window, local, scores_dtype, impl)
    pad = -t % chunk
    qs = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, -1, chunk, n, h).swapaxes(0, 1)
    ps = jnp.pad(query_pos, ((0, 0), (0, pad))).reshape(b, -1, chunk).swapaxes(0, 1)
    out = lax.map(lambda qp: _attend(qp[0], k, v, qp[1], scale, window, local, scores_dtype, impl), (qs, ps))
    return out.swapaxes(0, 1).reshape(b, -1, n, v.shape[-1])[:, :t]


_NATIVE_ATTENTION_BLOCKS = 8  # batch x kv heads up to which the native products are unrolled


def _attend(q, k, v, query_pos, scale, window, local, scores_dtype, impl="auto"):
    # The G query heads of each kv head and the T queries form the rows of one matmul per kv head
    # ([T * G, H] against the keys [S, H]): XLA:CPU runs that plain layout ~2x faster than the same dots
    # with T and G as separate free dims (gemma3's 128-token prefill: 0.28 -> 0.14 ms a layer).
    b, t, n, h = q.shape
    kv = k.shape[2]
    g = n // kv
    rows = q.reshape(b, t, kv, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * g, h)
    row_pos = jnp.repeat(query_pos, g, axis=1)[:, :, None]  # [B, T * G, 1]: row t * G + j is query t
    key_pos = jnp.arange(k.shape[1])[None, None, :]
    mask = key_pos <= row_pos  # [B, T * G, S]
    if window:
        mask &= ~jnp.asarray(local, bool) | (key_pos > row_pos - window)
    native = _native_attention(rows, k, v, scores_dtype, impl) if t > 1 else None  # decode: XLA's small dots
    if native:
        scores = native(rows, k) * scale
    else:
        scores = jnp.einsum("BKMH,BSKH->BKMS", rows, k, preferred_element_type=scores_dtype) * scale
    scores = jnp.where(mask[:, None], scores, jnp.finfo(scores_dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if native:
        out = native(probs.astype(v.dtype), v.swapaxes(1, 3))  # [B, K, M, S] against v^T [B, Hv, K, S]
    else:
        out = jnp.einsum("BKMS,BSKH->BKMH", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, kv, t, g, -1).transpose(0, 2, 1, 3, 4).reshape(b, t, n, -1).astype(q.dtype)


def _native_attention(rows, k, v, scores_dtype, impl: str):
    """For impl "native" on a prefill (the caller's: several queries; here: more than native.MAX_ROWS rows
    per kv head, bf16 inputs, f32 scores, even head and key lengths, at most _NATIVE_ATTENTION_BLOCKS
    batch x kv-head blocks): a function (a [B, K, M, J], w [B, N, K, J]) -> a @ w^T [B, K, M, N] f32 on the native bf16 gemm, w packed
    per block (a transpose of a few hundred KB); else None."""
    if impl != "native" or jax.default_backend() != "cpu":
        return None
    from realm_jax import native

    b, kv, m, h = rows.shape
    if m <= native.MAX_ROWS or b * kv > _NATIVE_ATTENTION_BLOCKS or jnp.dtype(scores_dtype) != jnp.float32 \
            or any(a.dtype != jnp.bfloat16 for a in (rows, k, v)) or h % 2 or k.shape[1] % 2 \
            or not native.gemm_available():
        return None

    def product(a, w):
        n = w.shape[1]
        out = [[native.gemm(a[i, j], native.pack_panels(w[i, :, j]), n, out_dtype=jnp.float32) for j in range(kv)]
               for i in range(b)]
        return jnp.stack([jnp.stack(r) for r in out])

    return product
