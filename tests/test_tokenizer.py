"""realm_jax.tokenizer against llama.cpp, on the two real models.

The expected values come from llama.cpp itself (llama-cpp-python 0.3.36, its C-level llama_tokenize /
llama_token_to_piece / llama_detokenize), recorded by scripts/record_llama_tokens.py into
tests/data/tokens_<model>.json, so these tests need no llama.cpp. Where llama-cpp-python is installed,
`test_live_random_text_matches_llama_cpp` also compares on fresh random text.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pathlib
import random
import struct
import time

import numpy as np
import pytest

from realm_jax import open_gguf
from realm_jax.errors import ChatTemplateError, MetadataError, TokenIdError
from realm_jax.tokenizer import Tokenizer

DATA = pathlib.Path(__file__).parent / "data"
ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ("smollm2", "gemma3")


# --- fixtures: one tokenizer per model per session (gemma3's 262k-token build takes ~1.5 s) ----------------
@pytest.fixture(scope="session")
def model_paths(smollm2_path, gemma3_path):
    return {"smollm2": smollm2_path, "gemma3": gemma3_path}


@pytest.fixture(scope="session")
def metadata(model_paths):
    out = {}
    for key, path in model_paths.items():
        with open_gguf(path) as f:
            out[key] = dict(f.metadata)
    return out


@pytest.fixture(scope="session")
def tokenizers(model_paths):
    return {key: Tokenizer.from_gguf(path) for key, path in model_paths.items()}


@pytest.fixture(scope="session")
def records():
    return {key: json.loads((DATA / f"tokens_{key}.json").read_text(encoding="utf-8")) for key in MODELS}


def _mismatches(pairs):
    """[(label, expected, actual)] -> the failing ones, for one readable assertion message."""
    return [(label, want, got) for label, want, got in pairs if want != got]


def _digest(pieces) -> str:
    h = hashlib.sha256()
    for p in pieces:
        h.update(struct.pack("<I", len(p)) + p)
    return h.hexdigest()


# --- encoding ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", MODELS)
def test_encode_matches_llama_cpp(key, tokenizers, records):
    tok, rec = tokenizers[key], records[key]
    assert len(rec["texts"]) >= 150
    pairs = []
    for row in rec["texts"]:
        pairs.append((("special", row["text"]), row["ids"], tok.encode(row["text"])))
        want_plain = row.get("ids_plain", row["ids"])
        pairs.append((("plain", row["text"]), want_plain, tok.encode(row["text"], parse_special=False)))
    bad = _mismatches(pairs)
    assert not bad, f"{len(bad)} of {len(pairs)} encodings differ from llama.cpp; first: {bad[:3]}"


@pytest.mark.parametrize("key", MODELS)
def test_decode_matches_llama_cpp(key, tokenizers, records):
    tok, rec = tokenizers[key], records[key]
    bos = tok.token_text(tok.bos_id) if rec["add_bos"] else ""
    pairs = []
    for row in rec["texts"]:
        detok = row.get("detok", bos + row["text"])
        pairs.append((("decode", row["text"]), detok, tok.decode(row["ids"])))
        skipped = tok.decode(row["ids"], skip_special=True)
        pairs.append((("skip", row["text"]), row.get("detok_skip", detok), skipped))
        ids_plain = row.get("ids_plain", row["ids"])
        pairs.append((("plain", row["text"]), row.get("detok_plain", detok), tok.decode(ids_plain)))
    for case in rec["detok_remove_special"]:
        got = tok.detokenize(case["ids"], remove_special=True).decode("utf-8", errors="replace")
        pairs.append((("remove_special", case["ids"]), case["text"], got))
    bad = _mismatches(pairs)
    assert not bad, f"{len(bad)} of {len(pairs)} decodings differ from llama.cpp; first: {bad[:3]}"


@pytest.mark.parametrize("key", MODELS)
def test_pieces_and_attributes_of_every_token_match_llama_cpp(key, tokenizers, records):
    tok, rec = tokenizers[key], records[key]
    assert tok.vocab_size == rec["vocab_size"]
    for i, want in rec["sample"].items():
        assert (tok.token_attr(int(i)), tok.token_to_piece(int(i)).hex()) == (want["attr"], want["piece"]), i
    attrs = [tok.token_attr(i) for i in range(tok.vocab_size)]
    assert hashlib.sha256(struct.pack(f"<{len(attrs)}I", *attrs)).hexdigest() == rec["attrs_sha256"]
    assert _digest(tok.token_to_piece(i) for i in range(tok.vocab_size)) == rec["pieces_sha256"]
    plain = (tok.token_to_piece(i, special=False) for i in range(tok.vocab_size))
    assert _digest(plain) == rec["pieces_plain_sha256"]


@pytest.mark.parametrize("key", MODELS)
def test_special_ids_and_bos_rules(key, tokenizers, records):
    tok, rec = tokenizers[key], records[key]
    assert (tok.bos_id, tok.eos_id) == (rec["bos"], rec["eos"])
    assert (tok.add_bos, tok.add_eos) == (rec["add_bos"], rec["add_eos"])
    assert tok.stop_ids == tok.eot_ids == frozenset(rec["eog"])
    body = tok.encode("Hello", add_bos=False)
    assert tok.bos_id not in body
    assert tok.encode("Hello", add_bos=True) == [tok.bos_id, *body]
    assert tok.encode("Hello") == ([tok.bos_id] if rec["add_bos"] else []) + body
    assert tok.encode("") == ([tok.bos_id] if rec["add_bos"] else [])


def test_the_files_own_rules(tokenizers):
    smol, gemma = tokenizers["smollm2"], tokenizers["gemma3"]
    # SmolLM2 adds no BOS and splits every digit; gemma3 adds <bos>.
    assert not smol.add_bos and gemma.add_bos and gemma.bos_id == 2
    assert [smol.token_text(i) for i in smol.encode("2024")] == ["2", "0", "2", "4"]
    # End of generation: EOS and the end-of-turn tokens, by llama.cpp's list.
    assert {smol.token_text(i) for i in smol.stop_ids} >= {"<|im_end|>", "<|endoftext|>"}
    assert {gemma.token_text(i) for i in gemma.stop_ids} >= {"<eos>", "<end_of_turn>"}
    # Control tokens are text when parse_special is off; user-defined ones (<b>, runs of spaces) never are.
    assert gemma.encode("<start_of_turn>", add_bos=False) == [105]
    assert 105 not in gemma.encode("<start_of_turn>", add_bos=False, parse_special=False)
    bold = gemma.encode("<b>", add_bos=False)
    assert bold == gemma.encode("<b>", add_bos=False, parse_special=False) and len(bold) == 1
    assert smol.encode("<|im_start|>") == [1]
    assert 1 not in smol.encode("<|im_start|>", parse_special=False)


@pytest.mark.parametrize("key", MODELS)
def test_pieces_stream_to_the_decoded_bytes(key, tokenizers, records):
    tok, rec = tokenizers[key], records[key]
    # Neither file asks for llama.cpp's space clean-up, which works on the whole text, not per piece.
    assert not tok._vocab.clean_spaces
    for row in rec["texts"]:
        assert b"".join(tok.token_to_piece(i) for i in row["ids"]) == tok.detokenize(row["ids"])
    # A byte-fallback character arrives in pieces that are not valid UTF-8 alone.
    ids = tok.encode("\U0001f9ea\ue000", add_bos=False)
    pieces = [tok.token_to_piece(i) for i in ids]
    assert b"".join(pieces).decode() == "\U0001f9ea\ue000"


def test_token_to_piece_rejects_bad_ids(tokenizers):
    tok = tokenizers["smollm2"]
    with pytest.raises(IndexError):
        tok.token_to_piece(tok.vocab_size)
    with pytest.raises(IndexError):
        tok.decode([-1])


# --- other pre-tokenizers and flags, on the same vocabularies ---------------------------------------------
def _variant_ids(key):
    rec = json.loads((DATA / f"tokens_{key}.json").read_text(encoding="utf-8"))
    return [f"{key}:{v['changes']}" for v in rec["variants"]]


@pytest.mark.parametrize("variant", _variant_ids("smollm2") + _variant_ids("gemma3"))
def test_metadata_variants_match_llama_cpp(variant, metadata, records):
    key = variant.split(":")[0]
    rec = records[key]
    (case,) = [v for v in rec["variants"] if f"{key}:{v['changes']}" == variant]
    md = {**metadata[key], **case["changes"]}
    md = {k: v for k, v in md.items() if v is not None}
    tok = Tokenizer.from_metadata(md, source=variant)
    assert tok.add_bos == case["add_bos"]
    pairs = []
    for row, want in zip(rec["texts"], case["rows"]):
        ids = tok.encode(row["text"])
        pairs.append((row["text"], want["ids"], ids))
        got = hashlib.sha256(tok.detokenize(want["ids"])).hexdigest()[:16]
        pairs.append((("detok", row["text"]), want["detok_sha256"], got))
    bad = _mismatches(pairs)
    assert not bad, f"{len(bad)} of {len(pairs)} differ from llama.cpp; first: {bad[:3]}"


# --- chat templates ---------------------------------------------------------------------------------------
def test_smollm2_chat_template_matches_llama_cpp_python(tokenizers, records):
    tok = tokenizers["smollm2"]
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    for case in records["smollm2"]["chat"]:
        got = tok.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"])
        assert got == case["prompt"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.encode(prompt)[:1] == [1] and tok.decode(tok.encode(prompt)) == prompt


def test_gemma3_file_has_no_chat_template(tokenizers):
    tok = tokenizers["gemma3"]
    assert tok.chat_template is None
    with pytest.raises(MetadataError, match="tokenizer.chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "Hi"}])


# --- small synthetic vocabularies for the error paths -----------------------------------------------------
def _byte_chars() -> list[str]:
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return [table[b] for b in range(256)]


def tiny_gpt2(**changes) -> dict:
    """A byte-level BPE of 259 tokens: the 256 byte characters, "Ġt", "Ġth" and <|endoftext|>."""
    tokens = [*_byte_chars(), "Ġt", "Ġth", "<|endoftext|>"]
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array([1] * 258 + [3], np.int32),
        "tokenizer.ggml.merges": ["Ġ t", "Ġt h"],
        "tokenizer.ggml.bos_token_id": 258,
        "tokenizer.ggml.eos_token_id": 258,
        "tokenizer.chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
    }
    md.update(changes)
    return {k: v for k, v in md.items() if v is not None}


def tiny_spm(**changes) -> dict:
    """A SentencePiece vocabulary: <unk> <s> </s>, the 256 byte tokens, and a few scored pieces."""
    pieces = ["▁", "a", "b", "ab", "▁ab", "<start>"]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    types = [2, 3, 3, *[6] * 256, 1, 1, 1, 1, 1, 3]
    scores = [0.0] * 259 + [-5.0, -3.0, -4.0, -1.0, -0.5, 0.0]
    md = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(types, np.int32),
        "tokenizer.ggml.scores": np.array(scores, np.float32),
        "tokenizer.ggml.add_space_prefix": True,
    }
    md.update(changes)
    return {k: v for k, v in md.items() if v is not None}


def test_tiny_vocabularies_tokenize():
    gpt2 = Tokenizer.from_metadata(tiny_gpt2())
    assert [gpt2.token_text(i) for i in gpt2.encode("a th<|endoftext|>")] == ["a", "Ġth", "<|endoftext|>"]
    assert gpt2.decode(gpt2.encode("hello , world")) == "hello, world"  # gpt-2's space clean-up
    spm = Tokenizer.from_metadata(tiny_spm())
    assert spm.add_bos and spm.bos_id == 1 and spm.eos_id == 2 and spm.stop_ids == {2}
    ids = spm.encode("ab<start>abé")
    assert [spm.token_text(i) for i in ids] == ["<s>", "▁ab", "<start>", "▁ab", "<0xC3>", "<0xA9>"]
    assert spm.decode(ids) == "<s> ab<start> abé"
    assert spm.decode(ids, skip_special=True) == " ab abé"


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.model": "bert"}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.pre": "gpt2"}, "tokenizer.ggml.pre"),  # llama.cpp spells it "gpt-2"
        ({"tokenizer.ggml.pre": "no-such-pre"}, "tokenizer.ggml.pre"),
        ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": np.arange(3)}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": [*_byte_chars(), "Ġt", "Ġth", "Ġt"]}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.token_type": np.array([1, 1], np.int32)}, "tokenizer.ggml.token_type"),
        ({"tokenizer.ggml.token_type": ["1"] * 259}, "tokenizer.ggml.token_type"),
        ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.merges": ["Ġt"]}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.merges": ["x y"]}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.bos_token_id": 5000}, "tokenizer.ggml.bos_token_id"),
        ({"tokenizer.ggml.eos_token_id": "2"}, "tokenizer.ggml.eos_token_id"),
        ({"tokenizer.ggml.add_bos_token": "yes"}, "tokenizer.ggml.add_bos_token"),
        ({"tokenizer.chat_template": 3}, "tokenizer.chat_template"),
        ({"general.name": "Phi-3 mini"}, "general.name"),
    ],
)
def test_bad_gpt2_metadata_names_the_key(changes, key):
    with pytest.raises(MetadataError, match=key.replace(".", r"\.")) as info:
        Tokenizer.from_metadata(tiny_gpt2(**changes), source="bad.gguf")
    assert "bad.gguf" in str(info.value)


def test_bad_spm_metadata_names_the_key():
    with pytest.raises(MetadataError, match=r"tokenizer\.ggml\.scores"):
        Tokenizer.from_metadata(tiny_spm(**{"tokenizer.ggml.scores": np.zeros(3, np.float32)}))
    not_a_byte = tiny_spm()
    not_a_byte["tokenizer.ggml.tokens"][68] = "A"  # was <0x41>
    with pytest.raises(MetadataError, match=r"tokenizer\.ggml\.token_type\[68\]"):
        Tokenizer.from_metadata(not_a_byte)
    not_a_byte["tokenizer.ggml.token_type"][68] = 1
    with pytest.raises(MetadataError, match=r"<0x41>"):
        Tokenizer.from_metadata(not_a_byte)
    # llama.cpp's default BPE BOS id (11) is outside this 11-token vocabulary, so there is no BOS to add.
    small = tiny_gpt2(**{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": None,
                         "tokenizer.ggml.eos_token_id": None, "tokenizer.ggml.merges": []})  # fmt: skip
    small["tokenizer.ggml.tokens"] = small["tokenizer.ggml.tokens"][:11]
    with pytest.raises(MetadataError, match=r"tokenizer\.ggml\.add_bos_token"):
        Tokenizer.from_metadata(small)


def _spm_by_rescanning(ids: dict[str, int], scores, byte_ids, text: str) -> list[int]:
    """llama.cpp's SentencePiece merges by their definition (quadratic): while some adjacent pair of symbols
    makes a token, merge the best-scored one, the leftmost of equals; then each symbol's token or bytes."""
    symbols = list(text)  # the leftmost pair is the one whose left symbol starts first, as llama.cpp's ties go
    while True:
        best = None
        for i in range(len(symbols) - 1):
            token = ids.get(symbols[i] + symbols[i + 1])
            if token is not None and (best is None or scores[token] > best[0]):
                best = (scores[token], i)
        if best is None:
            break
        i = best[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return [t for sym in symbols for t in ([ids[sym]] if sym in ids else [byte_ids[b] for b in sym.encode()])]


def test_sentencepiece_merges_in_llama_cpp_order():
    """Random vocabularies of short pieces over a small alphabet, with many equal scores, and random texts:
    the tokenizer's merges give what the definition gives (ties to the leftmost pair), characters outside
    the vocabulary as their UTF-8 bytes."""
    from realm_jax.tokenizer import _load_vocab, _SentencePiece

    rng = random.Random(5)
    for trial in range(30):
        md = tiny_spm()
        pieces = list(dict.fromkeys("".join(rng.choice("ab▁c") for _ in range(rng.randrange(2, 6)))
                                    for _ in range(rng.randrange(5, 60))))
        pieces = [p for p in pieces if p not in md["tokenizer.ggml.tokens"]]
        tokens = md["tokenizer.ggml.tokens"] + pieces
        scores = np.concatenate([md["tokenizer.ggml.scores"], np.float32([rng.choice([-1, -2, -3]) for _ in pieces])])
        md.update({"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores.astype(np.float32),
                   "tokenizer.ggml.token_type": np.array([2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259), np.int32)})
        spm = _SentencePiece(_load_vocab(md, "t.gguf"))
        for _ in range(20):
            text = "".join(rng.choice("ab▁cé") for _ in range(rng.randrange(0, 40)))
            want = _spm_by_rescanning(spm.ids, spm.scores, spm.bytes, text)
            assert spm.encode(text) == want, (trial, text)


def test_sentencepiece_on_nested_runs_is_quick():
    """A hostile vocabulary of nested runs (a, aa, ..., 1024 a's) and 200,000 a's: merges never slice past
    the longest token, so the time stays linear in the text (well under the seconds a quadratic walk takes)."""
    from realm_jax.tokenizer import _load_vocab, _SentencePiece

    md = tiny_spm()
    runs = ["a" * k for k in range(2, 1025)]
    tokens = md["tokenizer.ggml.tokens"] + runs
    md.update({"tokenizer.ggml.tokens": tokens,
               "tokenizer.ggml.scores": np.concatenate([md["tokenizer.ggml.scores"],
                                                        np.arange(len(runs), dtype=np.float32)]),
               "tokenizer.ggml.token_type": np.array([2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259), np.int32)})
    spm = _SentencePiece(_load_vocab(md, "t.gguf"))
    start = time.perf_counter()
    ids = spm.encode("a" * 200_000)
    assert time.perf_counter() - start < 10
    assert sum(len(tokens[i]) for i in ids) == 200_000


@pytest.mark.parametrize("key, more, match", [
    ("tokens", ["x" * (1 << 20)], r"tokenizer\.ggml\.tokens\[259\].*1048576 characters"),
    ("tokens", [f"t{i}" for i in range(1 << 19)], r"tokenizer\.ggml\.tokens has 524547 tokens"),
    ("tokens", [f"{i:06}" * 170 for i in range(17000)], r"tokens has 17\d+ characters in all"),
    ("merges", ["x " + "y" * 1022] * 33000, r"merges has 3\d+ characters in all"),
])
def test_vocabularies_past_the_bounds_are_refused_at_once(key, more, match):
    from realm_jax.errors import ResourceLimitError

    md = tiny_gpt2()
    md[f"tokenizer.ggml.{key}"] = list(md[f"tokenizer.ggml.{key}"]) + more
    start = time.perf_counter()
    with pytest.raises(ResourceLimitError, match=match) as info:
        Tokenizer.from_metadata(md, source="big.gguf")
    assert "big.gguf" in str(info.value) and time.perf_counter() - start < 2


def test_from_gguf_names_a_missing_file(tmp_path):
    from realm_jax.errors import GGUFError

    with pytest.raises(GGUFError, match="nope.gguf"):
        Tokenizer.from_gguf(tmp_path / "nope.gguf")


# --- the chat-template sandbox ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
        "{{ self._TemplateReference__context }}",
        "{{ raise_exception.__globals__ }}",
        "{% set _ = messages.append({'role': 'x'}) %}",
        "{{ messages[0].update({'content': 'x'}) }}",
        "{{ 'x' * 100000000 }}",
        "{{ [0] * (2 ** 40) }}",
    ],
)
def test_hostile_templates_are_refused(template):
    tok = Tokenizer.from_metadata(tiny_gpt2(**{"tokenizer.chat_template": template}), source="evil.gguf")
    with pytest.raises(MetadataError, match="sandbox") as info:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "evil.gguf" in str(info.value)


def test_template_errors():
    tok = Tokenizer.from_metadata(tiny_gpt2(**{"tokenizer.chat_template": "{% for %}"}), source="t.gguf")
    with pytest.raises(MetadataError, match="does not compile"):
        tok.apply_chat_template([])
    rejecting = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
    tok = Tokenizer.from_metadata(tiny_gpt2(**{"tokenizer.chat_template": rejecting}))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="user first"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


@pytest.mark.parametrize("template, error, match", [
    ("{{ 'x' | center(3 * 10**9) }}", "TemplateBudgetError", "memory budget of 64 MiB"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "TemplateBudgetError", "memory budget"),
    ("{% for i in range(200) %}{{ 'x' * 1000 }}{% endfor %}", "TemplateBudgetError", "output budget"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "TemplateBudgetError",
     "time budget: still rendering after 0.5 s"),
    ("{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}", "MetadataError", "does not compile: RecursionError"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "MetadataError", "fails to render: RecursionError"),
    ("{{ '\\udcff' }}", "MetadataError", "output is not valid Unicode text"),  # not blamed on the prompt later
])
def test_templates_render_under_a_budget(template, error, match):
    """Over budget in output, memory or time, or too deep to compile: one error naming the file, and the
    worker that renders templates serves the next one."""
    from realm_jax import errors
    from realm_jax.chat_template import TemplateBudget

    tok = Tokenizer.from_metadata(tiny_gpt2(**{"tokenizer.chat_template": template}), source="evil.gguf")
    budget = TemplateBudget(max_chars=100_000, memory_bytes=64 << 20, seconds=0.5)
    with pytest.raises(getattr(errors, error), match=match) as info:
        tok.apply_chat_template([{"role": "user", "content": "hi"}], budget=budget)
    assert str(info.value).startswith("evil.gguf: tokenizer.chat_template")
    own = "{% for m in messages %}<{{ m.content }}>{% endfor %}"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], template=own, budget=budget) == "<hi>"


def test_error_messages_show_any_value_briefly():
    """A huge int has no repr, a deep list's overflows the stack, a long string's takes its size: the value an
    error names is shown short whatever it is."""
    from realm_jax.errors import SamplingError
    from realm_jax.inputs import shown
    from realm_jax.sampling import SamplingConfig

    deep = []
    for _ in range(100_000):
        deep = [deep]
    assert shown(10**5000) == "<int of 16610 bits>" and shown([1, 2**5000]) == "[1, <int of 5001 bits>]"
    assert len(shown("x" * 10**7)) < 80 and shown(deep).startswith("[[[[")
    with pytest.raises(SamplingError, match=r"temperature=<int of \d+ bits>"):
        SamplingConfig(temperature=-(10**5000))
    with pytest.raises(ChatTemplateError, match=r"got \[\[\[\["):
        Tokenizer.from_metadata(tiny_gpt2()).apply_chat_template(deep)


def test_text_that_is_not_unicode_is_refused():
    from realm_jax.errors import TextInputError

    tok = Tokenizer.from_metadata(tiny_gpt2())
    undecodable = b"caf\xe9".decode("utf-8", errors="surrogateescape")
    with pytest.raises(TextInputError, match=r"text is not valid Unicode text: .*byte 0xe9.* at character 3"):
        tok.encode(undecodable)
    with pytest.raises(TextInputError, match="must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(TextInputError, match=r"messages\[1\]\['content'\].*U\+D800"):
        tok.apply_chat_template([{"role": "user", "content": "ok"}, {"role": "user", "content": "\ud800"}])


def test_template_globals():
    template = "{{ bos_token }}|{{ eos_token }}|{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|" \
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}" \
        "{% if add_generation_prompt %}>{% endif %}"  # fmt: skip
    tok = Tokenizer.from_metadata(tiny_gpt2(**{"tokenizer.chat_template": template}))
    msgs = [{"role": "user", "content": "é"}, {"role": "user", "content": "b"}]
    as_json = '[{"role": "user", "content": "é"}, {"role": "user", "content": "b"}]'
    assert tok.apply_chat_template(msgs) == f"<|endoftext|>|<|endoftext|>|{as_json}|4|é>"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("|é")


# --- live comparison with llama.cpp, where llama-cpp-python is installed ----------------------------------
def _record_module():
    path = ROOT / "scripts" / "record_llama_tokens.py"
    spec = importlib.util.spec_from_file_location("record_llama_tokens", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("key", MODELS)
def test_live_random_text_matches_llama_cpp(key, tokenizers, model_paths):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [llama] extra) compares live")
    rec = _record_module()
    lv = rec.LlamaVocab(model_paths[key])
    tok = tokenizers[key]
    rng = random.Random(11)
    alphabet = [*"ab =-_.▁ \n\t0123'", "aa", "==", "  ", "é", "中", "😀", "<s>", "<start_of_turn>"]
    alphabet.append("<|im_start|>")
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))) for _ in range(300)]
    texts += ["".join(chr(rng.randrange(0x20, 0x2FFFF)) for _ in range(20)) for _ in range(100)]
    texts = [t for t in texts if not any(0xD800 <= ord(c) < 0xE000 for c in t)]
    pairs = []
    for t in texts:
        for special in (True, False):
            want = lv.tokenize(t, parse_special=special)
            pairs.append(((special, t), want, tok.encode(t, parse_special=special)))
        ids = lv.tokenize(t)
        pairs.append((("detok", t), lv.detokenize(ids), tok.detokenize(ids)))
    bad = _mismatches(pairs)
    assert not bad, f"{len(bad)} of {len(pairs)} differ from llama.cpp; first: {bad[:3]}"


def test_template_runtime_failure_is_a_metadata_error():
    tok = Tokenizer.from_metadata(tiny_gpt2(**{"tokenizer.chat_template": "{{ 1 / 0 }}"}), source="t.gguf")
    with pytest.raises(MetadataError, match="t.gguf.*fails to render"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("messages", [["hi"], [{"role": "user"}], "hi", [{"role": "user", "content": 3}]])
def test_bad_messages_are_the_callers_fault(messages):
    tok = Tokenizer.from_metadata(tiny_gpt2(**{"tokenizer.chat_template": "{{ messages[0].content }}"}))
    with pytest.raises(ChatTemplateError, match="messages must be"):
        tok.apply_chat_template(messages)


# --- ids from outside: one check (`tokenizer.int_list`) for every entry point -------------------------------
@pytest.fixture(scope="module")
def tiny():
    return Tokenizer.from_metadata(tiny_gpt2())


@pytest.mark.parametrize(("ids", "match"), [
    (None, r"^ids must be a sequence of token ids \(a list, tuple or 1-D integer array\), got NoneType$"),
    (5, r"got int$"),
    (b"abc", r"got bytes$"),  # not the ids 97, 98, 99
    (bytearray(b"abc"), r"got bytearray$"),
    ("abc", r"got str$"),
    ({1: 2}, r"got dict$"),  # not its keys
    ({1, 2}, r"got set$"),  # no order
    (np.array(3), r"^ids must be a 1-D array of token ids, got an array of shape \(\)$"),
    (np.ones((2, 2), np.int64), r"got an array of shape \(2, 2\)$"),
    ([1, 2.0], r"^ids must hold ints \(token ids\): \[1\] is 2\.0, a float$"),
    (np.array([1.0]), r"\[0\] is np\.float64\(1\.0\), a float64$"),
    ([1, True], r"\[1\] is True, a bool$"),
])
def test_ids_that_are_not_a_sequence_of_ints_are_refused(tiny, ids, match):
    for call in (tiny.decode, tiny.detokenize):
        with pytest.raises(TokenIdError, match=match):
            call(ids)


def test_ids_in_any_sequence_or_1d_integer_array_decode_alike(tiny):
    import array

    import jax.numpy as jnp

    ids = tiny.encode("a th<|endoftext|>")
    want = tiny.decode(ids)
    for same in (tuple(ids), (i for i in ids), np.array(ids, np.int32), np.array(ids, np.uint16), jnp.asarray(ids),
                 array.array("i", ids), np.array(ids, object)):
        assert tiny.decode(same) == want, type(same)
    assert tiny.decode(np.array([])) == tiny.decode(range(0)) == ""


@pytest.mark.parametrize("metadata", [None, [("tokenizer.ggml.model", "gpt2")], "tokenizer.ggml.model"])
def test_metadata_that_is_not_a_mapping_is_refused(metadata):
    with pytest.raises(MetadataError, match=r"^x\.gguf: metadata must be a mapping of GGUF keys to values .*got "
                                            rf"{type(metadata).__name__}$"):
        Tokenizer.from_metadata(metadata, source="x.gguf")


def test_encode_and_from_gguf_argument_types(tiny):
    from realm_jax.errors import ArgumentError

    with pytest.raises(ArgumentError,
                       match=r"^Tokenizer\.from_gguf: path must be a str, bytes or os\.PathLike, got NoneType None$"):
        Tokenizer.from_gguf(None)
    for bad in ("yes", 1, 0.0):  # each truthy or falsy, none a choice the caller made
        with pytest.raises(ArgumentError, match=r"^encode: add_bos=.* must be None, True or False$"):
            tiny.encode("a", add_bos=bad)
        with pytest.raises(ArgumentError, match=r"^encode: parse_special=.* must be True or False$"):
            tiny.encode("a", parse_special=bad)
    assert tiny.encode("a", add_bos=np.True_) == tiny.encode("a", add_bos=True)
