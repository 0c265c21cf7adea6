"""Token sampling under jit, in llama.cpp's order: repetition penalty, top-k, top-p, temperature, draw.

`SamplingConfig` is static (hashable): a change of temperature or top-p recompiles the decode loop once.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from realm_jax.errors import SamplingError

__all__ = ["SamplingConfig", "sample"]


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
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise SamplingError(f"temperature={t!r} must be a finite number >= 0 (0 is greedy)")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise SamplingError(f"top_k={k!r} must be None or an int >= 1")
        if p is not None and (not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1):
            raise SamplingError(f"top_p={p!r} must be None or a number in (0, 1]")
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not math.isfinite(r) or r <= 0:
            raise SamplingError(f"repetition_penalty={r!r} must be a finite number > 0")
        if not isinstance(self.penalty_last_n, int) or self.penalty_last_n < 1:
            raise SamplingError(f"penalty_last_n={self.penalty_last_n!r} must be an int >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample(logits: jax.Array, key: jax.Array, recent: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Draw one token per row.

    Args:
      logits: [B, V] float32.
      key: a PRNG key for this step.
      recent: [B, R] int32, the last tokens of each sequence (-1 = empty slot), for the penalty.
      cfg: static sampling settings.

    Returns:
      [B] int32 token ids.
    """
    if cfg.repetition_penalty != 1.0:
        b = logits.shape[0]
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], recent.shape)
        seen = jnp.zeros(logits.shape, bool).at[rows, jnp.maximum(recent, 0)].max(recent >= 0)
        penalized = jnp.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = jnp.where(seen, penalized, logits)
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if cfg.top_k is not None:
        values, ids = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))
    elif cfg.top_p is not None:
        ids = jnp.argsort(-logits, axis=-1)
        values = jnp.take_along_axis(logits, ids, axis=-1)
    else:
        values, ids = logits, None
    if cfg.top_p is not None and cfg.top_p < 1.0:
        probs = jax.nn.softmax(values, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the better candidates
        values = jnp.where(before < cfg.top_p, values, -jnp.inf)  # the best candidate always stays
    choice = jax.random.categorical(key, values / cfg.temperature, axis=-1)
    if ids is None:
        return choice.astype(jnp.int32)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
