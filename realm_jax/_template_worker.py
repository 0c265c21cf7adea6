"""The process that renders chat templates, started and fed by `realm_jax.chat_template`; run as a script
(``python -I _template_worker.py``), it imports only the standard library and Jinja.

A template comes from a model file (or a user), so it runs in Jinja's immutable sandbox (no attribute
escapes, no mutation of its arguments) and, being Turing-complete, in a process of its own: before each
render the address space is capped at what the worker uses plus the request's memory budget, so any
filter, method or operator that builds a large value (``center``, ``format``, ``~`` doubling, ``join``,
``tojson(indent=...)``, ``lipsum``, nested loops...) fails here with a MemoryError instead of taking the
caller's memory, and the caller kills the worker when the render outlives its time budget.

Protocol: one JSON object per line each way. Request ``{"template", "context", "max_chars",
"memory_bytes"}``; reply ``{"text"}`` or ``{"error": kind, "message"}`` with kind one of "compile",
"sandbox", "raised", "render", "output", "memory". After a "memory" reply the worker exits.
"""

from __future__ import annotations

import datetime
import json
import sys

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

try:
    import resource
except ImportError:  # not a Unix: no memory cap, the time budget still holds
    resource = None

_MAX_REPEAT = 1 << 20  # the longest string or list `*` may build: refused before it is allocated
_MAX_EXPONENT = 1024
_CACHED = 8  # compiled templates kept (a chat renders the same one every turn)


class _TemplateRaised(Exception):
    """The template called raise_exception (it rejects the messages)."""


class _Sandbox(ImmutableSandboxedEnvironment):
    # The memory cap bounds everything; these two give a clearer message without allocating first.
    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, k in ((left, right), (right, left)):
                if isinstance(seq, str | bytes | list | tuple) and isinstance(k, int) and len(seq) * k > _MAX_REPEAT:
                    raise SecurityError(f"repetition to {len(seq) * k} items exceeds {_MAX_REPEAT}")
        if operator == "**" and isinstance(right, int) and abs(right) > _MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is too large")
        return super().call_binop(context, operator, left, right)

    def unsafe_undefined(self, obj, attribute):
        # The stock sandbox returns an Undefined that renders as "": refuse loudly instead.
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")


class _GenerationTag(jinja2.ext.Extension):
    # Hugging Face's {% generation %} marks assistant text for training masks; rendering ignores it.
    tags = {"generation"}

    def parse(self, parser):
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def sandbox() -> ImmutableSandboxedEnvironment:
    """Jinja's immutable sandbox set up as Hugging Face and llama.cpp render chat templates."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def _cap_memory(budget: int) -> None:
    """Cap the address space at what this process maps now plus `budget` bytes."""
    if resource is None:
        return
    try:
        current = _address_space()
    except OSError:  # no /proc: leave the cap as it is
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = current + budget
    resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _uncap_memory() -> None:
    if resource is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def _render(env, compiled: dict, request: dict) -> dict:
    source = request["template"]
    template = compiled.get(source)
    if template is None:
        try:
            template = env.from_string(source)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001
            # Deeply nested syntax overflows the parser or Python's compiler (RecursionError, a SyntaxError
            # or ValueError from compile()): whatever it is, the template does not compile.
            return {"error": "compile", "message": f"{type(e).__name__}: {e}"[:2000]}
        if len(compiled) >= _CACHED:
            compiled.pop(next(iter(compiled)))
        compiled[source] = template
    max_chars, pieces, total = request["max_chars"], [], 0
    try:
        for piece in template.generate(**request["context"]):
            total += len(piece)
            if total > max_chars:
                return {"error": "output", "message": f"the output exceeds {max_chars} characters"}
            pieces.append(piece)
        return {"text": "".join(pieces)}
    except SecurityError as e:
        return {"error": "sandbox", "message": str(e)[:2000]}
    except _TemplateRaised as e:
        return {"error": "raised", "message": str(e)[:2000]}
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the template does wrong is the template's error
        return {"error": "render", "message": f"{type(e).__name__}: {e}"[:2000]}


def main() -> None:
    env, compiled = sandbox(), {}
    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        _cap_memory(request["memory_bytes"])
        try:
            text = json.dumps(_render(env, compiled, request))  # ASCII: lone surrogates survive the pipe
        except MemoryError:
            text = None
        _uncap_memory()
        if text is None:
            # Whatever was half-built is gone with the frame; report, then leave to a fresh worker.
            reply = {"error": "memory", "message": "a string, list or number it builds does not fit"}
            out.write(json.dumps(reply) + "\n")
            out.flush()
            return
        out.write(text + "\n")
        out.flush()


if __name__ == "__main__":
    main()
