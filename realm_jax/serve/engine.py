"""The serving engine: continuous batching over a fixed set of sequence slots.

One thread owns the model and runs a loop of steps. Each step admits queued requests into free slots,
runs one prefill chunk of one admitted request (so a long prompt does not stall the others' decoding for
its whole length), then one decode step of every live slot. A request joins the decode batch after its
last prefill chunk and leaves it when it finishes or is cancelled, freeing its slot for the next one.

The slots are split into groups of `group` rows, each with its own KV cache [L, group, S, K, H]. A decode
step runs one compiled forward per group that holds a live slot, over the group's first R rows: the fewest
of a few compiled row counts (1, 2, 4, 8 on CPU) that hold its highest live slot (new requests take the lowest
free slot), so one client costs one row's compute; a free row among them computes a throwaway token. The
same compiled functions serve every mix of live slots. By default `group` is 8 on CPU (the native matmul
reads a weight once per 8 rows) and a row's arithmetic is the same whether it shares its step with 0 or 15
others, so its greedy tokens are `Model.generate`'s (`batch_invariant=False` puts all slots in one group:
faster past 8 rows on CPU, where more rows take the bf16 gemm, but a row's answer then depends on the
batch). Greedy steps take their tokens from the decode step itself; a step with a sampled row, one that
asks for log-probabilities or one with logits processing (a logit bias, penalties) runs `sample_rows` on
its logits.

A prompt of at most `prefill_chunk` tokens is prefilled exactly as `generate` prefills it (one
`runtime._prefill` of the prompt padded to 64); a longer one runs in chunks of `prefill_chunk` tokens
into a scratch cache. The scratch is then copied into the request's slot.

Legend: B slots, G rows per group, S cache length (max_context), V vocab.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax import linear
from realm_jax.errors import ContextLengthError, RealmError, SamplingError
from realm_jax.inputs import shown
from realm_jax.models.transformer import KVCache, forward
from realm_jax.runtime import _PROMPT_BUCKET, Model, _layer_stack, _prefill, _prompt_length, _round_up, _TextCollector
from realm_jax.sampling import SamplingConfig, first_argmax
from realm_jax.serve.sampling import TOP_LOGPROBS, sample_rows

__all__ = ["Engine", "EngineStoppedError", "Event", "QueueFullError", "Request", "RequestParams", "complete"]

log = logging.getLogger("realm_jax.serve")

_CACHE_BUCKET = 256
MAX_LOGIT_BIAS = 300  # entries a request's logit_bias may hold
_BIAS_BUCKET = 16  # a step's bias arrays are [G, L], L a power of two from this: few compiled samplers
PENALTY_LAST_N = SamplingConfig.penalty_last_n  # the tokens repetition_penalty looks back on, as generate's
# repetition_penalty's range (llama.cpp's usual values are 1-1.5): past it, a logit divided or multiplied by it
# can leave float32's range, and a request's log-probabilities would be NaN
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0


class QueueFullError(RealmError):
    """Every slot is busy and the queue of waiting requests is full (HTTP 429)."""


class EngineStoppedError(RealmError):
    """The engine has stopped (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class RequestParams:
    """One request's generation settings (checked by `check`).

    temperature 0 is greedy; top_k 0 and top_p 1 disable them; seed None draws a random one; stop: strings
    that end the text (not included); logprobs: None, or how many top log-probabilities to return per
    token (0..TOP_LOGPROBS; the chosen token's own is always returned then). OpenAI's logits processing:
    logit_bias, (token id, value in [-100, 100]) pairs added to the token's logit at every step;
    presence_penalty and frequency_penalty (in [-2, 2]) subtracted from the logit of each token the
    completion holds so far, once and once per occurrence; and llama.cpp's (and `generate`'s)
    repetition_penalty over the last PENALTY_LAST_N tokens of prompt and completion (1: off)."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def check(self, vocab_size: int) -> RequestParams:
        t, k, p, s, n = self.temperature, self.top_k, self.top_p, self.seed, self.max_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SamplingError(f"max_tokens={shown(n)} must be an int >= 1")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1e6:
            raise SamplingError(f"temperature={shown(t)} must be a number in [0, 1e6] (0 is greedy)")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= vocab_size:
            raise SamplingError(f"top_k={shown(k)} must be an int in [0, {vocab_size}] (0 disables it)")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise SamplingError(f"top_p={shown(p)} must be a number in (0, 1]")
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32):
            raise SamplingError(f"seed={shown(s)} must be an int in [0, 2**32)")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= TOP_LOGPROBS):
            raise SamplingError(f"logprobs={shown(self.logprobs)} must be an int in [0, {TOP_LOGPROBS}]")
        if not all(isinstance(x, str) and x for x in self.stop):
            raise SamplingError(f"stop={shown(self.stop)} must hold non-empty strings")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2 <= v <= 2:
                raise SamplingError(f"{name}={shown(v)} must be a number in [-2, 2]")
        r = self.repetition_penalty
        low, high = MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not low <= r <= high:
            raise SamplingError(f"repetition_penalty={shown(r)} must be a number in [{low}, {high}] (1 is off)")
        bias = self.logit_bias
        ok = isinstance(bias, tuple) and len(bias) <= MAX_LOGIT_BIAS and all(
            isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], int) and not isinstance(e[0], bool)
            and 0 <= e[0] < vocab_size and isinstance(e[1], (int, float)) and not isinstance(e[1], bool)
            and -100 <= e[1] <= 100 for e in bias)
        if not ok or len({e[0] for e in bias}) != len(bias):
            raise SamplingError(f"logit_bias={shown(bias)} must be at most {MAX_LOGIT_BIAS} (token id in [0, "
                                f"{vocab_size}), value in [-100, 100]) pairs, each id once")
        return self

    def bias(self, counts: dict[int, int]) -> dict[int, float]:
        """What this request adds to the logits at a step, given how often each token occurs in its
        completion so far: {token id: value}, empty for none."""
        out = dict(self.logit_bias)
        if self.presence_penalty or self.frequency_penalty:
            for t, c in counts.items():
                out[t] = out.get(t, 0.0) - self.presence_penalty - self.frequency_penalty * c
        return out


@dataclasses.dataclass(frozen=True)
class Event:
    """What the engine tells a request's sink, from the engine's thread.

    kind "token": `text` (possibly empty: held back for a stop string, or an incomplete UTF-8 character)
    for `token`, with `logprob` and `top` ([(token id, logprob)]) when asked. kind "done": `finish_reason`
    ("stop" or "length") and the counts. kind "error": `message` (the request failed; the engine goes on).
    """

    kind: str
    text: str = ""
    token: int = -1
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    message: str = ""


class Request:
    """A submitted request: `cancel()` it from any thread; its events go to `sink`."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: RequestParams, sink: Callable[[Event], None], tokenizer):
        self.id = next(Request._ids)
        self.prompt, self.params, self.sink = prompt, params, sink
        self.seed = secrets.randbits(32) if params.seed is None else params.seed
        self.text = _TextCollector(tokenizer, 1, params.stop)
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens prefilled so far
        self.generated = 0  # tokens sampled so far
        self.last = -1  # the last sampled token, fed at the next decode step
        self.counts: collections.Counter[int] = collections.Counter()  # the completion's tokens (penalties)
        self.recent = collections.deque(prompt[-PENALTY_LAST_N:], maxlen=PENALTY_LAST_N)  # (repetition_penalty)
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()


@functools.partial(jax.jit, static_argnames=("config", "policy", "impl", "pipeline", "kv_len"),
                   donate_argnames=("cache",))
def _decode_group(params, cache: KVCache, token, pos, *, config, policy, impl, pipeline=None, kv_len: int):
    """One decode step of a group's first R rows (R <= G, the cache's rows): token [R] at positions pos [R]
    (all < kv_len) -> (logits [R, V] f32, their greedy tokens [R] int32, whether each row's logits are
    finite [R], the cache). Attention reads the cache's first kv_len positions (a bucket: few compilations).
    The greedy tokens come with the logits so that an all-greedy step needs no second dispatch."""
    logits, cache = forward(config, params, token[:, None], pos[:, None], cache, policy=policy,
                            last=jnp.zeros(token.shape, jnp.int32), kv_len=kv_len, layer_stack=_layer_stack(pipeline),
                            impl=impl)
    logits = logits.astype(jnp.float32)
    return logits, first_argmax(logits), jnp.all(jnp.isfinite(logits), axis=-1), cache


@functools.partial(jax.jit, static_argnames=("config", "policy", "impl", "pipeline"), donate_argnames=("cache",))
def _prefill_chunk(params, cache: KVCache, tokens, start, last, *, config, policy, impl, pipeline=None):
    """Prompt tokens [B, C] at positions start + [0, C) into a cache that holds the positions before
    them; the logits [B, V] of each row's position `last` [B]."""
    positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    logits, cache = forward(config, params, tokens, positions, cache, policy=policy, last=last,
                            layer_stack=_layer_stack(pipeline), impl=impl)
    return logits.astype(jnp.float32), cache


@functools.partial(jax.jit, donate_argnames=("cache",))
def _insert(cache: KVCache, scratch: KVCache, row):
    """The scratch cache's one sequence [L, 1, S, ...] into row `row` of a group's cache."""
    put = lambda c, s: jax.lax.dynamic_update_slice_in_dim(c, s[:, :1], row, axis=1)  # noqa: E731
    return KVCache(put(cache.k, scratch.k), put(cache.v, scratch.v))


def _row_counts(model: Model, cache: KVCache) -> tuple[int, ...]:
    """The row counts a group's decode step is compiled for (the last: the group's, `cache`'s rows): a step
    runs the fewest that hold the group's highest live row, so one client costs one row's compute, not a
    group's. Only where a row's arithmetic does not depend on how many rows share the step (the native CPU
    matmul, up to `native.MAX_ROWS` rows) and the decode attention reads the first rows of a larger cache in
    place; elsewhere the group's rows alone."""
    group = cache.k.shape[1]
    decoder = linear.decode_attention(model.impl)
    if model.impl != "native" or model.mesh is not None or decoder is None:
        return (group,)
    from realm_jax import native

    c = model.config
    q = jax.ShapeDtypeStruct((1, 1, c.n_heads, c.head_dim), model.policy.compute)
    if decoder(q, cache.k, cache.v, model.policy.scores) is None:
        return (group,)
    return (*(n for n in (1, 2, 4, 8) if n < group and n <= native.MAX_ROWS), group)


def _group_rows(impl: str) -> int:
    """Rows per group (per data shard on a mesh): the native CPU matmul reads and dequantizes a weight once
    per 8 rows of x (qmatmul.cc's row block, native.MAX_ROWS), so a group of 8 costs one pass over the
    weights while more rows of a busy server run as more groups. XLA's dot (the CPU's path on a mesh) takes
    another kernel for one row than for several, whose sums round differently: one row, as `generate`'s
    single prompt has. Other backends: their `max_rows` (the most rows they multiply as stored), or 8."""
    if impl == "native":
        from realm_jax import native

        return native.MAX_ROWS
    if impl == "xla":
        return 1
    return linear.BACKENDS[impl].max_rows or 8


class Engine:
    """Continuous batching over `slots` sequence slots of a loaded `Model`.

    Args:
      model: the model (`realm_jax.load`).
      slots: sequences decoded together.
      max_context: the most tokens (prompt + generated) a sequence may hold; the KV cache's length
        (default: the model's context, at most 2048: a decode step's time grows with the cache's length
        even where attention reads less of it, through the cache update).
      queue_size: requests that may wait for a slot; one more is refused (`QueueFullError`).
      prefill_chunk: prompt tokens prefilled per engine step (a multiple of 64).
      batch_invariant: a row's arithmetic independent of the other rows (module docstring).
      group: rows per group with batch_invariant (default `_group_rows`).
    """

    def __init__(self, model: Model, *, slots: int = 8, max_context: int | None = None, queue_size: int = 64,
                 prefill_chunk: int = 256, batch_invariant: bool = True, group: int | None = None):
        for name, value, low in (("slots", slots, 1), ("queue_size", queue_size, 0),
                                 ("prefill_chunk", prefill_chunk, 64)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SamplingError(f"{name}={shown(value)} must be an int >= {low}")
        if prefill_chunk % _PROMPT_BUCKET:
            raise SamplingError(f"{prefill_chunk=} must be a multiple of {_PROMPT_BUCKET}")
        context = model.config.context_length
        max_context = min(context, 2048) if max_context is None else max_context
        if isinstance(max_context, bool) or not isinstance(max_context, int) or not 2 <= max_context <= context:
            raise ContextLengthError(f"max_context={shown(max_context)} must be an int in [2, {context}] (the "
                                     f"model's context)")
        self.model, self.max_context, self.queue_size = model, max_context, queue_size
        self.prefill_chunk = prefill_chunk
        group = min(slots, group or _group_rows(model.impl)) if batch_invariant else slots
        group += -group % model.batch_multiple  # a data axis needs a row per shard
        self.group, self.n_groups = group, -(-slots // group)
        self.slots = slots
        self.batch_invariant = batch_invariant
        self._new_caches()
        self._rows = _row_counts(model, self._caches[0])
        self._static = dict(config=model.config, policy=model.policy, impl=model.impl, pipeline=model.pipeline)
        b = self.n_groups * group
        self._pos = np.zeros(b, np.int32)
        self._owner: list[Request | None] = [None] * b
        self._queue: collections.deque[Request] = collections.deque()
        self._prefilling: collections.deque[Request] = collections.deque()
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []  # (`call`)
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run

    def _new_caches(self) -> None:
        """Zero caches for every group and the prefill's scratch. A fresh jnp.zeros array is uncommitted and
        a jitted step's output committed: jit would compile the decode step once for each, so they are
        committed from the start."""
        m, length = self.model, _round_up(self.max_context, _CACHE_BUCKET)
        commit = (lambda c: c) if m.mesh is not None else (lambda c: jax.device_put(c, jax.devices()[0]))  # noqa: E731
        self._caches = [commit(m._new_cache(self.group, length)) for _ in range(self.n_groups)]
        self._scratch = commit(m._new_cache(m.batch_multiple, length))

    # --- the public side (any thread) ---------------------------------------------------------------
    def warm_up(self) -> Engine:
        """Compile the decode step at each of its row counts, before `start` (else the client whose request
        first makes a group that wide waits for a compilation). Group 0's rows get throwaway keys and values
        at position 0; a request's prefill overwrites its whole row."""
        if self._thread is not None:
            raise EngineStoppedError("warm_up runs before start")
        m = self.model
        kv_len = min(_CACHE_BUCKET, self._caches[0].length)
        with m.mesh_context():
            for n in self._rows:
                zeros = np.zeros(n, np.int32)
                *_, self._caches[0] = _decode_group(m.params, self._caches[0], zeros, zeros, kv_len=kv_len,
                                                    **self._static)
        return self

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="realm-jax-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()

    def submit(self, prompt: Sequence[int], params: RequestParams, sink: Callable[[Event], None]) -> Request:
        """Queue a token-id prompt; its events go to `sink` (called on the engine's thread: keep it short).

        Raises:
          ContextLengthError: the prompt and max_tokens do not fit in max_context.
          QueueFullError: the queue is full.
          EngineStoppedError: the engine has stopped.
        """
        prompt = self.model._check_ids(prompt)
        params = params.check(self.model.config.vocab_size)
        if len(prompt) + params.max_tokens > self.max_context:
            raise ContextLengthError(f"the prompt's {len(prompt)} tokens plus max_tokens={params.max_tokens} exceed "
                                     f"the server's context of {self.max_context} tokens")
        request = Request(prompt, params, sink, self.model.tokenizer)
        with self._lock:
            if self._stopping or self._thread is None or not self._thread.is_alive():
                raise EngineStoppedError("the engine is not running")
            free = sum(r is None for r in self._owner[: self.slots])  # the engine admits into these soon
            if len(self._queue) >= self.queue_size + free:
                # (the queue holds requests bound for free slots too: its length can pass queue_size)
                raise QueueFullError(f"the server is full ({self.slots} slots, a queue of {self.queue_size}; "
                                     f"{len(self._queue)} requests waiting): retry later")
            self._queue.append(request)
            self._lock.notify_all()
        return request

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` on the engine's thread between two steps (work on the model that must not race its
        steps, such as scoring a prompt: `Model.prompt_logprobs`); its result or exception in the future.

        Raises:
          EngineStoppedError: the engine has stopped.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._stopping or self._thread is None or not self._thread.is_alive():
                raise EngineStoppedError("the engine is not running")
            self._calls.append((fn, future))
            self._lock.notify_all()
        return future

    def stats(self) -> dict[str, Any]:
        with self._lock:
            busy = sum(r is not None for r in self._owner[: self.slots])
            return {"slots": self.slots, "busy": busy, "free": self.slots - busy, "queued": len(self._queue),
                    "queue_size": self.queue_size, "group": self.group, "batch_invariant": self.batch_invariant,
                    "max_context": self.max_context, "decode_steps": self.steps,
                    "running": self._thread is not None and self._thread.is_alive()}

    # --- the engine's thread ------------------------------------------------------------------------
    def _free_slot(self) -> int | None:
        # The lowest free slot: few clients then keep to the first group and its one forward a step.
        return next((i for i in range(self.slots) if self._owner[i] is None), None)

    def _run(self) -> None:
        while True:
            with self._lock:
                while (not self._stopping and not self._queue and not self._prefilling and not any(self._owner)
                       and not self._calls):
                    self._lock.wait()
                if self._stopping:
                    break
                self._admit()
                calls, self._calls = self._calls, []
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as e:  # noqa: BLE001 - the caller's to handle
                        future.set_exception(e)
            try:
                self._drop_cancelled()
                self._prefill_step()
                self._decode_step()
            except Exception as e:  # a device or engine failure: fail every request in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(f"{type(e).__name__}: {e}")
                self._new_caches()  # a failed step may have consumed (donated) the caches it was given
        self._fail_all("the server is shutting down")
        with self._lock:
            calls, self._calls = self._calls, []
        for _, future in calls:
            future.set_exception(EngineStoppedError("the server is shutting down"))

    def _admit(self) -> None:
        while self._queue:
            slot = self._free_slot()
            if slot is None:
                return
            request = self._queue.popleft()
            if request.cancelled.is_set():
                continue
            request.slot = slot
            self._owner[slot] = request
            self._prefilling.append(request)

    def _release(self, request: Request) -> None:
        with self._lock:
            if request.slot is not None and self._owner[request.slot] is request:
                self._owner[request.slot] = None
                self._pos[request.slot] = 0
            if request in self._prefilling:
                self._prefilling.remove(request)
            request.slot = None

    def _finish(self, request: Request, reason: str) -> None:
        self._release(request)
        tail = request.text.flush()[0]
        if tail:
            self._emit(request, Event("token", text=tail))
        self._emit(request, Event("done", finish_reason=reason, prompt_tokens=len(request.prompt),
                                  completion_tokens=request.generated))

    def _fail(self, request: Request, message: str) -> None:
        self._release(request)
        self._emit(request, Event("error", message=message))

    def _fail_all(self, message: str) -> None:
        with self._lock:
            requests = [r for r in self._owner if r is not None] + list(self._queue)
            self._queue.clear()
        for r in requests:
            self._fail(r, message)

    @staticmethod
    def _emit(request: Request, event: Event) -> None:
        try:
            request.sink(event)
        except Exception:  # a sink's failure is its request's, never the engine's
            log.exception("request %d: its sink failed", request.id)
            request.cancel()

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._owner if r is not None and r.cancelled.is_set()]:
            self._release(request)
        with self._lock:
            self._queue = collections.deque(r for r in self._queue if not r.cancelled.is_set())

    def _prefill_step(self) -> None:
        """One chunk of the oldest admitted request's prompt; after its last, its first token. A failure
        here is that request's alone."""
        if not self._prefilling:
            return
        request = self._prefilling[0]
        try:
            self._prefill(request)
        except Exception as e:
            log.exception("request %d: prefill failed", request.id)
            self._fail(request, f"the prefill failed: {type(e).__name__}: {e}")

    def _prefill(self, request: Request) -> None:
        m, n, chunk = self.model, len(request.prompt), self.prefill_chunk
        b = m.batch_multiple
        with m.mesh_context():
            if n <= chunk:  # as `generate` prefills it
                t = _prompt_length(n)
                tokens = np.zeros((b, t), np.int32)
                tokens[:, :n] = request.prompt
                logits, self._scratch = _prefill(m.params, tokens, np.full((b,), n, np.int32), self._scratch,
                                                 all_logits=False, **self._static)
                request.prefilled = n
            else:
                start = request.prefilled
                part = request.prompt[start : start + chunk]
                tokens = np.zeros((b, chunk), np.int32)
                tokens[:, : len(part)] = part
                logits, self._scratch = _prefill_chunk(m.params, self._scratch, tokens, np.int32(start),
                                                       np.full((b,), len(part) - 1, np.int32), **self._static)
                request.prefilled = start + len(part)
            if request.prefilled < n:
                return
            self._prefilling.popleft()
            slot = request.slot
            g, row = divmod(slot, self.group)
            self._caches[g] = _insert(self._caches[g], self._scratch, np.int32(row))
        self._pos[slot] = n
        self._sample([request], [0], logits)

    def _decode_step(self) -> None:
        live = [r for r in self._owner if r is not None and r.prefilled == len(r.prompt) and r.generated]
        if not live:
            return
        token = np.zeros(len(self._owner), np.int32)
        for r in live:
            token[r.slot] = r.last
        steps = []
        m = self.model
        with m.mesh_context():
            for g in sorted({r.slot // self.group for r in live}):
                members = [r for r in live if r.slot // self.group == g]
                top = max(r.slot for r in members) - g * self.group + 1
                n = next(c for c in self._rows if c >= top)
                rows = slice(g * self.group, g * self.group + n)
                # A copy: on CPU a jitted call may read a numpy argument in place, after the += below.
                pos = self._pos[rows].copy()
                kv_len = min(_round_up(int(pos.max()) + 1, _CACHE_BUCKET), self._caches[g].length)
                *out, self._caches[g] = _decode_group(m.params, self._caches[g], token[rows], pos, kv_len=kv_len,
                                                      **self._static)
                steps.append((members, [r.slot - g * self.group for r in members], out))
        for r in live:
            self._pos[r.slot] += 1
        self.steps += 1
        for members, rows, (logits, greedy, finite) in steps:
            self._sample(members, rows, logits, (greedy, finite))

    def _sample(self, requests: list[Request], rows: list[int], logits, greedy=None) -> None:
        """Sample each request's next token from its row of logits [R, V]; stream it; finish or fail it.
        greedy: the step's (greedy tokens [R], finite [R]), enough when no request samples or asks for
        log-probabilities."""
        ps = [r.params for r in requests]
        top_n = min(TOP_LOGPROBS, logits.shape[-1]) if any(p.logprobs is not None for p in ps) else 0
        sampled = any(p.temperature > 0 for p in ps)
        biases = [r.params.bias(r.counts) for r in requests]
        repeats = any(p.repetition_penalty != 1 for p in ps)
        if greedy is not None and not sampled and not top_n and not any(biases) and not repeats:
            out = jax.device_get(greedy)
        else:
            # Padded to the group's rows: one compiled sampler per setting whatever the step's rows. The
            # other rows (free slots, padding) are sampled greedily and thrown away.
            b = self.group
            if logits.shape[0] < b:
                logits = jnp.pad(logits, ((0, b - logits.shape[0]), (0, 0)))
            settings = np.zeros((5, b))
            settings[2] = 1.0  # top_p off
            for i, r in zip(rows, requests):
                settings[:, i] = (r.params.temperature, r.params.top_k, r.params.top_p, r.seed, r.generated)
            t, k, p, seed, count = settings
            bias = _bias_arrays(biases, rows, b) if any(biases) else (None, None)
            recent, penalty = None, None
            if repeats:
                recent, penalty = np.full((b, PENALTY_LAST_N), -1, np.int32), np.ones(b, np.float32)
                for i, r in zip(rows, requests):
                    recent[i, : len(r.recent)] = r.recent
                    penalty[i] = r.params.repetition_penalty
            out = jax.device_get(sample_rows(logits, t.astype(np.float32), k.astype(np.int32), p.astype(np.float32),
                                             seed.astype(np.uint32), count.astype(np.int32), *bias, recent, penalty,
                                             sampled=sampled, top_n=top_n))
        for i, r in zip(rows, requests):
            try:
                self._advance(r, out, i)
            except Exception as e:  # this request's text or sink: it fails alone
                log.exception("request %d failed", r.id)
                self._fail(r, f"{type(e).__name__}: {e}")

    def _advance(self, r: Request, out, i: int) -> None:
        """Row i of `sample_rows`' output `out` is request r's next token: stream it; finish or fail r."""
        tokens, finite = out[0], out[1]
        if not finite[i]:
            self._fail(r, f"{self.model.path.name}: the logits of new token {r.generated + 1} hold NaN or "
                          f"infinite values (the file's weights or the precision policy {self.model.policy})")
            return
        tok = int(tokens[i])
        r.last = tok
        r.generated += 1
        r.counts[tok] += 1
        r.recent.append(tok)
        piece = r.text.add(np.array([[tok]]))[0]
        stop_token = tok in self.model.tokenizer.stop_ids
        if stop_token:
            r.generated -= 1  # the end-of-generation token is not part of the completion
            if piece:  # text held back for a stop string that did not come
                self._emit(r, Event("token", text=piece))
        elif r.params.logprobs is not None:
            k = r.params.logprobs
            top = tuple((int(t), float(v)) for t, v in zip(out[4][i][:k], out[3][i][:k]))
            self._emit(r, Event("token", text=piece, token=tok, logprob=float(out[2][i]), top=top))
        else:
            self._emit(r, Event("token", text=piece, token=tok))
        if r.text.stopped[0]:
            self._finish(r, "stop")
        elif r.generated >= r.params.max_tokens:
            self._finish(r, "length")
        elif r.cancelled.is_set():
            self._release(r)


def _bias_arrays(biases: list[dict[int, float]], rows: list[int], b: int) -> tuple[np.ndarray, np.ndarray]:
    """Each request's {token id: value} at its row of [b, L] (ids int32, values f32; L a power of two of at
    least _BIAS_BUCKET), other places id 0 with 0."""
    width = max(_BIAS_BUCKET, 1 << (max(map(len, biases)) - 1).bit_length())
    ids, values = np.zeros((b, width), np.int32), np.zeros((b, width), np.float32)
    for i, bias in zip(rows, biases):
        ids[i, : len(bias)] = list(bias)
        values[i, : len(bias)] = list(bias.values())
    return ids, values


def complete(engine: Engine, prompt: Sequence[int], params: RequestParams, timeout: float = 600.0) -> dict[str, Any]:
    """Submit a token-id prompt and wait for it: {"text", "tokens", "finish_reason", "logprobs"} (a blocking
    convenience for scripts and tests; the server streams events instead)."""
    done = threading.Event()
    events: list[Event] = []

    def sink(event: Event) -> None:
        events.append(event)
        if event.kind != "token":
            done.set()

    request = engine.submit(prompt, params, sink)
    if not done.wait(timeout):
        request.cancel()
        raise TimeoutError(f"request {request.id} did not finish in {timeout} s")
    if events[-1].kind == "error":
        raise RealmError(events[-1].message)
    tokens = [e.token for e in events if e.kind == "token" and e.token >= 0]
    return {"text": "".join(e.text for e in events), "tokens": tokens, "finish_reason": events[-1].finish_reason,
            "logprobs": [e.logprob for e in events if e.kind == "token" and e.token >= 0]}
