"""llama.cpp's recorded logits, and the metrics that compare a runtime's logits with them.

``scripts/record_llama_logits.py`` records, per model and prompt, llama.cpp's top-K logits of a batched
teacher-forced evaluation, the full-vocabulary log-sum-exp, and a greedy continuation with llama.cpp's top-1
margins (``tests/data/llama_ref/``). This module reads them and compares; it does not need llama.cpp.

llama.cpp's logits are noisy (it quantizes activations inside its matmuls: its own batched and
token-by-token evaluations flip the argmax where the top-1 margin is small), so the comparisons are
statistical: top-1 agreement, with and without the positions where llama.cpp's margin is small, top-10
overlap, and KL(p_llama || p_ours). The KL coarse-grains both distributions to llama.cpp's top K tokens plus
one bin for the rest of the vocabulary (p_j = exp(l_j - lse), q_j = softmax(ours)_j for the K ids):

    KL = sum_j p_j (log p_j - log q_j) + (1 - sum_j p_j) (log(1 - sum_j p_j) - log(1 - sum_j q_j))

which is a lower bound of the full-vocabulary KL (log-sum inequality), tight when the rest holds little
mass (the manifest gives its largest value per prompt).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

__all__ = [
    "CONFIDENT_MARGIN",
    "PromptReference",
    "compare_logits",
    "greedy_agreement",
    "load_manifest",
    "load_reference",
    "reference_dir",
]

# llama.cpp's top-1 is trusted where its top-1 minus top-2 logit is at least this.
CONFIDENT_MARGIN = 0.5
OVERLAP_K = 10
_REST_EPS = 1e-9

_REFERENCE_DIR = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "llama_ref"


@dataclasses.dataclass(frozen=True)
class PromptReference:
    """llama.cpp's record of one prompt on one model (T positions, K top logits, S greedy steps).

    Attributes:
      text: the prompt.
      ids: int32 [T], llama.cpp's tokenization (BOS as the file asks).
      topk_ids: int32 [T, K], the K most likely next tokens at each position, most likely first.
      topk_logits: float32 [T, K], their logits (batched evaluation of the whole prompt).
      lse: float64 [T], log-sum-exp of each position's logits over the full vocabulary.
      greedy: int32 [S], llama.cpp's greedy continuation of the prompt.
      greedy_margin: float32 [S], llama.cpp's top-1 minus top-2 logit at each greedy step.
      token_by_token: the same prompt evaluated one token at a time (``greedy`` empty), recorded for the
        shortest prompts only, else None: llama.cpp's own noise.
    """

    text: str
    ids: np.ndarray
    topk_ids: np.ndarray
    topk_logits: np.ndarray
    lse: np.ndarray
    greedy: np.ndarray
    greedy_margin: np.ndarray
    token_by_token: PromptReference | None = None

    @property
    def margin(self) -> np.ndarray:
        """float32 [T]: llama.cpp's top-1 minus top-2 logit at each position."""
        return self.topk_logits[:, 0] - self.topk_logits[:, 1]


def reference_dir() -> pathlib.Path:
    """The folder of the recorded data, ``tests/data/llama_ref`` in the source tree."""
    return _REFERENCE_DIR


def load_manifest(data_dir: str | pathlib.Path | None = None) -> dict:
    """The recording's manifest: prompts, llama.cpp build, settings, and per-model figures."""
    path = pathlib.Path(data_dir or _REFERENCE_DIR) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"llama.cpp reference data not found at {path}: it lives in the source tree's "
            "tests/data/llama_ref (run scripts/record_llama_logits.py to make it)"
        )
    return json.loads(path.read_text())


def load_reference(model: str, data_dir: str | pathlib.Path | None = None) -> list[PromptReference]:
    """llama.cpp's recorded logits for `model` (a name in the manifest), one entry per prompt.

    Raises:
      FileNotFoundError: the data folder or the model's file is absent.
      KeyError: the manifest has no such model.
    """
    data_dir = pathlib.Path(data_dir or _REFERENCE_DIR)
    manifest = load_manifest(data_dir)
    if model not in manifest["models"]:
        raise KeyError(f"no llama.cpp reference for {model=}; recorded: {sorted(manifest['models'])}")
    path = data_dir / f"{model}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing although the manifest lists {model=}")
    prompts = []
    with np.load(path, allow_pickle=False) as z:
        for i, text in enumerate(manifest["prompts"]):
            p = f"p{i}_"
            if str(z[p + "text"]) != text:
                raise ValueError(f"{path}: prompt {i} differs from the manifest's; re-record the data")
            tbt = None
            if p + "tbt_topk_ids" in z:
                tbt = PromptReference(
                    text, z[p + "ids"], z[p + "tbt_topk_ids"], z[p + "tbt_topk_logits"], z[p + "tbt_lse"],
                    np.zeros(0, np.int32), np.zeros(0, np.float32),
                )  # fmt: skip
            prompts.append(
                PromptReference(
                    text, z[p + "ids"], z[p + "topk_ids"], z[p + "topk_logits"], z[p + "lse"],
                    z[p + "greedy"], z[p + "greedy_margin"], tbt,
                )  # fmt: skip
            )
    return prompts


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):  # an empty (all -inf) sum is log(0) = -inf
        return (m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))).squeeze(axis)


def compare_logits(ours: np.ndarray, ref: PromptReference) -> dict:
    """Compares a runtime's teacher-forced logits for ``ref.ids`` with llama.cpp's.

    Args:
      ours: [T, V] logits for the T positions of ``ref.ids`` (any float dtype; the KL is computed in
        float64).
      ref: llama.cpp's record of the prompt.

    Returns:
      A dict: ``top1_agreement`` (fraction of positions whose argmax equals llama.cpp's),
      ``top1_agreement_confident`` over the ``n_confident`` positions where llama.cpp's margin is at least
      `CONFIDENT_MARGIN` (NaN if there are none), ``topk_overlap`` (mean |our top-10 ∩ llama's top-10|
      / 10),
      ``kl_mean`` and ``kl_max`` of KL(p_llama || p_ours) as in the module docstring,
      ``max_margin_of_disagreement`` (llama.cpp's largest margin where the argmaxes differ, 0 if none),
      ``disagreements`` (the positions where they differ) and ``n_positions``.
    """
    ours = np.asarray(ours)
    t, k = ref.topk_ids.shape
    if ours.ndim != 2 or ours.shape[0] != t:
        raise ValueError(f"ours must be [T, V] with T={t} positions, got shape {ours.shape}")
    if ours.shape[1] < max(k, OVERLAP_K) or ours.shape[1] <= ref.topk_ids.max():
        raise ValueError(f"ours has {ours.shape[1]} logits per position, fewer than llama.cpp's vocabulary")

    agree = ours.argmax(axis=1) == ref.topk_ids[:, 0]
    margin = ref.margin.astype(np.float64)
    confident = margin >= CONFIDENT_MARGIN
    our_top = np.argpartition(-ours, OVERLAP_K - 1, axis=1)[:, :OVERLAP_K]
    overlap = [len(np.intersect1d(a, b)) / OVERLAP_K for a, b in zip(our_top, ref.topk_ids[:, :OVERLAP_K])]

    # KL over llama's top K plus one rest bin, in float64 one row at a time (a [T, V] float64 copy of a
    # 262k vocabulary is ~2 MB per position). Our rest is summed directly: 1 - sum(q) would lose digits.
    log_p = ref.topk_logits.astype(np.float64) - ref.lse[:, None]
    p_rest = np.clip(1.0 - np.exp(log_p).sum(axis=1), 0.0, 1.0)
    kl = np.empty(t)
    for i in range(t):
        row = ours[i].astype(np.float64)
        log_z = _logsumexp(row)
        log_q = row[ref.topk_ids[i]] - log_z
        row[ref.topk_ids[i]] = -np.inf
        log_q_rest = _logsumexp(row) - log_z
        kl[i] = np.sum(np.exp(log_p[i]) * (log_p[i] - log_q))
        if p_rest[i] > _REST_EPS:  # below it, 1 - sum(p) is rounding error, not mass
            kl[i] += p_rest[i] * (np.log(p_rest[i]) - log_q_rest)

    return {
        "n_positions": t,
        "top1_agreement": float(agree.mean()),
        "top1_agreement_confident": float(agree[confident].mean()) if confident.any() else float("nan"),
        "n_confident": int(confident.sum()),
        "topk_overlap": float(np.mean(overlap)),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "max_margin_of_disagreement": float(margin[~agree].max()) if (~agree).any() else 0.0,
        "disagreements": np.flatnonzero(~agree).tolist(),
    }


def greedy_agreement(our_tokens, ref: PromptReference) -> dict:
    """Compares a runtime's greedy continuation of ``ref.ids`` with llama.cpp's.

    After the first step where llama.cpp's margin is below `CONFIDENT_MARGIN`, its own noise may pick
    either token, and the two continuations may part for good without either being wrong.

    Returns:
      A dict: ``first_divergence`` (first step where the tokens differ, None if none over the compared
      steps), ``first_uncertain`` (llama.cpp's first step with a margin below `CONFIDENT_MARGIN`, None if
      none), ``n_compared`` (steps in both), and ``matches_until_uncertain``: whether ours has every step
      before ``first_uncertain`` (all of llama.cpp's steps if none) and they all match.
    """
    ours = np.asarray(our_tokens, dtype=np.int64).reshape(-1)
    theirs = ref.greedy.astype(np.int64)
    n = min(len(ours), len(theirs))
    differ = np.flatnonzero(ours[:n] != theirs[:n])
    uncertain = np.flatnonzero(ref.greedy_margin < CONFIDENT_MARGIN)
    first_divergence = int(differ[0]) if len(differ) else None
    first_uncertain = int(uncertain[0]) if len(uncertain) else None
    must_match = len(theirs) if first_uncertain is None else first_uncertain
    matches = n >= must_match and (first_divergence is None or first_divergence >= must_match)
    return {
        "first_divergence": first_divergence,
        "first_uncertain": first_uncertain,
        "n_compared": n,
        "matches_until_uncertain": matches,
    }
