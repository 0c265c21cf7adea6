"""Pipeline parallelism: the layer stack split over the mesh's `stage` axis, microbatches moved with ppermute.

Legend: S stages, M microbatches, B batch rows (per data shard inside the schedule), T tokens, D width,
c slots of one layer run per stage, C slots of all runs per stage.

Partition: `create_model_shards` cuts the layers into S contiguous pieces, balanced by layer count or by
the bytes of each layer's params (quantized layers differ in size).

Layout: jit runs one program on every device (SPMD), so every stage must hold arrays of one shape. Each
run of stacked layers (`transformer.LayerRun`) becomes a `StageRun` of S * c slots, c being the most layers
of that run any stage holds: stage s's layers fill slots [s*c, s*c + n_s), zeros the rest. The slot axis
splits evenly over `stage`; a stage skips its empty slots (`lax.cond`: no compute). The KV cache has
S * C layer slots, stage s owning [s*C, (s+1)*C). With one run and S dividing the layers nothing is padded.

Schedule: GPipe fill/drain. The batch (and, in a prefill, the tokens: chunk j of a sequence attends to the
keys chunks <= j left in the cache, so chunks may follow each other through a stage) is cut into M
microbatches; at tick i stage s runs microbatch i - s, then `ppermute` hands its activations to stage s + 1.
M + S - 1 ticks; each stage is busy M of them: the bubble is (S - 1) / (M + S - 1). The embedding and final
norm run outside the schedule, replicated over `stage`, and the stages share the output projection's rows
(`rules.RULES["logits"]`); `data` is manual too (each
data shard pipelines its own rows) and `model` stays with XLA's partitioner (tensor parallelism inside
each stage).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from realm_jax.errors import MeshError, ShardingError
from realm_jax.models.config import ModelConfig
from realm_jax.models.transformer import KVCache, LayerRun, scan_layers
from realm_jax.precision import Policy

__all__ = ["ModelShards", "Pipeline", "Schedule", "StageRun", "bubble_fraction", "create_model_shards", "schedule",
           "stage_layers"]

BY = ("layers", "bytes")
# GPipe: M >= 4S microbatches keep the bubble (S-1)/(M+S-1) near 20% or less.
_MICROBATCHES_PER_STAGE = 4
# A microbatch holds at least this many tokens (rows of every matmul): thinner ones re-read the stage's
# weights for too little work (decode is memory-bound), so splitting them further costs more than it saves.
_MIN_ROWS = 16


# --- partition ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelShards:
    """A contiguous partition of the layer stack: stage s holds layers [bounds[s][0], bounds[s][1])."""

    bounds: tuple[tuple[int, int], ...]
    weights: tuple[int, ...]  # per stage: its layer count or its params' bytes, as `by` says
    by: str

    @property
    def n_stages(self) -> int:
        return len(self.bounds)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(stop - start for start, stop in self.bounds)

    @property
    def imbalance(self) -> float:
        """The heaviest stage over the mean stage (1.0: perfectly balanced)."""
        return max(self.weights) * self.n_stages / sum(self.weights)


def _leaf_bytes(tree) -> int:
    return sum(int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def _layer_weights(model, by: str) -> list[int]:
    """Per layer: 1 (by layers) or its params' bytes, from a config, a params pytree or a list of bytes."""
    if isinstance(model, ModelConfig):
        if by == "bytes":
            raise ShardingError("create_model_shards(by='bytes') needs the params (or per-layer byte counts), "
                                "not a ModelConfig")
        return [1] * model.n_layers
    if isinstance(model, dict):
        layers = model["layers"]
        if all(isinstance(run, LayerRun) for run in layers):
            sizes = [_leaf_bytes(run.params) // run.count for run in layers for _ in range(run.count)]
        else:
            sizes = [_leaf_bytes(layer) for layer in layers]
    elif isinstance(model, Sequence) and all(isinstance(n, (int, np.integer)) and n > 0 for n in model):
        sizes = [int(n) for n in model]
    else:
        raise ShardingError(f"create_model_shards: model must be a ModelConfig, a params dict or a list of "
                            f"per-layer byte counts, got {type(model).__name__}")
    return sizes if by == "bytes" else [1] * len(sizes)


def _partition(weights: list[int], n: int) -> list[int]:
    """Cut points of the contiguous split of `weights` into n non-empty parts with the smallest heaviest
    part (ties: the smallest sum of squares, the most even). Dynamic programming, O(n L^2)."""
    total = len(weights)
    prefix = np.concatenate([[0], np.cumsum(weights)]).tolist()
    inf = (float("inf"), float("inf"))
    best = [[inf] * (total + 1) for _ in range(n + 1)]
    cut = [[0] * (total + 1) for _ in range(n + 1)]
    best[0][0] = (0, 0)
    for k in range(1, n + 1):
        for i in range(k, total - (n - k) + 1):
            for j in range(k - 1, i):
                w = prefix[i] - prefix[j]
                cand = (max(best[k - 1][j][0], w), best[k - 1][j][1] + w * w)
                if cand < best[k][i]:
                    best[k][i], cut[k][i] = cand, j
    cuts, i = [total], total
    for k in range(n, 0, -1):
        i = cut[k][i]
        cuts.append(i)
    return cuts[::-1]


def create_model_shards(model, n_stages: int, *, by: str = "layers") -> ModelShards:
    """A balanced contiguous partition of the layer stack over `n_stages` pipeline stages.

    Args:
      model: a `ModelConfig` (by="layers" only), a params pytree (`params["layers"]`: per-layer dicts or
        stacked `LayerRun`s), or a list of per-layer byte counts.
      n_stages: the number of stages (the mesh's stage axis); every stage gets at least one layer.
      by: "layers" (layer counts differ by at most one) or "bytes" (the heaviest stage's params as light as
        a contiguous split allows).

    Returns:
      A `ModelShards`.
    """
    if by not in BY:
        raise ShardingError(f"create_model_shards: by={by!r} must be one of {BY}")
    if isinstance(n_stages, bool) or not isinstance(n_stages, (int, np.integer)) or n_stages < 1:
        raise ShardingError(f"create_model_shards: n_stages={n_stages!r} must be an int >= 1")
    weights = _layer_weights(model, by)
    if n_stages > len(weights):
        raise ShardingError(f"create_model_shards: {len(weights)} layers cannot be split over {n_stages} pipeline "
                            f"stages (each stage needs at least one layer)")
    cuts = _partition(weights, int(n_stages))
    bounds = tuple(zip(cuts[:-1], cuts[1:]))
    return ModelShards(bounds, tuple(sum(weights[a:b]) for a, b in bounds), by)


# --- layout ---------------------------------------------------------------------------------------
@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"], meta_fields=["layer_ids"])
@dataclasses.dataclass(frozen=True)
class StageRun:
    """One run of stacked layers laid out over the stages: leaves stacked [S * c, ...]; stage s's slot j
    holds layer layer_ids[s][j] of the model, or zeros where that is -1."""

    layer_ids: tuple[tuple[int, ...], ...]
    params: Any

    @property
    def slots(self) -> int:
        return len(self.layer_ids[0])

    @property
    def padded(self) -> bool:
        return any(i < 0 for ids in self.layer_ids for i in ids)

    @property
    def first(self) -> int:
        return min(i for ids in self.layer_ids for i in ids if i >= 0)


def stage_layers(runs: list[LayerRun], shards: ModelShards) -> list[StageRun]:
    """Lay the stacked layer runs out over the stages of `shards` (see the module docstring)."""
    n_layers = sum(run.count for run in runs)
    if shards.bounds[-1][1] != n_layers:
        raise ShardingError(f"stage_layers: the shards cover {shards.bounds[-1][1]} layers, the model has {n_layers}")
    out = []
    for run in runs:
        spans = []  # the run's layers [lo, hi) on each stage, lo == hi where it has none
        for a, b in shards.bounds:
            lo = max(a, run.first)
            spans.append((lo, max(lo, min(b, run.first + run.count))))
        c = max(hi - lo for lo, hi in spans)
        ids = tuple(tuple(range(lo, hi)) + (-1,) * (c - (hi - lo)) for lo, hi in spans)
        if c * len(spans) == run.count:  # every stage holds c of the run's layers: the stack is the layout
            out.append(StageRun(ids, run.params))
            continue

        def lay_out(leaf, spans=spans, c=c, first=run.first):
            parts = []
            for lo, hi in spans:
                part = leaf[lo - first : hi - first] if hi > lo else leaf[:0]
                parts.append(jnp.pad(part, [(0, c - (hi - lo))] + [(0, 0)] * (leaf.ndim - 1)))
            return jnp.concatenate(parts)

        out.append(StageRun(ids, jax.tree.map(lay_out, run.params)))
    return out


# --- schedule -------------------------------------------------------------------------------------
def bubble_fraction(n_stages: int, n_microbatches: int, stage_weights: Sequence[float] | None = None) -> float:
    """The idle fraction of the stages' time in a GPipe fill/drain schedule: (S-1)/(M+S-1). With
    `stage_weights` (each stage's work per microbatch) ticks last as long as the heaviest stage, and the
    lighter stages' waiting counts as idle too: 1 - M * sum(w) / ((M+S-1) * S * max(w))."""
    s, m = n_stages, n_microbatches
    if s < 1 or m < 1:
        raise ShardingError(f"bubble_fraction: n_stages={s} and n_microbatches={m} must be >= 1")
    if stage_weights is None:
        return (s - 1) / (m + s - 1)
    if len(stage_weights) != s:
        raise ShardingError(f"bubble_fraction: {len(stage_weights)} stage weights for {s} stages")
    return 1.0 - m * sum(stage_weights) / ((m + s - 1) * s * max(stage_weights))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A GPipe schedule: the batch cut into batch_splits row groups and the tokens into token_splits chunks."""

    stages: int
    batch_splits: int
    token_splits: int

    @property
    def microbatches(self) -> int:
        return self.batch_splits * self.token_splits

    @property
    def ticks(self) -> int:
        return self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        return bubble_fraction(self.stages, self.microbatches)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def schedule(n_stages: int, batch: int, tokens: int) -> Schedule:
    """The microbatching of `batch` rows of `tokens` tokens over `n_stages` stages: as many microbatches as
    divide evenly, up to 4 per stage, each of at least 16 tokens (decode of a small batch: one microbatch,
    a sequential pass through the stages); batch splits before token chunks (each chunk attends anew)."""
    target = _MICROBATCHES_PER_STAGE * n_stages if n_stages > 1 else 1
    best = max((bs * ts, bs, ts) for bs in _divisors(batch) for ts in _divisors(tokens)
               if bs * ts <= target and (bs * ts == 1 or batch * tokens // (bs * ts) >= _MIN_ROWS))
    return Schedule(n_stages, best[1], best[2])


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """The pipeline over a mesh's `stage` axis; `run_layers` is `transformer.forward`'s `layer_stack`."""

    mesh: Mesh

    def __post_init__(self):
        if "stage" not in self.mesh.axis_names:
            raise MeshError(f"a pipeline needs a 'stage' axis; the mesh has {dict(self.mesh.shape)}")

    @property
    def n_stages(self) -> int:
        return int(self.mesh.shape["stage"])

    @property
    def data(self) -> int:
        return int(dict(self.mesh.shape).get("data", 1))

    def schedule(self, batch: int, tokens: int) -> Schedule:
        """The schedule of a forward pass over `batch` rows (all data shards) of `tokens` tokens."""
        if batch % self.data:
            raise ShardingError(f"a batch of {batch} rows cannot be split over data={self.data}")
        return schedule(self.n_stages, batch // self.data, tokens)

    def cache_layers(self, runs: list[StageRun]) -> int:
        """The KV cache's layer slots: S * C."""
        return self.n_stages * sum(run.slots for run in runs)

    def run_layers(self, config: ModelConfig, runs: list[StageRun], x, positions, cache: KVCache, *,
                   policy: Policy, kv_len: int, impl: str = "auto"):
        """x [B, T, D] at positions [B, T] through the stages; the cache's layer axis split over `stage`.
        Returns (x [B, T, D] as the last stage leaves it, the cache)."""
        b, t, d = x.shape
        n, sched = self.n_stages, self.schedule(b, t)
        batch_axis = "data" if "data" in self.mesh.axis_names else None
        manual = frozenset(a for a in ("stage", "data") if a in self.mesh.axis_names)
        forward_perm = [(j, j + 1) for j in range(n - 1)]

        def body(runs, x, positions, cache):
            s = lax.axis_index("stage")
            mb, tc = x.shape[0] // sched.batch_splits, t // sched.token_splits
            whole_batch = sched.batch_splits == 1

            def work(h, cache, pos, row):
                offset = 0
                for run in runs:
                    ids = jnp.asarray(np.asarray(run.layer_ids, np.int32))[s]
                    h, cache = scan_layers(config, run.params, h, pos, cache, offset + jnp.arange(run.slots), ids,
                                           policy=policy, kv_len=kv_len, row=None if whole_batch else row,
                                           skip=(ids < 0) if run.padded else None, impl=impl)
                    offset += run.slots
                return h, cache

            def tick(i, carry):
                h, cache, out = carry
                m = i - s
                active = (m >= 0) & (m < sched.microbatches)
                m = jnp.clip(m, 0, sched.microbatches - 1)
                r0, t0 = (m // sched.token_splits) * mb, (m % sched.token_splits) * tc
                pos = lax.dynamic_slice(positions, (r0, t0), (mb, tc))
                h = jnp.where(s == 0, lax.dynamic_slice(x, (r0, t0, 0), (mb, tc, d)), h)
                h, cache = lax.cond(active, lambda hc: work(*hc, pos, r0), lambda hc: hc, (h, cache))
                mine = lax.dynamic_slice(out, (r0, t0, 0), (mb, tc, d))
                out = lax.dynamic_update_slice(out, jnp.where(active & (s == n - 1), h, mine), (r0, t0, 0))
                return lax.ppermute(h, "stage", forward_perm), cache, out

            carry = (jnp.zeros((mb, tc, d), x.dtype), cache, jnp.zeros_like(x))
            _, cache, out = lax.fori_loop(0, sched.ticks, tick, carry)
            return out[None], cache

        staged = jax.shard_map(body, mesh=self.mesh, axis_names=manual, check_vma=False,
                               in_specs=(PartitionSpec("stage"), PartitionSpec(batch_axis), PartitionSpec(batch_axis),
                                         PartitionSpec("stage", batch_axis)),
                               out_specs=(PartitionSpec("stage", batch_axis), PartitionSpec("stage", batch_axis)))
        out, cache = staged(runs, x, positions, cache)
        return out[n - 1], cache
