"""Token sampling under jit, in llama.cpp's order: repetition penalty, top-k, top-p, temperature, draw.

A `SamplingConfig` splits into a static part (which steps run, and top_k: they shape the computation) and
traced scalars (temperature, top_p, penalty), so new values of those do not recompile the decode loop.

The draw: with a top_k, a categorical (Gumbel) draw over its candidates; with top_p alone or no limit, an
inverse-CDF draw from one uniform a row (`draw_candidate` over the kept set in descending order, taken from
the top candidates without a sort where they hold it; `draw_in_id_order` over the whole vocabulary). The
server's per-row sampler (`realm_jax.serve.sampling`) draws the same ways.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.errors import SamplingError
from realm_jax.inputs import shown
from realm_jax.ops import row_sum

__all__ = ["BLOCK", "CANDIDATES", "WIDE", "SamplingConfig", "candidate_tiers", "cumsum_rows", "draw_candidate",
           "draw_in_id_order", "first_argmax", "kept_candidates", "penalize", "pick_candidate", "sample", "step_keys",
           "uniforms"]

CANDIDATES = 64  # the candidates a top-p draw takes from a lax.top_k first
WIDE = 1024  # and then, where they do not hold some row's kept set, 16 x WIDE, before it sorts the vocabulary
BLOCK = 256  # tokens a block of `draw_in_id_order`'s first step


_F32_MAX = float(np.finfo(np.float32).max)  # the scalars are float32: past this they would be inf
_F32_TINY = float(np.finfo(np.float32).tiny)


def _finite(x: int | float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int past the largest float
        return False


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_k/top_p None disable them; repetition_penalty 1.0 disables it.

    The penalty follows llama.cpp: a logit of a token among the last `penalty_last_n` tokens is divided
    by the penalty when positive, multiplied when negative.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    penalty_last_n: int = 64

    def __post_init__(self):
        t, k, p, r = self.temperature, self.top_k, self.top_p, self.repetition_penalty
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not _finite(t) or not 0 <= t <= _F32_MAX:
            raise SamplingError(f"temperature={shown(t)} must be a number in [0, {_F32_MAX:.3g}] (float32's; "
                                f"0 is greedy)")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise SamplingError(f"top_k={shown(k)} must be None or an int >= 1")
        if p is not None and (not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1):
            raise SamplingError(f"top_p={shown(p)} must be None or a number in (0, 1]")
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not _finite(r) or not 0 < r <= _F32_MAX:
            raise SamplingError(f"repetition_penalty={shown(r)} must be a number in (0, {_F32_MAX:.3g}] (float32's)")
        n = self.penalty_last_n
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= _MAX_PENALTY_LAST_N:
            raise SamplingError(f"penalty_last_n={shown(n)} must be an int in [1, {_MAX_PENALTY_LAST_N}]")
        if p is not None and p >= 1.0:
            object.__setattr__(self, "top_p", None)  # keeps every token: skip the sort

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def static(self) -> SamplingConfig:
        """The part that shapes the computation (hashable, for jit); the values live in `scalars`."""
        return SamplingConfig(temperature=0.0 if self.greedy else 1.0, top_k=self.top_k,
                              top_p=None if self.top_p is None else 0.5,
                              repetition_penalty=1.0 if self.repetition_penalty == 1.0 else 2.0,
                              penalty_last_n=self.penalty_last_n)

    @property
    def scalars(self) -> dict[str, jax.Array]:
        # a temperature under float32's smallest normal is that (not 0: 0 / 0 is NaN for the best logit)
        return {"temperature": jnp.float32(max(self.temperature, _F32_TINY) if self.temperature else 1.0),
                "top_p": jnp.float32(self.top_p or 1.0),
                "penalty": jnp.float32(self.repetition_penalty)}


_MAX_PENALTY_LAST_N = 1 << 16


def penalize(logits: jax.Array, recent: jax.Array, penalty: jax.Array) -> jax.Array:
    """llama.cpp's repetition penalty: the logit [B, V] of each token among a row's `recent` [B, R] (-1: an
    empty place) divided by `penalty` (a scalar, or [B, 1]) where positive, multiplied where negative."""
    rows = jnp.broadcast_to(jnp.arange(logits.shape[0])[:, None], recent.shape)
    seen = jnp.zeros(logits.shape, bool).at[rows, jnp.maximum(recent, 0)].max(recent >= 0)
    return jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample(logits: jax.Array, key: jax.Array, recent: jax.Array, cfg: SamplingConfig,
           scalars: dict[str, jax.Array] | None = None) -> jax.Array:
    """Draw one token per row.

    Args:
      logits: [B, V] float32.
      key: [B] PRNG keys for this step, one per row (a row's draw does not depend on the others).
      recent: [B, R] int32, the last tokens of each sequence (-1 = empty slot), for the penalty.
      cfg: the sampling settings; under jit pass `cfg.static` here and `cfg.scalars` as `scalars`.
      scalars: traced temperature, top_p and penalty (default: cfg's own values).

    Returns:
      [B] int32 token ids.
    """
    scalars = cfg.scalars if scalars is None else scalars
    temperature, top_p, penalty = scalars["temperature"], scalars["top_p"], scalars["penalty"]
    if cfg.repetition_penalty != 1.0:
        logits = penalize(logits, recent, penalty)
    if cfg.greedy:
        return first_argmax(logits)
    if cfg.top_k is not None:
        values, ids = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))
    elif cfg.top_p is not None:
        return _top_p_draw(logits, key, temperature, top_p)
    else:  # every token kept: one uniform a row, not a Gumbel a token (~5 ms for gemma3's 262k at one row)
        return draw_in_id_order(logits, jnp.max(logits, axis=-1), jnp.broadcast_to(temperature, logits.shape[:1]),
                                uniforms(key))
    if cfg.top_p is not None:
        probs = jax.nn.softmax(values, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the better candidates
        values = jnp.where(before < top_p, values, -jnp.inf)  # the best candidate always stays
    # less the best first: a temperature of 1e-38 would take a logit past float32's range (ties of +inf)
    values = values - jnp.max(values, axis=-1, keepdims=True)
    choice = jax.vmap(jax.random.categorical)(key, values / temperature)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def cumsum_rows(x):
    """Cumulative sums over the last axis from elementwise adds (a row's do not depend on the batch, as
    `ops.row_sum`'s)."""
    return jax.lax.associative_scan(jnp.add, x, axis=-1)


def kept_candidates(values, z, m, top_k, top_p):
    """[B, C] mask of the candidates values [B, C] (descending) that top_k [B] (0: off) and top_p [B]
    (1: off) keep, and [B] whether the kept set ends inside these C candidates. m [B]: the row's largest
    logit; z [B]: its sum of exp(logits - m) over the whole vocabulary."""
    c = values.shape[-1]
    rank = jnp.arange(c)[None, :]
    keep = (top_k[:, None] == 0) | (rank < top_k[:, None])
    probs = jnp.exp(values - m[:, None]) / z[:, None]  # of the whole vocabulary: z sums over V
    cum = cumsum_rows(jnp.where(keep, probs, 0.0))
    keep &= (cum - probs < top_p[:, None]) | (rank == 0)  # the best candidate always stays
    ends = ((top_k > 0) & (top_k <= c)) | ((top_p < 1.0) & (cum[:, -1] >= top_p))
    return keep, ends


def draw_candidate(values, ids, keep, temperature, u):
    """The inverse-CDF draw of u [B] over the kept candidates (values [B, C] descending, their ids), weights
    exp((value - best) / temperature [B]): it reads only the kept ones, so it gives the same token from the
    first C candidates as from the whole vocabulary sorted."""
    w = jnp.where(keep, jnp.exp((values - values[:, :1]) / temperature[:, None]), 0.0)
    cum = cumsum_rows(w)
    idx = jnp.sum(cum <= (u * cum[:, -1])[:, None], axis=-1)
    idx = jnp.minimum(idx, jnp.sum(keep, axis=-1) - 1)  # u * total rounding up past the last kept one
    return jnp.take_along_axis(ids, idx[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _last_positive(w):
    """[...] the index of the last positive weight of w [..., n] (0 if none)."""
    return jnp.max(jnp.where(w > 0, jnp.arange(w.shape[-1]), 0), axis=-1)


def draw_in_id_order(logits, m, temperature, u):
    """The inverse-CDF draw of u [B] over every token in id order, weights exp((logits - m [B]) / temperature
    [B]; 0 counts as 1): first the block of `BLOCK` tokens (cumulative sums of the blocks' sums), then the
    token in it, so that no [B, V] cumulative sum is made (8.8 ms for 8 rows of 262k on a 2-core CPU; this,
    ~2 ms). Where rounding takes the threshold past the last weight, the last positive one is drawn, never a
    token of weight 0."""
    b, v = logits.shape
    blocks = -(-v // BLOCK)
    w = jnp.exp((logits - m[:, None]) / jnp.where(temperature > 0, temperature, 1.0)[:, None])
    w = jnp.pad(w, ((0, 0), (0, blocks * BLOCK - v))).reshape(b, blocks, BLOCK)
    cum = cumsum_rows(row_sum(w)[..., 0])  # [B, blocks]
    threshold = u * cum[:, -1]
    sums = cum - jnp.pad(cum, ((0, 0), (1, 0)))[:, :-1]  # the blocks' own sums, as the scan has them
    block = jnp.minimum(jnp.sum(cum <= threshold[:, None], axis=-1), _last_positive(sums))
    inside = jnp.take_along_axis(w, block[:, None, None], axis=1)[:, 0]  # [B, BLOCK]
    before = jnp.where(block > 0, jnp.take_along_axis(cum, jnp.maximum(block - 1, 0)[:, None], axis=1)[:, 0], 0.0)
    at = jnp.minimum(jnp.sum(cumsum_rows(inside) <= (threshold - before)[:, None], axis=-1), _last_positive(inside))
    return (block * BLOCK + at).astype(jnp.int32)


def uniforms(key):
    """[B] one uniform in [0, 1) from each row's key [B]: the inverse-CDF draws' one random number a row."""
    return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(key)


def candidate_tiers(vocab: int, wide: int = WIDE) -> list[int]:
    """The candidates a top-p draw tries, in order: the first `CANDIDATES`, `wide`, 16 x `wide`, and then the
    vocabulary sorted (each at most the vocabulary, none below CANDIDATES, none twice)."""
    return sorted({min(max(k, CANDIDATES), vocab) for k in (CANDIDATES, wide, 16 * wide, vocab)})


def pick_candidate(logits, values, ids, m, temperature, top_k, top_p, u):
    """The draw of each row of logits [B, V] from its candidates values [B, C] (descending) and their ids under
    its top_k [B] (0: off), top_p [B] and temperature [B] (0 counts as 1), and [B] whether its kept set ends
    inside these candidates. m [B]: the row's largest logit; u [B]: its uniform."""
    z = row_sum(jnp.exp(logits - m[:, None]))[:, 0]
    keep, ends = kept_candidates(values, z, m, top_k, top_p)
    return draw_candidate(values, ids, keep, jnp.where(temperature > 0, temperature, 1.0), u), ends


def _top_p_draw(logits, key, temperature, top_p):
    """top_p alone: the inverse-CDF draw over the kept set in descending order, from the first `CANDIDATES`
    of a lax.top_k; in a step where they do not hold some row's kept set, from more (`candidate_tiers`), and
    only where none does, from the vocabulary sorted (the same token each way: a row's draw does not depend on
    its batch). A sort of gemma3's 262k logits a token had taken ~45 ms on a 2-core CPU, four decode steps;
    with top_p 0.95 at temperature 0.8, generate went 14 -> 62 tok/s (greedy: 58-62)."""
    b = logits.shape[0]
    settings = (jnp.max(logits, axis=-1), jnp.broadcast_to(temperature, (b,)), jnp.zeros((b,), jnp.int32),
                jnp.broadcast_to(top_p, (b,)), uniforms(key))

    def tries(k: int, *after: int):  # the draw from the top k, or where a row's kept set goes past them, more
        # The barrier keeps XLA's TopK: the scans' slices of its outputs would merge into slices of a sort.
        top = jax.lax.top_k(logits, k)
        drawn, ends = pick_candidate(logits, *(jax.lax.optimization_barrier(top) if after else top), *settings)
        if not after:
            return drawn
        return jax.lax.cond(jnp.all(ends), lambda: drawn, lambda: jnp.where(ends, drawn, tries(*after)))

    return tries(*candidate_tiers(logits.shape[-1]))


def first_argmax(logits: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first maximum; the first NaN if any), as int32, written as a max
    and a min: XLA:CPU runs argmax's paired reduction over a 262k vocabulary in ~1.2 ms, these two in
    ~0.2 ms (a sixth of a gemma3 decode step)."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == top) | jnp.isnan(logits)
    v = logits.shape[-1]
    return jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def step_keys(seeds: jax.Array, step) -> jax.Array:
    """[B] PRNG keys for one decode step from per-row seeds [B] (uint32)."""
    return jax.vmap(lambda seed: jax.random.fold_in(jax.random.PRNGKey(seed), step))(seeds)
