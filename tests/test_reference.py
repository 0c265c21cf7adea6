"""The llama.cpp reference data and the metrics that compare against it (no llama.cpp needed)."""

from __future__ import annotations

import numpy as np
import pytest

from realm_jax import reference
from realm_jax.reference import PromptReference, compare_logits, greedy_agreement

MODELS = [
    "gemma3-270m-q4_k_m",
    "smollm2-135m-instruct-q4_1",
    "llama-k-q4_k_m",
    "llama-k-q5_k_m",
    "llama-k-q6_k",
    "llama-k-q8_0",
]
K = 64


def make_reference(logits: np.ndarray, greedy=(), greedy_margin=()) -> PromptReference:
    """A reference recorded from dense [T, V] logits, as scripts/record_llama_logits.py does."""
    x = logits.astype(np.float64)
    order = np.lexsort((np.broadcast_to(np.arange(x.shape[1]), x.shape), -x), axis=1)[:, :K]
    m = x.max(1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(1, keepdims=True)))[:, 0]
    return PromptReference(
        text="",
        ids=np.zeros(x.shape[0], np.int32),
        topk_ids=order.astype(np.int32),
        topk_logits=np.take_along_axis(logits, order, 1).astype(np.float32),
        lse=lse,
        greedy=np.asarray(greedy, np.int32),
        greedy_margin=np.asarray(greedy_margin, np.float32),
    )


def dense_from_topk(ref: PromptReference, vocab: int, keep: np.ndarray) -> np.ndarray:
    """[T, V] logits with the recorded top K, the `keep` [T, n] ids outside it at the K-th logit (an upper
    bound of theirs), and the rest spread evenly so that the log-sum-exp matches."""
    t = len(ref.ids)
    rows = np.arange(t)[:, None]
    dense = np.zeros((t, vocab), np.float64)
    dense[rows, keep] = ref.topk_logits[:, -1:]
    dense[rows, ref.topk_ids] = ref.topk_logits
    known = np.zeros((t, vocab), bool)
    known[rows, keep] = known[rows, ref.topk_ids] = True
    known_mass = np.where(known, np.exp(dense - ref.lse[:, None]), 0).sum(1)
    rest = np.log(np.maximum(1.0 - known_mass, 1e-300) / (vocab - known.sum(1))) + ref.lse
    return np.where(known, dense, rest[:, None]).astype(np.float32)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def dense_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(1)


@pytest.fixture
def logits(rng):
    return (rng.standard_normal((40, 300)) * 3).astype(np.float32)


def test_identical_logits(logits):
    ref = make_reference(logits)
    got = compare_logits(logits, ref)
    assert got["top1_agreement"] == 1.0 and got["top1_agreement_confident"] == 1.0
    assert got["topk_overlap"] == 1.0
    assert got["max_margin_of_disagreement"] == 0.0 and got["disagreements"] == []
    assert got["kl_max"] < 1e-6 and got["kl_mean"] >= -1e-9
    assert got["n_confident"] == int((ref.margin >= reference.CONFIDENT_MARGIN).sum())


def test_shifted_logits_are_the_same_distribution(logits):
    got = compare_logits(logits + 7.5, make_reference(logits))
    assert got["top1_agreement"] == 1.0 and got["kl_max"] < 1e-6


def test_swapped_top1_at_known_positions(logits):
    ref = make_reference(logits)
    ours = logits.copy()
    swapped = [3, 17, 29]
    for t in swapped:  # exchange llama's top-1 and top-2 logits: the argmax moves, the top-10 set stays
        a, b = ref.topk_ids[t, :2]
        ours[t, [a, b]] = ours[t, [b, a]]
    got = compare_logits(ours, ref)
    assert got["disagreements"] == swapped
    assert got["top1_agreement"] == pytest.approx(1 - len(swapped) / len(logits))
    assert got["topk_overlap"] == 1.0
    assert got["max_margin_of_disagreement"] == pytest.approx(float(ref.margin[swapped].max()))
    confident = ref.margin >= reference.CONFIDENT_MARGIN
    n_bad = int(confident[swapped].sum())
    assert got["top1_agreement_confident"] == pytest.approx(1 - n_bad / confident.sum())
    assert got["kl_mean"] > 0


def test_permuted_vocabulary_has_no_overlap(logits):
    ours = np.roll(logits, 150, axis=1)  # every token's logit moves to a token 150 ids away
    got = compare_logits(ours, make_reference(logits))
    assert got["top1_agreement"] == 0.0
    assert got["topk_overlap"] < 0.1
    assert got["kl_mean"] > 1.0


def test_kl_equals_dense_kl_when_the_vocabulary_fits_in_top_k(rng):
    llama = (rng.standard_normal((12, K)) * 2).astype(np.float32)
    ours = llama + (rng.standard_normal(llama.shape) * 0.3).astype(np.float32)
    got = compare_logits(ours, make_reference(llama))
    expected = dense_kl(llama, ours)
    assert got["kl_mean"] == pytest.approx(expected.mean(), rel=1e-9)
    assert got["kl_max"] == pytest.approx(expected.max(), rel=1e-9)


def test_kl_is_a_lower_bound_of_dense_kl(rng):
    llama = (rng.standard_normal((12, 2000)) * 2).astype(np.float32)
    ours = llama + (rng.standard_normal(llama.shape) * 0.5).astype(np.float32)
    got = compare_logits(ours, make_reference(llama))
    expected = dense_kl(llama, ours)
    assert 0 < got["kl_max"] <= expected.max() + 1e-12
    assert got["kl_mean"] <= expected.mean() + 1e-12


def test_compare_logits_rejects_wrong_shapes(logits):
    ref = make_reference(logits)
    with pytest.raises(ValueError, match="positions"):
        compare_logits(logits[:-1], ref)
    with pytest.raises(ValueError, match="vocabulary"):
        compare_logits(logits[:, :50], ref)


def test_greedy_agreement():
    no_logits = np.zeros((1, K), np.float32)
    ref = make_reference(no_logits, greedy=[5, 6, 7, 8, 9], greedy_margin=[2, 2, 0.1, 2, 2])
    same = greedy_agreement([5, 6, 7, 8, 9], ref)
    assert same == {
        "first_divergence": None, "first_uncertain": 2, "n_compared": 5, "matches_until_uncertain": True,
    }  # fmt: skip
    after = greedy_agreement([5, 6, 1, 1, 1], ref)  # parts where llama.cpp itself was unsure
    assert after["first_divergence"] == 2 and after["matches_until_uncertain"]
    before = greedy_agreement([5, 1, 7, 8, 9], ref)
    assert before["first_divergence"] == 1 and not before["matches_until_uncertain"]
    short = greedy_agreement([5], ref)
    assert short["n_compared"] == 1 and not short["matches_until_uncertain"]
    sure = make_reference(no_logits, greedy=[1, 2, 3], greedy_margin=[1, 1, 1])
    assert greedy_agreement([1, 2, 3], sure)["matches_until_uncertain"]
    assert not greedy_agreement([1, 2, 4], sure)["matches_until_uncertain"]


@pytest.mark.parametrize("model", MODELS)
def test_recorded_data_is_consistent(model):
    manifest = reference.load_manifest()
    prompts = reference.load_reference(model)
    assert [p.text for p in prompts] == manifest["prompts"]
    steps = manifest["settings"]["greedy_steps"]
    for p, info in zip(prompts, manifest["models"][model]["prompts"]):
        t = len(p.ids)
        assert p.ids.dtype == np.int32 and p.topk_ids.dtype == np.int32
        assert p.topk_logits.dtype == np.float32 and p.lse.dtype == np.float64
        assert t == info["n_tokens"] and p.lse.shape == (t,)
        assert p.topk_ids.shape == p.topk_logits.shape == (t, K)
        assert p.greedy.shape == p.greedy_margin.shape == (steps,)
        assert np.all(np.diff(p.topk_logits, axis=1) <= 0)  # largest first
        assert np.all(p.margin >= 0) and np.all(p.greedy_margin >= 0)
        assert np.all(p.lse >= p.topk_logits[:, 0])  # the full vocabulary holds at least the top-1
        top_mass = np.exp(p.topk_logits.astype(np.float64) - p.lse[:, None]).sum(1)
        assert np.all(top_mass <= 1 + 1e-5)


@pytest.mark.parametrize("model", MODELS)
def test_llama_token_by_token_against_its_batched_logits(model):
    """The manifest's figures for llama.cpp's own noise, recomputed from the recorded top-K alone."""
    manifest = reference.load_manifest()
    n_vocab = manifest["models"][model]["n_vocab"]
    infos = manifest["models"][model]["prompts"]
    prompts = reference.load_reference(model)
    with_tbt = [(p, info) for p, info in zip(prompts, infos) if p.token_by_token is not None]
    assert len(with_tbt) == 2
    for p, info in with_tbt:
        noise = info["batched_vs_token_by_token"]
        got = compare_logits(dense_from_topk(p.token_by_token, n_vocab, keep=p.topk_ids), p)
        assert got["top1_agreement"] == noise["top1_agreement"]
        flip_margin = noise["max_margin_of_disagreement"]  # rounded to 6 digits in the manifest
        assert got["max_margin_of_disagreement"] == pytest.approx(flip_margin, rel=1e-5)
        # Exact but for the batched top-K tokens outside the token-by-token top K (set to an upper bound).
        assert got["kl_mean"] == pytest.approx(noise["kl_top64_mean"], rel=0.05, abs=1e-9)
        assert got["kl_mean"] <= noise["kl_mean"] * 1.05 + 1e-9  # the top-K KL bounds the dense KL from below


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="record_llama_logits"):
        reference.load_reference("llama-k-q8_0", data_dir=tmp_path)
    with pytest.raises(KeyError, match="recorded"):
        reference.load_reference("no-such-model")
