"""The OpenAI-compatible HTTP API over an `Engine` (Starlette on uvicorn: the `serve` extra).

POST /v1/completions (a prompt or a list of them; echo) and /v1/chat/completions, n choices a prompt, each
an engine request of its own (streamed as server-sent events in OpenAI's chunk format, ending with `data:
[DONE]`, or not; log-probabilities in each endpoint's own format), GET /v1/models and /v1/models/{id}, GET
/health (slots busy and free, the queue). Every error is OpenAI's JSON error object with a 4xx status for
the client's mistakes (malformed JSON, wrong types, a prompt over the context, a field asking for what is
not served: 400; a missing or wrong API key: 401; an unknown model or route: 404; a body over the limit:
413; the queue full: 429) and 503 while the engine is down; a failure inside one request fails that
request alone. A client that disconnects cancels its sequences and frees their slots.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from realm_jax.errors import (ChatTemplateError, ContextLengthError, MetadataError, SamplingError,
                              TextInputError, TokenIdError)
from realm_jax.inputs import shown
from realm_jax.serve.engine import Engine, EngineStoppedError, Event, QueueFullError, RequestParams
from realm_jax.serve.protocol import ApiError, Body, parse_body

__all__ = ["create_app"]

log = logging.getLogger("realm_jax.serve")

_CLIENT_ERRORS = (ChatTemplateError, ContextLengthError, MetadataError, SamplingError, TextInputError, TokenIdError)


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _api_error(e: Exception) -> ApiError:
    """The ApiError of an exception raised while a request is checked, tokenized or queued."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), type="rate_limit_error", code="queue_full")
    if isinstance(e, EngineStoppedError):
        return ApiError(503, str(e), type="server_error", code="engine_stopped")
    if isinstance(e, ContextLengthError):
        return ApiError(400, str(e), code="context_length_exceeded")
    if isinstance(e, _CLIENT_ERRORS):
        return ApiError(400, str(e))
    log.exception("request failed")
    return ApiError(500, f"internal error: {type(e).__name__}", type="server_error")


class _Api:
    def __init__(self, engine: Engine, name: str, *, api_key: str | None, max_body_bytes: int,
                 chat_template: str | None, template_source: str):
        self.engine, self.model, self.name = engine, engine.model, name
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        self.chat_template, self.template_source = chat_template, template_source
        self.created = int(time.time())

    # --- plumbing -----------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY", type="authentication_error",
                           code="invalid_api_key")

    async def _read(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            raise ApiError(413, f"the request body is larger than {self.max_body_bytes} bytes", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ApiError(413, f"the request body is larger than {self.max_body_bytes} bytes",
                               code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def _tokenize(self, body: Body) -> list[list[int]]:
        """Each prompt's token ids (in a worker thread: tokenizing and the template's sandbox take time)."""
        tok = self.model.tokenizer
        if body.messages is None:
            return [p if isinstance(p, list) else self._encode(p, None) for p in body.prompts]
        text = tok.apply_chat_template(body.messages, add_generation_prompt=True, template=self.chat_template,
                                       template_source=self.template_source)
        bos = tok.bos_id  # a template that writes its BOS must not get a second one
        return [self._encode(text, False if bos is not None and text.startswith(tok.token_text(bos)) else None)]

    def _encode(self, text: str, add_bos: bool | None) -> list[int]:
        if len(text) > self.model.max_prompt_chars:  # before tokenizing: a long text takes long to tokenize
            raise ContextLengthError(f"the prompt has {len(text)} characters: more tokens than the server's context "
                                     f"of {self.engine.max_context}")
        return self.model.tokenizer.encode(text, add_bos=add_bos)

    def _params(self, body: Body, n_prompt: int) -> RequestParams:
        room = self.engine.max_context - n_prompt
        if room < 1:
            raise ContextLengthError(f"the prompt's {n_prompt} tokens leave no room in the server's context of "
                                     f"{self.engine.max_context} tokens")
        if body.max_tokens is None:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
            max_tokens = min(room, 16) if body.messages is None else room
        else:
            max_tokens = body.max_tokens
        return RequestParams(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                             seed=body.seed, stop=body.stop, logprobs=body.logprobs, logit_bias=body.logit_bias,
                             presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                             repetition_penalty=body.repetition_penalty)

    # --- endpoints ----------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        stats = self.engine.stats()
        return JSONResponse({"status": "ok" if stats["running"] else "error", **stats},
                            status_code=200 if stats["running"] else 503)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as e:
            return _error(e)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def retrieve_model(self, request: Request) -> Response:
        try:
            self._authorize(request)
            name = request.path_params["name"]
            if name != self.name:
                raise ApiError(404, f"model {shown(name)} is not served here (this server serves {self.name!r})",
                               param="model", code="model_not_found")
        except ApiError as e:
            return _error(e)
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "realm-jax"}

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def _complete(self, request: Request, *, chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def sink(index: int) -> Callable[[Event], None]:  # called on the engine's thread
            return lambda event: loop.call_soon_threadsafe(events.put_nowait, (index, event))

        try:
            self._authorize(request)
            body = parse_body(await self._read(request), chat=chat, vocab_size=self.model.config.vocab_size)
            prompts = await run_in_threadpool(self._tokenize, body)
            choices = await self._submit(body, prompts, sink)
        except ClientDisconnect:
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - every failure becomes its request's JSON error
            return _error(_api_error(e))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        usage = functools.partial(_usage, choices, prompts)
        if body.stream:
            return StreamingResponse(self._stream(request, choices, events, rid, chat, body, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            await self._collect(request, choices, events)
        except ClientDisconnect:
            return Response(status_code=499)
        finally:  # done, failed or gone: free the slots
            for c in choices:
                c.cancel()
        failed = next((c.done for c in choices if c.done.kind == "error"), None)
        if failed is not None:
            return _error(ApiError(500, failed.message, type="server_error"))
        out = []
        for c in choices:
            text = "".join(e.text for e in c.pieces)
            if chat:
                out.append({"index": c.index, "message": {"role": "assistant", "content": text},
                            "logprobs": self._chat_logprobs(c.pieces, body), "finish_reason": c.done.finish_reason})
                continue
            logprobs = self._logprobs(c.pieces, body, at=len(c.echo[0]) if c.echo else 0)
            if c.echo:
                text = c.echo[0] + text
                logprobs = logprobs and {key: c.echo[1][key] + logprobs[key] if logprobs[key] is not None else None
                                         for key in logprobs}
            out.append({"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": c.done.finish_reason})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.name, "choices": out, "usage": usage()})

    async def _submit(self, body: Body, prompts: list[list[int]], sink) -> list[_Choice]:
        """The request's choices, n a prompt (choice i n + j: prompt i's j-th; seeded: seed + j), each
        submitted to the engine (none where max_tokens is 0), then their echoes scored. All or none: where
        one cannot be queued (or an echo fails), those already queued are cancelled."""
        engine, count = self.engine, len(prompts) * body.n
        if count > engine.slots + engine.queue_size:  # (all or none: it could never be queued)
            raise ApiError(400, f"{len(prompts)} prompt(s) times n={body.n} make {count} choices: more than this "
                           f"server's {engine.slots} slots and queue of {engine.queue_size} hold", param="n",
                           code="invalid_value")
        if not engine.stats()["running"]:
            raise EngineStoppedError("the engine is not running")
        params = [None if body.max_tokens == 0 else self._params(body, len(p)) for p in prompts]  # context first
        choices: list[_Choice] = []
        try:
            for i, (prompt, param) in enumerate(zip(prompts, params)):
                for j in range(body.n):
                    index, job = i * body.n + j, None
                    if param is not None:
                        seed = None if body.seed is None else (body.seed + j) % 2**32
                        job = engine.submit(prompt, dataclasses.replace(param, seed=seed), sink(index))
                    choices.append(_Choice(index, job, None, len(prompt)))
            if body.echo:  # scored between the engine's steps, while the choices wait or run
                for i, prompt in enumerate(prompts):
                    echo = await self._echo(body, prompt)
                    for c in choices[i * body.n: (i + 1) * body.n]:
                        c.echo = echo
        except BaseException:
            for c in choices:
                c.cancel()
            raise
        return choices

    async def _echo(self, body: Body, prompt: list[int]) -> tuple[str, dict[str, list] | None]:
        """echo: the prompt's text (its tokens detokenized, control tokens as nothing: the basis of the text
        offsets) and, with logprobs, its tokens' completions-style logprobs (the first token has none),
        scored on the engine's thread."""
        tok = self.model.tokenizer
        self.model._check_ids(prompt)  # (an empty prompt)
        if len(prompt) > self.engine.max_context:
            raise ContextLengthError(f"the prompt's {len(prompt)} tokens exceed the server's context of "
                                     f"{self.engine.max_context} tokens")
        text, offsets = tok.text_offsets(prompt)
        if body.logprobs is None:
            return text, None
        n = body.logprobs
        chosen, values, ids = await asyncio.wrap_future(self.engine.call(
            functools.partial(self.model.prompt_logprobs, prompt, n)))
        if not (np.isfinite(chosen).all() and np.isfinite(values).all()):
            raise ApiError(500, f"{self.model.path.name}: the prompt's logits hold NaN or infinite values",
                           type="server_error")
        piece = lambda t: tok.token_to_piece(t).decode("utf-8", errors="replace")  # noqa: E731
        top = [None] + [{piece(int(i)): float(v) for i, v in zip(row_ids, row)} for row_ids, row in zip(ids, values)]
        return text, {"tokens": [piece(t) for t in prompt], "token_logprobs": [None, *chosen.tolist()],
                      "top_logprobs": top if n else None, "text_offset": offsets}

    async def _collect(self, request: Request, choices: list[_Choice], events: asyncio.Queue) -> None:
        """Wait for every choice's events (its `pieces`, then `done`); a client that goes away raises
        ClientDisconnect."""
        pending = 0
        for c in choices:
            if c.job is None:  # max_tokens 0
                c.done = _nothing(c.n_prompt)
            else:
                pending += 1
        loop = asyncio.get_running_loop()
        checked = loop.time()
        while pending:
            try:
                index, event = await asyncio.wait_for(events.get(), timeout=0.5)
            except TimeoutError:
                event = None
            if loop.time() - checked >= 0.5:  # while tokens flow too: a client gone frees its slots at once
                checked = loop.time()
                if await request.is_disconnected():
                    raise ClientDisconnect() from None
            if event is None:
                continue
            c = choices[index]
            if event.kind == "token":
                c.pieces.append(event)
            else:
                c.done, pending = event, pending - 1

    def _logprobs(self, pieces: list[Event], body: Body, at: int = 0) -> dict[str, Any] | None:
        """Completions' logprobs of the tokens in `pieces`, their text offsets counted from `at`."""
        if body.logprobs is None:
            return None
        piece = lambda t: self.model.tokenizer.token_to_piece(t).decode("utf-8", errors="replace")  # noqa: E731
        tokens = [e for e in pieces if e.token >= 0]
        offsets = []
        for e in pieces:
            if e.token >= 0:
                offsets.append(at)
            at += len(e.text)
        return {"tokens": [piece(e.token) for e in tokens], "token_logprobs": [e.logprob for e in tokens],
                "top_logprobs": [{piece(t): v for t, v in e.top} for e in tokens] if body.logprobs else None,
                "text_offset": offsets}

    def _chat_logprobs(self, pieces: list[Event], body: Body) -> dict[str, Any] | None:
        """Chat's logprobs: {"content": [{token, logprob, bytes, top_logprobs}]} for the tokens in `pieces`."""
        if body.logprobs is None:
            return None
        raw = self.model.tokenizer.token_to_piece

        def entry(token: int, logprob: float) -> dict[str, Any]:
            b = raw(token)
            return {"token": b.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(b)}

        return {"content": [{**entry(e.token, e.logprob), "top_logprobs": [entry(t, v) for t, v in e.top]}
                            for e in pieces if e.token >= 0], "refusal": None}

    async def _stream(self, request: Request, choices: list[_Choice], events: asyncio.Queue, rid: str, chat: bool,
                      body: Body, usage: Callable[[], dict[str, int]]):
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        def chunk(choice: dict[str, Any], usage: dict[str, Any] | None = None) -> str:
            out = {"id": rid, "object": kind, "created": created, "model": self.name, "choices": [choice]}
            if usage is not None:
                out["usage"] = usage
            return f"data: {json.dumps(out, ensure_ascii=False)}\n\n"

        def last(c: _Choice, final: bool) -> str:  # the final chunk of the last choice to end carries the usage
            choice = {"index": c.index, "logprobs": None, "finish_reason": c.done.finish_reason,
                      **({"delta": {}} if chat else {"text": ""})}
            return chunk(choice, usage() if final else None)

        try:
            pending = sum(c.job is not None for c in choices)
            for k, c in enumerate(choices):
                if chat:
                    yield chunk({"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None})
                if c.echo:
                    yield chunk({"index": c.index, "text": c.echo[0], "logprobs": c.echo[1], "finish_reason": None})
                    c.at = len(c.echo[0])
                if c.job is None:  # max_tokens 0
                    c.done = _nothing(c.n_prompt)
                    yield last(c, not pending and k == len(choices) - 1)
            while pending:
                try:
                    index, event = await asyncio.wait_for(events.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                c = choices[index]
                if event.kind == "token":
                    if not event.text and (body.logprobs is None or event.token < 0):
                        continue
                    if chat:
                        yield chunk({"index": c.index, "delta": {"content": event.text},
                                     "logprobs": self._chat_logprobs([event], body), "finish_reason": None})
                    else:
                        yield chunk({"index": c.index, "text": event.text,
                                     "logprobs": self._logprobs([event], body, c.at), "finish_reason": None})
                        c.at += len(event.text)
                    continue
                if event.kind == "error":
                    err = ApiError(500, event.message, type="server_error").body()
                    yield f"data: {json.dumps(err)}\n\n"
                    return
                c.done, pending = event, pending - 1
                yield last(c, not pending)
            if body.include_usage:  # OpenAI's usage-only chunk
                out = {"id": rid, "object": kind, "created": created, "model": self.name, "choices": [],
                       "usage": usage()}
                yield f"data: {json.dumps(out)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # done, or the client went away (the response task is cancelled): free the slots
            for c in choices:
                c.cancel()


@dataclasses.dataclass
class _Choice:
    """One answer of a request: its engine job (None: max_tokens 0), its echo, and what has come back."""

    index: int
    job: Any
    echo: tuple[str, dict[str, list] | None] | None
    n_prompt: int
    pieces: list[Event] = dataclasses.field(default_factory=list)
    done: Event | None = None
    at: int = 0  # the text streamed so far (completions' text offsets)

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()


def _nothing(n_prompt: int) -> Event:
    """The end of a request that generates nothing (max_tokens 0 with echo)."""
    return Event("done", finish_reason="length", prompt_tokens=n_prompt)


def _usage(choices: list[_Choice], prompts: list[list[int]]) -> dict[str, int]:
    """Each prompt's tokens once (whatever its n), and every choice's completion tokens."""
    prompt = sum(map(len, prompts))
    completion = sum(c.done.completion_tokens for c in choices if c.done is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def create_app(engine: Engine, *, name: str, api_key: str | None = None, max_body_bytes: int = 4 << 20,
               chat_template: str | None = None, template_source: str = "--chat-template") -> Starlette:
    """The ASGI app serving `engine` (started by the caller) as model `name`."""
    api = _Api(engine, name, api_key=api_key, max_body_bytes=max_body_bytes, chat_template=chat_template,
               template_source=template_source)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))

    async def server_error(request: Request, exc: Exception) -> Response:
        return _error(_api_error(exc))

    routes = [Route("/health", api.health, methods=["GET"]), Route("/v1/models", api.models, methods=["GET"]),
              Route("/v1/models/{name:path}", api.retrieve_model, methods=["GET"]),
              Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/v1/chat/completions", api.chat, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
