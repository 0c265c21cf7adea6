"""`ModelConfig`: everything the forward pass needs to know about an architecture, read from GGUF metadata.

Each architecture module (`llama`, `gemma3`) turns a file's metadata into a ModelConfig; the shared
forward pass (`transformer`) reads only the config, never the architecture name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from realm_jax.errors import MetadataError
from realm_jax.inputs import shown


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer's hyper-parameters.

    Shapes legend: V vocab, D model width, F ffn width, N query heads, K kv heads, H head dim.
    """

    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    v_head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_neox: bool  # rotate (i, i + R/2) pairs; else adjacent pairs
    rope_dims: int  # R: the rotated dims of each head
    rope_base: float
    rope_scale: float = 1.0  # linear scaling: positions are multiplied by this (1 / factor)
    rope_freq_factors: tuple[float, ...] = ()  # per-frequency divisors (Llama 3.1's rope_freqs.weight)
    activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    tied_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False  # gemma: norms after attention and after the FFN, before the residual adds
    embed_scale: float = 1.0  # multiplies the embeddings (gemma: sqrt(D))
    attn_scale: float = 0.0  # multiplies q.k; 0 means 1/sqrt(H)
    sliding_window: int = 0  # keys a local layer sees (0: no local layers)
    local_layers: tuple[bool, ...] = ()  # per layer: sliding-window attention
    rope_base_local: float = 0.0  # rope base of local layers (0: same as rope_base)

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise MetadataError(f"{self.arch}: n_heads={self.n_heads} must be a multiple of "
                                f"n_kv_heads={self.n_kv_heads}")
        if self.rope_dims % 2 or not 0 < self.rope_dims <= self.head_dim:
            raise MetadataError(f"{self.arch}: rope_dims={self.rope_dims} must be even and in (0, "
                                f"head_dim={self.head_dim}]")
        if self.local_layers and len(self.local_layers) != self.n_layers:
            raise MetadataError(f"{self.arch}: {len(self.local_layers)} local-layer flags for "
                                f"n_layers={self.n_layers}")

    @property
    def scale(self) -> float:
        return self.attn_scale or self.head_dim**-0.5

    def inv_freq(self, layer: int) -> np.ndarray:
        """RoPE inverse frequencies [R/2] of one layer, with linear scaling folded in."""
        local = bool(self.local_layers) and self.local_layers[layer]
        base = self.rope_base_local if local and self.rope_base_local else self.rope_base
        scale = 1.0 if local else self.rope_scale
        exponents = np.arange(0, self.rope_dims, 2, dtype=np.float64) / self.rope_dims
        inv_freq = scale * base**-exponents
        if self.rope_freq_factors and not local:
            inv_freq = inv_freq / np.asarray(self.rope_freq_factors, np.float64)
        return inv_freq.astype(np.float32)

    def is_local(self, layer: int) -> bool:
        return bool(self.local_layers) and self.local_layers[layer]


_F32_MIN, _F32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)  # normal float32


def get(metadata: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ..., *,
        source: str = "") -> Any:
    """metadata[key] checked to be of `kind`; MetadataError naming the file and key when missing or wrong."""
    if key not in metadata:
        if default is ...:
            raise MetadataError(f"{source}: metadata key {key!r} is missing")
        return default
    value = metadata[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MetadataError(f"{source}: metadata key {key!r} must be {getattr(kind, '__name__', kind)}, "
                            f"got {type(value).__name__} {shown(value)}")
    if kind is int and value <= 0 and not key.endswith("sliding_window"):
        raise MetadataError(f"{source}: metadata key {key!r} must be positive, got {value}")
    if kind is float and not (math.isfinite(value) and _F32_MIN <= value <= _F32_MAX):
        # eps, rope bases and scaling factors: a zero or negative one gives NaN logits, not an error, and one
        # float32 cannot hold (1e300, 1e-300) constant logits: the forward pass computes in float32
        raise MetadataError(f"{source}: metadata key {key!r} must be a positive number float32 can hold "
                            f"(~1.2e-38 to 3.4e38), got {value}")
    return value
