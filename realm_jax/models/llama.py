"""The llama family as GGUF names it: llama (SmolLM2, Llama 2/3, Mistral files), mistral, qwen2.

Pre-norm decoder: RMSNorm, GQA attention with RoPE, SwiGLU FFN; qwen2 adds q/k/v biases and rotates
NeoX-style; tied embeddings when the file has no output.weight. RoPE scaling: none or linear, plus the
per-frequency factors of Llama 3.1 files (rope_freqs.weight).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from realm_jax.errors import MetadataError, TensorShapeError, UnsupportedArchitectureError
from realm_jax.models.config import ModelConfig, get
from realm_jax.quant import dequantize

ARCHITECTURES = ("llama", "mistral", "qwen2")
ROPE_FREQS = "rope_freqs.weight"  # the tensor of Llama 3.1's RoPE factors, read by the config (not a param)


def rope_scale(metadata: dict[str, Any], arch: str, source: str) -> float:
    """The linear RoPE scale (1 / factor) of the file; an error for scaling types not implemented."""
    kind = get(metadata, f"{arch}.rope.scaling.type", str, "none", source=source)
    factor = get(metadata, f"{arch}.rope.scaling.factor", float, 1.0, source=source)
    if kind == "none" or (kind == "linear" and factor == 1.0):
        legacy = get(metadata, f"{arch}.rope.scale_linear", float, 1.0, source=source)
        return 1.0 / legacy
    if kind == "linear":
        return 1.0 / factor
    raise UnsupportedArchitectureError(f"{source}: rope scaling type {kind!r} is not supported (none, linear)")


def rope_factors(tensors: dict[str, Any], rope_dims: int, source: str) -> tuple[float, ...]:
    """Llama 3.1's per-frequency divisors (the tensor rope_freqs.weight; () without it), checked: one finite
    positive factor for each of the rope_dims / 2 frequencies."""
    qt = tensors.get(ROPE_FREQS)
    if qt is None:
        return ()
    if tuple(qt.shape) != (rope_dims // 2,):
        raise TensorShapeError(f"{source}: tensor {ROPE_FREQS!r} has shape {tuple(qt.shape)}, expected "
                               f"({rope_dims // 2},): a factor for each of the {rope_dims} rotary dims' frequencies")
    factors = np.asarray(dequantize(qt), np.float64).reshape(-1)
    bad = ~(np.isfinite(factors) & (factors > 0))
    if bad.any():
        i = int(np.argmax(bad))
        raise MetadataError(f"{source}: tensor {ROPE_FREQS!r}: factor {i} is {factors[i]}; RoPE frequency factors "
                            f"must be finite and positive")
    return tuple(map(float, factors))


def config_from_metadata(metadata: dict[str, Any], tensors: dict[str, Any], source: str) -> ModelConfig:
    """A ModelConfig from a llama-family file's metadata and tensors (name -> QTensor)."""
    arch = get(metadata, "general.architecture", str, source=source)
    d = get(metadata, f"{arch}.embedding_length", int, source=source)
    n_heads = get(metadata, f"{arch}.attention.head_count", int, source=source)
    head_dim = get(metadata, f"{arch}.attention.key_length", int, d // n_heads, source=source)
    vocab = tensors["token_embd.weight"].shape[0] if "token_embd.weight" in tensors else 0
    rope_dims = get(metadata, f"{arch}.rope.dimension_count", int, head_dim, source=source)
    return ModelConfig(
        arch=arch,
        n_layers=get(metadata, f"{arch}.block_count", int, source=source),
        d_model=d,
        n_heads=n_heads,
        n_kv_heads=get(metadata, f"{arch}.attention.head_count_kv", int, n_heads, source=source),
        head_dim=head_dim,
        v_head_dim=get(metadata, f"{arch}.attention.value_length", int, head_dim, source=source),
        ffn_dim=get(metadata, f"{arch}.feed_forward_length", int, source=source),
        vocab_size=get(metadata, f"{arch}.vocab_size", int, vocab or 1, source=source),
        context_length=get(metadata, f"{arch}.context_length", int, source=source),
        norm_eps=get(metadata, f"{arch}.attention.layer_norm_rms_epsilon", float, source=source),
        rope_neox=arch == "qwen2",
        rope_dims=rope_dims,
        rope_base=get(metadata, f"{arch}.rope.freq_base", float, 10000.0, source=source),
        rope_scale=rope_scale(metadata, arch, source),
        rope_freq_factors=rope_factors(tensors, rope_dims, source),
        activation="silu",
        tied_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
    )
