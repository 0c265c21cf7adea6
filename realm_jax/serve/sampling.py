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
the same token whether the candidates came from the first `CANDIDATES` of a `lax.top_k` or from a full
sort. The full sort over the vocabulary runs only for a step with a row whose kept set does not fit in
`CANDIDATES` (no top_k, and top_p needing more).

Legend: B rows, V vocab, C candidates.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from realm_jax.ops import row_sum
from realm_jax.sampling import first_argmax, penalize

__all__ = ["CANDIDATES", "TOP_LOGPROBS", "sample_rows"]

CANDIDATES = 64  # candidates the fast path keeps per row
TOP_LOGPROBS = 20  # the most top log-probabilities a request may ask for (OpenAI's chat limit; completions': 5)


def _cumsum(x):
    """Cumulative sums over the last axis from elementwise adds (a row's do not depend on the batch, as
    `ops.row_sum`'s)."""
    return lax.associative_scan(jnp.add, x, axis=-1)


def _keep(values, z, m, top_k, top_p):
    """[B, C] mask of the candidates values [B, C] (descending) that top_k [B] (0: off) and top_p [B]
    (1: off) keep, and [B] whether the kept set ends inside these C candidates."""
    c = values.shape[-1]
    rank = jnp.arange(c)[None, :]
    keep = (top_k[:, None] == 0) | (rank < top_k[:, None])
    probs = jnp.exp(values - m[:, None]) / z[:, None]  # of the whole vocabulary: z sums over V
    cum = _cumsum(jnp.where(keep, probs, 0.0))
    keep &= (cum - probs < top_p[:, None]) | (rank == 0)  # the best candidate always stays
    ends = ((top_k > 0) & (top_k <= c)) | ((top_p < 1.0) & (cum[:, -1] >= top_p))
    return keep, ends


def _draw(values, ids, keep, temperature, u):
    """The candidate whose cumulative weight first passes u [B] of the kept candidates' total."""
    w = jnp.where(keep, jnp.exp((values - values[:, :1]) / temperature[:, None]), 0.0)
    cum = _cumsum(w)
    idx = jnp.sum(cum <= (u * cum[:, -1])[:, None], axis=-1)
    idx = jnp.minimum(idx, jnp.sum(keep, axis=-1) - 1)  # u * total rounding up past the last kept one
    return jnp.take_along_axis(ids, idx[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("sampled", "top_n"))
def sample_rows(logits, temperature, top_k, top_p, seeds, counts, bias_ids=None, bias_values=None, recent=None,
                penalty=None, *, sampled: bool, top_n: int):
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

    Returns:
      (tokens [B] int32, finite [B] bool: the row's processed logits hold no NaN or infinity, and with top_n: the
      chosen tokens' log-probabilities [B], the top_n log-probabilities [B, top_n] and their ids).
    """
    if recent is not None:
        logits = penalize(logits, recent, penalty[:, None])
    if bias_ids is not None:
        logits = logits.at[jnp.arange(logits.shape[0])[:, None], bias_ids].add(bias_values)
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    tokens = first_argmax(logits)
    if sampled:
        m = jnp.max(logits, axis=-1)
        z = row_sum(jnp.exp(logits - m[:, None]))[:, 0]
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seeds, counts)
        u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
        safe_t = jnp.where(temperature > 0, temperature, 1.0)

        def pick(values, ids):
            keep, ends = _keep(values, z, m, top_k, top_p)
            return _draw(values, ids, keep, safe_t, u), ends

        fast, ends = pick(*lax.top_k(logits, min(CANDIDATES, logits.shape[-1])))
        greedy = temperature <= 0

        def full():
            return jnp.where(ends, fast, pick(*lax.top_k(logits, logits.shape[-1]))[0])

        drawn = lax.cond(jnp.all(ends | greedy), lambda: fast, full)
        tokens = jnp.where(greedy, tokens, drawn)
    if not top_n:
        return tokens, finite
    top = jnp.max(logits, axis=-1, keepdims=True)
    logp = logits - (top + jnp.log(row_sum(jnp.exp(logits - top))))
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    top_values, top_ids = lax.top_k(logp, top_n)
    return tokens, finite, chosen, top_values, top_ids
