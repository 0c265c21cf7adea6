"""A tokenizer built from GGUF metadata that tokenizes and detokenizes exactly as llama.cpp does.

llama.cpp (`src/llama-vocab.cpp`) is the reference. Its rules are reproduced here, with a Hugging Face
`tokenizers.Tokenizer` doing the splitting (and a gpt2 vocabulary's merges):

- Token attributes come from ``tokenizer.ggml.token_type``, then llama.cpp's fix-ups by token text: EOT,
  EOM and FIM tokens found by name become control tokens, control tokens named "unused" are unused, and
  the end-of-generation set is EOS plus the end-of-turn tokens llama.cpp recognises by name.
- Control, unknown and user-defined tokens are split out of the text before anything else (llama.cpp's
  "special token partition"). With ``parse_special=False`` control and unknown tokens are text like any
  other; user-defined tokens are split out in both modes. In `tokenizers` terms: control and unknown tokens
  are special added tokens, user-defined ones are plain added tokens, none normalized, and
  ``encode_special_tokens`` turns parse_special off.
- ``gpt2`` vocabularies: byte-level BPE with the file's merges, pre-split by the regexes llama.cpp uses for
  ``tokenizer.ggml.pre``.
- ``llama`` (SentencePiece) vocabularies: llama.cpp replaces spaces with U+2581 and repeatedly merges the
  adjacent pair whose concatenation is the best-scored token (`_SentencePiece`, its algorithm line for line;
  `tokenizers` only splits the special tokens out). Characters missing from the vocabulary fall back to
  ``<0xNN>`` byte tokens.
- Detokenization concatenates llama.cpp's per-token pieces and applies its space clean-up where the
  pre-tokenizer asks for it; that part is plain Python over byte strings.
"""

from __future__ import annotations

import array
import codecs
import dataclasses
import functools
import heapq
import os
import threading
from collections.abc import Iterable, Mapping, Sequence, Set
from typing import Any

import numpy as np

from realm_jax.chat_template import DEFAULT_BUDGET, TemplateBudget, render
from realm_jax.errors import ArgumentError, MetadataError, ResourceLimitError, TokenIdError
from realm_jax.inputs import as_path, check_messages, check_text, shown

__all__ = ["Tokenizer"]

# GGUF token types (llama.cpp's llama_token_type).
_TYPE_NORMAL, _TYPE_UNKNOWN, _TYPE_CONTROL, _TYPE_USER_DEFINED, _TYPE_UNUSED, _TYPE_BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp's llama_token_attr bits.
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5

_TYPE_TO_ATTR = {
    _TYPE_NORMAL: ATTR_NORMAL,
    _TYPE_UNKNOWN: ATTR_UNKNOWN,
    _TYPE_CONTROL: ATTR_CONTROL,
    _TYPE_USER_DEFINED: ATTR_USER_DEFINED,
    _TYPE_UNUSED: ATTR_UNUSED,
    _TYPE_BYTE: ATTR_BYTE,
}
_ATTR_SPECIAL = ATTR_UNKNOWN | ATTR_CONTROL  # rendered only when special pieces are asked for
_ATTR_SPLIT = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN  # split out of the text before the BPE

_SPACE = "\u2581"  # SentencePiece's visible space
_PIECES_KEPT = 1 << 14  # rendered pieces a tokenizer keeps (`Tokenizer.token_to_piece`)

# Bounds no real vocabulary comes near (gemma3 has 262,144 tokens; the longest tokens of the tested models
# have 31 and 81 characters: runs of newlines, tabs, '#'), so a hostile file cannot make the tokenizer's
# tables (~1 KB a token while they are built) or the time to build them grow without end.
MAX_VOCAB = 1 << 19
MAX_TOKEN_CHARS = 1024
MAX_VOCAB_CHARS = 1 << 24  # all tokens' characters together (gemma3: 1,476,602)
MAX_MERGES = 1 << 20  # a gpt2 vocabulary's BPE merges
# A gpt2 file's merges' characters together: the tokenizers library takes every merge as a pair of strings.
MAX_MERGE_CHARS = 1 << 25

# --- pre-tokenizers of gpt2-style vocabularies (llama_vocab::impl::load and llm_tokenizer_bpe) -----------
# llama.cpp's own spellings of the regexes; its custom matchers for the GPT-2 and Llama-3 patterns include
# the trailing `|\s+` written here.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_RE = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclasses.dataclass(frozen=True)
class _BpePre:
    regexes: tuple[str, ...]  # applied in turn, each splitting the pieces of the one before
    clean_spaces: bool = True  # llama.cpp's clean_up_tokenization_spaces at detokenization
    ignore_merges: bool = False  # a pre-split word that is a token is emitted whole
    add_bos: bool = False  # default when tokenizer.ggml.add_bos_token is absent


_DEFAULT_PRE = _BpePre((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", "[0-9][0-9][0-9]"))
_BPE_PRE: dict[str, _BpePre] = {
    "default": _DEFAULT_PRE,
    "gpt-2": _BpePre((_GPT2_RE,)),
    "llama3": _BpePre((_LLAMA3_RE,), ignore_merges=True, add_bos=True),
    "llama-v3": _BpePre((_LLAMA3_RE,), ignore_merges=True, add_bos=True),
    "llama-bpe": _BpePre((_LLAMA3_RE,), ignore_merges=True, add_bos=True),
    "qwen2": _BpePre((_QWEN2_RE,), clean_spaces=False),
    "smollm": _BpePre((r"\p{N}", _GPT2_RE), clean_spaces=False),
    "starcoder": _BpePre((r"\p{N}", _GPT2_RE)),
}

# --- special tokens llama.cpp recognises by their text (llama_vocab::impl::load) -------------------------
_EOT_NAMES = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
    "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
)  # fmt: skip
_EOM_NAMES = ("<|eom_id|>",)
_FIM_NAMES = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
            "<|code_prefix|>", "<|prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
            "<|code_suffix|>", "<|suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
            "<|code_middle|>", "<|middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}  # fmt: skip
_EOG_NAMES = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
))  # fmt: skip
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss: user-defined

# Metadata keys of the special token ids that llama.cpp reads.
_ID_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "eom": "tokenizer.ggml.eom_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "fim_pre": "tokenizer.ggml.fim_pre_token_id",
    "fim_suf": "tokenizer.ggml.fim_suf_token_id",
    "fim_mid": "tokenizer.ggml.fim_mid_token_id",
    "fim_pad": "tokenizer.ggml.fim_pad_token_id",
    "fim_rep": "tokenizer.ggml.fim_rep_token_id",
    "fim_sep": "tokenizer.ggml.fim_sep_token_id",
}
_DEPRECATED_FIM_KEYS = {
    "fim_pre": "tokenizer.ggml.prefix_token_id",
    "fim_suf": "tokenizer.ggml.suffix_token_id",
    "fim_mid": "tokenizer.ggml.middle_token_id",
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (llama.cpp's unicode_byte_to_utf8_map)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


@dataclasses.dataclass
class _Vocab:
    """The vocabulary as llama.cpp holds it after loading: texts, scores, attributes and flags."""

    source: str
    model: str  # "gpt2" or "llama"
    pre_name: str  # the gpt2 pre-tokenizer's name ("" for llama)
    pre: _BpePre | None  # gpt2 only
    texts: list[str]
    ids_of: dict[str, int]  # each token's id by its text (the texts are distinct)
    scores: np.ndarray  # f32 [n]
    attrs: list[int]
    merges: list[tuple[str, str]]  # gpt2 only, in rank order; emptied once the tokenizer is built
    ids: dict[str, int | None]  # bos, eos, eot, ... (None: absent)
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    clean_spaces: bool
    eog_ids: frozenset[int]


# --- ids from outside -------------------------------------------------------------------------------------
# Iterable, but not a sequence of ids: text and bytes would pass as their characters or byte values, a mapping
# as its keys, a set in no order of the caller's.
_NOT_IDS = (str, bytes, bytearray, memoryview, Mapping, Set)


def int_list(values: Any, what: str, kind: str = "token ids") -> list[int]:
    """`values` as a list of Python ints: the one check of ids from outside, which `Tokenizer.detokenize`,
    `Model.logits`, `Model.generate_ids` and the server share.

    Args:
      values: a list, tuple, range or iterator of ints (Python or numpy), or a 1-D integer array (numpy, JAX).
      what: what error messages call it ("ids", "the prompt", "stop_ids").
      kind: what the ints are, for the messages.

    Raises:
      TokenIdError: `values` is None, a str, bytes, a dict, a set or an array that is not 1-D, or it holds
        something other than an int (a float, a bool).
    """
    if hasattr(values, "__array__") and hasattr(values, "ndim"):  # numpy and JAX arrays
        if values.ndim != 1:
            raise TokenIdError(f"{what} must be a 1-D array of {kind}, got an array of shape {tuple(values.shape)}")
        values = np.asarray(values)
        values = values.tolist() if values.dtype.kind in "iu" else list(values)  # others fail the check below
    elif isinstance(values, _NOT_IDS) or not isinstance(values, Iterable):
        raise TokenIdError(f"{what} must be a sequence of {kind} (a list, tuple or 1-D integer array), got "
                           f"{type(values).__name__}")
    values = list(values)
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TokenIdError(f"{what} must hold ints ({kind}): [{i}] is {shown(v)}, a {type(v).__name__}")
    return [int(v) for v in values]


class Tokenizer:
    """Tokenizer of a GGUF model, identical to llama.cpp's for the same file.

    Build it with `from_gguf` or `from_metadata`. Attributes: ``bos_id`` / ``eos_id`` (None when the file
    has none), ``stop_ids`` (alias ``eot_ids``: every end-of-generation token, as llama.cpp's
    ``llama_vocab_is_eog`` reports), ``vocab_size``, ``add_bos`` / ``add_eos`` (what the file asks for),
    ``max_token_chars`` (the longest token's characters) and ``chat_template`` (the file's Jinja template, or
    None).
    """

    def __init__(self, vocab: _Vocab, chat_template: str | None):
        # Private: use from_gguf / from_metadata.
        self.source = vocab.source
        self._vocab = vocab
        self._texts = vocab.texts
        self._attrs = vocab.attrs
        self.vocab_size = len(vocab.texts)
        self.bos_id: int | None = vocab.ids["bos"]
        self.eos_id: int | None = vocab.ids["eos"]
        self.stop_ids: frozenset[int] = vocab.eog_ids
        self.eot_ids = self.stop_ids
        self.add_bos = vocab.add_bos
        self.add_eos = vocab.add_eos
        self.chat_template = chat_template
        # Pieces are made as tokens are rendered, the most recent kept: a table of every token's would hold
        # ~14 MiB for gemma3's 262,144 tokens.
        self._piece = functools.lru_cache(maxsize=_PIECES_KEPT)(functools.partial(_piece, vocab))
        self.max_token_chars = max(map(len, vocab.texts))
        self._hf = _build_hf_tokenizer(vocab)
        vocab.merges = []  # the BPE holds them now (a gpt2 vocabulary's: ~10 MiB of pairs of strings for SmolLM2)
        self._hf_lock = threading.Lock()  # encode_special_tokens is state on the shared HF object
        self._spm = _SentencePiece(vocab) if vocab.model == "llama" else None

    # --- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], *, source: str = "<metadata>") -> Tokenizer:
        """Build the tokenizer from a GGUF file's metadata.

        Args:
          metadata: the key/value metadata as `realm_jax.open_gguf(path).metadata` returns it (string
            arrays as ``list[str]``, numeric arrays as numpy arrays).
          source: what error messages name (the file path).

        Returns:
          The tokenizer.

        Raises:
          MetadataError: a tokenizer key is missing, has the wrong type or a value llama.cpp rejects or
            realm-jax does not implement (the message names the key and the value), or `metadata` is not a
            mapping.
        """
        if not isinstance(metadata, Mapping):
            raise MetadataError(f"{source}: metadata must be a mapping of GGUF keys to values (as "
                                f"open_gguf(path).metadata), got {type(metadata).__name__}")
        vocab = _load_vocab(metadata, source)
        template = metadata.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise MetadataError(
                f"{source}: tokenizer.chat_template must be a string, got {type(template).__name__}"
            )
        return cls(vocab, template)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Build the tokenizer of a GGUF file (reads the header only).

        Raises:
          GGUFError: the file cannot be read (a subclass per cause); MetadataError for bad tokenizer keys.
          ArgumentError: `path` is not a str, bytes or os.PathLike, or is empty (`realm_jax.inputs.as_path`).
        """
        from realm_jax.gguf import open_gguf

        path = as_path(path, "Tokenizer.from_gguf")
        with open_gguf(path) as f:
            metadata = f.metadata
        return cls.from_metadata(metadata, source=str(path))

    # --- encoding -------------------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``, as llama.cpp's ``llama_tokenize`` gives them.

        Args:
          text: the text.
          add_bos: None adds BOS and EOS as the file says (llama.cpp's ``add_special=True``); False adds
            neither; True adds BOS even where the file does not ask for it (EOS still as the file says).
          parse_special: True turns the texts of control tokens (``<start_of_turn>``, ``<|im_start|>``)
            into those tokens; False leaves them as plain text. User-defined tokens are split out either way.

        Returns:
          The ids.

        Raises:
          TextInputError: `text` is not a str of valid Unicode text (a lone surrogate, for instance).
          ArgumentError: `add_bos` is not None or a bool, or `parse_special` is not a bool.
        """
        # A truthy "no" or a falsy 0.0 would choose for the caller; numpy's bools are bools.
        if add_bos is not None and not isinstance(add_bos, (bool, np.bool_)):
            raise ArgumentError(f"encode: add_bos={shown(add_bos)} must be None, True or False")
        if not isinstance(parse_special, (bool, np.bool_)):
            raise ArgumentError(f"encode: parse_special={shown(parse_special)} must be True or False")
        add_bos = None if add_bos is None else bool(add_bos)
        return self._encode(check_text(text, "text"), add_bos, bool(parse_special))

    def _encode(self, text: str, add_bos: bool | None, parse_special: bool) -> list[int]:
        # `encode` for text checked already (Model.generate checks its prompts once, where they enter).
        ids: list[int] = []
        if add_bos or (add_bos is None and self.add_bos):
            if self.bos_id is None:
                raise MetadataError(f"{self.source}: no BOS token (tokenizer.ggml.bos_token_id) to add")
            ids.append(self.bos_id)
        if text:
            with self._hf_lock:
                self._hf.encode_special_tokens = not parse_special
                encoding = self._hf.encode(text, add_special_tokens=False)
            if self._spm is None:
                ids.extend(encoding.ids)
            else:  # the special tokens split out; each fragment between them is SentencePiece's
                for split, token, (start, end) in zip(encoding.ids, encoding.tokens, encoding.offsets):
                    if split:  # a special or user-defined token (the fragments are the splitter's word 0)
                        ids.append(self._spm.ids[token])
                        continue
                    # llama.cpp prefixes a space to the first fragment and to every fragment after a special
                    # token, i.e. to every fragment.
                    fragment = (" " if self._vocab.add_space_prefix else "") + text[start:end]
                    ids.extend(self._spm.encode(fragment.replace(" ", _SPACE)))
        if add_bos is not False and self.add_eos:
            ids.append(self.eos_id)
        return ids

    # --- decoding -------------------------------------------------------------------------------------
    def token_to_piece(self, id: int, *, special: bool = True) -> bytes:
        """The bytes llama.cpp's ``llama_token_to_piece`` renders for one token.

        A piece can end inside a UTF-8 character (byte tokens, byte-level BPE): stream bytes, not str.

        Args:
          id: the token id.
          special: render control and unknown tokens (their text); False renders them as b"".
        """
        self._check_id(id)
        if not special and self._attrs[id] & _ATTR_SPECIAL:
            return b""
        return self._piece(int(id))

    def detokenize(
        self, ids: Iterable[int], *, remove_special: bool = False, unparse_special: bool = True
    ) -> bytes:
        """llama.cpp's ``llama_detokenize``: the bytes of a token sequence.

        Args:
          ids: token ids: a list, tuple or iterator of ints, or a 1-D integer array.
          remove_special: drop a leading BOS / trailing EOS where the file adds them.
          unparse_special: render control and unknown tokens as their text.

        Raises:
          TokenIdError: `ids` is not such a sequence (a str, bytes, dict, set or None: `int_list`), or an id
            is outside the vocabulary.
        """
        ids = int_list(ids, "ids")
        for i in ids:
            self._check_id(i)
        remove_space = self._vocab.add_space_prefix
        if remove_special and self.add_bos and ids and ids[0] == self.bos_id:
            remove_space = False
            ids = ids[1:]
        if remove_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        out = bytearray()
        for n, i in enumerate(ids):
            piece = self.token_to_piece(i, special=unparse_special)
            if n == 0 and remove_space and piece.startswith(b" "):
                piece = piece[1:]
            out += piece
        if self._vocab.clean_spaces:
            out = _clean_spaces(out)
        return bytes(out)

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """The text of ``ids``, as llama.cpp detokenizes it (invalid UTF-8 becomes U+FFFD).

        Args:
          ids: token ids: a list, tuple or iterator of ints, or a 1-D integer array.
          skip_special: render control tokens (BOS, ``<end_of_turn>``...) as nothing instead of their text.

        Raises:
          TokenIdError: as `detokenize`.
        """
        return self.detokenize(ids, unparse_special=not skip_special).decode("utf-8", errors="replace")

    def text_offsets(self, ids: Iterable[int]) -> tuple[str, list[int]]:
        """`decode(ids, skip_special=True)` and the character offset in it at which each token's text begins
        (a control token's is empty; the tokens of a UTF-8 character split across several all start where
        it does). Exact but where the detokenizer's clean-up removed a space before punctuation: the offsets
        past it are then at most that many characters high (capped at the text's length)."""
        ids = int_list(ids, "ids")
        for i in ids:
            self._check_id(i)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        remove_space, at, offsets = self._vocab.add_space_prefix, 0, []
        for n, i in enumerate(ids):
            piece = self.token_to_piece(i, special=False)
            if n == 0 and remove_space and piece.startswith(b" "):  # as `detokenize`
                piece = piece[1:]
            offsets.append(at)
            at += len(decoder.decode(piece))
        text = self.decode(ids, skip_special=True)
        return text, [min(o, len(text)) for o in offsets]

    def token_text(self, id: int) -> str:
        """The token's text as the vocabulary stores it (``▁`` for spaces, GPT-2 byte characters)."""
        self._check_id(id)
        return self._texts[id]

    def is_control(self, id: int) -> bool:
        """Whether llama.cpp treats the token as a control token (after its fix-ups by name)."""
        self._check_id(id)
        return bool(self._attrs[id] & ATTR_CONTROL)

    def token_attr(self, id: int) -> int:
        """llama.cpp's ``llama_token_attr`` bits of the token (``llama_vocab_get_attr``)."""
        self._check_id(id)
        return self._attrs[id]

    def _check_id(self, id: int) -> None:
        if isinstance(id, bool) or not isinstance(id, (int, np.integer)) or not 0 <= id < self.vocab_size:
            raise TokenIdError(f"token id={shown(id)} is not an id of the vocabulary [0, {self.vocab_size})")

    # --- chat templates -------------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
        template: str | None = None, template_source: str = "the chat template",
        budget: TemplateBudget = DEFAULT_BUDGET,
    ) -> str:
        """Render the file's chat template (``tokenizer.chat_template``), or `template`, for ``messages``.

        The template is a program from the file (or the user): it renders in Jinja's immutable sandbox (no
        attribute starting with an underscore, no mutation of the arguments), in a worker process, under
        `budget` (output characters, memory, seconds: `realm_jax.chat_template`).

        Args:
          messages: ``[{"role": "user", "content": "..."}, ...]``.
          add_generation_prompt: end with the opening of the assistant's turn.
          template: a Jinja chat template to use instead of the file's.
          template_source: what error messages call `template` (e.g. the path it was read from).
          budget: the render's limits.

        Returns:
          The prompt text; encode it with ``parse_special=True`` (its BOS, if any, is in the text).

        Raises:
          MetadataError: the file has no chat template (and none is given), or the template does not
            compile, breaks the sandbox's rules or fails; TemplateBudgetError (a subclass) when it is over
            budget.
          ChatTemplateError: the messages are not a list of {"role": str, "content": str} dicts, or the
            template rejected them (its ``raise_exception``).
          TextInputError: a role or content is not valid Unicode text, or all of it exceeds the budget.
        """
        messages = check_messages(messages)
        if template is not None:
            template, what = check_text(template, template_source), template_source
        elif self.chat_template is None:
            raise MetadataError(
                f"{self.source}: the file has no chat template (tokenizer.chat_template is absent); "
                "format the prompt yourself or give a template"
            )
        else:
            template, what = self.chat_template, f"{self.source}: tokenizer.chat_template"
        context = dict(
            messages=messages,
            add_generation_prompt=bool(add_generation_prompt),
            bos_token=self._texts[self.bos_id] if self.bos_id is not None else "",
            eos_token=self._texts[self.eos_id] if self.eos_id is not None else "",
        )
        return render(template, what, context, budget)

    def __repr__(self) -> str:
        kind = self._vocab.model if self._vocab.pre is None else f"gpt2/{self._vocab.pre_name}"
        return (
            f"Tokenizer({self.source!r}, {kind}, vocab_size={self.vocab_size}, "
            f"bos={self.bos_id}, eos={self.eos_id})"
        )


# --- loading the vocabulary -------------------------------------------------------------------------------
def _get(metadata: Mapping[str, Any], key: str, kind: type, source: str, default: Any = ...) -> Any:
    if key not in metadata:
        if default is ...:
            raise MetadataError(f"{source}: {key} is missing")
        return default
    value = metadata[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MetadataError(f"{source}: {key} is a {type(value).__name__}, expected a {kind.__name__}")
    return value


def _num_array(metadata: Mapping[str, Any], key: str, n: int, source: str, dtype: str) -> np.ndarray | None:
    if key not in metadata:
        return None
    value = metadata[key]
    if not isinstance(value, np.ndarray) or value.ndim != 1:
        raise MetadataError(f"{source}: {key} must be a numeric array, got {type(value).__name__}")
    if value.dtype.kind not in "iuf":
        raise MetadataError(f"{source}: {key} has dtype {value.dtype}, expected a numeric array")
    if len(value) < n:
        raise MetadataError(f"{source}: {key} has {len(value)} entries for {n} tokens")
    return value[:n].astype(dtype)


def _load_vocab(metadata: Mapping[str, Any], source: str) -> _Vocab:
    model = _get(metadata, "tokenizer.ggml.model", str, source)
    pre_name = _get(metadata, "tokenizer.ggml.pre", str, source, default="")
    if model == "gpt2":
        pre_key = pre_name or "default"  # llama.cpp warns and uses "default" when the key is absent
        if pre_key not in _BPE_PRE:
            raise MetadataError(
                f"{source}: tokenizer.ggml.pre = {shown(pre_name)} is not a pre-tokenizer realm-jax implements "
                f"(supported: {sorted(_BPE_PRE)})"
            )
        pre = _BPE_PRE[pre_key]
        defaults = dict(bos=11, eos=11, unk=None)
        add_bos, add_space_prefix, clean_spaces = pre.add_bos, False, pre.clean_spaces
    elif model == "llama":
        pre, pre_key = None, ""
        defaults = dict(bos=1, eos=2, unk=0)
        add_bos, add_space_prefix, clean_spaces = True, True, False
    else:
        raise MetadataError(
            f"{source}: tokenizer.ggml.model = {shown(model)} is not a tokenizer realm-jax implements "
            "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)"
        )
    add_space_prefix = _get(metadata, "tokenizer.ggml.add_space_prefix", bool, source, add_space_prefix)

    texts = _get(metadata, "tokenizer.ggml.tokens", list, source)
    n = len(texts)
    if n == 0:
        raise MetadataError(f"{source}: tokenizer.ggml.tokens is empty")
    if n > MAX_VOCAB:
        raise ResourceLimitError(f"{source}: tokenizer.ggml.tokens has {n} tokens, more than the {MAX_VOCAB} "
                                 "realm-jax builds a tokenizer for (real vocabularies have at most 262,144)")
    texts = list(texts)
    chars = sum(len(t) for t in texts if isinstance(t, str))
    if chars > MAX_VOCAB_CHARS:
        raise ResourceLimitError(f"{source}: tokenizer.ggml.tokens has {chars} characters in all, more than the "
                                 f"{MAX_VOCAB_CHARS} realm-jax builds a tokenizer from")
    ids_of: dict[str, int] = {}
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise MetadataError(f"{source}: tokenizer.ggml.tokens[{i}] is a {type(t).__name__}, not a string")
        if len(t) > MAX_TOKEN_CHARS:
            raise ResourceLimitError(
                f"{source}: tokenizer.ggml.tokens[{i}] ({t[:16]!r}...) has {len(t)} characters, more than the "
                f"{MAX_TOKEN_CHARS} realm-jax accepts (no real vocabulary has tokens near that long)"
            )
        if not t:
            t = texts[i] = f"[EMPTY_{i}]"  # llama.cpp's name for an empty token
        if ids_of.setdefault(t, i) != i:
            raise MetadataError(f"{source}: tokenizer.ggml.tokens has {t!r} twice (ids {ids_of[t]} and {i})")

    scores = _num_array(metadata, "tokenizer.ggml.scores", n, source, "float32")
    scores = np.zeros(n, np.float32) if scores is None else scores
    types = _num_array(metadata, "tokenizer.ggml.token_type", n, source, "int64")
    attrs = [ATTR_NORMAL] * n if types is None else [_TYPE_TO_ATTR.get(int(t), 0) for t in types]
    for i, a in enumerate(attrs):
        t = texts[i]
        if a & ATTR_BYTE and not _is_byte_token(t):
            raise MetadataError(
                f"{source}: tokenizer.ggml.token_type[{i}] marks {t!r} a byte token, which needs the form "
                "<0xNN>"
            )

    merges: list[tuple[str, str]] = []
    if model == "gpt2":
        merges = _parse_merges(_get(metadata, "tokenizer.ggml.merges", list, source), ids_of, source)

    ids: dict[str, int | None] = {k: None for k in _ID_KEYS}
    ids.update(defaults)
    for name, key in {**_DEPRECATED_FIM_KEYS, **_ID_KEYS}.items():
        value = _get(metadata, key, int, source, default=None)
        if value is None:
            continue
        if not 0 <= value < n:
            raise MetadataError(f"{source}: {key} = {value} is outside the vocabulary (0..{n - 1})")
        ids[name] = value
    for name in ("bos", "eos", "unk"):
        if ids[name] is not None and ids[name] >= n:
            ids[name] = None  # llama.cpp disables a default id outside the vocabulary

    add_bos = _get(metadata, "tokenizer.ggml.add_bos_token", bool, source, add_bos)
    add_eos = _get(metadata, "tokenizer.ggml.add_eos_token", bool, source, False)
    for flag, name in ((add_bos, "bos"), (add_eos, "eos")):
        if flag and ids[name] is None:
            key = f"tokenizer.ggml.add_{name}_token"
            raise MetadataError(f"{source}: {key} is true, but the file has no {name.upper()} token id")

    _check_unsupported_attributes(metadata, source)
    eog = _fix_attributes(texts, ids_of, attrs, ids)
    return _Vocab(
        source=source, model=model, pre_name=pre_key, pre=pre, texts=texts, ids_of=ids_of, scores=scores,
        attrs=attrs, merges=merges, ids=ids, add_bos=add_bos, add_eos=add_eos, add_space_prefix=add_space_prefix,
        clean_spaces=clean_spaces, eog_ids=eog,
    )  # fmt: skip


def _is_byte_token(t: str) -> bool:
    hex_digits = "0123456789abcdefABCDEF"
    return len(t) == 6 and t.startswith("<0x") and t.endswith(">") and all(c in hex_digits for c in t[3:5])


def _parse_merges(raw: list, ids_of: Mapping[str, int], source: str) -> list[tuple[str, str]]:
    """The file's merges as pairs in rank order; a repeated pair keeps its first rank, as in llama.cpp."""
    if len(raw) > MAX_MERGES:
        raise ResourceLimitError(f"{source}: tokenizer.ggml.merges has {len(raw)} merges, more than the "
                                 f"{MAX_MERGES} realm-jax builds a tokenizer from")
    chars = sum(len(m) - 1 for m in raw if isinstance(m, str))
    if chars > MAX_MERGE_CHARS:
        raise ResourceLimitError(f"{source}: tokenizer.ggml.merges has {chars} characters in all, more than the "
                                 f"{MAX_MERGE_CHARS} realm-jax builds a tokenizer from")
    seen: set[tuple[str, str]] = set()
    merges = []
    for i, m in enumerate(raw):
        if not isinstance(m, str):
            raise MetadataError(f"{source}: tokenizer.ggml.merges[{i}] is a {type(m).__name__}, not a string")
        pos = m.find(" ", 1)
        if pos < 0:
            raise MetadataError(f"{source}: tokenizer.ggml.merges[{i}] = {shown(m)} is not two tokens and a space")
        pair = (m[:pos], m[pos + 1 :])
        # A merge that makes a non-token would send llama.cpp into its per-byte fallback, which the BPE
        # here does not have; converted files never contain one.
        for part in (*pair, pair[0] + pair[1]):
            if part not in ids_of:
                raise MetadataError(
                    f"{source}: tokenizer.ggml.merges[{i}] = {shown(m)} uses or makes {shown(part)}, not a token"
                )
        if pair not in seen:
            seen.add(pair)
            merges.append(pair)
    return merges


def _check_unsupported_attributes(metadata: Mapping[str, Any], source: str) -> None:
    # llama.cpp gives some tokens lstrip/rstrip attributes by model name; those rules are not implemented.
    name = str(metadata.get("general.name", "")).lower()
    pre = str(metadata.get("tokenizer.ggml.pre", ""))
    arch = str(metadata.get("general.architecture", ""))
    if (
        any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code"))
        or any(s in arch for s in ("nomic-bert-moe", "jina-bert-v3"))
        or any(s in name for s in ("phi-3", "phi3", "modern-bert"))
    ):
        raise MetadataError(
            f"{source}: llama.cpp strips spaces around some tokens of this model (general.name = {shown(name)}, "
            f"tokenizer.ggml.pre = {shown(pre)}); realm-jax does not implement those per-token rules"
        )


def _fix_attributes(
    texts: list[str], ids_of: Mapping[str, int], attrs: list[int], ids: dict[str, int | None]
) -> frozenset[int]:
    """llama.cpp's fix-ups of token attributes by token text; returns the end-of-generation ids.

    llama.cpp walks a hash map, so where several tokens match one role it picks an unspecified one; this
    picks the lowest id.
    """
    roles = {"eot": _EOT_NAMES, "eom": _EOM_NAMES, **{f"fim_{k}": v for k, v in _FIM_NAMES.items()}}
    for role, names in roles.items():
        if ids[role] is None:
            found = [ids_of[t] for t in names if t in ids_of]
            if found:
                ids[role] = min(found)
                attrs[ids[role]] |= ATTR_CONTROL
    for i, t in enumerate(texts):
        if attrs[i] & ATTR_CONTROL and "unused" in t:
            attrs[i] |= ATTR_UNUSED

    eog = {ids[r] for r in ("fim_pad", "fim_rep", "fim_sep") if ids[r] is not None}
    for t in _EOG_NAMES:
        if t in ids_of:
            eog.add(ids_of[t])
            attrs[ids_of[t]] |= ATTR_CONTROL
    for t in _ALWAYS_RENDERED:
        if t in ids_of:
            attrs[ids_of[t]] = ATTR_USER_DEFINED
    eog |= {ids[r] for r in ("eos", "eot", "eom") if ids[r] is not None}

    by_text = {texts[i]: i for i in eog}
    # o200k_harmony and solar-open: "<|end|>" ends a message, not the generation.
    if "<|end|>" in by_text and (
        ("<|return|>" in by_text and ("<|call|>" in by_text or "<|calls|>" in by_text))
        or (("<|call|>" in by_text or "<|calls|>" in by_text) and "<|flush|>" in by_text)
    ):
        eog.discard(by_text["<|end|>"])
        attrs[by_text["<|end|>"]] = ATTR_USER_DEFINED
    # gemma4 and paddleocr: "</s>" is not an end of generation there.
    if "<|tool_response>" in by_text and "</s>" in by_text:
        eog.discard(by_text["</s>"])
        attrs[by_text["</s>"]] = ATTR_NORMAL
    return frozenset(eog)


# --- pieces and detokenization ----------------------------------------------------------------------------
def _piece(vocab: _Vocab, i: int) -> bytes:
    """llama.cpp's token_to_piece(special=True) of token ``i``."""
    attr, text = vocab.attrs[i], vocab.texts[i]
    if attr & (_ATTR_SPECIAL | ATTR_USER_DEFINED):
        return text.encode()
    if attr & ATTR_NORMAL:
        if vocab.model == "llama":
            return text.replace(_SPACE, " ").encode()
        return _decode_byte_level(text)
    if attr & ATTR_BYTE:
        return bytes([int(text[3:5], 16)])
    return b""  # unused and undefined tokens render as nothing


def _decode_byte_level(text: str) -> bytes:
    """llama.cpp's llama_decode_text, its odd message for characters outside GPT-2's byte table included."""
    out = bytearray()
    for c in text:
        b = _BYTE_DECODER.get(c)
        if b is not None:
            out.append(b)
        else:
            out += b"[UNK_BYTE_0x" + c.encode().hex().encode() + text.encode() + b"]"
    return bytes(out)


def _clean_spaces(text: bytearray) -> bytearray:
    """llama.cpp's clean_up_tokenization_spaces, transcribed pass by pass (it edits the buffer in place)."""
    t = bytearray(text)
    sp, ap = ord(" "), ord("'")
    # First pass: " ?", " !", " .", " ," lose their space.
    total1, total = len(t), (1 if t else 0)
    for i in range(1, total1):
        x = t[i]
        if t[i - 1] == sp and x in b"?!.,":
            total -= 1
        t[total] = x
        total += 1
    # Second pass: a lone apostrophe between spaces loses both.
    total2, total = total, (1 if total else 0)
    i = 1
    while i < total2:
        x = t[i]
        if x == ap and i + 1 < total2 and t[i - 1] == sp and t[i + 1] == sp:
            total -= 1
            i += 1
            t[i] = 0
        t[total] = x
        total += 1
        i += 1
    # Third pass: " 's", " 'm", " 're", " 've" lose their space.
    total3, total = total, (1 if total else 0)
    for i in range(1, total3):
        x = t[i]
        if t[i - 1] == sp and x == ap and i + 1 < total3:
            x1 = t[i + 1]
            if x1 in b"sm":
                total -= 1
            elif x1 not in b"td" and i + 2 < total3:
                x2 = t[i + 2]
                if (x1, x2) in ((ord("r"), ord("e")), (ord("v"), ord("e"))):
                    total -= 1
        t[total] = x
        total += 1
    return t[:total]


# --- SentencePiece ("llama") vocabularies ----------------------------------------------------------------
class _SentencePiece:
    """llama.cpp's SentencePiece tokenizer (`llm_tokenizer_spm_session`) on one fragment of text: the text's
    characters are symbols; the adjacent pair whose concatenation is the best-scored token is merged (on
    equal scores the leftmost), again and again; each symbol left is its token, or its UTF-8 bytes as
    ``<0xNN>`` tokens where it is none. Exactly llama.cpp's order of merges, ties included.

    It reads the vocabulary's dict from each token's text to its id and holds the scores as float32: ~11 MiB
    for gemma3's 262,144 tokens, where a BPE with the equivalent 514,847 merges held 70.
    """

    def __init__(self, vocab: _Vocab):
        self.ids = vocab.ids_of  # llama.cpp's token_to_id
        missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in self.ids]
        if missing:
            raise MetadataError(
                f"{vocab.source}: tokenizer.ggml.tokens lacks the byte-fallback tokens {missing[:4]}... "
                f"({len(missing)} of 256); realm-jax needs all of <0x00>..<0xFF> for a 'llama' vocabulary"
            )
        self.bytes = [self.ids[f"<0x{b:02X}>"] for b in range(256)]
        self.scores = array.array("f", np.asarray(vocab.scores, np.float32).tobytes())
        self.longest = max(map(len, vocab.texts))

    def encode(self, text: str) -> list[int]:
        n = len(text)
        if not n:
            return []
        size = [1] * n  # symbol i starts at character i; 0 once merged into its left neighbour
        prev, after = list(range(-1, n - 1)), list(range(1, n + 1))
        after[-1] = -1
        ids, scores, longest = self.ids, self.scores, self.longest
        pop, push = heapq.heappop, heapq.heappush
        # (-score, left, right, characters) of each adjacent pair that makes a token; the first ones at once
        queue = [] if longest < 2 else [(-scores[t], i, i + 1, 2) for i, t in
                                        enumerate(map(ids.get, (text[i:i + 2] for i in range(n - 1)))) if t is not None]
        heapq.heapify(queue)
        while queue:
            _, left, right, merged = pop(queue)
            if not size[left] or not size[right] or size[left] + size[right] != merged:
                continue  # a side was merged since
            size[left], size[right] = merged, 0
            nxt = after[left] = after[right]
            if nxt >= 0:
                prev[nxt] = left
            # the new symbol's pairs with its neighbours (each side at most the longest token)
            before = prev[left]
            if before >= 0 and size[before] + merged <= longest:
                token = ids.get(text[before:left + merged])
                if token is not None:
                    push(queue, (-scores[token], before, left, size[before] + merged))
            if nxt >= 0 and merged + size[nxt] <= longest:
                token = ids.get(text[left:nxt + size[nxt]])
                if token is not None:
                    push(queue, (-scores[token], left, nxt, merged + size[nxt]))
        out: list[int] = []
        i = 0
        while i >= 0:
            piece = text[i:i + size[i]]
            token = ids.get(piece)
            if token is not None:
                out.append(token)
            else:
                out.extend(self.bytes[b] for b in piece.encode())
            i = after[i]
        return out


# --- the Hugging Face tokenizer ---------------------------------------------------------------------------
def _build_hf_tokenizer(vocab: _Vocab):
    """gpt2 vocabularies: the whole tokenizer. llama (SentencePiece) vocabularies: the split of the special
    and user-defined tokens out of the text only (a one-word model whose word, `_raw`, stands for each
    fragment of text between them, which `_SentencePiece` tokenizes)."""
    from tokenizers import AddedToken, Regex, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE, WordLevel

    if vocab.model == "llama":
        raw = _raw(vocab)
        hf = HFTokenizer(WordLevel(vocab={raw: 0}, unk_token=raw))
    else:
        hf = HFTokenizer(BPE(vocab=vocab.ids_of, merges=vocab.merges, ignore_merges=vocab.pre.ignore_merges))
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in vocab.pre.regexes]
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
        )
    # llama.cpp splits control, unknown and user-defined tokens out of the raw text first.
    # Control and unknown tokens are "special" (parse_special=False leaves them as text); user-defined
    # ones are split out in both modes.
    def added(attr_mask: int, exclude: int = 0) -> list:
        return [
            AddedToken(t, special=not exclude, normalized=False, lstrip=False, rstrip=False)
            for t, a in zip(vocab.texts, vocab.attrs)
            if a & attr_mask and not a & exclude
        ]

    hf.add_special_tokens(added(_ATTR_SPECIAL))
    hf.add_tokens(added(ATTR_USER_DEFINED, exclude=_ATTR_SPECIAL))
    return hf


def _raw(vocab: _Vocab) -> str:
    """The splitter's word for a fragment of text: a string none of the tokens it splits out is."""
    split = {t for t, a in zip(vocab.texts, vocab.attrs) if a & _ATTR_SPLIT}  # the texts the splitter matches
    raw = "\uffff"
    while raw in split:
        raw += "\uffff"
    return raw
