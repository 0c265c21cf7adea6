"""Hostile input of every class, each case in a process of its own under a memory and a time limit.

Classes: chat templates that build huge values, loop or nest without end; vocabularies with huge tokens, too
many tokens or merges; headers whose counts a sparse file can claim but memory cannot hold; files that change
after they are opened; command-line options out of range (sizes, processes, devices, an empty --model,
contradicting fields); text that is not Unicode (undecodable argv bytes, stdin lines, lone surrogates);
weights whose logits are NaN. The cases are generated from a seed (`SEED`, `REALM_JAX_HOSTILE_SEED` to vary
it). Each must end in one RealmError (on the command line: one line on stderr and exit status 2) that names
what it is about, with no traceback and no signal, within the benign chat's time plus 10 s, at most 1 GiB
above the benign chat's peak RSS (the template worker within 1 GiB of its own). `tests/hostile_runner.py`
forks the cases from one interpreter that has imported realm_jax.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import select
import struct
import subprocess
import sys

import numpy as np
import pytest

import realm_jax

SEED = int(os.environ.get("REALM_JAX_HOSTILE_SEED", "16"))
GIB = 1 << 30
SLACK_S = 10.0  # a case may take this much longer than the benign chat
RUNNER = pathlib.Path(__file__).with_name("hostile_runner.py")


class _Runner:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(RUNNER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self._read(120) == {"ready": True}
        self.benign = None

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the hostile runner did not answer"
        return json.loads(self.proc.stdout.readline())

    def run(self, *, timeout_s: float, limit_bytes: int = 4 * GIB, stdin: str = "", **case) -> dict:
        request = {"stdin": stdin, "limit_bytes": limit_bytes, "timeout_s": timeout_s, **case}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout_s + 60)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The synthetic llama model with a hostile chat template, and with NaN weights; a benign template."""
    from realm_jax.reference import reference_dir

    tmp = tmp_path_factory.mktemp("hostile")
    metadata, tensors = realm_jax.read_gguf(reference_dir().parent / "synthetic" / "llama-k-q8_0.gguf")
    metadata = {k: v for k, v in metadata.items() if k != "general.architecture"}

    def write(name, meta=None, **changed):
        meta = {**metadata, **(meta or {})}
        return realm_jax.write_gguf(tmp / name, {**tensors, **changed}, arch="llama", metadata=meta)

    norm = np.full(tensors["output_norm.weight"].shape, np.nan, np.float32)
    (tmp / "own.jinja").write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>")
    return {"dir": tmp, "tensors": tensors, "metadata": metadata, "write": write,
            "evil": write("evil.gguf", {"tokenizer.chat_template": _DOUBLING}),
            "nan": write("nan.gguf", **{"output_norm.weight": realm_jax.quantize(norm, "F32")}),
            "own": tmp / "own.jinja"}


_DOUBLING = "{% set ns = namespace(s='ab') %}{% for i in range(48) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"


@pytest.fixture(scope="module")
def runner(files):
    """The runner, and the benign chat every case is measured against (the user's own template works where
    the file's does not)."""
    r = _Runner()
    r.benign = r.run(argv=["chat", "--model", str(files["evil"]), "--chat-template", str(files["own"]),
                           "--max-new-tokens", "1"], stdin="Hello\n", timeout_s=300)
    assert r.benign["status"] == 0 and r.benign["stdout"].strip(), r.benign["stderr"]
    yield r
    r.close()


def _check(runner, result, *needles, cli=True):
    """One clear error, in the limits."""
    where = f"{result['stderr'][-2000:]}"
    assert not result["timed_out"] and not result["signal"], where
    assert result["seconds"] <= runner.benign["seconds"] + SLACK_S, (result["seconds"], where)
    assert result["maxrss"] <= runner.benign["maxrss"] + GIB, (result["maxrss"], where)
    assert result["worker_maxrss"] <= GIB, result["worker_maxrss"]
    assert "Traceback" not in result["stderr"], where
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1, where
    if cli:
        assert result["status"] == 2 and lines[0].startswith("realm-jax: error: "), where
    else:
        assert result["status"] == 3, where
    for needle in needles:
        assert needle in lines[0], (needle, where)
    return lines[0]


def _api(code: str) -> str:
    """A snippet that prints a RealmError as the command line does and exits 3."""
    body = "\n".join("    " + line for line in code.strip().splitlines())
    return (f"import sys\nfrom realm_jax.errors import RealmError\ntry:\n{body}\nexcept RealmError as e:\n"
            f"    print(f'{{type(e).__name__}}: {{e}}', file=sys.stderr)\n    sys.exit(3)\n")


# --- chat templates ---------------------------------------------------------------------------------------------
# Each builds a value of about `n` characters (or items, or steps) with one construct.
_AMPLIFIERS = {
    "center": lambda n: f"{{{{ 'x' | center({n}) }}}}",
    "ljust": lambda n: f"{{{{ 'x'.ljust({n}) }}}}",
    "zfill": lambda n: f"{{{{ 'x'.zfill({n}) }}}}",
    "indent": lambda n: f"{{{{ 'a\\nb\\nc' | indent({n}) }}}}",
    "percent": lambda n: f"{{{{ '%{n}d' % 1 }}}}",
    "format_filter": lambda n: f"{{{{ '%-{n}s' | format('x') }}}}",
    "str_format": lambda n: f"{{{{ '{{:>{n}}}'.format('x') }}}}",
    "concat_doubling": lambda n: _doubling("ns.s ~ ns.s", n),
    "plus_doubling": lambda n: _doubling("ns.s + ns.s", n),
    "replace_doubling": lambda n: _doubling("ns.s | replace('a', 'aa')", n),
    "join": lambda n: f"{{{{ range(100000) | join('x' * {n // 100000}) | length }}}}",
    "tojson_indent": lambda n: f"{{{{ [[[[[[[[1]]]]]]]] | tojson(indent={n // 8}) }}}}",
    "lipsum": lambda n: f"{{{{ lipsum({n // 100}) }}}}",
    "batch_fill": lambda n: f"{{{{ [1] | batch({n}, 'x') | list | length }}}}",
    "to_bytes": lambda n: f"{{{{ (1).to_bytes({n}, 'big') | length }}}}",
    "nested_loops": lambda n: "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "branching_macro": lambda n: "{% macro f(k) %}{% if k %}{{ f(k - 1) }}{{ f(k - 1) }}{% endif %}{% endmacro %}"
                                 "{{ f(60) }}",
    "bigint_squaring": lambda n: "{% set ns = namespace(a=3) %}{% for i in range(64) %}{% set ns.a = ns.a * ns.a %}"
                                 "{% endfor %}{{ ns.a > 0 }}",
    "deep_nesting": lambda n: "{{ " + "(" * (n % 5000 + 2000) + "1" + ")" * (n % 5000 + 2000) + " }}",
    "deep_blocks": lambda n: "{% if 1 %}" * (n % 3000 + 1500) + "{% endif %}" * (n % 3000 + 1500),
}


def _doubling(step: str, n: int) -> str:
    rounds = max(int(np.log2(n)), 30)
    return (f"{{% set ns = namespace(s='ab') %}}{{% for i in range({rounds}) %}}{{% set ns.s = {step} %}}"
            "{% endfor %}{{ ns.s | length }}")


def _template_cases() -> list[tuple[str, str]]:
    rng = np.random.default_rng(SEED)
    return [(name, make(int(10 ** rng.uniform(8.5, 10.5)))) for name, make in _AMPLIFIERS.items()]


@pytest.mark.parametrize("name, template", _template_cases(), ids=[c[0] for c in _template_cases()])
def test_hostile_chat_templates(runner, name, template):
    code = _api(f"""
from realm_jax.chat_template import TemplateBudget
from realm_jax.tokenizer import Tokenizer
from test_tokenizer import tiny_gpt2
tok = Tokenizer.from_metadata(tiny_gpt2(**{{"tokenizer.chat_template": {template!r}}}), source="evil.gguf")
tok.apply_chat_template([{{"role": "user", "content": "hi"}}], budget=TemplateBudget(seconds=0.5))
""")
    line = _check(runner, runner.run(code=f"import sys; sys.path.insert(0, {str(RUNNER.parent)!r})\n" + code,
                                     timeout_s=60), "evil.gguf: tokenizer.chat_template", cli=False)
    assert line.startswith(("TemplateBudgetError", "MetadataError")), line


def test_hostile_template_in_a_model_file_on_the_command_line(runner, files):
    """The file's template is over budget: the chat names the file (the benign run, with the user's own
    template, works with the same file)."""
    result = runner.run(argv=["chat", "--model", str(files["evil"]), "--max-new-tokens", "2"], stdin="Hello\n",
                        timeout_s=120)
    _check(runner, result, "evil.gguf: tokenizer.chat_template exceeds the sandbox's memory budget")


# --- vocabularies ---------------------------------------------------------------------------------------------
def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + payload


def _strings(key: str, texts: list[str]) -> bytes:
    return _kv(key, 9, struct.pack("<IQ", 8, len(texts)) + b"".join(
        struct.pack("<Q", len(b)) + b for b in (t.encode() for t in texts)))


def _vocab_cases():
    """Token lists past each bound: a token of 1-2 MiB, 525k-560k tokens."""
    rng = np.random.default_rng(SEED + 1)
    base = [f"<0x{b:02X}>" for b in range(256)] + list("abc")
    return {
        "huge_token": (base + ["x" * int(rng.integers(1 << 20, 1 << 21))], "tokens[259]"),
        "too_many_tokens": (base + [f"t{i}" for i in range(int(rng.integers(525_000, 560_000)))], "tokens has 5"),
    }


def _nested_vocab_cases():
    """Vocabularies whose tokens split into each other without end: every string of a and b up to 16-17
    long (2^20 splits into two tokens), runs of one 4-byte character up to 600-1024 long (2^25 characters
    of splits); and a text of 20,000 characters they merge all the way."""
    rng = np.random.default_rng(SEED + 2)
    base = [f"<0x{b:02X}>" for b in range(256)] + list("abc")
    return {
        "every_ab_string": (base + ["".join(p) for k in range(2, int(rng.integers(17, 19)))
                                    for p in itertools.product("ab", repeat=k)],
                            "".join(rng.choice(list("ab"), 20_000))),
        "runs_of_a_4_byte_character": (base + ["\U0001F600" * k for k in range(1, int(rng.integers(600, 1025)))],
                                       "\U0001F600" * 20_000),
    }


@pytest.mark.parametrize("case", list(_nested_vocab_cases()))
def test_nested_vocabularies_build_and_tokenize_in_the_limits(runner, files, case):
    """The SentencePiece tokenizer holds a dict of the tokens, not their splits: such vocabularies build,
    and tokenize a text that merges all the way, within the benign case's time and memory (plus slack)."""
    tokens, text = _nested_vocab_cases()[case]
    path = files["dir"] / f"vocab-{case}.gguf"
    kvs = [_kv("tokenizer.ggml.model", 8, struct.pack("<Q", 5) + b"llama"), _strings("tokenizer.ggml.tokens", tokens)]
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))
    code = _api(f"from realm_jax.tokenizer import Tokenizer\nt = Tokenizer.from_gguf({str(path)!r})\n"
                f"assert len(t.encode({text!r}, add_bos=False)) >= 1")
    result = runner.run(code=code, timeout_s=60)
    where = result["stderr"][-2000:]
    assert result["status"] == 0 and not result["timed_out"] and not result["signal"], where
    assert result["seconds"] <= runner.benign["seconds"] + SLACK_S, (result["seconds"], where)
    assert result["maxrss"] <= runner.benign["maxrss"] + GIB, (result["maxrss"], where)


@pytest.mark.parametrize("case", list(_vocab_cases()))
def test_hostile_vocabularies(runner, files, case):
    tokens, needle = _vocab_cases()[case]
    path = files["dir"] / f"vocab-{case}.gguf"
    kvs = [_kv("tokenizer.ggml.model", 8, struct.pack("<Q", 5) + b"llama"), _strings("tokenizer.ggml.tokens", tokens)]
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))
    code = _api(f"from realm_jax.tokenizer import Tokenizer\nTokenizer.from_gguf({str(path)!r})")
    _check(runner, runner.run(code=code, timeout_s=60), f"vocab-{case}.gguf", "tokenizer.ggml", needle, cli=False)


def test_hostile_vocabulary_on_the_command_line(runner, files):
    tokens = list(files["metadata"]["tokenizer.ggml.tokens"])
    tokens[700] = "y" * (3 << 19)
    path = files["write"]("vocab.gguf", {"tokenizer.ggml.tokens": tokens})
    result = runner.run(argv=["generate", "Hi", "--model", str(path), "--max-new-tokens", "2"], timeout_s=120)
    _check(runner, result, "vocab.gguf: tokenizer.ggml.tokens[700]", "1572864 characters")


# --- headers a sparse file can claim --------------------------------------------------------------------------
def _header_cases():
    rng = np.random.default_rng(SEED + 2)
    size = int(rng.integers(2, 8)) * GIB
    scalar = int(rng.choice([0, 1, 4, 10, 12]))  # UINT8, INT8, UINT32, UINT64, FLOAT64
    width = {0: 1, 1: 1, 4: 4, 10: 8, 12: 8}[scalar]
    return {
        "numeric_array": (size, 0, _kv("a.nums", 9, struct.pack("<IQ", scalar, (size - 4096) // width)), "'a.nums'"),
        "string_array": (size, 0, _kv("a.strs", 9, struct.pack("<IQ", 8, (size - 4096) // 9)), "'a.strs'"),
        "one_string": (size, 0, _kv("a.str", 8, struct.pack("<Q", size - 4096)), "'a.str'"),
        "nested_arrays": (size, 0, _kv("a.nest", 9, struct.pack("<IQ", 9, (size - 4096) // 13)), "'a.nest'"),
        "tensor_infos": (size, (size - 4096) // 40, b"", "n_tensors="),
    }


@pytest.mark.parametrize("case", list(_header_cases()))
def test_hostile_headers(runner, files, case):
    size, n_tensors, kv, needle = _header_cases()[case]
    path = files["dir"] / f"header-{case}.gguf"
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, 1 if kv else 0) + kv)
        f.truncate(size)
    # The map of the whole file takes address space, not memory: the cap leaves room for it.
    result = runner.run(argv=["inspect", str(path)], timeout_s=120, limit_bytes=size + 4 * GIB)
    _check(runner, result, f"header-{case}.gguf", needle, "budget")


@pytest.mark.parametrize("during", [False, True])
def test_a_file_truncated_while_it_is_read(runner, files, tmp_path, during):
    """Cut between two tensors' reads, or in the middle of one (inside the read call): never a SIGBUS."""
    path = tmp_path / "shrinking.gguf"
    path.write_bytes(files["nan"].read_bytes())
    target = "gguf.os.preadv" if during else "checkpoint.repack"
    code = _api(f"""
import os
from realm_jax import checkpoint, gguf
real = {target}
calls = []
def shrink(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.truncate({str(path)!r}, 4096)
    return real(*args, **kwargs)
{target} = shrink
checkpoint.read_gguf({str(path)!r})
""")
    _check(runner, runner.run(code=code, timeout_s=60), "FileChangedError", "shrinking.gguf", cli=False)


# --- the command line ------------------------------------------------------------------------------------------
def _cli_cases():
    rng = np.random.default_rng(SEED + 3)
    big = str(int(10 ** rng.uniform(9, 15)))
    return {
        "empty_model": (["generate", "Hi", "--model", ""], "--model is empty"),
        "empty_model_bench": (["bench", "--model", " "], "--model is empty"),
        "batch_zero": (["bench", "--batch", "0"], "batch=0"),
        "batch_huge": (["bench", "--batch", big, "--prompt-tokens", "8", "--decode-tokens", "1"], "GiB"),
        "batch_past_a_float": (["bench", "--batch", big * 40], "needs at least 2**"),
        "prompt_tokens_huge": (["bench", "--prompt-tokens", big], "context"),
        "decode_tokens_huge": (["bench", "--decode-tokens", big], "context"),
        "runs_huge": (["bench", "--runs", big], "runs="),
        "max_new_tokens_huge": (["generate", "Hi", "--max-new-tokens", big], "context"),
        "top_k_huge": (["generate", "Hi", "--top-k", big], "--top-k"),
        "seed_negative": (["generate", "Hi", "--seed", "-" + big], "--seed"),
        "temperature_nan": (["generate", "Hi", "--temperature", "nan"], "temperature"),
        "policy_conflict": (["generate", "Hi", "--precision", "params=f32,compute=bf16,params=bf16"],
                            "params is given twice"),
        "processes_huge": (["launch", "--processes", big, "--", "generate", "Hi", "--mesh", f"model={big}"], "GiB"),
        "cpu_devices_huge": (["launch", "--processes", "2", "--cpu-devices", big, "--", "generate", "Hi", "--mesh",
                              "model=2"], "cpu_devices"),
        "port_out_of_range": (["launch", "--hosts", "a,b", "--port", big, "--", "generate", "Hi", "--mesh", "model=2"],
                              "--port"),
        "undecodable_prompt": (["generate", os.fsdecode(b"caf\xe9 " + bytes(rng.integers(0x80, 0x100, 3).tolist()))],
                               "PROMPT is not valid Unicode text: it holds the byte 0xe9"),
        "undecodable_stop": (["generate", "Hi", "--stop", os.fsdecode(b"\xff\xfe")], "--stop is not valid Unicode"),
        "missing_template": (["chat", "--chat-template", "/nonexistent/t.jinja"], "t.jinja"),
    }


@pytest.mark.parametrize("case", list(_cli_cases()))
def test_hostile_command_lines(runner, files, case):
    argv, needle = _cli_cases()[case]
    if argv[0] in ("bench", "generate") and "--model" not in argv:
        argv = [*argv, "--model", str(files["nan"])]
    _check(runner, runner.run(argv=argv, timeout_s=120), needle)


# --- text and numbers that reach a loaded model -----------------------------------------------------------
@pytest.mark.parametrize("stdin, needle", [
    (os.fsdecode(b"bad \xc3\x28 line\n"), "stdin line 1 is not valid Unicode text: it holds the byte 0xc3"),
    ("x" * (5 << 20) + "\n", "stdin line 1 is longer than"),
    ("a b " * 4000 + "\n", "stdin line 1: the conversation so far does not fit"),
])
def test_hostile_chat_input(runner, files, stdin, needle):
    result = runner.run(argv=["chat", "--model", str(files["evil"]), "--chat-template", str(files["own"]),
                              "--max-new-tokens", "2"], stdin=stdin, timeout_s=120)
    _check(runner, result, needle)


def test_nan_weights_on_the_command_line(runner, files):
    result = runner.run(argv=["generate", "Hi", "--model", str(files["nan"]), "--max-new-tokens", "4"], timeout_s=120)
    _check(runner, result, "nan.gguf: the logits of generation step 0")
