"""The operations of the inference path besides the linear layers (`realm_jax.linear`): `embed`,
`rms_norm`, `rope` and `attention`.

Shapes: B batch, T tokens, S key positions, N query heads, K kv heads, G query heads per kv head, H head
dim, D model width, R rotated dims.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from realm_jax.quant import QTensor, dequantize_tile

__all__ = ["attention", "embed", "rms_norm", "rope", "rope_tables", "row_sum"]


def embed(ids: jax.Array, table: QTensor, dtype=jnp.float32) -> jax.Array:
    """Rows `ids` of a (V, D) table, dequantized: [B..., D] in `dtype`. Only the gathered rows are
    dequantized, so a quantized vocabulary stays quantized."""
    planes = {name: jnp.take(p, ids, axis=0) for name, p in table.planes.items()}
    return dequantize_tile(table.fmt, planes, dtype=dtype)


def row_sum(x: jax.Array) -> jax.Array:
    """The sum over the last axis [..., n] -> [..., 1], by pairwise halving (zero-padded to a power of two):
    elementwise adds only, so a row's sum does not depend on how many other rows the array holds. XLA:CPU's
    reduce does not promise that: it vectorizes a [R, n] reduction differently as R grows (a decode step's
    norms and softmax then gave a row other bits in a batch of 8 than alone), and the server's rows must
    get the same answer whoever shares their step (`realm_jax.serve`)."""
    n = x.shape[-1]
    width = 1 << max(n - 1, 0).bit_length()
    if width != n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - n)])
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype=jnp.float32) -> jax.Array:
    """x / rms(x) * weight over the last axis, computed in `dtype` (f32 by default: a sum of squares in
    bf16 loses the small terms, in f16 it overflows) and returned in x.dtype. The sum of squares is
    `row_sum`'s: a row's norm does not depend on its batch."""
    xf = x.astype(dtype)
    mean = row_sum(xf * xf) / jnp.asarray(xf.shape[-1], dtype)
    y = xf * lax.rsqrt(mean + jnp.asarray(eps, dtype))
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
              local=None, scores_dtype=jnp.float32, chunk: int = _QUERY_CHUNK, products=None) -> jax.Array:
    """Causal grouped-query attention over a cache.

    Args:
      q: [B, T, N, H]; k: [B, S, K, H]; v: [B, S, K, Hv]. N must be a multiple of K; query head n reads
        kv head n // (N / K). Key j holds position j.
      query_pos: [B, T] the queries' positions: a query attends to keys at positions <= its own.
      window: with `local` true (a traced bool is fine), only the last `window` positions are attended.
      scores_dtype: the dtype of scores and softmax (f32 by default: long rows need its range).
      chunk: queries per block; longer prefills run block by block (lax.map) to bound the scores' memory.
      products: None (XLA's dots), or a backend's prefill products (`realm_jax.linear.products`): called
        as products(rows [B, K, T*G, H], k, v, scores_dtype), it returns a function (a [B, K, M, J],
        w [B, N, K, J]) -> a @ w^T [B, K, M, N] in f32 for the shapes it takes, else None.

    Returns:
      [B, T, N, Hv] in q.dtype.
    """
    b, t, n, h = q.shape
    if t <= chunk:
        return _attend(q, k, v, query_pos, scale, window, local, scores_dtype, products)
    pad = -t % chunk
    qs = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, -1, chunk, n, h).swapaxes(0, 1)
    ps = jnp.pad(query_pos, ((0, 0), (0, pad))).reshape(b, -1, chunk).swapaxes(0, 1)
    out = lax.map(lambda qp: _attend(qp[0], k, v, qp[1], scale, window, local, scores_dtype, products), (qs, ps))
    return out.swapaxes(0, 1).reshape(b, -1, n, v.shape[-1])[:, :t]


def _attend(q, k, v, query_pos, scale, window, local, scores_dtype, products=None):
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
    dot = products(rows, k, v, scores_dtype) if products is not None and t > 1 else None  # decode: XLA's dots
    if dot:
        scores = dot(rows, k) * scale
    else:
        scores = jnp.einsum("BKMH,BSKH->BKMS", rows, k, preferred_element_type=scores_dtype) * scale
    scores = jnp.where(mask[:, None], scores, jnp.finfo(scores_dtype).min)
    if t == 1:  # decode: a row's softmax must not depend on the batch (`row_sum`)
        e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        probs = e / row_sum(e)
    else:
        probs = jax.nn.softmax(scores, axis=-1)
    if dot:
        out = dot(probs.astype(v.dtype), v.swapaxes(1, 3))  # [B, K, M, S] against v^T [B, Hv, K, S]
    else:
        out = jnp.einsum("BKMS,BSKH->BKMH", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, kv, t, g, -1).transpose(0, 2, 1, 3, 4).reshape(b, t, n, -1).astype(q.dtype)
