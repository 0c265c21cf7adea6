"""Architectures: GGUF metadata and tensors -> (`ModelConfig`, params pytree), and the shared forward pass.

Params (shapes in numpy order; V vocab, D width, F ffn, N heads, K kv heads, H head dim):

    embed        QTensor (V, D)          token_embd.weight, as stored (rows are gathered, then dequantized)
    output       (V, D)                  output.weight, or token_embd.weight when the embeddings are tied
    final_norm   f32 [D]                 output_norm.weight
    layers       list of dicts, one per layer:
      attn_norm [D]; wq (N*H, D), wk (K*H, D), wv (K*Hv, D), wo (D, N*Hv); bq/bk/bv (qwen2);
      q_norm/k_norm [H] (gemma3); post_attn_norm/post_ffn_norm [D] (gemma3);
      ffn_norm [D]; w_gate (F, D), w_up (F, D), w_down (D, F)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from realm_jax import linear
from realm_jax.errors import MetadataError, MissingTensorError, TensorShapeError, UnsupportedArchitectureError
from realm_jax.inputs import shown
from realm_jax.models import gemma3, llama
from realm_jax.models.config import ModelConfig
from realm_jax.quant import QTensor, dequantize

__all__ = ["ARCHITECTURES", "CONFIG_TENSORS", "ModelConfig", "config_from_gguf", "fuse_projections",
           "params_from_tensors", "tensor_roles"]

_MODULES = {arch: module for module in (llama, gemma3) for arch in module.ARCHITECTURES}
ARCHITECTURES = tuple(_MODULES)

# param name -> GGUF tensor name suffix (per layer: "blk.{i}." + suffix)
_LAYER_TENSORS = {
    "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight",
    "wo": "attn_output.weight", "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias",
    "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
    "post_attn_norm": "post_attention_norm.weight", "ffn_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
    "post_ffn_norm": "post_ffw_norm.weight",
}  # fmt: skip


CONFIG_TENSORS = (llama.ROPE_FREQS,)  # tensors whose values the config reads (RoPE factors): not params


def config_from_gguf(metadata: dict[str, Any], tensors: dict[str, QTensor], source: str) -> ModelConfig:
    """The ModelConfig of a file; UnsupportedArchitectureError names the architecture if unknown."""
    arch = metadata.get("general.architecture")
    if arch not in _MODULES:
        raise UnsupportedArchitectureError(
            f"{source}: architecture {shown(arch)} is not supported; supported: {', '.join(ARCHITECTURES)}")
    layers = metadata.get(f"{arch}.block_count")
    if isinstance(layers, int) and layers > len(tensors):  # before anything loops over the layers
        raise MetadataError(f"{source}: metadata key '{arch}.block_count' is {layers}, more layers than the "
                            f"file has tensors ({len(tensors)})")
    try:
        return _MODULES[arch].config_from_metadata(metadata, tensors, source)
    except MetadataError as e:
        if str(e).startswith(f"{source}:"):
            raise
        raise MetadataError(f"{source}: {e}") from None


def _expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    n, k, h, hv, d, f = c.n_heads, c.n_kv_heads, c.head_dim, c.v_head_dim, c.d_model, c.ffn_dim
    shapes = {"attn_norm": (d,), "wq": (n * h, d), "wk": (k * h, d), "wv": (k * hv, d), "wo": (d, n * hv),
              "ffn_norm": (d,), "w_gate": (f, d), "w_up": (f, d), "w_down": (d, f)}
    if c.qkv_bias:
        shapes |= {"bq": (n * h,), "bk": (k * h,), "bv": (k * hv,)}
    if c.qk_norm:
        shapes |= {"q_norm": (h,), "k_norm": (h,)}
    if c.post_norms:
        shapes |= {"post_attn_norm": (d,), "post_ffn_norm": (d,)}
    return shapes


def tensor_roles(config: ModelConfig) -> dict[str, str]:
    """What the forward pass does with each tensor of a file of `config`: "linear" (a weight it multiplies
    by), "output" (the output projection: a prefill multiplies only its last positions by it; the
    embedding table when the embeddings are tied), "embed" (rows gathered) or "vector" (norms, biases)."""
    roles = {"token_embd.weight": "embed", "output_norm.weight": "vector",
             "token_embd.weight" if config.tied_embeddings else "output.weight": "output"}
    for i in range(config.n_layers):
        for key, shape in _expected_shapes(config).items():
            roles[f"blk.{i}.{_LAYER_TENSORS[key]}"] = "vector" if len(shape) == 1 else "linear"
    return roles


def params_from_tensors(config: ModelConfig, tensors: dict[str, QTensor], source: str,
                        linear: Callable[[QTensor, str], Any] = lambda qt, name: qt,
                        output: Callable[[QTensor, str], Any] | None = None) -> dict[str, Any]:
    """The params pytree of `config` from a file's tensors, every shape checked.

    Args:
      linear: applied to each matrix the forward pass multiplies by, with its tensor name (e.g. to
        prepare it for a linear-layer backend); the embedding table stays as stored, norm and bias vectors
        become f32 arrays. Traceable: under `jax.eval_shape` it gives the params' shapes and dtypes
        without computing them.
      output: the same for the output projection (default: `linear`).
    """

    used = set(CONFIG_TENSORS)

    def take(name: str, shape: tuple[int, ...], convert: Callable[[QTensor, str], Any] = linear):
        used.add(name)
        if name not in tensors:
            raise MissingTensorError(f"{source}: tensor {name!r} is missing (architecture {config.arch})")
        qt = tensors[name]
        if qt.shape != shape:
            raise TensorShapeError(f"{source}: tensor {name!r} has shape {qt.shape}, expected {shape} "
                                   f"for {config.arch} with this metadata")
        return dequantize(qt) if len(shape) == 1 else convert(qt, name)

    v, d = config.vocab_size, config.d_model
    params: dict[str, Any] = {"embed": take("token_embd.weight", (v, d), convert=lambda qt, name: qt),
                              "final_norm": take("output_norm.weight", (d,)),
                              "output": take("token_embd.weight" if config.tied_embeddings else "output.weight",
                                             (v, d), convert=output or linear)}
    shapes = _expected_shapes(config)
    params["layers"] = [{key: take(f"blk.{i}.{_LAYER_TENSORS[key]}", shape) for key, shape in shapes.items()}
                        for i in range(config.n_layers)]
    unused = sorted(set(tensors) - used)
    if unused:  # llama.cpp refuses such files too: the metadata and the tensors disagree
        raise MetadataError(f"{source}: {len(unused)} tensors are not part of {config.arch} with "
                            f"block_count={config.n_layers}: {unused[:5]}")
    return params


def fuse_projections(layer: dict[str, Any]) -> dict[str, Any]:
    """Merge wq|wk|wv into "wqkv" and w_gate|w_up into "w_gateup" where their backends can fuse them (the
    same backend and format): one matmul instead of three (two) reads the same bytes with fewer dispatches
    and better tiles."""
    layer = dict(layer)
    groups = (("wqkv", ("wq", "wk", "wv"), ("bq", "bk", "bv")), ("w_gateup", ("w_gate", "w_up"), ()))
    for fused, names, biases in groups:
        weight = linear.concat([layer[n] for n in names])
        if weight is not None:
            for n in names:
                del layer[n]
            layer[fused] = weight
            if biases and all(b in layer for b in biases):
                layer["b" + fused[1:]] = jnp.concatenate([layer.pop(b) for b in biases])
    return layer
