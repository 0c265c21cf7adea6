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
from float64_forward import float64_forward
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


@pytest.mark.parametrize("name", ["llama-k-q4_k_m", "llama-k-q6_k"])
def test_synthetic_model_matches_a_float64_reference(name):
    ref = load_reference(name)[2]
    ids = list(ref.ids) + ref.greedy[:3].tolist()
    model = realm_jax.load(model_file(name), policy="f32", progress=False)
    ours = model.logits(ids)
    exact = float64_forward(*realm_jax.read_gguf(model_file(name)), ids)
    scale = np.abs(exact).max()
    assert np.abs(ours - exact).max() <= 1e-5 * scale * np.sqrt(model.config.d_model)
