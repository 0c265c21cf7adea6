"""The sharding rules: one table from the params' logical axes to mesh axes, and the placement of the params
and the KV cache on a mesh.

Tensor parallelism is Megatron's: q/k/v and gate/up are column-parallel (their rows, the output features,
split over `model`), the attention output and down projections row-parallel (their columns split), so each
block half ends in one all-reduce, which XLA's partitioner inserts. Quantized planes split on whole blocks.
KV heads that do not divide over `model` are replicated, as other runtimes do; query heads or FFN columns
that do not divide are an error.

Pipeline parallelism splits the stacked layer axis of the params and of the KV cache over `stage` (the
layers laid out per stage by `pipeline.stage_layers`), and the output projection's rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from realm_jax import linear
from realm_jax.distributed.pipeline import StageRun
from realm_jax.errors import ShardingError
from realm_jax.models.config import ModelConfig
from realm_jax.models.transformer import KVCache
from realm_jax.quant import QTensor

# logical axis -> mesh axis (None: replicated). "layers" is the stacked axis of the layer runs and of the cache;
# "logits" the output projection's rows: the pipeline's stages share the head (instead of each holding all of
# it and computing the same logits).
RULES: dict[str, str | None] = {"heads": "model", "kv_heads": "model", "mlp": "model", "embed": None,
                                "vocab": None, "head_dim": None, "batch": "data", "seq": None, "layers": "stage",
                                "logits": "stage"}

# param -> logical axes of its logical shape (rows, cols) or (n,)
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "wq": ("heads", "embed"), "wk": ("kv_heads", "embed"), "wv": ("kv_heads", "embed"),
    "wo": ("embed", "heads"), "w_gate": ("mlp", "embed"), "w_up": ("mlp", "embed"), "w_down": ("embed", "mlp"),
    "bq": ("heads",), "bk": ("kv_heads",), "bv": ("kv_heads",),
    "attn_norm": ("embed",), "ffn_norm": ("embed",), "post_attn_norm": ("embed",), "post_ffn_norm": ("embed",),
    "q_norm": ("head_dim",), "k_norm": ("head_dim",),
    "embed": ("vocab", "embed"), "output": ("logits", "embed"), "final_norm": ("embed",),
}  # fmt: skip
CACHE_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")  # [L, B, S, K, H]


def check_model_axis(n_heads: int, ffn_dim: int, tp: int, name: str, mesh: dict[str, int]) -> None:
    """ShardingError unless a model axis of `tp` devices splits the query heads and the FFN width (also the
    launch supervisor's check, from the file's header, before any worker starts)."""
    if n_heads % tp:
        raise ShardingError(f"{name}: {n_heads} query heads cannot be split over a model axis of {tp} devices "
                            f"(mesh {mesh})")
    if ffn_dim % tp:
        raise ShardingError(f"{name}: ffn width {ffn_dim} cannot be split over a model axis of {tp} devices")


def _rules(config: ModelConfig, mesh: Mesh, name: str) -> dict[str, str | None]:
    tp = int(mesh.shape.get("model", 1))
    check_model_axis(config.n_heads, config.ffn_dim, tp, name, dict(mesh.shape))
    rules = dict(RULES)
    if config.n_kv_heads % tp:
        rules["kv_heads"] = None  # fewer KV heads than shards: every shard keeps all of them
    for logical, axis in (("batch", "data"), ("layers", "stage"), ("logits", "stage")):
        if int(mesh.shape.get(axis, 1)) == 1:
            rules[logical] = None
    if config.vocab_size % int(mesh.shape.get("stage", 1)):
        rules["logits"] = None  # the stages cannot share the head evenly: each keeps all of it
    return rules


def _spec(axes: tuple[str | None, ...], rules: dict[str, str | None], stacked: bool) -> PartitionSpec:
    return PartitionSpec(*(rules.get(a) if a else None for a in ((("layers",) if stacked else ()) + axes)))


def _place(value: Any, spec: PartitionSpec, mesh: Mesh, what: str):
    """Put an array, a QTensor (its planes split on whole blocks) or a prepared linear weight (as its
    backend lays it out) on the mesh with `spec` over its logical axes."""
    if isinstance(value, (QTensor, linear.Prepared)):
        return linear.place(value, spec, mesh, what)
    return jax.device_put(value, NamedSharding(mesh, spec))


def shard_params(params: dict[str, Any], config: ModelConfig, mesh: Mesh, name: str = "model") -> dict[str, Any]:
    """Place the params (as `runtime.build_params` makes them, unfused) on the mesh by the rules. With a
    stage axis > 1 the layer runs must be laid out over the stages first (`pipeline.stage_layers`)."""
    rules = _rules(config, mesh, name)
    out = {key: _place(value, _spec(PARAM_AXES[key], rules, False), mesh, f"{name}: {key}")
           for key, value in params.items() if key != "layers"}
    out["layers"] = []
    stages = int(mesh.shape.get("stage", 1))
    for run in params["layers"]:
        if stages > 1 and not (isinstance(run, StageRun) and len(run.layer_ids) == stages):
            raise ShardingError(f"{name}: the layers (run from layer {run.first}) are not laid out over stage={stages} "
                                f"pipeline stages: use realm_jax.distributed.pipeline.stage_layers first")
        placed = {key: _place(value, _spec(PARAM_AXES[key], rules, True), mesh, f"{name}: layers {run.first}+ {key}")
                  for key, value in run.params.items()}
        out["layers"].append(dataclasses.replace(run, params=placed))
    return out


def cache_sharding(config: ModelConfig, mesh: Mesh) -> KVCache:
    """NamedShardings for the KVCache's leaves: KV heads over `model` when they divide, batch over `data`,
    layer slots over `stage`."""
    spec = _spec(CACHE_AXES, _rules(config, mesh, config.arch), False)
    return KVCache(NamedSharding(mesh, spec), NamedSharding(mesh, spec))


__all__ = ["CACHE_AXES", "PARAM_AXES", "RULES", "cache_sharding", "shard_params"]
