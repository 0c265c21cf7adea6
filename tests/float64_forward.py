"""An independent float64 numpy forward of the llama family, from dequantized weights: the exact reference
that realm-jax's forward is checked against (llama.cpp's own logits carry its 8-bit activation noise)."""

from __future__ import annotations

import numpy as np

import realm_jax
from realm_jax.models import config_from_gguf


def float64_forward(metadata: dict, tensors: dict, ids: list[int], source: str = "model") -> np.ndarray:
    """[T, V] logits of a llama/mistral/qwen2 model (q/k/v biases, NeoX or adjacent-pair RoPE, linear RoPE
    scaling and rope_freqs factors as the metadata says) or a gemma3 model (embedding scale, q/k norms,
    post norms, GeGLU, sliding-window local layers with their own rope base)."""
    c = config_from_gguf(metadata, tensors, source)
    w = {k: np.asarray(realm_jax.dequantize(v), np.float64) for k, v in tensors.items()}
    t, h, n, kv = len(ids), c.head_dim, c.n_heads, c.n_kv_heads

    def norm(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.norm_eps) * weight

    def rope(q, local):
        base, scale = (c.rope_base_local, 1.0) if local and c.rope_base_local else (c.rope_base, c.rope_scale)
        inv_freq = base ** (-np.arange(0, c.rope_dims, 2) / c.rope_dims) * scale
        if c.rope_freq_factors and not local:
            inv_freq = inv_freq / np.asarray(c.rope_freq_factors)
        angles = np.arange(t)[:, None] * inv_freq
        cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
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
    query, key = np.arange(t)[:, None], np.arange(t)[None, :]
    x = w["token_embd.weight"][ids] * c.embed_scale
    for layer in range(c.n_layers):
        p = {k.split(".", 2)[2]: v for k, v in w.items() if k.startswith(f"blk.{layer}.")}
        local = c.is_local(layer)
        mask = causal & (query - key < c.sliding_window) if local else causal

        def proj(y, name):
            out = y @ p[f"{name}.weight"].T
            return out + p[f"{name}.bias"] if f"{name}.bias" in p else out

        y = norm(x, p["attn_norm.weight"])
        q, k = proj(y, "attn_q").reshape(t, n, h), proj(y, "attn_k").reshape(t, kv, h)
        if c.qk_norm:
            q, k = norm(q, p["attn_q_norm.weight"]), norm(k, p["attn_k_norm.weight"])
        q, k = rope(q, local), rope(k, local)
        v = proj(y, "attn_v").reshape(t, kv, c.v_head_dim)
        out = np.empty((t, n, c.v_head_dim))
        for head in range(n):
            s = np.where(mask, q[:, head] @ k[:, head // (n // kv)].T * c.scale, -np.inf)
            s = np.exp(s - s.max(1, keepdims=True))
            out[:, head] = (s / s.sum(1, keepdims=True)) @ v[:, head // (n // kv)]
        o = out.reshape(t, -1) @ p["attn_output.weight"].T
        x = x + (norm(o, p["post_attention_norm.weight"]) if c.post_norms else o)
        y = norm(x, p["ffn_norm.weight"])
        gate, up = y @ p["ffn_gate.weight"].T, y @ p["ffn_up.weight"].T
        if c.activation == "silu":
            act = gate / (1 + np.exp(-gate))
        else:  # tanh GELU
            act = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
        down = (act * up) @ p["ffn_down.weight"].T
        x = x + (norm(down, p["post_ffw_norm.weight"]) if c.post_norms else down)
    out_w = w["output.weight"] if "output.weight" in w else w["token_embd.weight"]
    return norm(x, w["output_norm.weight"]) @ out_w.T
