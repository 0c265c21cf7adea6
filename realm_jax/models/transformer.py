"""The decoder forward pass every architecture shares, over a KV cache. Pure functions, jit-friendly.

Legend: B batch, T new tokens, S cache length, L layers, D width, N heads, K kv heads, H head dim, V vocab.

Runs of consecutive layers whose params have the same structure (the same formats) are stacked and run
with `lax.scan`. A file that mixes formats across layers (Q4_K_M: attn_v and ffn_down in Q6_K on some
layers) becomes, on one CPU (`runtime.prepare_params`), one run whose layers are of a few structures
(`Variants`): each structure's layers stacked apart, and the scan's step picks its layer's with
`lax.switch`, so that the program holds each structure's layer once rather than once per run (gemma3-270m:
11 runs -> 1, half the compile time); on an accelerator or a mesh, one run per stretch of one structure.
Per-layer differences that are data (rope frequencies, sliding-window or global) ride along as scanned
arrays.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from realm_jax import linear, ops
from realm_jax.models.config import ModelConfig
from realm_jax.precision import Policy
from realm_jax.quant.formats import adjacent_view


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys [L, B, S, K, H] and values [L, B, S, K, Hv]; position p of sequence b lives at index p."""

    k: jax.Array
    v: jax.Array

    @property
    def length(self) -> int:
        return self.k.shape[2]


def init_cache(config: ModelConfig, batch: int, length: int, dtype, layers: int | None = None) -> KVCache:
    """A zero cache; `layers` (default: the model's) is the pipeline's slot count when it differs."""
    shape = (config.n_layers if layers is None else layers, batch, length, config.n_kv_heads)
    return KVCache(jnp.zeros((*shape, config.head_dim), dtype), jnp.zeros((*shape, config.v_head_dim), dtype))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["stacks", "which", "slot"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Variants:
    """A run's layers of a few structures: `stacks[k]` holds the layers of structure k stacked (leaves
    [n_k, ...]); layer i of the run is `stacks[which[i]]` at `slot[i]` (int32 [n] each)."""

    stacks: tuple[Any, ...]
    which: Any
    slot: Any


MAX_VARIANTS = 4  # structures one run may hold: each is a branch of the step, compiled once


@dataclasses.dataclass(frozen=True)
class LayerRun:
    """Layers [first, first + count) with identical param structure, their leaves stacked on axis 0."""

    first: int
    count: int
    params: Any


def stack_layers(layers: list[dict[str, Any]], *, last_apart: bool = False, variants: bool = False) -> list[LayerRun]:
    """Group consecutive layers of identical structure into stacked runs for `lax.scan`.

    `last_apart` puts the last layer in a run of its own, so that a prefill that needs only the last
    position's logits can run that layer's attention output and FFN on that position alone (`run_layers`).
    `variants`: layers of up to `MAX_VARIANTS` structures make one run (`Variants`) where they would make
    several (`checkpoint.read_gguf` places each structure's layers side by side, so that their stacks too
    are views, not copies).

    A stacked QTensor keeps its per-layer logical shape while its planes gain the leading L axis: inside
    the scan each step sees one layer's consistent QTensor. (Unrolling the layers instead measured no
    faster on XLA:CPU for SmolLM2 decode and prefill, and compiles slower.)
    """
    bounds = []  # (first, end) of each stretch of one structure
    i = 0
    end = len(layers) - 1 if last_apart else len(layers)
    while i < len(layers):
        treedef = jax.tree_util.tree_structure(layers[i])
        j = i + 1
        while j < end and jax.tree_util.tree_structure(layers[j]) == treedef:
            j += 1
        bounds.append((i, j))
        i = j
    merged = _variant_run(layers[:end]) if variants and sum(a < end for a, _ in bounds) > 1 else None
    return ([merged] if merged else []) + [LayerRun(a, b - a, jax.tree.map(_stack, *layers[a:b]))
                                           for a, b in bounds if merged is None or a >= end]


class _Scattered(Exception):
    """A structure's layers' arrays do not lie one after another: stacking them would copy."""


def _variant_run(layers: list[dict[str, Any]]) -> LayerRun | None:
    """The layers as one `Variants` run, or None where they have more than `MAX_VARIANTS` structures or a
    structure's stack would copy arrays of the file's that the stretches' stacks take as views."""
    structures = [jax.tree_util.tree_structure(layer) for layer in layers]
    kinds = list(dict.fromkeys(structures))
    if len(kinds) > MAX_VARIANTS:
        return None
    which = np.array([kinds.index(s) for s in structures], np.int32)
    seen = [0] * len(kinds)
    slot = np.zeros(len(layers), np.int32)
    for i, kind in enumerate(which):  # layer i's place among its structure's layers
        slot[i], seen[kind] = seen[kind], seen[kind] + 1

    def view(*xs):
        stacked = _stack(*xs)
        if not isinstance(stacked, np.ndarray) and all(isinstance(x, np.ndarray) for x in xs):
            raise _Scattered
        return stacked

    try:
        stacks = tuple(jax.tree.map(view, *(layer for layer, k in zip(layers, which) if k == kind))
                       for kind in range(len(kinds)))
    except _Scattered:
        return None
    return LayerRun(0, len(layers), Variants(stacks, which, slot))


def _stack(*xs):
    """jnp.stack, or the memory the layers' arrays already lie in, in order (`checkpoint.read_gguf` places
    them so): a view, not a second copy of the weights."""
    view = adjacent_view(xs, stack=True)
    return view if view is not None else jnp.stack(xs)


jax.tree_util.register_dataclass(LayerRun, data_fields=["params"], meta_fields=["first", "count"])


def _layer_constants(config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = np.stack([config.inv_freq(i) for i in range(config.n_layers)])  # [L, R/2]
    local = np.array([config.is_local(i) for i in range(config.n_layers)], dtype=bool)  # [L]
    return inv_freq, local


def _to(x, dtype):
    """x in a compute dtype; f16 inputs are clamped to its finite range first (gemma's activations reach
    past 65504: an Inf entering a matmul would poison every output)."""
    if jnp.dtype(dtype) == jnp.float16:
        x = jnp.clip(x, -65504.0, 65504.0)
    return x.astype(dtype)


def _linear(x, w, dtype, bias=None):
    """x @ w^T with x cast to the compute dtype, f32 out (the residual stream stays f32), by the backend
    that prepared w at load."""
    y = linear.matmul(_to(x, dtype), w, out_dtype=jnp.float32)
    return y if bias is None else y + bias


def _projections(config: ModelConfig, p: dict[str, Any], h, dtype):
    """q [B, T, N*H], k [B, T, K*H], v [B, T, K*Hv] from separate or fused ("wqkv") weights."""
    if "wqkv" in p:
        qkv = _linear(h, p["wqkv"], dtype, p.get("bqkv"))
        nq, nk = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        return qkv[..., :nq], qkv[..., nq : nq + nk], qkv[..., nq + nk :]
    return tuple(_linear(h, p[w], dtype, p.get(b)) for w, b in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")))


# Sequences up to which a decode step writes its keys and values with an update each (in place; XLA's scatter
# was slower at these batches), past which with one scatter (2 x 3000 updates a layer took a tiny model's
# decode program 170 s and 9.5 GB to compile).
_UNROLLED_WRITES = 32


def _block(config: ModelConfig, p: dict[str, Any], x, positions, cache: KVCache, layer, inv_freq, local, *,
           policy: Policy, kv_len: int, row=None, impl: str = "auto", tables=None, keep=None):
    """One decoder layer on the f32 residual x [B, T, D] at positions [B, T], dtypes from `policy`.
    Writes this step's keys/values into cache slot `layer` and attends over its first kv_len positions.
    `row`: x is the cache's rows [row, row + B) (a pipeline microbatch); None: x is the cache's first B rows
    (all of them, but for a server's decode step on a partly busy group).
    `tables`: `ops.rope_tables(positions, inv_freq)` when the caller has them. `keep`: None, or [B] indices
    into T: after the cache write only those positions go on (x [B, 1, D] out), as the last layer of a
    prefill that needs one position's logits may."""
    b, t, _ = x.shape
    eps, dtype = config.norm_eps, policy.compute
    norm = functools.partial(ops.rms_norm, eps=eps, dtype=policy.norm)
    h = norm(x, p["attn_norm"])
    q, k, v = _projections(config, p, h, dtype)
    q = q.reshape(b, t, config.n_heads, config.head_dim)
    k = k.reshape(b, t, config.n_kv_heads, config.head_dim)
    v = v.reshape(b, t, config.n_kv_heads, config.v_head_dim)
    if config.qk_norm:
        q, k = norm(q, p["q_norm"]), norm(k, p["k_norm"])
    tables = ops.rope_tables(positions, inv_freq) if tables is None else tables
    q = ops.rope(q, positions, inv_freq, neox=config.rope_neox, tables=tables)
    k = ops.rope(k, positions, inv_freq, neox=config.rope_neox, tables=tables)

    decoder = linear.decode_attention(impl) if row is None and keep is None else None
    attend = decoder and decoder(_to(q, dtype), cache.k, cache.v, policy.scores)
    if attend:
        # A decode step on a backend that attends over the stacked cache where it lies: this step's keys and
        # values go into the stack in place (one update per sequence; a vmapped update made XLA scatter),
        # with no copy of the layer's cache out of the stack and back.
        ck, cv = cache.k, cache.v
        if b <= _UNROLLED_WRITES:
            for i in range(b):
                start = (layer, i, positions[i, 0], 0, 0)
                ck = lax.dynamic_update_slice(ck, k[i][None, None].astype(ck.dtype), start)
                cv = lax.dynamic_update_slice(cv, v[i][None, None].astype(cv.dtype), start)
        else:  # one scatter: an update a sequence would grow the program, and its compile, with the batch
            at = (layer, jnp.arange(b)[:, None], positions[:, :1] + jnp.arange(t)[None, :])
            ck, cv = ck.at[at].set(k.astype(ck.dtype)), cv.at[at].set(v.astype(cv.dtype))
        cache = KVCache(ck, cv)
        attn = attend(_to(q, dtype), ck, cv, layer, positions, local, scale=config.scale,
                      window=config.sliding_window, kv_len=kv_len)
        return _block_rest(config, p, x, attn, dtype, norm), cache

    if row is None and cache.k.shape[1] != b:  # x is the cache's first B rows (a server's partly busy group)
        row = 0
    # Write this step's keys/values at each sequence's own offset, then attend over the cache.
    write = jax.vmap(lambda c, new, start: lax.dynamic_update_slice_in_dim(c, new, start, axis=0))
    if row is None:
        ck, cv = cache.k[layer], cache.v[layer]
    else:
        ck, cv = (lax.dynamic_slice_in_dim(c[layer], row, b, axis=0) for c in (cache.k, cache.v))
    ck = write(ck, k.astype(cache.k.dtype), positions[:, 0])
    cv = write(cv, v.astype(cache.v.dtype), positions[:, 0])
    if row is None:
        cache = KVCache(cache.k.at[layer].set(ck), cache.v.at[layer].set(cv))
    else:
        cache = KVCache(*(lax.dynamic_update_slice(c, new[None], (layer, row, 0, 0, 0))
                          for c, new in ((cache.k, ck), (cache.v, cv))))

    if keep is not None:
        pick = lambda a: jnp.take_along_axis(a, keep.reshape(b, 1, *[1] * (a.ndim - 2)), axis=1)  # noqa: E731
        q, x, positions, t = pick(q), pick(x), pick(positions), 1
    attn = ops.attention(_to(q, dtype), _to(ck[:, :kv_len], dtype), _to(cv[:, :kv_len], dtype), positions,
                         scale=config.scale, window=config.sliding_window, local=local, scores_dtype=policy.scores,
                         products=linear.products(impl))
    return _block_rest(config, p, x, attn, dtype, norm), cache


def _block_rest(config: ModelConfig, p: dict[str, Any], x, attn, dtype, norm):
    """The layer after attention: the output projection of attn [B, T, N, Hv] onto the residual x [B, T, D],
    then the FFN; the new x."""
    b, t = attn.shape[:2]
    o = _linear(attn.reshape(b, t, -1), p["wo"], dtype)
    if config.post_norms:
        o = norm(o, p["post_attn_norm"])
    x = x + o

    h = norm(x, p["ffn_norm"])
    if "w_gateup" in p:
        hidden = linear.glu(_to(h, dtype), p["w_gateup"], config.activation)
    else:
        gate, up = _linear(h, p["w_gate"], dtype), _linear(h, p["w_up"], dtype)
        hidden = linear.gated(gate, up, config.activation)
    down = _linear(hidden, p["w_down"], dtype)
    if config.post_norms:
        down = norm(down, p["post_ffn_norm"])
    return x + down


def scan_layers(config: ModelConfig, params: Any, x, positions, cache: KVCache, slots, layer_ids, *, policy: Policy,
                kv_len: int, row=None, skip=None, impl: str = "auto", rope=None):
    """Run one stack of layers (leaves stacked [n, ...]) over x with `lax.scan`.

    Args:
      slots: [n] the cache slot of each layer; layer_ids: [n] its index in the model (numpy or traced), which
        picks its RoPE frequencies and sliding-window flag.
      row: see `_block`.
      skip: [n] bool or None; a skipped layer leaves x and the cache as they were (a pipeline stage's empty
        slots).
      rope: None (each layer computes its rotary tables), or `rope_sets(config, positions)`.

    Returns:
      (x, cache).
    """
    inv_freq, local = _layer_constants(config)
    if isinstance(layer_ids, np.ndarray):
        freq, is_local = inv_freq[layer_ids], local[layer_ids]
    else:
        ids = jnp.maximum(layer_ids, 0)
        freq, is_local = jnp.asarray(inv_freq)[ids], jnp.asarray(local)[ids]

    which = np.zeros(len(slots), np.int32) if rope is None else rope[1][np.asarray(layer_ids)]
    if isinstance(params, Variants):  # each structure's stack read at the layer's slot (see `Variants`)
        parts = [linear.split_stacked(stack) for stack in params.stacks]
        scanned, index = jnp.asarray(params.which), jnp.asarray(params.slot)

        def layer_of(kind, at):  # structure `kind`'s layer `at` (its slot in that stack)
            stacked, in_place = parts[kind]
            return in_place(jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, at, keepdims=False), stacked), at)
    else:
        scanned, in_place = linear.split_stacked(params)
        index = jnp.arange(len(slots), dtype=jnp.int32)

    def body(carry, xs):
        layer_params, slot, f, loc, off, i, w = xs
        tables = None if rope is None else tuple(t[w] for t in rope[0])

        def block(layer_params, carry):
            h, c = carry
            return _block(config, layer_params, h, positions, c, slot, f, loc, policy=policy, kv_len=kv_len, row=row,
                          impl=impl, tables=tables)

        if isinstance(params, Variants):  # layer_params: the layer's structure; i: its slot in that stack
            branches = [functools.partial(lambda k, c: block(layer_of(k, i), c), k) for k in range(len(parts))]
            run = functools.partial(lax.switch, layer_params, branches)
        else:
            run = functools.partial(block, in_place(layer_params, i))
        return (run(carry) if skip is None else lax.cond(off, lambda c: c, run, carry)), None

    skips = jnp.zeros(len(slots), bool) if skip is None else skip  # unread when skip is None
    (x, cache), _ = lax.scan(body, (x, cache), (scanned, slots, freq, is_local, skips, index, which))
    return x, cache


def rope_sets(config: ModelConfig, positions):
    """The rotary tables of each distinct set of layer frequencies (gemma3: its local and global layers;
    llama: one), computed once per forward instead of once per layer (~1.2 ms of gemma3's prefill):
    ((cos [U, B, T, 1, R/2], sin [U, ...]), numpy [n_layers] the set of each layer)."""
    inv_freq, _ = _layer_constants(config)
    sets, which = np.unique(inv_freq, axis=0, return_inverse=True)
    tables = jax.vmap(lambda f: ops.rope_tables(positions, f))(jnp.asarray(sets))
    return tables, np.asarray(which, np.int32).reshape(-1)


def run_layers(config: ModelConfig, runs: list[LayerRun], x, positions, cache: KVCache, *, policy: Policy,
               kv_len: int, impl: str = "auto", last=None):
    """The layer stack on one device group: each `LayerRun` scanned in turn; layer i uses cache slot i.

    `last`: None (x out [B, T, D]), or [B] indices into T: x out is those positions' rows [B, D]. When the
    model's last layer is a run of its own (`stack_layers(last_apart=True)`), it computes keys and values
    for every position but the rest for those rows alone (llama.cpp's graph prunes the same way).
    """
    rope = rope_sets(config, positions)
    for i, run in enumerate(runs):
        ids = np.arange(run.first, run.first + run.count)
        if last is not None and i == len(runs) - 1 and run.count == 1:
            scanned, in_place = linear.split_stacked(run.params)
            params = in_place(jax.tree.map(lambda a: a[0], scanned), jnp.int32(0))
            inv_freq, local = _layer_constants(config)
            tables = tuple(t[rope[1][run.first]] for t in rope[0])
            # One position a row (a decode step) keeps it anyway: without `keep` the layer takes the in-place
            # decode attention over the stacked cache, as the scanned layers do, where `keep`'s path would
            # copy the layer's cache out of the stack and back (two copies of a cache's size a step).
            keep = last if x.shape[1] > 1 else None
            x, cache = _block(config, params, x, positions, cache, run.first, jnp.asarray(inv_freq[run.first]),
                              bool(local[run.first]), policy=policy, kv_len=kv_len, impl=impl, tables=tables, keep=keep)
            return x[:, 0], cache
        x, cache = scan_layers(config, run.params, x, positions, cache, jnp.asarray(ids), ids, policy=policy,
                               kv_len=kv_len, impl=impl, rope=rope)
    return (x if last is None else jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]), cache


def forward(config: ModelConfig, params: dict[str, Any], tokens, positions, cache: KVCache, *, policy: Policy,
            last: jax.Array | None = None, kv_len: int | None = None, layer_stack: Callable = run_layers,
            impl: str = "auto", logits: bool = True):
    """Run tokens [B, T] at positions [B, T] through the model, updating the cache.

    Args:
      params: the params pytree with "layers" replaced by `stack_layers(...)` runs.
      policy: the dtypes: `compute` for matmul and attention inputs, `norm` for RMSNorm statistics,
        `scores` for attention scores and softmax, `output` for the logits (the cache carries `kv`). The
        residual stream and matmul accumulators are f32 whatever it says (f16 would overflow gemma's
        residual; bf16 would blur it).
      last: [B] indices into T; when given, only those tokens' logits are computed.
      kv_len: attend over the cache's first kv_len positions (default: all). A prefill from position 0
        needs only T.
      layer_stack: runs params["layers"]: `layer_stack(config, params["layers"], x, positions, cache,
        policy=, kv_len=, impl=) -> (x, cache)`; `run_layers` by default, a pipeline's schedule over a mesh's
        stages.
      impl: the backend the weights were prepared for (`realm_jax.linear.resolve`): attention's prefill
        products run on it where it has them (`realm_jax.linear.products`). Each linear layer runs on the
        backend that prepared its weight.
      logits: False returns the final-normed rows instead, for `project` to turn into logits a few at a
        time (`Model.logits`: [T, V] logits of a long prompt need not exist at once).

    Returns:
      (logits float32 [B, T, V] or [B, V] with `last` (or the final-normed rows [B, T, D] / [B, D] without
      `logits`), the updated cache).
    """
    kv_len = cache.length if kv_len is None else kv_len
    x = ops.embed(tokens, params["embed"], dtype=jnp.float32)
    if config.embed_scale != 1.0:
        x = x * jnp.float32(config.embed_scale)
    if layer_stack is run_layers:  # it takes `last`: the last layer may run only those rows
        x, cache = run_layers(config, params["layers"], x, positions, cache, policy=policy, kv_len=kv_len, impl=impl,
                              last=last)
    else:
        x, cache = layer_stack(config, params["layers"], x, positions, cache, policy=policy, kv_len=kv_len, impl=impl)
        if last is not None:
            x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    x = ops.rms_norm(x, params["final_norm"], config.norm_eps, dtype=policy.norm)
    return (project(params, x, policy) if logits else x), cache


def project(params: dict[str, Any], x, policy: Policy):
    """The output projection of final-normed rows x [..., D]: logits [..., V] in `policy.output`."""
    return _linear(x, params["output"], policy.compute).astype(policy.output)
