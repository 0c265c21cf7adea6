"""Chat templates rendered under a budget.

A chat template is a Jinja program from a model file (or from the user). It renders in Jinja's immutable
sandbox, which blocks attribute escapes, inside a worker process of its own (`_template_worker.py`, started
at the first render and reused): there the address space is capped at the worker's own plus
`TemplateBudget.memory_bytes` while it renders, so no filter, method, operator or loop can build a value
larger than that; the output is cut off at `max_chars`; and a render still running after `seconds` is
ended by killing the worker. Whatever goes wrong ends in one error naming the template's source:
`MetadataError` (it does not compile, breaks the sandbox's rules or fails), `TemplateBudgetError` (over
budget) or `ChatTemplateError` (the template's own raise_exception rejected the messages).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import pathlib
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from realm_jax.errors import ChatTemplateError, MetadataError, TemplateBudgetError, TextInputError
from realm_jax.inputs import check_text

__all__ = ["DEFAULT_BUDGET", "TemplateBudget", "render"]

_WORKER = pathlib.Path(__file__).with_name("_template_worker.py")
_START_S = 60.0  # a fresh interpreter importing Jinja: ~0.2 s, far more on a loaded machine


@dataclasses.dataclass(frozen=True)
class TemplateBudget:
    """The limits of one render.

    Attributes:
      max_chars: the longest output, in characters (real chat prompts are well under a million).
      memory_bytes: the memory the render may take beyond the worker's own: bounds every intermediate
        string, list or number.
      seconds: wall-clock time of the render.
    """

    max_chars: int = 1 << 23
    memory_bytes: int = 256 << 20
    seconds: float = 5.0


DEFAULT_BUDGET = TemplateBudget()


def render(template: str, what: str, context: dict[str, Any], budget: TemplateBudget = DEFAULT_BUDGET) -> str:
    """Render `template` with `context` in the sandbox, under `budget`.

    Args:
      template: the Jinja source.
      what: what error messages call it ("model.gguf: tokenizer.chat_template", "--chat-template t.jinja").
      context: the template's variables (messages, add_generation_prompt, bos_token, ...); plain JSON values.
      budget: the limits.

    Returns:
      The rendered text, valid Unicode.

    Raises:
      MetadataError: the template does not compile, breaks the sandbox's rules, fails while rendering or
        writes a lone surrogate (text no encoder takes).
      TemplateBudgetError: it needs more output, memory or time than `budget` allows.
      ChatTemplateError: its raise_exception rejected the messages.
      TextInputError: the context is larger than the output budget.
    """
    try:
        request = json.dumps({"template": template, "context": context, "max_chars": budget.max_chars,
                              "memory_bytes": budget.memory_bytes})
    except (TypeError, ValueError, RecursionError) as e:  # not JSON, a cycle, or nested past the stack
        raise ChatTemplateError(f"{what}: the messages hold a value that is not plain JSON data: "
                                f"{type(e).__name__}: {e}") from None
    size = _text_size(context)
    if size > budget.max_chars:
        raise TextInputError(f"the messages for {what} hold {size} characters, more than its output budget of "
                             f"{budget.max_chars}")
    reply = _POOL.ask(request.encode() + b"\n", budget, what)
    if "text" in reply:
        try:  # here, where the template can be named: later the text would be blamed on the prompt
            return check_text(reply["text"], f"{what}'s output")
        except TextInputError as e:
            raise MetadataError(str(e)) from None
    kind, message = reply["error"], reply["message"]
    if kind == "raised":
        raise ChatTemplateError(f"{what}: the chat template rejects these messages: {message}")
    if kind == "compile":
        raise MetadataError(f"{what} does not compile: {message}")
    if kind == "sandbox":
        raise MetadataError(f"{what} breaks the sandbox's rules: {message}")
    if kind == "output":
        raise TemplateBudgetError(f"{what} exceeds the sandbox's output budget: {message}")
    if kind == "memory":
        raise TemplateBudgetError(f"{what} exceeds the sandbox's memory budget of {budget.memory_bytes >> 20} MiB: "
                                  f"{message}")
    raise MetadataError(f"{what} fails to render: {message}")


def _text_size(value: Any) -> int:
    """Characters of all the strings in a JSON value (one without cycles: json.dumps took it)."""
    total, stack = 0, [value]
    while stack:  # not recursive: nesting as deep as json.dumps allows would overflow a recursion
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            stack += [*v.keys(), *v.values()]
        elif isinstance(v, (list, tuple)):
            stack += v
    return total


class _Worker:
    """One worker process and the pipe to it."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-I", str(_WORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.buffer = bytearray()
        self.overran = False
        if self.read(time.monotonic() + _START_S, 1 << 10) != {"ready": True}:
            self.close()
            raise MetadataError(f"the chat-template worker ({sys.executable} {_WORKER}) did not start")

    def read(self, deadline: float, limit: int) -> dict | None:
        """The next reply, or None when the worker died, timed out or overran `limit` bytes (`overran`)."""
        fd = self.proc.stdout.fileno()
        end = self.buffer.find(b"\n")
        while end < 0:  # a reply can be ~100 MB: the buffer grows in place and only new bytes are searched
            if len(self.buffer) > limit:
                self.overran = True
                return None
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            end = chunk.find(b"\n")
            if end >= 0:
                end += len(self.buffer)
            self.buffer += chunk
        line = self.buffer[:end]
        del self.buffer[:end + 1]
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            stream.close()


def _describe(code: int) -> str:
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


class _Pool:
    """The worker of this process, started at the first render; one render at a time."""

    def __init__(self):
        self.lock = threading.Lock()
        self.worker: _Worker | None = None

    def ask(self, request: bytes, budget: TemplateBudget, what: str) -> dict:
        with self.lock:
            if self.worker is None or self.worker.proc.poll() is not None:
                self.worker = _Worker()
            worker = self.worker
            start = time.monotonic()
            try:
                worker.proc.stdin.write(request)
                worker.proc.stdin.flush()
            except BrokenPipeError:
                reply = None
            else:
                reply = worker.read(start + budget.seconds, 12 * budget.max_chars + (1 << 16))
            if reply is not None and reply.get("error") != "memory":
                return reply
            # Timed out, died, overran or ran out of its memory budget: a fresh worker serves the next render.
            self.worker = None
            worker.close()
            if reply is not None:
                return reply
            if worker.overran:  # the worker cuts its output at max_chars: a longer reply is not one it sent whole
                raise MetadataError(f"{what} fails to render: the sandbox's worker sent more than its output budget")
            if time.monotonic() - start >= budget.seconds:
                raise TemplateBudgetError(f"{what} exceeds the sandbox's time budget: still rendering after "
                                          f"{budget.seconds:g} s (stopped)")
            cause = _describe(worker.proc.returncode)
            raise MetadataError(f"{what} fails to render: the sandbox's worker died ({cause})")

    def close(self) -> None:
        with self.lock:
            if self.worker is not None:
                self.worker.close()
                self.worker = None


_POOL = _Pool()
atexit.register(_POOL.close)
