"""Decode attention on the Pallas Triton GPU backend, over one layer of the stacked KV cache read where it
lies.

The model's cache is one array per K and V, [L, B, S, K, H], carried through the scan over layers. XLA's
attention for a decode step slices layer i out of it (a copy of the layer's whole cache, every layer, every
step) and, where it writes the step's keys and values into the slice, copies the slice back. This kernel
takes the stacked cache and the layer index instead: the step's keys and values are written into the
stack in place beforehand (`realm_jax.models.transformer`), and the kernel reads only the keys it attends
to.

Shapes: B sequences, T queries each (a decode step: T = 1, or a few), N query heads over K kv heads
(G = N / K per kv head), S cache positions, H / Hv key / value width.

A program owns one sequence, one kv head and a range of the cache's positions (split so that the grid
gives every SM work: a decode step has few sequences and kv heads), and the T * G queries that read that
kv head (padded to one `mma` tile of 16 rows). It walks its range `block` keys at a time, up to the
largest position its queries attend to: scores [rows, block] on the tensor cores in f32, the mask
(causal, kv_len, the sliding window of local layers), an online softmax (running max and sum, in f32),
and the probabilities, rounded to the cache's dtype as the reference rounds them, times the values. Each
program writes its unnormalised sum and its running max and sum; `decode_attention` merges the ranges.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from realm_jax.errors import ShapeMismatchError

__all__ = ["AttentionTiling", "decode_attention", "tiling_for"]

_SMS = 132  # H100 / H200
ROWS = 16  # the fewest query rows a program multiplies: one mma's rows
MAX_ROWS = 64  # the most (T * G): past it the model's attention takes XLA's path
_BLOCKS = (64, 32, 16)  # keys a step: the largest dividing the cache's length
_NEG = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionTiling:
    """block: keys a loop step; splits: programs along the cache's positions; num_warps: warps a program."""

    block: int
    splits: int
    num_warps: int = 4


def tiling_for(b: int, kv: int, s: int, *, interpret: bool = False) -> AttentionTiling | None:
    """The largest block of keys dividing S, then position splits (a power of two, at most a block each)
    that give every SM a program: each split also writes a partial [rows, Hv] f32 sum to merge, so one
    wave rather than several; one split in interpret mode (a CPU runs the programs one by one). None where
    no block divides S."""
    block = next((bl for bl in _BLOCKS if s % bl == 0), None)
    if block is None:
        return None
    want = -(-_SMS // (b * kv))
    splits = 1 if interpret else min(s // block, 1 << (want - 1).bit_length())
    return AttentionTiling(block=block, splits=splits)


def _kernel(layer_ref, local_ref, q_ref, pos_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, t: AttentionTiling,
            span: int, kv_len: int, window: int, scale: float):
    b, kvh, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    q = q_ref[b, kvh]  # [R, H]
    pos = pos_ref[b]  # [R]
    start = split * span
    # the keys this program reads: its range, below kv_len, up to the furthest position its queries attend
    stop = jnp.minimum(jnp.minimum(start + span, kv_len), jnp.max(pos) + 1)
    steps = jnp.maximum(0, (stop - start + t.block - 1) // t.block)
    local = local_ref[0] != 0

    def body(i, carry):
        m, total, acc = carry
        s0 = start + i * t.block
        k = k_ref[layer, b, pl.ds(s0, t.block), kvh, :]  # [block, H]
        v = v_ref[layer, b, pl.ds(s0, t.block), kvh, :]  # [block, Hv]
        scores = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale  # [R, block]
        key = s0 + lax.broadcasted_iota(jnp.int32, (1, t.block), 1)
        valid = (key <= pos[:, None]) & (key < kv_len)
        if window:
            valid &= jnp.logical_not(local) | (key > pos[:, None] - window)
        scores = jnp.where(valid, scores, _NEG)
        m_new = jnp.maximum(m, jnp.max(scores, axis=1))
        p = jnp.where(valid, jnp.exp(scores - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, total * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

    rows = q.shape[0]
    init = (jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, o_ref.shape[-1]), jnp.float32))
    m, total, acc = lax.fori_loop(0, steps, body, init)
    o_ref[0, 0, 0] = acc
    m_ref[0, 0, 0] = m
    l_ref[0, 0, 0] = total


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer, query_pos: jax.Array, local, *,
                     scale: float, window: int = 0, kv_len: int | None = None, interpret: bool = False,
                     tiling: AttentionTiling | None = None) -> jax.Array:
    """`realm_jax.ops.attention` for a decode step over layer `layer` of the stacked cache, read in place.

    Args:
      q: [B, T, N, H] queries in the cache's dtype (bf16 or f16), T * N / K <= MAX_ROWS.
      k_cache: [L, Bc, S, K, H] and v_cache [L, Bc, S, K, Hv], Bc >= B, with this step's keys and values
        already written; sequences 0..B-1 are read.
      layer: int32 scalar: the cache slot of this layer.
      query_pos: [B, T] int32, each query's position: it attends to the keys at positions <= its own and
        below kv_len (with `local` true and a `window`, the last `window` of them).
      local: bool scalar (traced or not).
      interpret: Pallas interpret mode (CPU).
      tiling: overrides `tiling_for`.

    Returns:
      [B, T, N, Hv] in q.dtype: f32 scores and softmax, the probabilities rounded to the cache's dtype,
      f32 sums.
    """
    b, tq, n, h = q.shape
    _, bc, s, kv, hk = k_cache.shape
    hv = v_cache.shape[-1]
    g = n // kv if kv else 0
    if (k_cache.ndim != 5 or v_cache.shape[:4] != k_cache.shape[:4] or hk != h or not g or n % kv or bc < b
            or q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype or tq * g > MAX_ROWS):
        raise ShapeMismatchError(f"decode attention: q {q.dtype}{list(q.shape)} against caches "
                                 f"{k_cache.dtype}{list(k_cache.shape)} / {v_cache.dtype}{list(v_cache.shape)}; "
                                 f"at most {MAX_ROWS} query rows a kv head")
    kv_len = s if kv_len is None else kv_len
    t = tiling or tiling_for(b, kv, s, interpret=interpret)
    if t is None or s % t.block:
        raise ShapeMismatchError(f"decode attention: no block of {_BLOCKS} keys divides the cache's {s} positions")
    span = -(-kv_len // t.splits // t.block) * t.block
    # rows t * G + j of kv head k are query head k * G + j of query t, as in `ops.attention`
    rows = max(ROWS, 1 << (tq * g - 1).bit_length())
    qr = q.reshape(b, tq, kv, g, h).transpose(0, 2, 1, 3, 4).reshape(b, kv, tq * g, h)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, rows - tq * g), (0, 0)))
    pos = jnp.repeat(jnp.asarray(query_pos, jnp.int32), g, axis=1)
    pos = jnp.pad(pos, ((0, 0), (0, rows - tq * g)))  # padding rows attend to position 0: cut below
    scalars = (jnp.asarray(layer, jnp.int32).reshape(1), jnp.asarray(local, jnp.int32).reshape(1))
    kernel = functools.partial(_kernel, t=t, span=span, kv_len=kv_len, window=window, scale=scale)
    out_shape = (jax.ShapeDtypeStruct((t.splits, b, kv, rows, hv), jnp.float32),
                 jax.ShapeDtypeStruct((t.splits, b, kv, rows), jnp.float32),
                 jax.ShapeDtypeStruct((t.splits, b, kv, rows), jnp.float32))
    acc, m, total = pl.pallas_call(
        kernel,
        grid=(b, kv, t.splits),
        in_specs=[pl.no_block_spec] * 6,
        out_specs=(pl.BlockSpec((1, 1, 1, rows, hv), lambda i, j, sp: (sp, i, j, 0, 0)),
                   pl.BlockSpec((1, 1, 1, rows), lambda i, j, sp: (sp, i, j, 0)),
                   pl.BlockSpec((1, 1, 1, rows), lambda i, j, sp: (sp, i, j, 0))),
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=t.num_warps, num_stages=2),
        interpret=interpret,
        name="decode_attention",
    )(*scalars, qr, pos, k_cache, v_cache)
    # merge the position ranges: weights exp(m - max m), ranges with no key weigh nothing
    top = jnp.max(m, axis=0)
    w = jnp.where(total > 0, jnp.exp(m - top), 0.0)
    out = jnp.sum(w[..., None] * acc, axis=0) / jnp.sum(w * total, axis=0)[..., None]  # [B, K, rows, Hv]
    out = out[:, :, : tq * g].reshape(b, kv, tq, g, hv).transpose(0, 2, 1, 3, 4).reshape(b, tq, n, hv)
    return out.astype(q.dtype)
