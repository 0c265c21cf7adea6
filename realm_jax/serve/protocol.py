"""The OpenAI request bodies the server takes, checked field by field.

Known fields with a wrong type or value are an `ApiError` (HTTP 400, OpenAI's error JSON, naming the
field). A field that would change the answer in a way realm-jax does not implement (tools, a JSON
response_format, best_of, suffix, audio) is a 400 too unless it asks for the default:
answering as if it had been honoured would be a silent wrong answer. Other fields (user, metadata,
store, parallel_tool_calls, ...) are ignored, as OpenAI-compatible servers do. Text goes through
`realm_jax.inputs.check_text` like every other input.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from realm_jax.inputs import check_text, shown
from realm_jax.serve.engine import MAX_LOGIT_BIAS, MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY
from realm_jax.serve.sampling import TOP_LOGPROBS

__all__ = ["ApiError", "Body", "parse_body"]

MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_CHOICES = 64  # choices a request may ask for: n times the prompts (each takes a slot or a queue place)
COMPLETION_LOGPROBS = 5  # the most `logprobs` a completion may ask for (OpenAI's limit; chat: TOP_LOGPROBS)


class ApiError(Exception):
    """An OpenAI-style error: HTTP `status`, error `type`, the `param` at fault and a `code`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Body:
    """A checked request: `prompts` (completions: texts or token ids, each answered n times) or `messages`
    (chat, answered n times)."""

    prompts: list[str | list[int]] | None
    messages: list[dict[str, str]] | None
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None  # top log-probabilities a token (None: no log-probabilities)
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    echo: bool = False  # completions: the prompt before the completion (its logprobs too, the first None)
    n: int = 1  # choices a prompt (each its own sequence; seeded: seed + j for the j-th)


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


def _number(body: dict, key: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    # an int of any size compares with the bounds exactly (math.isfinite of one past 1e308 overflows)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise _bad(key, f"must be a number, got {shown(v)}")
    if v < low or v > high or (low_open and v == low):
        raise _bad(key, f"{shown(v)} must be in {'(' if low_open else '['}{low}, {high}]")
    return float(v)


def _int(body: dict, key: str, low: int, high: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(key, f"must be an integer, got {shown(v)}")
    if not low <= v <= high:
        raise _bad(key, f"{shown(v)} must be in [{low}, {high}]")
    return v


def _text(value: Any, param: str) -> str:
    try:
        return check_text(value, param)
    except Exception as e:  # TextInputError: not a str, or not valid Unicode
        raise _bad(param, str(e)) from None


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _bad("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", f"must be an object, got {shown(m)}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise _bad(f"messages[{i}].role", f"must be a non-empty string, got {shown(role)}")
        if content is None:
            content = ""
        elif isinstance(content, list):  # content parts: only text parts are understood
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"messages[{i}].content[{j}]", 'must be {"type": "text", "text": str}: realm-jax '
                               "serves text models")
                parts.append(part["text"])
            content = "".join(parts)
        out.append({"role": _text(role, f"messages[{i}].role"), "content": _text(content, f"messages[{i}].content")})
    return out


def _logit_bias(value: Any, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: {"token id": value in [-100, 100]}."""
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise _bad("logit_bias", f"must be an object of at most {MAX_LOGIT_BIAS} token ids, got {shown(value)}")
    out = []
    for key, v in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 12 and int(key) < vocab_size):
            raise _bad("logit_bias", f"key {shown(key)} must be a token id in [0, {vocab_size})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise _bad("logit_bias", f"the value of {shown(key)}, {shown(v)}, must be a number in [-100, 100]")
        out.append((int(key), float(v)))
    if len({t for t, _ in out}) != len(out):  # "7" and "007"
        raise _bad("logit_bias", "names a token id twice")
    return tuple(out)


def _repetition_penalty(body: dict) -> float:
    """llama.cpp's repetition penalty, by vLLM's name or llama.cpp server's ("repeat_penalty"), in
    [MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY]."""
    values = {key: _number(body, key, 1.0, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
              for key in ("repetition_penalty", "repeat_penalty") if body.get(key) is not None}
    if len(set(values.values())) > 1:
        raise _bad("repeat_penalty", "and repetition_penalty differ: they are the same setting")
    return next(iter(values.values()), 1.0)


def _unsupported(body: dict) -> None:
    """A 400 for each field that asks for something realm-jax does not do (its default values pass)."""
    default = {"tools": lambda v: v in (None, []), "functions": lambda v: v in (None, []),
               "tool_choice": lambda v: v in (None, "none", "auto"),
               "function_call": lambda v: v in (None, "none", "auto"),
               "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
               "best_of": lambda v: v is None or (v == 1 and not isinstance(v, bool)),
               "suffix": lambda v: v in (None, ""), "audio": lambda v: v is None,
               "modalities": lambda v: v in (None, ["text"])}
    for key, ok in default.items():
        if key in body and not ok(body[key]):
            raise _bad(key, f"{shown(body[key])} is not served: realm-jax answers in plain text, without tool "
                       "calls, JSON modes, audio, a suffix or best_of")


def _ids(value: list, vocab_size: int, param: str) -> list[int]:
    bad = [t for t in value if not 0 <= t < vocab_size]
    if bad:
        raise _bad(param, f"token ids {shown(bad[:5])} are outside the vocabulary [0, {vocab_size})")
    return value


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def _prompts(value: Any, vocab_size: int, most: int) -> list[str | list[int]]:
    """A completion's prompts: a string, a list of token ids, or a non-empty list of either (at most `most`)."""
    if isinstance(value, str) or _is_ids(value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _bad("prompt", f"must be a string, a non-empty list of token ids or a list of those, got {shown(value)}")
    if len(value) > most:
        raise _bad("prompt", f"{len(value)} prompts: at most {most} at this n (n times the prompts: at most "
                   f"{MAX_CHOICES} choices)")
    out = []
    for i, v in enumerate(value):
        where = "prompt" if len(value) == 1 else f"prompt[{i}]"
        if isinstance(v, str):
            out.append(_text(v, where))
        elif _is_ids(v):
            out.append(_ids(v, vocab_size, where))
        else:
            raise _bad(where, f"must be a string or a non-empty list of token ids, got {shown(v)}")
    return out


def parse_body(raw: bytes, *, chat: bool, vocab_size: int) -> Body:
    """The checked fields of a /v1/completions (`chat` False) or /v1/chat/completions body."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # malformed JSON, bad UTF-8, nesting past the stack
        raise ApiError(400, f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", f"must be a string, got {shown(model)}")
    n = _int(body, "n", 1, MAX_CHOICES) or 1
    for key in ("stream", "echo"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise _bad(key, f"must be a boolean, got {shown(body[key])}")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict)
                                or not isinstance(options.get("include_usage", False), bool)):
        raise _bad("stream_options", f'must be {{"include_usage": bool}}, got {shown(options)}')
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", f"must be a non-empty string or a list of at most {MAX_STOP}, got {shown(body.get('stop'))}")
    stop = tuple(_text(s, f"stop[{i}]") for i, s in enumerate(stop))
    echo = bool(body.get("echo")) and not chat  # (chat has no echo: ignored there)
    # max_tokens 0 scores an echoed prompt without generating
    max_tokens = _int(body, "max_completion_tokens" if chat and "max_tokens" not in body else "max_tokens",
                      0 if echo else 1, 2**31)
    _unsupported(body)
    if chat:  # "logprobs": true, and "top_logprobs": how many besides the chosen token's
        wanted = body.get("logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise _bad("logprobs", f"must be a boolean, got {shown(wanted)}")
        top = _int(body, "top_logprobs", 0, TOP_LOGPROBS)
        if top and not wanted:
            raise _bad("top_logprobs", "needs logprobs: true")
        logprobs = (top or 0) if wanted else None
    else:
        logprobs = _int(body, "logprobs", 0, COMPLETION_LOGPROBS)
    return Body(
        prompts=None if chat else _prompts(body.get("prompt"), vocab_size, MAX_CHOICES // n),
        n=n,
        messages=_messages(body.get("messages")) if chat else None,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_int(body, "top_k", 0, vocab_size) or 0,
        seed=None if body.get("seed") is None else _int(body, "seed", -(2**63), 2**64 - 1) % 2**32,
        stop=stop,
        stream=bool(body.get("stream", False)),
        include_usage=bool((options or {}).get("include_usage", False)),
        logprobs=logprobs,
        logit_bias=_logit_bias(body.get("logit_bias"), vocab_size),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_repetition_penalty(body),
        echo=echo,
    )
