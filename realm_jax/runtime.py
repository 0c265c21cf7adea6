"""The model runtime: `load` a GGUF file, then teacher-forced `logits` and `generate`.

One generate call is one jitted prefill of the (right-padded) prompts and a jitted decode loop
(`lax.while_loop`) that samples on the device; Python steps in only between chunks of the loop: to stream
text out, or to check stop strings.

Legend: B batch, T prompt tokens (padded), S cache length, V vocab.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import operator
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from realm_jax import compile_cache, linear
from realm_jax.errors import (ArgumentError, ContextLengthError, MetadataError, NonFiniteLogitsError, SamplingError,
                              ShardingError, TokenIdError)
from realm_jax.inputs import as_path, check_text, shown
from realm_jax.preflight import check_fits, step_bytes
from realm_jax.checkpoint import read_gguf
from realm_jax.models import ModelConfig, config_from_gguf, fuse_projections, params_from_tensors
from realm_jax.models.transformer import KVCache, forward, init_cache, project, run_layers, stack_layers
from realm_jax.precision import Policy, resolve_policy
from realm_jax.quant import QTensor
from realm_jax.sampling import SamplingConfig, sample, step_keys
from realm_jax.tokenizer import Tokenizer, int_list

__all__ = ["Model", "load"]

_PROMPT_BUCKET = 64  # longer prompts are padded to a multiple of this: fewer shapes to compile
_SHORT_PROMPTS = (16, 32)  # shorter ones to the first of these that holds them
_CACHE_BUCKET = 256
_STREAM_CHUNK = 1  # tokens per dispatch while streaming
_STOP_CHUNK = 16  # tokens per dispatch while watching for stop strings
_LOGITS_ROWS = 128  # Model.logits projects this many rows to logits at a time: [rows, V] at once, not [T, V]


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _prompt_length(n: int) -> int:
    """The length a prompt of n tokens is prefilled at: 16 or 32 for a short one (a chat turn, a server's
    completion: a 5-token prompt padded to 64 costs 4x its prefill), else a multiple of _PROMPT_BUCKET.
    Every path that prefills (generate, logits, the server) pads alike, so a prompt meets the same kernels
    whichever runs it."""
    return next((b for b in _SHORT_PROMPTS if n <= b), None) or _round_up(n, _PROMPT_BUCKET)


def _whole(value: Any) -> int | None:
    """`value` as an int if it is an integer: a Python, numpy or 0-d JAX int (`operator.index`); None for
    anything else, a bool (True is not a count) and a float included."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _flag(value: Any) -> bool | None:
    """`value` as a bool if it is a Python or numpy bool, else None: a truthy "no" must not pass as True."""
    return bool(value) if isinstance(value, (bool, np.bool_)) else None


def _layer_stack(pipeline):
    """The layer stack's runner: one device group, or a pipeline over the mesh's stages."""
    return run_layers if pipeline is None else pipeline.run_layers


@functools.partial(jax.jit, static_argnames=("config", "policy", "all_logits", "pipeline", "impl", "logits"),
                   donate_argnames=("cache",))
def _prefill(params, tokens, lengths, cache, *, config: ModelConfig, policy: Policy, all_logits: bool, pipeline=None,
             impl: str = "auto", logits: bool = True):
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return forward(config, params, tokens, positions, cache, policy=policy, last=None if all_logits else lengths - 1,
                   kv_len=t, layer_stack=_layer_stack(pipeline), impl=impl, logits=logits)


@functools.partial(jax.jit, static_argnames=("policy",))
def _project(params, x, rows, *, policy: Policy):
    """Logits [R, V] of rows [R] of the final-normed x [T, D]."""
    return project(params, x[rows], policy)


@functools.partial(jax.jit, static_argnames=("top_n",))
def _logprob_rows(logits, after, *, top_n: int):
    """For logits [R, V] and the token after each row [R]: its log-probability [R] and the top_n [R, top_n]
    (values f32, ids int32)."""
    logits = logits.astype(jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    logp = logits - (top + jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True)))
    values, ids = jax.lax.top_k(logp, top_n)
    return jnp.take_along_axis(logp, after[:, None], axis=-1)[:, 0], values, ids.astype(jnp.int32)


def _mark_nonfinite(bad, logits, live, step):
    """bad [B] (the step each row's logits were first not finite, -1 if never) with `step` set for the `live`
    rows [B] of logits [B, V] that hold a NaN or an infinity now: each row its own (no cross-row reduction,
    so nothing is gathered over a data axis)."""
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    return jnp.where((bad < 0) & live & ~finite, step, bad).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("sampling",))
def _sample_first(logits, seeds, recent, scalars, stop_ids, n, *, sampling: SamplingConfig):
    """The first sampled token of each row after prefill, whether the row is done (a stop id, or a padding
    row past the n real ones), the recent-token ring with it and `_mark_nonfinite`'s flags at step 0: one
    dispatch (eager ops cost ~5 ms here)."""
    logits = logits.astype(jnp.float32)
    first = sample(logits, step_keys(seeds, 0), recent, sampling, scalars)
    real = jnp.arange(first.shape[0]) < n
    done = jnp.isin(first, stop_ids) | ~real  # padding rows start done
    return first, done, _push(recent, first), _mark_nonfinite(jnp.full(real.shape, -1), logits, real, 0)


def _push(recent, tokens):
    """Append tokens [B] to the ring of recent tokens [B, R] (oldest dropped)."""
    return jnp.concatenate([recent[:, 1:], tokens[:, None]], axis=1)


@functools.partial(jax.jit, static_argnames=("config", "policy", "sampling", "n_steps", "pipeline", "impl"),
                   donate_argnames=("cache",))
def _decode(params, cache: KVCache, token, pos, done, recent, key, step0, stop_ids, limit, scalars, *,
            config: ModelConfig, policy: Policy, sampling: SamplingConfig, n_steps: int, pipeline=None,
            impl: str = "auto"):
    """Up to `limit` (<= n_steps, traced) decode steps. token [B] (sampled, not yet fed) at positions pos [B];
    done [B]. n_steps is a bucket: generations of different lengths share one compilation. A row whose logits
    hold a NaN or an infinity is done from that step (each row checks its own: under data parallelism no
    step gathers anything for it).

    Returns (new tokens [B, n_steps] with -1 after a sequence is done or past `limit`, the updated state, and
    bad [B]: the step at which each row's logits were first not finite, -1 if never)."""
    b = token.shape[0]

    def cond(state):
        step, *_, done_, _, _ = state
        return (step < limit) & ~jnp.all(done_)

    def body(state):
        step, out, cache_, token_, pos_, recent_, done_, key_, bad_ = state
        logits, cache_ = forward(config, params, token_[:, None], pos_[:, None], cache_, policy=policy,
                                 last=jnp.zeros((b,), jnp.int32), layer_stack=_layer_stack(pipeline), impl=impl)
        logits = logits.astype(jnp.float32)
        bad_ = _mark_nonfinite(bad_, logits, ~done_, step0 + step)
        nxt = sample(logits, step_keys(key_, step0 + step), recent_, sampling, scalars)
        nxt = jnp.where(done_, -1, nxt)
        out = out.at[:, step].set(nxt)
        advance = ~done_
        done_ = done_ | jnp.isin(nxt, stop_ids) | (bad_ >= 0)
        recent_ = jnp.where(advance[:, None], _push(recent_, nxt), recent_)
        return step + 1, out, cache_, jnp.where(advance, nxt, token_), pos_ + advance, recent_, done_, key_, bad_

    out = jnp.full((b, n_steps), -1, jnp.int32)
    state = (jnp.int32(0), out, cache, token, pos, recent, done, key, jnp.full((b,), -1, jnp.int32))
    _, out, cache, token, pos, recent, done, _, bad = jax.lax.while_loop(cond, body, state)
    return out, cache, token, pos, recent, done, bad


class Model:
    """A loaded model: config, params on the device, tokenizer and precision policy; with a mesh whose stage
    axis is > 1, `pipeline` (a `realm_jax.distributed.pipeline.Pipeline`) runs the layers over the stages."""

    def __init__(self, path: pathlib.Path, metadata: dict[str, Any], config: ModelConfig, params: dict[str, Any],
                 tokenizer: Tokenizer, policy: Policy, mesh: Mesh | None = None, impl: str = linear.REFERENCE):
        self.mesh = mesh
        self.impl = impl  # the linear layers' preferred backend (`realm_jax.linear.resolve`)
        self.pipeline = None
        if mesh is not None and int(dict(mesh.shape).get("stage", 1)) > 1:
            from realm_jax.distributed.pipeline import Pipeline

            self.pipeline = Pipeline(mesh)
        self.path = path
        self.metadata = metadata
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.policy = policy

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({self.path.name!r}, arch={c.arch}, layers={c.n_layers}, d_model={c.d_model}, "
                f"vocab={c.vocab_size}, policy={self.policy})")

    # --- teacher-forced logits --------------------------------------------------------------------
    def logits(self, ids: Sequence[int], positions: Sequence[int] | None = None) -> np.ndarray:
        """Teacher-forced logits of `ids`: float32 [len(ids), V], or [len(positions), V] for those positions.

        One prefill of the whole prompt gives its final-normed rows ([T, D], the prefill `generate` runs),
        and only the rows asked for are projected to logits, `_LOGITS_ROWS` at a time: memory grows with the
        rows returned, not with the prompt times the vocabulary. The values are one prefill's, bit for bit.

        Args:
          ids: the token ids.
          positions: indices into `ids` (negative ones count from the end), in any order, repeats allowed;
            None: every position.
        """
        ids = self._check_ids(ids)
        rows = self._check_positions(positions, len(ids))
        out = np.empty((len(rows), self.config.vocab_size), np.float32)
        for start, logits in self._logit_chunks(ids, rows, f"the logits of {len(rows)} of {len(ids)} positions",
                                                out_rows=len(rows)):
            out[start : start + _LOGITS_ROWS] = np.asarray(logits[: len(out) - start], np.float32)
        return out

    def prompt_logprobs(self, ids: Sequence[int], top_n: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The log-probability of each token of `ids` after the ones before it, teacher-forced (one prefill,
        as `logits`): float32 [len(ids) - 1] for tokens 1.., and the top_n most likely tokens at each of
        those places, log-probabilities float32 [len(ids) - 1, top_n] (descending) and ids int32. Reduced
        on the device: the host gets these, not [T, V] logits.

        Raises:
          TokenIdError: `ids` is not a sequence of ids of the vocabulary; SamplingError: top_n is not an
            int in [0, 20].
        """
        ids = self._check_ids(ids)
        if isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or not 0 <= top_n <= 20:
            raise SamplingError(f"top_n={shown(top_n)} must be an int in [0, 20]")
        n, top_n = len(ids) - 1, min(top_n, self.config.vocab_size)
        chosen = np.empty(n, np.float32)
        values, which = np.empty((n, top_n), np.float32), np.empty((n, top_n), np.int32)
        after = np.asarray(ids[1:] + [0] * _LOGITS_ROWS, np.int32)
        for start, logits in self._logit_chunks(ids, np.arange(n), f"the log-probabilities of {n} tokens",
                                                out_rows=0):
            end = min(start + _LOGITS_ROWS, n)
            c, v, w = (np.asarray(a)[: end - start] for a in
                       _logprob_rows(logits, after[start : start + _LOGITS_ROWS], top_n=top_n))
            chosen[start:end], values[start:end], which[start:end] = c, v, w
        return chosen, values, which

    def _logit_chunks(self, ids: list[int], rows: np.ndarray, what: str, *, out_rows: int):
        """(start, logits [_LOGITS_ROWS, V] on the device) of rows[start: start + _LOGITS_ROWS] of the
        prompt `ids`' teacher-forced logits, a chunk at a time after one prefill (the last chunk padded by
        repeating its last row: one compiled shape). out_rows: the rows the caller keeps on the host."""
        t = _prompt_length(len(ids))
        b = self.batch_multiple  # the data axis needs a row per shard: the extra rows repeat this one
        self._check_fits(what, batch=b, prompt_tokens=t, cache_tokens=t, logits_rows=_LOGITS_ROWS + out_rows)
        tokens = np.zeros((b, t), np.int32)
        tokens[:, : len(ids)] = ids
        with self.mesh_context():
            x = _prefill(self.params, tokens, np.full((b,), len(ids), np.int32), self._new_cache(b, t),
                         config=self.config, policy=self.policy, all_logits=True, pipeline=self.pipeline,
                         impl=self.impl, logits=False)[0][0]  # the cache is not needed after
        for start in range(0, len(rows), _LOGITS_ROWS):
            chunk = rows[start : start + _LOGITS_ROWS]
            padded = np.pad(chunk, (0, _LOGITS_ROWS - len(chunk)), mode="edge")
            with self.mesh_context():
                yield start, _project(self.params, x, padded.astype(np.int32), policy=self.policy)

    def _check_positions(self, positions, n: int) -> np.ndarray:
        if positions is None:
            return np.arange(n)
        positions = int_list(positions, "positions", "ints")
        bad = [p for p in positions if not -n <= p < n]
        if bad:
            raise TokenIdError(f"positions {shown(bad[:5])} are outside the {n} tokens of the prompt")
        return np.asarray(positions, np.int64) % n

    def compiled_text(self, step: str, *, batch: int = 1, prompt_tokens: int = 16) -> str:
        """The compiled HLO text of one jitted step for `batch` prompts of `prompt_tokens` tokens: "prefill"
        (the prompt through the model) or "decode" (the decode loop; its body is one step). Collective bytes
        are read from it (`realm_jax.distributed.hlo`)."""
        if step not in ("prefill", "decode"):
            raise ArgumentError(f"compiled_text: step={step!r} must be 'prefill' or 'decode'")
        prompts = [[self.tokenizer.bos_id or 1] * prompt_tokens] * batch
        if step == "prefill":
            b, t = len(prompts) + (-len(prompts) % self.batch_multiple), _prompt_length(prompt_tokens)
            with self.mesh_context():
                lowered = _prefill.lower(self.params, np.zeros((b, t), np.int32),
                                         np.full((b,), prompt_tokens, np.int32),
                                         self._new_cache(b, _round_up(t + 2, _CACHE_BUCKET)), config=self.config,
                                         policy=self.policy, all_logits=False, pipeline=self.pipeline,
                                         impl=self.impl)
        else:  # the decode loop's inputs come from a prefill
            lowered = _Generation(self, prompts, 2, SamplingConfig(), 0, []).lower_step(1)
        return lowered.compile().as_text()

    def mesh_context(self):
        """The mesh as JAX's context mesh (for the kernels' shard_map) while a jitted step traces; a no-op
        without a mesh."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    @property
    def max_prompt_chars(self) -> int:
        """The most characters a prompt can have and fit in the context: a token covers at most the longest
        token's characters. Longer text is refused before it is tokenized."""
        return self.config.context_length * self.tokenizer.max_token_chars

    @property
    def batch_multiple(self) -> int:
        """Batches are padded to a multiple of this: the size of the mesh's data axis (1 without a mesh)."""
        return 1 if self.mesh is None else int(dict(self.mesh.shape).get("data", 1))

    def _check_fits(self, what: str, **shape: int) -> None:
        """MemoryBudgetError, before anything is allocated, if a step of this shape cannot fit in memory."""
        devices = None if self.mesh is None else self.mesh.devices.flat
        check_fits(f"{self.path.name}: {what}", step_bytes(token_sizes(self.config, self.policy), **shape), devices)

    def _new_cache(self, batch: int, length: int) -> KVCache:
        layers = None if self.pipeline is None else self.pipeline.cache_layers(self.params["layers"])
        cache = init_cache(self.config, batch, length, self.policy.kv, layers)
        if self.mesh is None:
            return cache
        from realm_jax.distributed import cache_sharding

        return jax.device_put(cache, cache_sharding(self.config, self.mesh))

    def _check_ids(self, ids, *, what: str = "the prompt", allow_empty: bool = False) -> list[int]:
        """`ids` as a list of ints, each in the vocabulary and all within the context: the check every entry
        point of token ids shares (logits, generate_ids' prompts and stop_ids, the server). `tokenizer.int_list`
        refuses what is not a sequence of ints (a str, bytes, a dict, a set, None)."""
        ids = int_list(ids, what)
        if not ids and not allow_empty:
            raise SamplingError(f"{what} is empty: at least one token is needed")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise TokenIdError(f"{what}: token ids {shown(bad[:5])} are outside the vocabulary "
                               f"[0, {self.config.vocab_size})")
        if len(ids) > self.config.context_length:
            raise ContextLengthError(f"{len(ids)} tokens exceed the model's context of "
                                     f"{self.config.context_length} tokens")
        return ids

    # --- generation -------------------------------------------------------------------------------
    def start(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: SamplingConfig,
              seed: int = 0, stop_ids: Sequence[int] | None = None) -> _Generation:
        """Prefill token-id prompts and sample each one's first new token; `_Generation.step` continues.
        `stop_ids` (default: the tokenizer's end-of-generation tokens) end a sequence. `seed` and
        `max_new_tokens` are ints (Python or numpy, not bools); `sampling` a `SamplingConfig`."""
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, (list, tuple, np.ndarray)) for p in prompts):
            raise SamplingError("prompts must be a list of token-id lists")
        whole = _whole(seed)
        if whole is None or not 0 <= whole < 2**32:
            raise SamplingError(f"seed={shown(seed)} must be an int in [0, 2**32)")
        if not isinstance(sampling, SamplingConfig):  # None too: the default, SamplingConfig(), is greedy
            raise SamplingError(f"sampling={shown(sampling)} must be a realm_jax.sampling.SamplingConfig "
                                f"(SamplingConfig() is greedy), got {type(sampling).__name__}")
        stop_ids = sorted(self.tokenizer.stop_ids) if stop_ids is None else self._check_ids(stop_ids, what="stop_ids",
                                                                                            allow_empty=True)
        return _Generation(self, [self._check_ids(p) for p in prompts], max_new_tokens, sampling, whole, stop_ids)

    def generate_ids(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                     sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                     stop_ids: Sequence[int] | None = None) -> list[list[int]]:
        """New token ids for each token-id prompt, in one prefill and one decode dispatch; a sequence ends
        at the first of `stop_ids` (default: the tokenizer's end-of-generation tokens; included).

        Raises:
          SamplingError: `sampling` is not a `SamplingConfig` (None included: leave it out for greedy), or
            `max_new_tokens` or `seed` is not an int in range (numpy ints pass, bools and floats do not).
          TokenIdError: a prompt or `stop_ids` is not a sequence of ids of the vocabulary (`_check_ids`).
        """
        gen = self.start(prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop_ids=stop_ids)
        blocks = [gen.first]
        while not gen.finished:
            blocks.append(gen.step(gen.remaining))
        out = np.concatenate(blocks, axis=1)
        return [[int(t) for t in row if t >= 0] for row in out]

    def generate(self, prompt: str | Sequence[str], *, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                 seed: int = 0, stop: Sequence[str] | None = (), stream: bool = False,
                 add_bos: bool | None = None):
        """Generate text after `prompt` (or after each prompt of a list, in one batch).

        Args:
          prompt: a string, or a list of strings generated together (their lengths may differ).
          max_new_tokens: at most this many tokens per prompt (an int >= 1; numpy ints pass).
          temperature, top_k, top_p, repetition_penalty: sampling (temperature 0 is greedy).
          seed: the PRNG seed of the sampling (an int in [0, 2**32)); prompt i of a list samples with
            seed + i, exactly as it would alone with that seed.
          stop: strings that end a sequence (not included in the result).
          stream: True returns an iterator of text pieces as they are generated (one prompt only); a bool.
          add_bos: prepend BOS (None, the default: as the file says; pass False for text that holds its own
            BOS, such as a rendered chat template); None or a bool.

        Returns:
          The generated text (a list of texts for a list of prompts), or an iterator of pieces if `stream`.
        """
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty)
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise SamplingError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}")
        stop = () if stop is None else stop
        if isinstance(stop, str) or not isinstance(stop, (list, tuple)) or \
                not all(isinstance(s, str) and s for s in stop):
            raise SamplingError(f"stop={shown(stop)} must be a list of non-empty strings")
        stream_flag, bos_flag = _flag(stream), _flag(add_bos)
        if stream_flag is None:
            raise SamplingError(f"stream={shown(stream)} must be True or False")
        if add_bos is not None and bos_flag is None:
            raise SamplingError(f"add_bos={shown(add_bos)} must be None, True or False")
        stream, add_bos = stream_flag, bos_flag
        if stream and not single:
            raise SamplingError("stream=True takes one prompt, not a list")
        for i, p in enumerate(prompts):
            what = "prompt" if single else f"prompt[{i}]"
            check_text(p, what)
            if len(p) > self.max_prompt_chars:  # before tokenizing it: a long text takes long to tokenize
                most = self.tokenizer.max_token_chars
                raise ContextLengthError(
                    f"{self.path}: {what} has {len(p)} characters, so at least {-(-len(p) // most)} tokens (no token "
                    f"is longer than {most} characters): more than the model's context of "
                    f"{self.config.context_length} tokens")
        for i, text in enumerate(stop):
            check_text(text, f"stop[{i}]")
        ids = [self.tokenizer._encode(p, add_bos, True) for p in prompts]
        chunk = _STREAM_CHUNK if stream else (_STOP_CHUNK if stop else None)
        texts = _TextCollector(self.tokenizer, len(prompts), tuple(stop))
        # Started here, not inside the generator, so bad arguments raise at the call, stream or not.
        gen = self.start(ids, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)
        pieces = self._stream_texts(gen, texts, chunk)
        if stream:
            return (piece[0] for piece in pieces if piece[0])
        for _ in pieces:
            pass
        return texts.texts[0] if single else texts.texts

    def _stream_texts(self, gen: _Generation, texts: _TextCollector, chunk):
        yield texts.add(gen.first)
        while not gen.finished:
            gen.stop_rows(texts.stopped)
            if gen.finished:
                break
            yield texts.add(gen.step(min(chunk or gen.remaining, gen.remaining)))
        yield texts.flush()


class _Generation:
    """The device state of one generate call between dispatches of the decode loop."""

    def __init__(self, model: Model, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig,
                 seed: int, stop_ids: list[int]):
        whole = _whole(max_new_tokens)
        if whole is None or whole < 1:
            raise SamplingError(f"max_new_tokens={shown(max_new_tokens)} must be an int >= 1")
        max_new_tokens = whole
        if not prompts:
            raise SamplingError("no prompts given")
        config, policy = model.config, model.policy
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > config.context_length:
            raise ContextLengthError(
                f"a prompt of {longest} tokens plus max_new_tokens={shown(max_new_tokens)} exceeds the model's context "
                f"of {config.context_length} tokens")
        self.model, self.sampling = model, sampling
        # Data parallelism splits the batch over the mesh's data axis: pad it with copies of the first prompt
        # (their outputs are dropped) to a multiple of that axis.
        self.n = len(prompts)
        prompts = prompts + [prompts[0]] * (-len(prompts) % model.batch_multiple)
        b, t = len(prompts), _prompt_length(longest)
        tokens = np.zeros((b, t), np.int32)
        lengths = np.array([len(p) for p in prompts], np.int32)
        recent = np.full((b, sampling.penalty_last_n), -1, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
            tail = p[-sampling.penalty_last_n :]
            recent[i, recent.shape[1] - len(tail) :] = tail
        length = _round_up(t + max_new_tokens, _CACHE_BUCKET)
        model._check_fits(f"a generation of {b} prompt(s) of {longest} tokens and {max_new_tokens} new tokens",
                          batch=b, prompt_tokens=t, cache_tokens=length)
        cache = model._new_cache(b, length)
        with model.mesh_context():
            logits, self.cache = _prefill(model.params, tokens, lengths, cache, config=config, policy=policy,
                                          all_logits=False, pipeline=model.pipeline, impl=model.impl)
        # Prompt i samples with seed + i: a batch gives each prompt what it would get alone with that seed.
        self.key = jnp.asarray((seed + np.arange(b)) % 2**32, jnp.uint32)
        self.stop_ids = jnp.asarray(stop_ids or [-2], jnp.int32)  # -2 matches nothing
        first, self.done, self.recent, bad = _sample_first(logits, self.key, recent, sampling.scalars,
                                                           self.stop_ids, self.n, sampling=sampling.static)
        self.token, self.pos = first, jnp.asarray(lengths)
        first, bad = jax.device_get((first, bad))
        self._check_finite(bad)
        self.first = first[: self.n, None]
        self.produced, self.max_new_tokens = 1, max_new_tokens

    def _check_finite(self, bad: np.ndarray) -> None:
        """Raise for the first step, and its first row, whose logits were not finite (`_mark_nonfinite`)."""
        rows = np.flatnonzero(bad[: self.n] >= 0)
        if rows.size:
            row = int(rows[np.argmin(bad[rows])])
            step = int(bad[row])
            m = self.model
            raise NonFiniteLogitsError(
                f"{m.path}: the logits of generation step {step} (new token {step + 1}) of prompt {row} hold "
                f"NaN or infinite values; the generation stops there. The file's weights or the precision "
                f"policy ({m.policy}) produce them")

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - self.produced

    @property
    def finished(self) -> bool:
        return self.remaining <= 0 or bool(jnp.all(self.done[: self.n]))

    def stop_rows(self, rows: Sequence[bool]) -> None:
        """End the sequences flagged in `rows` (e.g. a stop string seen on the host)."""
        rows = np.asarray(rows, bool)
        self.done = self.done | jnp.asarray(np.pad(rows, (0, self.done.shape[0] - len(rows))))

    def _decode_args(self, n: int):
        m = self.model
        bucket = 1 << max(n - 1, 0).bit_length()  # the next power of two: few compilations
        args = (m.params, self.cache, self.token, self.pos, self.done, self.recent, self.key, jnp.int32(self.produced),
                self.stop_ids, jnp.int32(n), self.sampling.scalars)
        return args, dict(config=m.config, policy=m.policy, sampling=self.sampling.static, n_steps=bucket,
                          pipeline=m.pipeline, impl=m.impl)

    def lower_step(self, n: int):
        """The decode loop of `step(n)`, lowered (not run)."""
        args, static = self._decode_args(n)
        with self.model.mesh_context():
            return _decode.lower(*args, **static)

    def step(self, n: int) -> np.ndarray:
        """Run up to n more decode steps in one dispatch: new tokens [B, n], -1 after a sequence ends."""
        args, static = self._decode_args(n)
        with self.model.mesh_context():
            out, self.cache, self.token, self.pos, self.recent, self.done, bad = _decode(*args, **static)
        out, bad = jax.device_get((out, bad))
        self._check_finite(bad)
        self.produced += n
        return out[: self.n, :n]


class _TextCollector:
    """Turns token blocks into text per sequence as llama.cpp streams it: each token's piece
    (`token_to_piece`), decoded incrementally as UTF-8. The text is the concatenation of what was emitted:
    nothing is retracted. Possible stop-string prefixes are held back; text ends before a stop string."""

    def __init__(self, tokenizer: Tokenizer, n: int, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(n)]
        self.raw = [""] * n
        self.emitted = [0] * n
        self.texts = [""] * n
        self.stopped = [False] * n

    @property
    def all_stopped(self) -> bool:
        return all(self.stopped)

    def add(self, block: np.ndarray) -> list[str]:
        out = []
        for i, row in enumerate(block):
            if not self.stopped[i]:
                for tok in row:
                    if tok < 0 or tok in self.tokenizer.stop_ids:
                        self.stopped[i] = True
                        break
                    self.raw[i] += self.decoders[i].decode(self.tokenizer.token_to_piece(int(tok)))
            out.append(self._update(i, final=self.stopped[i]))
        return out

    def flush(self) -> list[str]:
        for i, decoder in enumerate(self.decoders):
            self.raw[i] += decoder.decode(b"", final=True)
        return [self._update(i, final=True) for i in range(len(self.raw))]

    def _update(self, i: int, final: bool) -> str:
        text = self.raw[i]
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            text, final = text[:cut], True
            self.stopped[i] = True
        ready = len(text)
        if not final:
            for s in self.stop:  # a stop string may be starting
                for k in range(min(len(s) - 1, ready), 0, -1):
                    if text[:ready].endswith(s[:k]):
                        ready -= k
                        break
        new = text[self.emitted[i] : max(ready, self.emitted[i])]
        self.emitted[i] = max(ready, self.emitted[i])
        self.texts[i] = text[: self.emitted[i]]
        return new


def load(path: str | os.PathLike, *, policy: Policy | str | None = None, mesh: Mesh | None = None,
         split_by: str = "bytes", impl: str = "auto", progress: bool | None = None) -> Model:
    """Load a GGUF model.

    Args:
      path: the GGUF file (llama, mistral, qwen2 or gemma3 architecture).
      policy: a `Policy`, a string such as "bf16" or "params=f32,compute=bf16", or None for the device's
        automatic choice.
      mesh: a `realm_jax.distributed.make_mesh(data=d, stage=s, model=m)` mesh: the layer stack split over
        s pipeline stages, each layer over m devices (tensor parallelism), batches over d (data parallelism).
        A mesh of one device is that device: the model runs there as without a mesh (`Model.mesh` None).
      split_by: how the layers are cut into the mesh's stages: "bytes" (each stage's params as equal as a
        contiguous split allows) or "layers" (equal layer counts); see `distributed.create_model_shards`.
      impl: the user's choice of linear-layer backend, one of `realm_jax.linear.IMPLS`: "auto" (default)
        takes the platform's best (`realm_jax.linear.resolve`); a backend's name asks for it. Each weight
        is prepared for that backend at load, or for the XLA reference where the backend does not support
        its format or shape (`realm-jax inspect` says which serves each tensor; the
        "realm_jax.linear" logger says so at debug level).
      progress: show a progress bar while loading (default: when stderr is a terminal).

    Compiled executables are kept on disk (`realm_jax.compile_cache`: ``$REALM_JAX_CACHE/xla``; set
    ``REALM_JAX_COMPILE_CACHE=0`` to turn that off), so a later process with the same model, policy, mesh
    and shapes compiles nothing.

    Returns:
      A `Model`.

    Raises:
      ArgumentError: `path` is not a str, bytes or os.PathLike, or is empty.
      MeshError: `mesh` is not a `jax.sharding.Mesh`, has an axis other than data / stage / model, or holds a
        device twice.
      GGUFError: the file cannot be used (a subclass per cause).
    """
    path = as_path(path, "load")
    compile_cache.enable()  # a later process with the same model and shapes compiles nothing
    if mesh is not None:
        from realm_jax.distributed import mesh_shape

        mesh_shape(mesh)  # not a Mesh, unknown axes, a device twice: an error before the file is read
    from realm_jax.distributed.pipeline import BY

    if split_by not in BY:
        raise ShardingError(f"load: split_by={split_by!r} must be one of {BY}")
    device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
    if mesh is not None and mesh.size == 1:  # nothing to split: the model runs on that device alone
        mesh = None
    policy = resolve_policy(policy, device)
    impl = linear.resolve(impl, device.platform, devices=1 if mesh is None else mesh.size)
    progress = sys.stderr.isatty() if progress is None else progress
    metadata, tensors = read_gguf(path, progress=progress)
    config = config_from_gguf(metadata, tensors, str(path))
    tokenizer = Tokenizer.from_metadata(metadata, source=str(path))
    if tokenizer.vocab_size != config.vocab_size:
        raise MetadataError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but token_embd.weight has "
                            f"{config.vocab_size} rows")
    params = prepare_params(config, tensors, str(path), policy, device, mesh, split_by=split_by, impl=impl)
    return Model(path, metadata, config, params, tokenizer, policy, mesh, impl)


def build_params(config: ModelConfig, tensors: dict[str, QTensor], source: str, policy: Policy, *,
                 fuse: bool = True, impl: str = linear.REFERENCE, last_apart: bool = False,
                 variants: bool = False) -> dict[str, Any]:
    """The params pytree the jitted forward takes: linear weights prepared for the backend `impl` prefers
    (`realm_jax.linear.prepare`), q|k|v and gate|up fused (unless `fuse` is False: tensor parallelism splits
    them by heads), layers stacked into scan runs (with `variants`, layers of a few structures in one run:
    `transformer.stack_layers`), the last layer in a run of its own with `last_apart` (a prefill then runs
    most of it on the last positions alone: `transformer.run_layers`; a pipeline's stages do not).
    Traceable (see `memory_plan`)."""

    def prepare(many_rows: bool):
        return lambda qt, name: linear.prepare(qt, policy, impl=impl, many_rows=many_rows, what=f"{source}: {name}")

    # The output projection: a prefill multiplies only its last positions by it (`Model.logits`, every row).
    params = params_from_tensors(config, tensors, source, linear=prepare(True), output=prepare(False))
    layers = [fuse_projections(layer) for layer in params["layers"]] if fuse else params["layers"]
    params["layers"] = stack_layers(layers, last_apart=last_apart, variants=variants)
    return params


def prepare_params(config: ModelConfig, tensors: dict[str, QTensor], source: str, policy: Policy,
                   device: jax.Device | None = None, mesh=None, *, split_by: str = "bytes",
                   impl: str = linear.REFERENCE) -> dict[str, Any]:
    """`build_params`, on `device`, or split over `mesh` by the sharding rules; with a stage axis > 1 the
    layers are first partitioned by `split_by` and laid out over the stages (`distributed.pipeline`).
    On one CPU, layers of a few structures run as one scan (`transformer.Variants`: measured there); on an
    accelerator each stretch of one structure stays a scan of its own, since a `lax.switch` per layer may
    cost XLA:GPU a read of the branch index by the host at every step (not measured yet).
    On one CPU the last layer stays in the scan too. A run of its own lets a prefill run most of that layer on
    the last positions alone, but it is a second copy of the layer's code in every program: on gemma3-270m
    and SmolLM2 it raised the peak RSS of the process that compiles by 25-55 MiB, took 0.4-0.9 s more to
    compile, and made no prefill of 128 tokens faster (at 512 tokens 0-5%, 1/18 of gemma3's layers)."""
    if mesh is None:
        cpu = (device or jax.devices()[0]).platform == "cpu"
        return _put_once(build_params(config, tensors, source, policy, impl=impl, last_apart=not cpu,
                                      variants=cpu), device)
    from realm_jax.distributed import shard_params
    from realm_jax.distributed.pipeline import create_model_shards, stage_layers

    stages = int(dict(mesh.shape).get("stage", 1))
    params = build_params(config, tensors, source, policy, fuse=False, impl=impl, last_apart=stages == 1)
    if stages > 1:
        try:
            shards = create_model_shards(params, stages, by=split_by)
        except ShardingError as e:
            raise ShardingError(f"{source}: {e}") from None
        params["layers"] = stage_layers(params["layers"], shards)
    return shard_params(params, config, mesh, source)


def _unique_leaves(tree) -> list[Any]:
    """The leaves of `tree`, each array once however often the tree holds it (a tied output projection
    prepared on the embedding table's own planes)."""
    return list({id(leaf): leaf for leaf in jax.tree.leaves(tree)}.values())


def _put_once(tree, device):
    """`jax.device_put(tree, device)` that puts an array the tree holds twice on the device once."""
    leaves, treedef = jax.tree.flatten(tree)
    unique = _unique_leaves(leaves)
    placed = dict(zip(map(id, unique), jax.device_put(unique, device)))
    return treedef.unflatten([placed[id(leaf)] for leaf in leaves])


def memory_plan(path: str | os.PathLike, policy: Policy | str | None = None, impl: str = "auto") -> dict[str, Any]:
    """Bytes `load(path, policy=policy)` allocates for the params, the KV cache's bytes per token and at the
    full context, and the other per-token sizes of `token_sizes`, from the file's header alone (the params'
    shapes come from `jax.eval_shape` of the very function that builds them)."""
    from realm_jax.gguf import open_gguf
    from realm_jax.models import CONFIG_TENSORS
    from realm_jax.quant import format_for_ggml_type, repack

    as_path(path, "memory_plan")
    policy, impl = resolve_policy(policy), linear.resolve(impl)
    with open_gguf(path) as f:
        metadata = dict(f.metadata)
        tensors = {}
        for name, info in f.tensors.items():
            what = f"{f.path}: tensor {name!r}"
            fmt = format_for_ggml_type(info.ggml_type, what=what)
            if name in CONFIG_TENSORS:  # the config reads their values (load reads them too)
                tensors[name] = repack(f.read_tensor(name), fmt.name, info.shape, what=what)
                continue
            n_blocks = info.shape[-1] // fmt.block_size
            planes = {p.name: jax.ShapeDtypeStruct((*info.shape[:-1], n_blocks * p.count), p.dtype) for p in fmt.planes}
            tensors[name] = QTensor(fmt.name, info.shape, planes)
    config = config_from_gguf(metadata, tensors, str(path))
    # Arrays the params hold twice (a tied output on the table's planes) count once, as load() places them.
    shapes = jax.eval_shape(lambda t: _unique_leaves(build_params(config, t, str(path), policy, impl=impl)), tensors)
    params = sum(leaf.size * leaf.dtype.itemsize for leaf in shapes)
    sizes = token_sizes(config, policy)
    return {"policy": str(policy), "impl": impl, "params_bytes": int(params), **sizes,
            "context_length": config.context_length, "n_heads": config.n_heads, "ffn_dim": config.ffn_dim,
            "kv_bytes_full_context": sizes["kv_bytes_per_token"] * config.context_length}


def token_sizes(config: ModelConfig, policy: Policy) -> dict[str, int]:
    """What one token costs: bytes of the KV cache, and of a prefill's live activations (the f32 residual
    and its norm, q/k/v, the attention output, the FFN's gate, up and hidden in the compute dtype); and the
    head count and vocabulary that size the attention scores and the logits (`preflight.step_bytes`)."""
    c, compute = config, jnp.dtype(policy.compute).itemsize
    kv = c.n_layers * c.n_kv_heads * (c.head_dim + c.v_head_dim) * jnp.dtype(policy.kv).itemsize
    act = 8 * c.d_model + compute * (c.n_heads * (c.head_dim + c.v_head_dim) + 2 * c.n_kv_heads * c.head_dim
                                     + 3 * c.ffn_dim)
    return {"kv_bytes_per_token": int(kv), "prefill_bytes_per_token": int(act), "n_heads": c.n_heads,
            "vocab_size": c.vocab_size}
