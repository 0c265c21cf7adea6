"""A model decoding one token at a time against llama.cpp's recorded logits, as the GPU backends' tests check
their decode kernels (one row of x for every linear layer)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.reference import CONFIDENT_MARGIN, compare_logits, load_reference


def decode_step(model):
    """One decode step of `model` (one token over the KV cache), jitted once per model: every prompt of a
    model reuses the compiled step (the cache's length is a multiple of 256, so the shapes repeat)."""
    from realm_jax.models.transformer import forward

    if "_decode_step" not in model.__dict__:
        model._decode_step = jax.jit(
            lambda params, tok, pos, cache: forward(model.config, params, tok, pos, cache, policy=model.policy,
                                                    last=jnp.zeros((1,), jnp.int32), impl=model.impl),
            donate_argnums=(3,))
    return model._decode_step


def decode_logits(model, ids: list[int]) -> np.ndarray:
    """Teacher-forced logits of every position of `ids` computed the way decoding computes them: one token
    at a time over the KV cache."""
    step = decode_step(model)
    cache = model._new_cache(1, -(-(len(ids) + 1) // 256) * 256)
    if model.mesh is None:  # committed, as the step returns it: else its second call compiles it again
        cache = jax.device_put(cache, jax.devices()[0])
    rows = []
    for p, tok in enumerate(ids):
        logits, cache = step(model.params, jnp.array([[tok]], jnp.int32), jnp.array([[p]], jnp.int32), cache)
        rows.append(np.asarray(logits[0], np.float32))
    return np.stack(rows)


def assert_decode_agrees(model, name: str, positions: int | None = None) -> None:
    """`model` decoding the prompts of llama.cpp's record `name` (their first `positions` positions in all,
    None: every one; a prompt cut short is teacher-forced too) agrees with llama.cpp as the model tests ask
    (tests/test_llama_reference.py): top-1 at >= 99% of its confident positions and >= 95% of all, mean KL
    <= 0.01."""
    hits, confident, kl, seen = [], [], [], 0
    for ref in load_reference(name):
        if positions is not None and seen >= positions:
            break
        if positions is not None and seen + len(ref.ids) > positions:
            n = positions - seen
            ref = dataclasses.replace(ref, ids=ref.ids[:n], topk_ids=ref.topk_ids[:n], topk_logits=ref.topk_logits[:n],
                                      lse=ref.lse[:n], token_by_token=None)
        ours = decode_logits(model, list(ref.ids))
        stats = compare_logits(ours, ref)
        hit = ours.argmax(axis=1) == ref.topk_ids[:, 0]
        hits.append(hit)
        confident.append(hit[ref.margin >= CONFIDENT_MARGIN])
        kl.append(stats["kl_mean"] * stats["n_positions"])
        seen += len(hit)
    hits, confident = np.concatenate(hits), np.concatenate(confident)
    assert confident.mean() >= 0.99, f"{name}: top-1 at confident positions {confident.mean():.4f}"
    assert hits.mean() >= 0.95, f"{name}: top-1 over all positions {hits.mean():.4f}"
    assert sum(kl) / len(hits) <= 0.01, f"{name}: mean KL {sum(kl) / len(hits):.5f}"
