"""realm-jax against llama.cpp's recorded logits (tests/data/llama_ref, made by scripts/record_llama_logits.py)
on both real models and the four synthetic k-quant models, and against an independent float64 numpy
forward of the synthetic model.

llama.cpp rounds activations to 8 bits inside its matmuls, so its logits carry noise of up to ~1 logit; the
agreement is measured where its own top-1 margin is at least 0.5 (CONFIDENT_MARGIN), and over all positions.
"""

from __future__ import annotations

import numpy as np
import pytest

import realm_jax
from realm_jax import assets
from realm_jax.models import config_from_gguf
from realm_jax.reference import CONFIDENT_MARGIN, compare_logits, greedy_agreement, load_reference, reference_dir

SYNTHETIC = ["llama-k-q4_k_m", "llama-k-q5_k_m", "llama-k-q6_k", "llama-k-q8_0"]
MODELS = ["gemma3-270m-q4_k_m", "smollm2-135m-instruct-q4_1", *SYNTHETIC]


def model_file(name: str):
    if name in SYNTHETIC:
        return reference_dir().parent / "synthetic" / f"{name}.gguf"
    return assets.model_path(name)


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    return request.param, realm_jax.load(model_file(request.param), policy="f32", progress=False)


def test_teacher_forced_logits_agree_with_llama_cpp(loaded):
    name, model = loaded
    agree, confident, kl = [], [], []
    for ref in load_reference(name):
        ours = model.logits(ref.ids)
        stats = compare_logits(ours, ref)
        hit = ours.argmax(axis=1) == ref.topk_ids[:, 0]
        agree.append(hit)
        confident.append(hit[ref.margin >= CONFIDENT_MARGIN])
        kl.append(stats["kl_mean"] * stats["n_positions"])
        assert stats["topk_overlap"] >= 0.8, (name, ref.text[:30], stats["topk_overlap"])
    agree, confident = np.concatenate(agree), np.concatenate(confident)
    assert len(confident) >= 300
    assert confident.mean() >= 0.99, f"{name}: top-1 at confident positions {confident.mean():.4f}"
    assert agree.mean() >= 0.95, f"{name}: top-1 over all positions {agree.mean():.4f}"
    assert sum(kl) / len(agree) <= 0.01, f"{name}: mean KL {sum(kl) / len(agree):.5f}"


# (model, prompt index): llama.cpp's greedy continuation takes a step with margin >= 0.5 where the exact
# model (float64 numpy, test below) is undecided; ours follows the exact model there. Measured: step 2 of
# prompt 2 of llama-k-q6_k, llama.cpp margin 0.694 for token 909; float64: token 508 ahead by 0.017.
LLAMA_CPP_NOISE = {("llama-k-q6_k", 2): 2}


def test_greedy_continuations_match_until_llama_cpp_is_unsure(loaded):
    name, model = loaded
    for i, ref in enumerate(load_reference(name)):
        ours = model.generate_ids([list(ref.ids)], max_new_tokens=len(ref.greedy), stop_ids=())[0]
        result = greedy_agreement(ours, ref)
        if (name, i) in LLAMA_CPP_NOISE:
            assert result["first_divergence"] == LLAMA_CPP_NOISE[name, i]
            continue
        assert result["matches_until_uncertain"], (name, i, result)


def float64_llama_forward(path, ids: list[int]) -> np.ndarray:
    """An independent llama forward in float64 numpy from the dequantized weights: [T, V] logits."""
    metadata, tensors = realm_jax.read_gguf(path)
    c = config_from_gguf(metadata, tensors, str(path))
    w = {k: np.asarray(realm_jax.dequantize(v), np.float64) for k, v in tensors.items()}
    t, h, n, kv = len(ids), c.head_dim, c.n_heads, c.n_kv_heads

    def norm(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.norm_eps) * weight

    angles = np.arange(t)[:, None] * c.rope_base ** (-np.arange(0, h, 2) / h)

    def rope(q):  # llama.cpp's "normal" RoPE: adjacent pairs
        a, b = q[..., 0::2], q[..., 1::2]
        cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
        out = np.empty_like(q)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
        return out

    causal = np.tril(np.ones((t, t), bool))
    x = w["token_embd.weight"][ids]
    for layer in range(c.n_layers):
        p = {k.split(".", 2)[2]: v for k, v in w.items() if k.startswith(f"blk.{layer}.")}
        y = norm(x, p["attn_norm.weight"])
        q = rope((y @ p["attn_q.weight"].T).reshape(t, n, h))
        k = rope((y @ p["attn_k.weight"].T).reshape(t, kv, h))
        v = (y @ p["attn_v.weight"].T).reshape(t, kv, h)
        out = np.empty((t, n, h))
        for head in range(n):
            s = np.where(causal, q[:, head] @ k[:, head // (n // kv)].T / np.sqrt(h), -np.inf)
            s = np.exp(s - s.max(1, keepdims=True))
            out[:, head] = (s / s.sum(1, keepdims=True)) @ v[:, head // (n // kv)]
        x = x + out.reshape(t, -1) @ p["attn_output.weight"].T
        y = norm(x, p["ffn_norm.weight"])
        gate, up = y @ p["ffn_gate.weight"].T, y @ p["ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ p["ffn_down.weight"].T
    return norm(x, w["output_norm.weight"]) @ w["output.weight"].T


@pytest.mark.parametrize("name", ["llama-k-q4_k_m", "llama-k-q6_k"])
def test_synthetic_model_matches_a_float64_reference(name):
    ref = load_reference(name)[2]
    ids = list(ref.ids) + ref.greedy[:3].tolist()
    model = realm_jax.load(model_file(name), policy="f32", progress=False)
    ours = model.logits(ids)
    exact = float64_llama_forward(model_file(name), ids)
    scale = np.abs(exact).max()
    assert np.abs(ours - exact).max() <= 1e-5 * scale * np.sqrt(model.config.d_model)
