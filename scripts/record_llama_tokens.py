"""Record llama.cpp's tokenization of a varied corpus for the real models, for tests/test_tokenizer.py.

Needs llama-cpp-python (``pip install -e .[llama]``, ~6 min to compile). Writes
``tests/data/tokens_<model>.json`` with, for every corpus text, llama.cpp's ids with special-token parsing
on and off (BOS/EOS as the file says) and its detokenization; the attributes, end-of-generation set and
rendered piece of every token; for SmolLM2 the chat template rendered by llama-cpp-python's formatter; and
for variants of the files' tokenizer metadata (other pre-tokenizers, add_space_prefix) the ids again.

Only llama.cpp's C functions are used (``llama_tokenize``, ``llama_token_to_piece``, ``llama_detokenize``):
llama-cpp-python's own ``detokenize`` drops pieces longer than 32 bytes.

Usage: python scripts/record_llama_tokens.py [--only smollm2|gemma3]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import pathlib
import random
import struct
import sys
import tempfile
import unicodedata

import llama_cpp

from realm_jax import assets

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
MODELS = {"smollm2": "smollm2-135m-instruct-q4_1", "gemma3": "gemma3-270m-q4_k_m"}


# --- the corpus -------------------------------------------------------------------------------------------
def corpus() -> list[str]:
    texts = [
        "",
        " ",
        "  ",
        "\n",
        "\t",
        "a",
        "A",
        "1",
        "é",
        "中",
        "😀",
        "Hello world",
        "Hello, world!",
        " Hello world",
        "Hello world ",
        "  Hello  world  ",
        "\nHello\n",
        "The quick brown fox jumps over the lazy dog.",
        "It's a dog's life, isn't it? We'll see; they'd've known. I'm sure you're right, we've won.",
        "IT'S LOUD. DON'T SHOUT! WE'LL SEE, THEY'D GO.",
        "Mr. O'Neil said: \"Don't 'quote' me\" -- or ' stray ' quotes ' s .",
        "Once upon a time, in a land far, far away, there lived a king who had three daughters. "
        "The youngest was the fairest of them all, and she loved to play in the garden by the old well.",
        "Machine learning (ML) is a field of study in artificial intelligence concerned with the development "
        "and study of statistical algorithms that can learn from data and generalize to unseen data.",
        "Dear Sir or Madam,\n\nI am writing to enquire about the position advertised on your website.\n\n"
        "Yours faithfully,\nJ. Smith",
        "Question: What is 2 + 2?\nAnswer: 4.\n\nQuestion: What is the capital of France?\nAnswer: Paris.",
        # code
        "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
        "class Foo:\n\tdef __init__(self):\n\t\tself.x = {'a': [1, 2, 3]}\n\t\tself.y = None\n",
        "#include <stdio.h>\nint main(void) {\n    printf(\"%d\\n\", 42);\n    return 0;\n}\n",
        "for (int i = 0; i < n; ++i) { a[i] += b[i] * c[i]; }",
        "if x == 1 and y != 2 or z >= 3: pass  # comment",
        "<html><body><div class=\"x\"><table><tr><td>cell</td></tr></table></div></body></html>",
        "<s>strike</s> <b>bold</b> <i>it</i> <code>x = 1</code> <h1>Title</h1>",
        "SELECT name, COUNT(*) FROM users WHERE age > 21 GROUP BY name ORDER BY 2 DESC;",
        "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}",
        "x = lambda a, *args, **kw: a ** 2 // 3 % 4 @ m",
        "{\"key\": \"value\", \"list\": [1, 2.5, -3e10, true, null], \"nested\": {\"a\": {}}}",
        "$ ls -la | grep '^d' && echo \"done\" > /dev/null 2>&1",
        "// TODO: fix\n/* block\n * comment */\n",
        "    indented with four spaces\n        and eight\n\t\tand two tabs\n \t mixed",
        "a\tb\t\tc\t\t\td",
        "line1\r\nline2\r\n\r\nline3\r",
        # whitespace runs
        " " * 2,
        " " * 3,
        " " * 7,
        " " * 16,
        " " * 31,
        " " * 32,
        " " * 33,
        " " * 100,
        "a" + " " * 40 + "b",
        "word" + " " * 5 + "word" + " " * 9 + "end" + " " * 3,
        "\n" * 2,
        "\n" * 5,
        "\n" * 40,
        "\t" * 4,
        "\t" * 35,
        " \n \n  \n   \n",
        "\n \n\t\n \t \n",
        "x \n\n\ny",
        "   leading spaces",
        "trailing spaces   ",
        "\t\ttabs around\t\t",
        "a\u00a0b\u2003c\u3000d\u200be\u2028f\u0085g",
        # numbers
        "0",
        "12",
        "123",
        "1234",
        "12345678901234567890",
        "3.14159265358979323846",
        "-0.001 +1e-10 6.022e23 1,000,000 1.000.000,50",
        "The year 2024 had 366 days; 1/3 ≈ 0.333.",
        "Phone: +1 (555) 123-4567, ZIP 90210",
        "٠١٢٣٤٥٦٧٨٩ ०१२३४५६७८९ ①②③ ⅠⅡⅢ ½ ¾ ²³",
        "v1.2.3-rc4+build.567",
        "0x1F 0b1010 0o777 1_000_000",
        # emoji
        "I love 🍕 and 🍣!",
        "👨‍👩‍👧‍👦 family",
        "🏳️‍🌈 🏴‍☠️ 👩🏽‍💻 🧑🏿‍🚀",
        "👍🏻👍🏼👍🏽👍🏾👍🏿",
        "❤️💔💯🔥✨🎉",
        "🇫🇷🇯🇵🇺🇸",
        "😀😃😄😁😆😅🤣😂🙂🙃😉😊😇",
        # scripts
        "你好，世界！今天天气很好。",
        "日本語のテキストです。カタカナとひらがな、漢字。",
        "한국어 텍스트입니다. 안녕하세요!",
        "مرحبا بالعالم! هذه جملة باللغة العربية.",
        "नमस्ते दुनिया! यह हिंदी में एक वाक्य है।",
        "Привет, мир! Это предложение на русском языке.",
        "Γειά σου Κόσμε! Αυτή είναι μια πρόταση.",
        "שלום עולם! זה משפט בעברית.",
        "สวัสดีชาวโลก นี่คือประโยคภาษาไทย",
        "Xin chào thế giới! Đây là một câu tiếng Việt.",
        "Ça va? Où êtes-vous? Über Größe, naïve café, señor, smørrebrød, Łódź, İstanbul.",
        "e\u0301 a\u0300 o\u0308 n\u0303",
        "ﬁ ﬂ ﬀ Ⅸ ㎏ ℃ ™ © ® ° µ Å",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙 𝒮𝒸𝓇𝒾𝓅𝓉",
        "ᚠᛇᚻ᛫ᛒᛦᚦ ⠓⠑⠇⠇⠕ ꦲꦏ꧀ꦱꦫ",
        # special tokens inline
        "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "<bos>text after bos",
        "text<eos>",
        "<bos><bos>",
        "<|endoftext|>",
        "<|endoftext|><|endoftext|>x",
        "a<start_of_turn>b",
        "<start_of_turn>",
        "< start_of_turn >",
        "<start_of_turn",
        "<unk> <pad> <mask> [multimodal] <start_of_image><end_of_image>",
        "<unused0><unused99>",
        "<repo_name>x<file_sep>y<filename>z<gh_stars>10",
        "<jupyter_code>print(1)<jupyter_output>1<empty_output>",
        "<|im_start|><|im_end|><|im_start|>",
        "<<|im_start|>>",
        "</s><s>",
        "<0x41><0xFF>",
        # byte-fallback heavy
        "\x00\x01\x02\x7f",
        "\x1b[31mred\x1b[0m",
        "\ufffd\ufeff\u200d\u200c\u2060",
        "\U0001f9ea\U0001fae0\U0001fa7b\U0001fabf",
        "\U000e0041\U000e0042 tags",
        "\ue000\uf8ff\U000f0000 private use",
        "𓀀𓀁𓂀 ꙮ 𐍈 𒀭",
        "▁ ▁▁ ▁▁▁ ▁x ▁▁y",
        "ĠĊ ċ Ġhello ĉ",
        "Ā ā Ă ă Ą ą",
        # repeated characters
        "=" * 40,
        "-" * 33 + "\n" + "=" * 12,
        "*" * 17 + "#" * 9 + "~" * 5,
        "." * 10 + "!" * 7 + "?" * 3,
        "aaaaaaaaaaaaaaaaaaaaaaaaa",
        "abababababababababab",
        "ーーーーーー…………",
        "_" * 20 + "/" * 10,
        "0" * 30,
        "hahahahahahaha lololol",
        "Mississippi assassin bookkeeper",
    ]
    rng = random.Random(20240601)
    texts += _random_texts(rng)
    return texts


_BLOCKS = [
    (0x20, 0x7F), (0xA0, 0x250), (0x370, 0x530), (0x590, 0x700), (0x900, 0xE00), (0x1100, 0x1200),
    (0x1E00, 0x2000), (0x2000, 0x2400), (0x2500, 0x2800), (0x3000, 0x3100), (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3), (0xFF00, 0xFFF0), (0x1F300, 0x1FAFF), (0x10000, 0x10100), (0x1D400, 0x1D800),
    (0x20000, 0x20100),
]  # fmt: skip


def _random_texts(rng: random.Random) -> list[str]:
    """Seeded random text: assigned code points from many blocks, mixed with ASCII words and spaces."""

    def char() -> str:
        while True:
            lo, hi = rng.choice(_BLOCKS)
            c = chr(rng.randrange(lo, hi))
            if unicodedata.category(c) not in ("Cn", "Cs"):
                return c

    out = []
    for _ in range(30):
        parts = []
        for _ in range(rng.randrange(1, 12)):
            kind = rng.random()
            if kind < 0.4:
                parts.append("".join(char() for _ in range(rng.randrange(1, 6))))
            elif kind < 0.7:
                parts.append(rng.choice(["the", "of", "x", "42", "foo_bar", "Zebra", "'s", "n't", "..."]))
            else:
                parts.append(rng.choice([" ", "  ", "\n", "\t", " \n", "   "]))
        out.append("".join(parts))
    return out


# --- llama.cpp --------------------------------------------------------------------------------------------
@llama_cpp.llama_log_callback
def _quiet(level, text, user_data):
    # llama.cpp logs every double BOS the corpus provokes; the recording needs none of it.
    return None


class LlamaVocab:
    """llama.cpp's vocabulary of a GGUF file, through its C functions."""

    def __init__(self, path):
        llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))
        self.llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode()
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        assert n >= 0, (text, n)
        return list(buf[:n])

    def piece(self, token: int, *, special: bool = True) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 256, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, ids: list[int], *, remove_special: bool = False, unparse_special: bool = True):
        arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
        cap = 64 + 8 * len(ids)
        while True:
            buf = ctypes.create_string_buffer(cap)
            n = llama_cpp.llama_detokenize(self.vocab, arr, len(ids), buf, cap, remove_special, unparse_special)
            if n >= 0:
                return buf.raw[:n]
            cap = -n + 16

    def attr(self, token: int) -> int:
        return int(llama_cpp.llama_vocab_get_attr(self.vocab, token))

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def bos(self) -> int:
        return int(llama_cpp.llama_vocab_bos(self.vocab))

    def eos(self) -> int:
        return int(llama_cpp.llama_vocab_eos(self.vocab))

    def add_bos(self) -> bool:
        return bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))

    def add_eos(self) -> bool:
        return bool(llama_cpp.llama_vocab_get_add_eos(self.vocab))


def pieces_digest(pieces: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in pieces:
        h.update(struct.pack("<I", len(p)) + p)
    return h.hexdigest()


def attrs_digest(attrs: list[int]) -> str:
    return hashlib.sha256(struct.pack(f"<{len(attrs)}I", *attrs)).hexdigest()


# --- metadata variants: a header-only copy of a GGUF file with some keys changed ---------------------------
def variant_file(path, changes: dict, out_dir) -> pathlib.Path:
    """A GGUF with the metadata of ``path`` (``changes`` applied: key -> str/bool value) and no tensors."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    raw = bytearray()
    n_kv = 0
    seen = set()
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        if field.name in changes:
            seen.add(field.name)
            if changes[field.name] is not None:  # None: drop the key
                n_kv += 1
                raw += _kv(field.name, changes[field.name])
            continue
        n_kv += 1
        size = sum(p.nbytes for p in field.parts)
        raw += reader.data[field.offset : field.offset + size].tobytes()
    for key in sorted(k for k in changes.keys() - seen if changes[k] is not None):
        n_kv += 1
        raw += _kv(key, changes[key])
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv)
    tag = hashlib.sha256(repr(sorted(changes.items())).encode()).hexdigest()[:8]
    out = pathlib.Path(out_dir) / f"{path.stem}-{tag}.gguf"
    out.write_bytes(header + bytes(raw))
    return out


def _kv(key: str, value) -> bytes:
    k = key.encode()
    head = struct.pack("<Q", len(k)) + k
    if isinstance(value, bool):
        return head + struct.pack("<IB", 7, value)
    v = value.encode()
    return head + struct.pack("<IQ", 8, len(v)) + v


VARIANTS = {
    "smollm2": [
        {"tokenizer.ggml.pre": "default"},
        {"tokenizer.ggml.pre": "gpt-2"},
        {"tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.add_bos_token": None},
        {"tokenizer.ggml.pre": "qwen2"},
        {"tokenizer.ggml.pre": "starcoder"},
        {"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True},
    ],
    "gemma3": [
        {"tokenizer.ggml.add_space_prefix": True},
        {"tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": True},
    ],
}

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Where is the treasure?"},
        {"role": "assistant", "content": "Arr, under the palm tree."},
        {"role": "user", "content": "Which one? ¿Cuál? 🌴"},
    ],
    [{"role": "user", "content": "Line one\nLine two\n\n  indented"}, {"role": "assistant", "content": "OK."}],
]


# --- recording --------------------------------------------------------------------------------------------
def record_model(key: str, texts: list[str], tmp: str) -> dict:
    path = assets.model_path(MODELS[key])
    lv = LlamaVocab(path)
    bos_text = lv.piece(lv.bos()).decode() if lv.add_bos() else ""
    rows = []
    for text in texts:
        ids = lv.tokenize(text, parse_special=True)
        row = {"text": text, "ids": ids}
        ids_plain = lv.tokenize(text, parse_special=False)
        if ids_plain != ids:
            row["ids_plain"] = ids_plain
        # Detokenizations, stored only where they differ from what the test assumes by default.
        detok = lv.detokenize(ids).decode("utf-8", errors="replace")
        if detok != bos_text + text:
            row["detok"] = detok
        detok_skip = lv.detokenize(ids, unparse_special=False).decode("utf-8", errors="replace")
        if detok_skip != detok:
            row["detok_skip"] = detok_skip
        detok_plain = lv.detokenize(ids_plain).decode("utf-8", errors="replace")
        if detok_plain != detok:
            row["detok_plain"] = detok_plain
        rows.append(row)
    pieces = [lv.piece(i) for i in range(lv.n)]
    pieces_plain = [lv.piece(i, special=False) for i in range(lv.n)]
    attrs = [lv.attr(i) for i in range(lv.n)]
    common = {4, 8 | 2}  # normal; control + unused (the thousands of <unusedN> tokens)
    rng = random.Random(7)
    sample = sorted(set(rng.sample(range(lv.n), 300)) | {i for i in range(lv.n) if attrs[i] not in common})
    out = {
        "model": MODELS[key],
        "llama_cpp_python": llama_cpp.__version__,
        "vocab_size": lv.n,
        "bos": lv.bos(),
        "eos": lv.eos(),
        "add_bos": lv.add_bos(),
        "add_eos": lv.add_eos(),
        "eog": [i for i in range(lv.n) if lv.is_eog(i)],
        "attrs_sha256": attrs_digest(attrs),
        "pieces_sha256": pieces_digest(pieces),
        "pieces_plain_sha256": pieces_digest(pieces_plain),
        "sample": {str(i): {"attr": attrs[i], "piece": pieces[i].hex()} for i in sample},
        "texts": rows,
        "detok_remove_special": [
            {"ids": ids, "text": lv.detokenize(ids, remove_special=True).decode("utf-8", errors="replace")}
            for ids in (rows[11]["ids"], rows[12]["ids"] + [lv.eos()], [lv.bos(), lv.bos()] + rows[13]["ids"])
        ],
        "variants": [],
    }
    for changes in VARIANTS[key]:
        vv = LlamaVocab(variant_file(path, changes, tmp))
        vrows = []
        for text in texts:
            ids = vv.tokenize(text, parse_special=True)
            vrows.append({"ids": ids, "detok_sha256": hashlib.sha256(vv.detokenize(ids)).hexdigest()[:16]})
        out["variants"].append({"changes": changes, "add_bos": vv.add_bos(), "rows": vrows})
    if key == "smollm2":
        template = lv.llm.metadata["tokenizer.chat_template"]
        out["chat"] = []
        for messages in CHATS:
            for agp in (True, False):
                fmt = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
                    template, eos_token=lv.piece(lv.eos()).decode(), bos_token=lv.piece(lv.bos()).decode(),
                    add_generation_prompt=agp,
                )  # fmt: skip
                prompt = fmt(messages=messages).prompt
                out["chat"].append({"messages": messages, "add_generation_prompt": agp, "prompt": prompt})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(MODELS), help="record one model")
    args = parser.parse_args()
    texts = corpus()
    DATA.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for key in sorted(MODELS):
            if args.only and key != args.only:
                continue
            data = record_model(key, texts, tmp)
            path = DATA / f"tokens_{key}.json"
            text = json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"
            path.write_text(text, encoding="utf-8")
            print(f"{path}: {len(texts)} texts, {path.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
