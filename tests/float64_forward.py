"""An independent float64 numpy forward of the llama family, from dequantized weights: the exact reference
that realm-jax's forward is checked against (llama.cpp's own logits carry its 8-bit activation noise)."""

from __future__ import annotations

import numpy as np

import realm_jax
from realm_jax.models import config_from_gguf


def float64_forward(metadata: dict, tensors: dict, ids: list[int], source: str = "model") -> np.ndarray:
    """[T, V] logits of a llama/mistral/qwen2 model (q/k/v biases, NeoX or adjacent-pair RoPE, linear RoPE
    scaling and rope_freqs factors as the metadata says)."""
    c = config_from_gguf(metadata, tensors, source)
    w = {k: np.asarray(realm_jax.dequantize(v), np.float64) for k, v in tensors.items()}
    t, h, n, kv = len(ids), c.head_dim, c.n_heads, c.n_kv_heads

    def norm(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.norm_eps) * weight

    inv_freq = c.rope_base ** (-np.arange(0, c.rope_dims, 2) / c.rope_dims) * c.rope_scale
    if c.rope_freq_factors:
        inv_freq = inv_freq / np.asarray(c.rope_freq_factors)
    angles = np.arange(t)[:, None] * inv_freq
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]

    def rope(q):
        r = c.rope_dims
        out = q.copy()
        if c.rope_neox:
            a, b = q[..., : r // 2], q[..., r // 2 : r]
            out[..., : r // 2], out[..., r // 2 : r] = a * cos - b * sin, b * cos + a * sin
        else:
            a, b = q[..., 0:r:2], q[..., 1:r:2]
            out[..., 0:r:2], out[..., 1:r:2] = a * cos - b * sin, b * cos + a * sin
        return out

    causal = np.tril(np.ones((t, t), bool))
    x = w["token_embd.weight"][ids]
    for layer in range(c.n_layers):
        p = {k.split(".", 2)[2]: v for k, v in w.items() if k.startswith(f"blk.{layer}.")}

        def proj(y, name):
            out = y @ p[f"{name}.weight"].T
            return out + p[f"{name}.bias"] if f"{name}.bias" in p else out

        y = norm(x, p["attn_norm.weight"])
        q = rope(proj(y, "attn_q").reshape(t, n, h))
        k = rope(proj(y, "attn_k").reshape(t, kv, h))
        v = proj(y, "attn_v").reshape(t, kv, c.v_head_dim)
        out = np.empty((t, n, c.v_head_dim))
        for head in range(n):
            s = np.where(causal, q[:, head] @ k[:, head // (n // kv)].T * c.scale, -np.inf)
            s = np.exp(s - s.max(1, keepdims=True))
            out[:, head] = (s / s.sum(1, keepdims=True)) @ v[:, head // (n // kv)]
        x = x + out.reshape(t, -1) @ p["attn_output.weight"].T
        y = norm(x, p["ffn_norm.weight"])
        gate, up = y @ p["ffn_gate.weight"].T, y @ p["ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ p["ffn_down.weight"].T
    out_w = w["output.weight"] if "output.weight" in w else w["token_embd.weight"]
    return norm(x, w["output_norm.weight"]) @ out_w.T
