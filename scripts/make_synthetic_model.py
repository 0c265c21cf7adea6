"""Write the small synthetic llama-architecture GGUF models the test suite compares against llama.cpp.

A seeded random llama model (D=256, 4 query heads and 2 KV heads of 64, V=1024, untied output, context 1024;
size "k": 4 layers, F=768; size "s": 2 layers, F=512, for the files of the lower-bit types, to keep the test
data small) is written as an F32 GGUF with gguf-py into a temporary folder, then quantized by llama.cpp
(``llama_cpp.llama_model_quantize``, no importance matrix) into ``tests/data/synthetic/<name>.gguf`` for each
of `VARIANTS`. Every 2-D weight has a row length that is a multiple of 256, so llama.cpp stores true k-quants
and i-quants rather than its fallbacks (real small models are mostly fallbacks).

llama.cpp writes IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S and IQ3_XXS only with an importance matrix. For them
`RANDOM` files are written with gguf-py directly: the layers' matrices take these types in turn, each made of
random valid blocks (random codebook points, signs and sub-block scales) whose f16 super-block scale gives the
block the RMS of the F32 weights it replaces; the embedding and output matrices are Q8_0 (gguf-py's quantizer,
bit-exact with llama.cpp's). llama.cpp evaluates them like any other file.

The tokenizer is a SentencePiece-style ("llama") vocabulary: <unk>, <s>, </s>, the 256 byte tokens, then
765 pieces: the printable ASCII characters, the space marker U+2581, and byte-pair merges learned on the
English and Python text below, scored by merge rank (llama.cpp's SPM tokenizer merges the highest-scoring
adjacent pair whose concatenation is a piece). It is a rough tokenizer (about 2.3 tokens per token of the
real models' vocabularies), which is all a test needs: the ids recorded from llama.cpp are the reference.

The output matrix is scaled so that logits have a standard deviation of about 5.5, with log-normal row
norms so that a few tokens are likely everywhere; with that, llama.cpp's top-1 margin is >= 0.5 at most
prompt positions (figures in tests/data/llama_ref/manifest.json), so a top-1 comparison means something.
The attention scales make the predictions depend strongly on the context and its order.

The output is deterministic: rerunning writes the same bytes.

Run: ``.venv/bin/python scripts/make_synthetic_model.py [NAME ...]`` (all files, or the ones named; needs
llama-cpp-python: ``make llama``).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import pathlib
import re
import string
import sys
import tempfile

import gguf
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "tests" / "data" / "synthetic"

D_MODEL = 256
N_HEADS = 4
N_KV_HEADS = 2
HEAD_DIM = D_MODEL // N_HEADS
VOCAB = 1024
CONTEXT = 1024  # the synthetic vocabulary turns the long reference prompt into ~760 tokens
ROPE_BASE = 10000.0
RMS_EPS = 1e-5
SEED = 20240611

# Standard deviations of the random weights: attention scores q.k/sqrt(H) of std ~1.5, residual updates of
# rms ~0.5-1 against an embedding of rms 1, logits of std ~5.5.
EMBED_STD = 1.0
QK_STD = 0.077
VO_STD = 0.06
FFN_STD = 1.0 / np.sqrt(D_MODEL)
DOWN_GAIN = 1.2  # ffn_down's std is DOWN_GAIN / sqrt(F)
OUTPUT_STD = 0.30


@dataclasses.dataclass(frozen=True)
class Size:
    n_layers: int
    ffn: int


SIZES = {"k": Size(n_layers=4, ffn=768), "s": Size(n_layers=2, ffn=512)}

# file name -> (size, llama.cpp's file type)
VARIANTS = {
    "llama-k-q4_k_m": ("k", "LLAMA_FTYPE_MOSTLY_Q4_K_M"),
    "llama-k-q5_k_m": ("k", "LLAMA_FTYPE_MOSTLY_Q5_K_M"),
    "llama-k-q6_k": ("k", "LLAMA_FTYPE_MOSTLY_Q6_K"),
    "llama-k-q8_0": ("k", "LLAMA_FTYPE_MOSTLY_Q8_0"),
    "llama-s-q2_k": ("s", "LLAMA_FTYPE_MOSTLY_Q2_K"),
    "llama-s-q3_k_s": ("s", "LLAMA_FTYPE_MOSTLY_Q3_K_S"),
    "llama-s-q3_k_m": ("s", "LLAMA_FTYPE_MOSTLY_Q3_K_M"),
    "llama-s-iq4_nl": ("s", "LLAMA_FTYPE_MOSTLY_IQ4_NL"),
    "llama-s-iq4_xs": ("s", "LLAMA_FTYPE_MOSTLY_IQ4_XS"),
    "llama-s-iq3_s": ("s", "LLAMA_FTYPE_MOSTLY_IQ3_S"),
    "llama-s-tq2_0": ("s", "LLAMA_FTYPE_MOSTLY_TQ2_0"),
}
# file name -> (size, the types the layers' matrices take in turn), written with random valid blocks
RANDOM = {"llama-s-iq-random": ("s", ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"))}

SPACE = "\u2581"  # SentencePiece's visible space
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_BYTE = 1, 2, 3, 6

CORPUS = """
The quick brown fox jumps over the lazy dog. A language model reads a sequence of tokens and predicts the
next one. Each token is turned into a vector, and the vectors pass through a stack of layers. In every
layer, attention lets each position look at the positions before it, and a feed-forward network transforms
each position on its own. The weights of the model are stored in a file, and a quantized file stores them
with fewer bits, which makes the model smaller and faster to run on a computer with little memory.
Once upon a time, there was a little girl who lived in a small house near the forest. Every morning she
walked to the river with her mother and her brother. They would sit on the bank and watch the water
flow past the old stone bridge. One day they saw a boat, and the man in the boat waved at them and said
hello. The children laughed and ran home to tell their father about the strange visitor.
Scientists study the world by making observations and testing ideas with experiments. When the results of
an experiment do not agree with a theory, the theory must be changed. This process has given us our
understanding of physics, chemistry, biology and many other fields. The history of science is full of
people who asked simple questions and found surprising answers.
The city council met on Tuesday to discuss the new budget for the coming year. Members talked about
schools, roads, public transport and the price of housing. After a long debate, they agreed to spend more
money on the water system and to build a new library in the center of town.
def forward(self, x, cache=None):
    for layer in self.layers:
        x = layer(x, cache)
    return self.norm(x) @ self.output.T
import numpy as np
class Model:
    def __init__(self, config):
        self.config = config
        self.weights = {}
User: What is the capital of France?
Assistant: The capital of France is Paris. It is known for its art, food and history.
User: Can you write a short poem about the sea?
Assistant: Sure! Here is a short poem about the sea and the wind.
"""

COMMON_WORDS = """
the of and to a in is it you that he was for on are with as I his they be at one have this from or had by
not word but what some we can out other were all there when up use your how said an each she which do their
time if will way about many then them write would like so these her long make thing see him two has look more
day could go come did number sound no most people my over know water than call first who may down side been
now find any new work part take get place made live where after back little only round man year came show
every good me give our under name very through just form sentence great think say help low line differ turn
cause much mean before move right boy old too same tell does set three want air well also play small end put
home read hand port large spell add even land here must big high such follow act why ask men change went
light kind off need house picture try us again animal point mother world near build self earth father head
stand own page should country found answer school grow study still learn plant cover food sun four between
state keep eye never last let thought city tree cross farm hard start might story saw far sea draw left late
run while press close night real life few north open seem together next white children begin got walk example
ease paper group always music those both mark often letter until mile river car feet care second book carry
took science eat room friend began idea fish mountain stop once base hear horse cut sure watch color face wood
main enough plain girl usual young ready above ever red list though feel talk bird soon body dog family direct
pose leave song measure door product black short numeral class wind question happen complete ship area half
rock order fire south problem piece told knew pass since top whole king space heard best hour better true
during hundred five remember step early hold west ground interest reach fast verb sing listen six table travel
less morning ten simple several vowel toward war lay against pattern slow center love person money serve
appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry dark
machine note wait plan figure star box noun field rest correct able pound done beauty drive stood contain
front teach week final gave green oh quick develop ocean warm free minute strong special mind behind clear
tail produce fact street inch multiply nothing course stay wheel full force blue object decide surface deep
moon island foot system busy test record boat common gold possible plane stead dry wonder laugh thousand ago
ran check game shape equal hot miss brought heat snow tire bring yes distant fill east paint language among
return print range input output model token value self class import def none true false
"""


def _training_words(text: str) -> collections.Counter:
    """SentencePiece's view of `text` for merge learning: whitespace-separated chunks with a leading space
    marker, split further into letter runs and single other characters, so that the merges learn
    "<space>word" rather than "<space>word," (at run time the tokenizer merges the two parts separately)."""
    words: collections.Counter = collections.Counter()
    for chunk in text.split():
        for i, part in enumerate(re.findall(r"[A-Za-z]+|[^A-Za-z]", chunk)):
            words[(SPACE if i == 0 else "") + part] += 1
    return words


def learn_pieces(n_pieces: int) -> list[tuple[str, float]]:
    """Pieces and scores: the printable ASCII characters and the space marker, then byte-pair merges.

    The merges are learned on `CORPUS`, on `COMMON_WORDS` (counted three times each) and on runs of spaces
    (Python indentation). Ties in the pair counts are broken by the pair's text, so the result is
    deterministic.
    """
    alphabet = [SPACE] + [c for c in string.printable if c not in string.whitespace]
    words = _training_words(CORPUS)
    for w, n in _training_words(COMMON_WORDS).items():
        words[w] += 3 * n
    words[SPACE * 4] += 40
    words[SPACE * 8] += 20
    segmented = {w: list(w) for w in words}
    pieces = [(c, -1e4 - i) for i, c in enumerate(alphabet)]  # single characters are never merge targets
    known = set(alphabet)
    rank = 0
    while len(pieces) < n_pieces:
        pairs: collections.Counter = collections.Counter()
        for w, syms in segmented.items():
            for a, b in zip(syms, syms[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            raise ValueError(f"the corpus yields only {len(pieces)} pieces, {n_pieces=} asked")
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merged = a + b
        for w, syms in segmented.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            segmented[w] = out
        if merged not in known:
            known.add(merged)
            pieces.append((merged, -float(rank)))
            rank += 1
    return pieces


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0] * len(tokens)
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256
    for piece, score in learn_pieces(VOCAB - len(tokens)):
        tokens.append(piece)
        scores.append(score)
        types.append(TOKEN_NORMAL)
    assert len(tokens) == VOCAB and len(set(tokens)) == VOCAB
    return tokens, scores, types


def weights(rng: np.random.Generator, size: Size) -> dict[str, np.ndarray]:
    """GGUF tensor name -> f32 array in GGUF's row-major (out_features, in_features) layout.

    Random q/k weights need no RoPE permutation: llama.cpp reads them in its "normal" (adjacent pairs)
    convention, and so must any runtime that loads these files.
    """

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight():
        return (1.0 + 0.1 * rng.standard_normal(D_MODEL)).astype(np.float32)

    kv_dim = N_KV_HEADS * HEAD_DIM
    vo_std = VO_STD * 16 / np.sqrt(D_MODEL)
    w = {"token_embd.weight": normal((VOCAB, D_MODEL), EMBED_STD)}
    for i in range(size.n_layers):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm_weight()
        w[p + "attn_q.weight"] = normal((D_MODEL, D_MODEL), QK_STD)
        w[p + "attn_k.weight"] = normal((kv_dim, D_MODEL), QK_STD)
        w[p + "attn_v.weight"] = normal((kv_dim, D_MODEL), vo_std)
        w[p + "attn_output.weight"] = normal((D_MODEL, D_MODEL), vo_std)
        w[p + "ffn_norm.weight"] = norm_weight()
        w[p + "ffn_gate.weight"] = normal((size.ffn, D_MODEL), FFN_STD)
        w[p + "ffn_up.weight"] = normal((size.ffn, D_MODEL), FFN_STD)
        w[p + "ffn_down.weight"] = normal((D_MODEL, size.ffn), DOWN_GAIN / np.sqrt(size.ffn))
    w["output_norm.weight"] = norm_weight()
    # Log-normal row norms: a few tokens are likely everywhere, which widens the top-1 margins.
    row_scale = np.exp(0.35 * rng.standard_normal((VOCAB, 1))).astype(np.float32)
    w["output.weight"] = normal((VOCAB, D_MODEL), OUTPUT_STD) * row_scale
    return w


def _random_blocks(fmt: str, w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random valid `fmt` blocks for the rows of w [N, K]: GGUF bytes [N, K/256 * type_size] whose f16
    super-block scale d gives each block the RMS of w's block it stands for."""
    qtype = gguf.GGMLQuantizationType[fmt]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(w.shape[0], w.shape[1] // block, type_size), dtype=np.uint8)

    def set_d(d: np.ndarray) -> None:
        bits = d.astype(np.float16).view(np.uint16)
        if fmt == "IQ1_M":  # d's nibbles are the top nibbles of the four scale words at bytes 48..55
            for i in range(4):
                raw[..., 49 + 2 * i] = (raw[..., 49 + 2 * i] & 0x0F) | (((bits >> (4 * i)) & 0xF) << 4).astype(np.uint8)
        else:  # d is the first field
            raw[..., :2] = bits[..., None].view(np.uint8)

    set_d(np.ones(raw.shape[:2]))
    unit = gguf.quants.dequantize(raw.reshape(w.shape[0], -1), qtype).reshape(*raw.shape[:2], block)
    target = np.sqrt(np.mean(np.square(w.reshape(*raw.shape[:2], block)), axis=-1))
    set_d(target / np.sqrt(np.mean(np.square(unit), axis=-1)))
    return raw.reshape(w.shape[0], -1)


def write_source(path: pathlib.Path, size: Size, random_types: tuple[str, ...] = ()) -> None:
    """The F32 model of `size`; with `random_types`, its layers' matrices as random blocks of those types
    in turn (and Q8_0 embedding and output matrices) instead."""
    tokens, scores, types = vocabulary()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("realm-jax synthetic llama")
    writer.add_file_type(int(gguf.LlamaFileType.GUESSED if random_types else gguf.LlamaFileType.ALL_F32))
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(D_MODEL)
    writer.add_block_count(size.n_layers)
    writer.add_feed_forward_length(size.ffn)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_KV_HEADS)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_freq_base(ROPE_BASE)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    rng = np.random.default_rng(SEED)
    turn = 0
    for name, array in weights(rng, size).items():
        if random_types and name.startswith("blk.") and array.ndim == 2:
            fmt = random_types[turn % len(random_types)]
            turn += 1
            qtype = gguf.GGMLQuantizationType[fmt]
            writer.add_tensor(name, _random_blocks(fmt, array, rng), raw_dtype=qtype)  # bytes [N, row bytes]
        elif random_types and array.ndim == 2:
            q8 = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(src: pathlib.Path, dst: pathlib.Path, ftype_name: str) -> None:
    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp logs every tensor otherwise
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = 2
    tmp = dst.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({ftype_name}) returned {rc}")
    tmp.replace(dst)


def describe(path: pathlib.Path) -> str:
    """One line per file: size, hash, type counts, then the weights whose type differs from the majority."""
    from realm_jax import open_gguf

    with open_gguf(path) as f:
        types = {n: t.type_name for n, t in f.tensors.items()}
    counts = collections.Counter(types.values())
    majority = collections.Counter(t for t in types.values() if t != "F32").most_common(1)[0][0]
    others = {n: t for n, t in types.items() if t not in (majority, "F32")}
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    size = path.stat().st_size / 2**20
    line = f"{path.relative_to(REPO)}: {size:.2f} MiB, sha256 {digest}..., {dict(counts)}"
    return line + "".join(f"\n    {n} {t}" for n, t in others.items())


def main(names: list[str]) -> int:
    names = names or [*VARIANTS, *RANDOM]
    unknown = [n for n in names if n not in VARIANTS and n not in RANDOM]
    if unknown:
        raise SystemExit(f"unknown model names {unknown}; known: {', '.join([*VARIANTS, *RANDOM])}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sources: dict[str, pathlib.Path] = {}
        for name in names:
            dst = OUT_DIR / f"{name}.gguf"
            if name in RANDOM:
                size, random_types = RANDOM[name]
                tmp_dst = dst.with_suffix(".tmp")
                write_source(tmp_dst, SIZES[size], random_types)
                tmp_dst.replace(dst)
            else:
                size, ftype_name = VARIANTS[name]
                if size not in sources:
                    sources[size] = pathlib.Path(tmp) / f"llama-{size}-f32.gguf"
                    write_source(sources[size], SIZES[size])
                quantize(sources[size], dst, ftype_name)
            print(describe(dst))
    total = sum(p.stat().st_size for p in OUT_DIR.glob("*.gguf"))
    print(f"total {total / 2**20:.2f} MiB in {OUT_DIR.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
