"""Gemma 3 as llama.cpp runs it (llm_build_gemma3_iswa).

Differences from llama: embeddings scaled by sqrt(D); RMSNorm on q and k per head; norms after attention
and after the FFN, before each residual add; GeGLU (tanh GELU); NeoX RoPE; every 6th layer global with the
file's rope base, the other five local: sliding-window attention with rope base 10000; tied embeddings.
GGUF norm weights already hold gemma's (1 + w).
"""

from __future__ import annotations

from typing import Any

from realm_jax.models.config import ModelConfig, get
from realm_jax.models.llama import rope_scale

ARCHITECTURES = ("gemma3",)
_SWA_PATTERN = 6  # llama.cpp: layer i is local unless i % 6 == 5
_ROPE_BASE_LOCAL = 10000.0  # llama.cpp's rope_freq_base_train_swa for gemma3


def config_from_metadata(metadata: dict[str, Any], tensors: dict[str, Any], source: str) -> ModelConfig:
    a = "gemma3"
    d = get(metadata, f"{a}.embedding_length", int, source=source)
    n_heads = get(metadata, f"{a}.attention.head_count", int, source=source)
    n_layers = get(metadata, f"{a}.block_count", int, source=source)
    head_dim = get(metadata, f"{a}.attention.key_length", int, d // n_heads, source=source)
    window = get(metadata, f"{a}.attention.sliding_window", int, 0, source=source)
    # llama.cpp scales q by 1/sqrt(D/N) for the 62-layer 27B model and by 1/sqrt(H) otherwise.
    scale = (d / n_heads) ** -0.5 if n_layers == 62 else head_dim**-0.5
    return ModelConfig(
        arch=a,
        n_layers=n_layers,
        d_model=d,
        n_heads=n_heads,
        n_kv_heads=get(metadata, f"{a}.attention.head_count_kv", int, n_heads, source=source),
        head_dim=head_dim,
        v_head_dim=get(metadata, f"{a}.attention.value_length", int, head_dim, source=source),
        ffn_dim=get(metadata, f"{a}.feed_forward_length", int, source=source),
        vocab_size=tensors["token_embd.weight"].shape[0] if "token_embd.weight" in tensors else 1,
        context_length=get(metadata, f"{a}.context_length", int, source=source),
        norm_eps=get(metadata, f"{a}.attention.layer_norm_rms_epsilon", float, source=source),
        rope_neox=True,
        rope_dims=head_dim,
        rope_base=get(metadata, f"{a}.rope.freq_base", float, 1e6, source=source),
        rope_scale=rope_scale(metadata, a, source),
        activation="gelu_tanh",
        tied_embeddings="output.weight" not in tensors,
        qk_norm=True,
        post_norms=True,
        embed_scale=float(d) ** 0.5,
        attn_scale=scale,
        sliding_window=window,
        local_layers=tuple(window > 0 and i % _SWA_PATTERN != _SWA_PATTERN - 1 for i in range(n_layers)),
        rope_base_local=_ROPE_BASE_LOCAL,
    )
