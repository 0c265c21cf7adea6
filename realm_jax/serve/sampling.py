"""Per-row sampling for the server's batch: every row has its own temperature, top_k, top_p, seed and logit
bias.

`realm_jax.sampling.sample` takes one setting for the whole batch (its static part shapes the computation);
a server's rows belong to different requests. Here the settings are [B] arrays and each row's draw reads
only its own row, so a request's tokens do not depend on who else shares the step.

The order is llama.cpp's, as `sample`'s: top-k, then top-p on the probabilities of the logits, then the
temperature, then the draw. A request's logits processing comes first: llama.cpp's repetition penalty
over its recent tokens (`recent`, `penalty`), then its logit bias and presence and frequency penalties, as
sparse per-row additions (`bias_ids`, `bias_values`). Greedy picks, top-k, top-p and the
log-probabilities all see the processed logits.

The draw is an inverse-CDF draw from one uniform per row and step (keyed by the request's seed and its own
token index), over the kept candidates in descending order: it reads only those candidates, so it gives
the same token whether the candidates came from the first `CANDIDATES` of a `lax.top_k`, from the first
`WIDE` or from a full sort. A row whose kept set does not fit in `CANDIDATES` (no top_k, or one past them,
and a top_p needing more) is drawn again from the first `WIDE` (~1-2 ms a row of gemma3's 262k on a 2-core
CPU), then from the first 16 x `WIDE` (~9 ms a row), and only where those do not hold it either from the
vocabulary sorted (~45 ms for one row, ~230 for eight at once: four and ten decode steps). A row that
keeps every token (no top_k, top_p 1: OpenAI's defaults) needs no order: its draw goes over the vocabulary
in id order (`realm_jax.sampling.draw_in_id_order`).

Legend: B rows, V vocab, C candidates.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from realm_jax.ops import row_sum
from realm_jax.sampling import (CANDIDATES, WIDE, candidate_tiers, draw_in_id_order, first_argmax, penalize,
                                pick_candidate, uniforms)

__all__ = ["CANDIDATES", "TOP_LOGPROBS", "WIDE", "sample_rows"]

TOP_LOGPROBS = 20  # the most top log-probabilities a request may ask for (OpenAI's chat limit; completions': 5)


def sample_rows(logits, temperature, top_k, top_p, seeds, counts, bias_ids=None, bias_values=None, recent=None,
                penalty=None, *, sampled: bool, top_n: int, wide: int = WIDE):
    """One token per row of logits [B, V] f32, each row by its own settings.

    Args:
      temperature: [B] f32, 0 for greedy (the first maximum, as `generate`).
      top_k: [B] int32, 0 disables it; top_p: [B] f32, 1 disables it.
      seeds: [B] uint32; counts: [B] int32, the index of the token being drawn in its request: the
        uniform of a draw is fold_in(PRNGKey(seed), count), the same whichever step and row it runs on.
      bias_ids, bias_values: None, or [B, L] int32 token ids and f32 values added to the row's logits at
        them (repeated ids add up; padding: any id with 0).
      recent, penalty: None, or [B, R] int32 each row's last tokens (-1: none) and [B] f32 its repetition
        penalty (1: off; `realm_jax.sampling.penalize`).
      sampled: whether any row has temperature > 0 (static: an all-greedy step skips the draw).
      top_n: 0, or the number of top log-probabilities to return per row.
      wide: the candidates of the second try, for the rows whose kept set the first `CANDIDATES` do not hold
        (the third: 16 x wide).

    Returns:
      (tokens [B] int32, finite [B] bool: the row's processed logits hold no NaN or infinity, and with top_n: the
      chosen tokens' log-probabilities [B], the top_n log-probabilities [B, top_n] and their ids).

    Programs compiled apart: `_sample` for every step, and `_sample_wider` for the rows whose kept set
    `_sample` found past its `CANDIDATES` (from the top `wide`, then 16 x `wide`, then the vocabulary sorted),
    only then: the full sort's [B, V] scans took 48 MB of temporaries, which XLA:CPU allocates at every run
    of a program that holds them, run or not (~5 ms a step). Whether a step needs the next is read on the
    host between them.
    """
    args = (logits, temperature, top_k, top_p, seeds, counts, bias_ids, bias_values, recent, penalty)
    tokens, finite, wider, *logprobs = _sample(*args, sampled=sampled, top_n=top_n)
    for k in candidate_tiers(logits.shape[-1], wide)[1:] if sampled else ():
        n = int(np.count_nonzero(np.asarray(wider)))  # read on the host between the programs
        if not n:
            break
        # one row at a time where at most half the rows need it (a row's sort of 262k: ~45 ms; 8 rows': ~230)
        tokens, wider, *logprobs = _sample_wider(*args, tokens, wider, k=k, each=2 * n <= len(wider), top_n=top_n)
    return (tokens, finite, *logprobs)


def _processed(logits, bias_ids, bias_values, recent, penalty):
    """The logits after the request's processing: the repetition penalty, then the bias."""
    if recent is not None:
        logits = penalize(logits, recent, penalty[:, None])
    if bias_ids is not None:
        logits = logits.at[jnp.arange(logits.shape[0])[:, None], bias_ids].add(bias_values)
    return logits


def _uniforms(seeds, counts):
    """[B] the uniform of each row's draw: of the key fold_in(PRNGKey(seed), count)."""
    return uniforms(jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seeds, counts))


def _logprobs(logits, tokens, top_n: int):
    """The chosen tokens' log-probabilities [B], and the top_n log-probabilities [B, top_n] and their ids."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    logp = logits - (top + jnp.log(row_sum(jnp.exp(logits - top))))
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    top_values, top_ids = lax.top_k(logp, top_n)
    return chosen, top_values, top_ids


@functools.partial(jax.jit, static_argnames=("sampled", "top_n"))
def _sample(logits, temperature, top_k, top_p, seeds, counts, bias_ids, bias_values, recent, penalty, *,
            sampled: bool, top_n: int):
    """`sample_rows` from the top CANDIDATES: (tokens, finite, [B] the rows whose kept set goes past them,
    *log-probabilities)."""
    logits = _processed(logits, bias_ids, bias_values, recent, penalty)
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    tokens = first_argmax(logits)
    wider = jnp.zeros(tokens.shape, bool)
    if sampled:
        m = jnp.max(logits, axis=-1)
        u = _uniforms(seeds, counts)
        greedy = temperature <= 0
        everything = (top_k == 0) & (top_p >= 1.0)  # keeps every token: drawn in id order, no sort

        def cut():  # the rows that keep some tokens: from the top CANDIDATES
            # The barrier keeps XLA's TopK: slices of its outputs (the scan's) would otherwise merge into those
            # of a sort, and the fast path become a full sort of the vocabulary.
            values, ids = lax.optimization_barrier(lax.top_k(logits, min(CANDIDATES, logits.shape[-1])))
            return pick_candidate(logits, values, ids, m, temperature, top_k, top_p, u)

        drawn, ends = lax.cond(jnp.all(everything | greedy), lambda: (tokens, jnp.ones(tokens.shape, bool)), cut)
        drawn = lax.cond(jnp.any(everything & ~greedy),
                         lambda: jnp.where(everything, draw_in_id_order(logits, m, temperature, u), drawn),
                         lambda: drawn)
        tokens = jnp.where(greedy, tokens, drawn)
        wider = ~(ends | greedy | everything)
    if not top_n:
        return tokens, finite, wider
    return tokens, finite, wider, *_logprobs(logits, tokens, top_n)


@functools.partial(jax.jit, static_argnames=("k", "each", "top_n"))
def _sample_wider(logits, temperature, top_k, top_p, seeds, counts, bias_ids, bias_values, recent, penalty,
                  tokens, rows, *, k: int, each: bool, top_n: int):
    """The tokens of `_sample` with those of `rows` drawn from the top k candidates (k = V: the vocabulary
    sorted): the same draw as from fewer (so the rows whose kept set ended in fewer would get their tokens
    again); (tokens, the rows whose kept set goes past these k too, *log-probabilities). each: one row at a
    time, only the rows asked for (else every row at once)."""
    logits = _processed(logits, bias_ids, bias_values, recent, penalty)
    m = jnp.max(logits, axis=-1)
    full = k == logits.shape[-1]

    def draw(x, *settings):
        top = lax.top_k(x, k)
        drawn, ends = pick_candidate(x, *(top if full else lax.optimization_barrier(top)), *settings)
        return drawn, ~ends & (not full)

    settings = (m, temperature, top_k, top_p, _uniforms(seeds, counts))
    if each:
        def row(args):
            x, asked, tok, *one = args
            return lax.cond(asked, lambda: tuple(v[0] for v in draw(x[None], *(v[None] for v in one))),
                            lambda: (tok, jnp.zeros((), bool)))

        tokens, rows = lax.map(row, (logits, rows, tokens, *settings))
    else:
        drawn, past = draw(logits, *settings)
        tokens, rows = jnp.where(rows, drawn, tokens), rows & past
    if not top_n:
        return tokens, rows
    return tokens, rows, *_logprobs(logits, tokens, top_n)
