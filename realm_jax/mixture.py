"""llama.cpp's quantization mixtures: the tensor type each tensor of a GGUF file gets under a file type.

A transcription of llama.cpp's `src/llama-quant.cpp` as llama-cpp-python 0.3.36 builds it:
`tensor_allows_quantization`, `tensor_get_category`, `llama_tensor_get_type_impl` (the mixture of each file
type: which layers' attn_v and ffn_down get more bits, the output and embedding types),
`tensor_type_fallback` (row lengths that are not a multiple of the type's block) and
`llama_ftype_get_default_type`. The rules keep counters of the attn_v and ffn tensors seen so far, so they
visit the tensors in llama.cpp's order (`llama_order`: by layer, then by name). `realm-jax quantize`
(`realm_jax.requantize`) reads `plan`; tests compare it with llama.cpp's own choices
(`llama_quant_compute_types`) and files.

Type names are ggml's (gguf-py's `GGMLQuantizationType`); which of them realm-jax can write is the format
table's business, not this module's.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from realm_jax.errors import MetadataError, UnsupportedFormatError
from realm_jax.inputs import shown

__all__ = ["FILE_TYPES", "Hparams", "allows_quantization", "file_type_id", "hparams_from_metadata", "llama_order",
           "plan", "requires_imatrix"]

# llama_ftype_get_default_type: file type -> the tensor type most of its tensors get.
FILE_TYPES: dict[str, str] = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1",
    "Q8_0": "Q8_0", "Q1_0": "Q1_0", "MXFP4_MOE": "MXFP4", "Q2_K_S": "Q2_K", "Q2_K": "Q2_K", "IQ3_XS": "IQ3_S",
    "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K",
    "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "TQ1_0": "TQ1_0", "TQ2_0": "TQ2_0", "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS",
    "IQ2_S": "IQ2_XS", "IQ2_M": "IQ2_S", "IQ3_XXS": "IQ3_XXS", "IQ1_S": "IQ1_S", "IQ1_M": "IQ1_M",
    "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS", "IQ3_S": "IQ3_S", "IQ3_M": "IQ3_S",
}  # fmt: skip

# Architectures whose 80-layer (jais2: 68-layer) models llama.cpp types as 70B, which gives attn_v more bits.
_70B_LAYERS = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}
_IQ2_FTYPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M")
_IMATRIX_TYPES = ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S")
_FALLBACK = {**dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"),
             **dict.fromkeys(("Q2_0", "Q2_K", "Q3_K", "TQ1_0", "TQ2_0"), "Q4_0"),
             "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# Names tensor_allows_quantization keeps as they are (substrings; the whole name for the last two).
_KEEP = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
         "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
         "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
         "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
         "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
         "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd",
         "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
         "mm.a.code_embd")
_KEEP_NAMES = ("position_embd.weight", "token_types.weight")
_KEEP_GLM5_NEXT = ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                   "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight",
                   "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight")
_CATEGORIES = (("attn_qkv.weight", "qkv"), ("attn_kv_b.weight", "kv_b"), ("attn_v.weight", "v"),
               ("attn_k.weight", "k"), ("attn_q.weight", "q"), ("attn_output.weight", "attn_output"),
               ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"))
_LAYER = re.compile(r"blk\.([+-]?\d+)")


@dataclasses.dataclass(frozen=True)
class Hparams:
    """What the mixture rules read of a model (llama.cpp's hparams of layer 0)."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        layers = _70B_LAYERS.get(self.arch)
        return layers == self.n_layer and (self.arch != "llama" or self.n_head != self.n_head_kv)


def hparams_from_metadata(metadata: Mapping[str, Any], *, what: str = "model") -> Hparams:
    """The `Hparams` of a GGUF file's metadata (`{arch}.block_count`, head counts, expert count)."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise MetadataError(f"{what}: general.architecture is missing")

    def first(key: str, default=None) -> int:
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise MetadataError(f"{what}: {arch}.{key} is missing")
        if isinstance(value, (np.ndarray, list)):  # a per-layer array: llama.cpp's rules read layer 0
            value = value[0] if len(value) else 0
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
                or not 0 <= value < 2**31:
            raise MetadataError(f"{what}: {arch}.{key}={shown(value)} must be an integer in [0, 2**31) (or an "
                                "array of them)")
        return int(value)

    n_head = first("attention.head_count", 0)
    return Hparams(arch, first("block_count"), n_head, first("attention.head_count_kv", n_head),
                   first("expert_count", 0))


def file_type_id(name: str) -> int:
    """general.file_type's value for a file type name ("Q4_K_M" -> 15; "GUESSED": 1024, none)."""
    return int(LlamaFileType[{"F32": "ALL_F32", "GUESSED": "GUESSED"}.get(name, f"MOSTLY_{name}")])


def _block(type_name: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][0]


def _n_dims(shape: Sequence[int]) -> int:
    ne = tuple(shape)[::-1]  # ggml_n_dims: trailing dims of 1 do not count
    return next((i + 1 for i in range(len(ne) - 1, 0, -1) if ne[i] > 1), 1)


def _layer(name: str) -> int:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def llama_order(names) -> list[str]:
    """Tensor names in the order llama.cpp's loader keeps them (and its quantize visits and writes them)."""
    return sorted(names, key=lambda n: (_layer(n), n))


def allows_quantization(name: str, shape: Sequence[int], arch: str) -> bool:
    """llama.cpp's tensor_allows_quantization with its default parameters (the output is quantized)."""
    if _n_dims(shape) < 2 or not name.endswith("weight") or name in _KEEP_NAMES:
        return False
    keep = _KEEP + (_KEEP_GLM5_NEXT if arch == "glm5-next" else ())
    return not any(k in name for k in keep)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    return next((cat for key, cat in _CATEGORIES if key in name), "other")


def requires_imatrix(name: str, type_name: str, ftype: str) -> bool:
    """llama.cpp's tensor_requires_imatrix: the types it writes only from an importance matrix."""
    if _category(name) in ("output", "token_embd"):
        return False
    return type_name in _IMATRIX_TYPES or (type_name == "Q2_K" and ftype == "Q2_K_S")


@dataclasses.dataclass
class _State:  # quantize_state_impl's counters
    hp: Hparams
    n_attention_wv: int
    tied: bool
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer_info(st: _State, counter: int, name: str) -> tuple[int, int]:
    n_layer = st.hp.n_layer
    if max(1, st.hp.n_expert) > 1:  # experts are not consecutive: the layer comes from the name
        m = _LAYER.match(name)
        if m is None:
            raise MetadataError(f"failed to determine layer for tensor {name}")
        counter = int(m.group(1))
        if not 0 <= counter < n_layer:
            raise MetadataError(f"bad layer {counter} for tensor {name}; must be in [0, {n_layer})")
    return counter, n_layer


def _mixture(st: _State, t: str, name: str, shape: Sequence[int], ft: str, cat: str) -> str:
    """llama_tensor_get_type_impl: the type of one quantizable tensor under file type `ft` (default type t)."""
    hp, arch = st.hp, st.hp.arch
    attn_v = cat in ("v", "qkv", "kv_b")
    glm5_q = arch == "glm5-next" and any(k in name for k in ("attn_q_a", "attn_q_b", "nextn.eh_proj"))
    if glm5_q and t not in ("F32", "BF16", "F16"):  # never below Q8_0
        return "Q8_0"
    if cat == "output" or (st.tied and cat == "token_embd"):
        if ft == "MXFP4_MOE" or arch == "falcon" or shape[-1] % _block(t):
            t = "Q8_0"
        elif ft in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
            t = "Q5_K"
        elif t != "Q8_0":
            t = "Q6_K"
    elif ft == "MXFP4_MOE":  # experts -> MXFP4, the rest -> Q8_0
        expert = arch != "bailingmoe3" or cat in ("ffn_up", "ffn_gate", "ffn_down")
        t = "MXFP4" if len(shape) > 2 and shape[-3] > 1 and expert else "Q8_0"
    elif cat == "token_embd":
        if ft in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            t = "Q2_K"
        elif ft in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            t = "IQ3_S"
        elif ft in ("TQ1_0", "TQ2_0", "Q2_0"):
            t = "Q4_K"
    elif ft in _IQ2_FTYPES:
        lower = "IQ3_S" if ft in ("IQ2_S", "IQ2_M") else "Q2_K"
        if attn_v:
            t = "Q4_K" if hp.n_gqa >= 4 or hp.n_expert >= 4 else lower
            st.i_attention_wv += 1
        elif hp.n_expert == 8 and cat == "k":
            t = "Q4_K"
        elif cat == "ffn_down":
            if st.i_ffn_down < hp.n_layer // 8:
                t = lower
            st.i_ffn_down += 1
        elif cat == "attn_output":
            if hp.n_expert == 8:
                t = "Q5_K"
            elif ft in ("IQ1_S", "IQ1_M"):
                t = "IQ2_XXS"
            elif ft in ("IQ2_S", "IQ2_M"):
                t = "IQ3_S"
    elif attn_v:
        i, n = st.i_attention_wv, st.n_attention_wv
        if ft == "Q2_K":
            t = "Q4_K" if hp.n_gqa >= 4 else "Q3_K"
        elif ft == "Q2_K_S" and hp.n_gqa >= 4:
            t = "Q4_K"
        elif ft == "IQ3_XXS":
            t = "Q4_K" if hp.n_gqa >= 4 else "IQ3_S"  # without an importance matrix
        elif (ft in ("IQ3_XS", "IQ3_S") and hp.n_gqa >= 4) or ft == "IQ3_M":
            t = "Q4_K"
        elif ft == "Q3_K_M":
            t = "Q5_K" if i < 2 else "Q4_K"
        elif ft == "Q3_K_L" or (ft in ("IQ4_NL", "IQ4_XS") and hp.n_gqa >= 4):
            t = "Q5_K"
        elif ft in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n):
            t = "Q6_K"
        elif ft == "Q4_K_S" and i < 4:
            t = "Q5_K"
        if hp.is_70b and t in ("Q3_K", "Q4_K"):  # 8 heads share attn_v: more bits cost little
            t = "Q5_K"
        if hp.n_expert == 8:
            t = "Q8_0"
        st.i_attention_wv += 1
    elif cat == "k":
        if hp.n_expert == 8:
            t = "Q8_0"
        elif ft == "IQ3_XS":
            t = "IQ3_XXS"
        elif ft == "IQ3_XXS":
            t = "IQ2_S"
    elif cat == "q":
        if ft == "IQ3_XS":
            t = "IQ3_XXS"
        elif ft == "IQ3_XXS":
            t = "IQ2_S"
    elif cat == "ffn_down":
        i, n = _layer_info(st, st.i_ffn_down, name)
        if ft == "Q2_K":
            t = "Q3_K"
        elif ft == "Q2_K_S":
            if i < n // 8:
                t = "Q4_K"
        elif ft == "IQ3_XXS":  # without an importance matrix
            t = "Q4_K" if i < n // 8 else "Q3_K"
        elif ft == "Q3_K_M":
            t = "Q5_K" if i < n // 16 else "Q4_K" if arch != "falcon" or _more_bits(i, n) else "Q3_K"
        elif ft == "IQ3_M" and (i < n // 8 or (hp.n_expert == 8 and _more_bits(i, n))):
            t = "Q4_K"
        elif ft == "Q3_K_L":
            t = "Q4_K" if arch == "falcon" else "Q5_K"
        elif ft == "Q4_K_M":
            if arch == "falcon":
                t = "Q6_K" if i < n // 16 else "Q5_K" if _more_bits(i, n) else "Q4_K"
            elif _more_bits(i, n):
                t = "Q6_K"
        elif i < n // 8 and ft in ("IQ4_NL", "IQ4_XS"):  # without an importance matrix
            t = "Q5_K"
        elif ft == "Q5_K_M" and _more_bits(i, n):
            t = "Q6_K"
        elif ft == "Q4_K_S" and arch != "falcon" and i < n // 8:
            t = "Q5_K"
        st.i_ffn_down += 1
    elif cat == "attn_output":
        if arch != "falcon":
            if hp.n_expert == 8:
                if ft in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S",
                          "IQ3_M", "IQ4_XS"):
                    t = "Q5_K"
            else:
                t = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(ft, t)
        elif ft == "Q3_K_L":
            t = "Q4_K"
    elif cat in ("ffn_gate", "ffn_up"):
        counter = "i_ffn_gate" if cat == "ffn_gate" else "i_ffn_up"
        i, n = _layer_info(st, getattr(st, counter), name)
        if ft == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
            t = "IQ3_XXS"
        setattr(st, counter, getattr(st, counter) + 1)
    return t


def _fallback(name: str, cols: int, t: str) -> str:
    """tensor_type_fallback: a type whose block divides the row length `cols`."""
    if cols % _block(t) == 0:
        return t
    if t in _FALLBACK:
        t = _FALLBACK[t]
    elif _block(t) > 32:
        raise UnsupportedFormatError(f"{name}: row length {cols} is not a multiple of {t}'s block "
                                     f"{_block(t)}, and llama.cpp defines no fallback type for {t}")
    return t if cols % _block(t) == 0 else "F16"


def plan(tensors: Mapping[str, tuple[Sequence[int], str]], ftype: str, hp: Hparams, *, pure: bool = False,
         default: str | None = None) -> dict[str, str]:
    """The tensor type of every tensor when llama.cpp quantizes a file to `ftype` (no importance matrix).

    Args:
      tensors: name -> (shape in numpy order (..., rows, cols), current type name), any order.
      ftype: a file type of `FILE_TYPES`.
      hp: the model's `Hparams`.
      pure: every quantizable tensor gets the default type (llama.cpp's --pure), fallbacks aside.
      default: the default type, where it is not the file type's own (a pure file of a type no file type has).

    Returns:
      name -> type name, in llama.cpp's order (`llama_order`). Tensors it does not quantize keep their type.
    """
    default = default or FILE_TYPES[ftype]
    names = llama_order(tensors)
    cats = {name: _category(name) for name in names}
    st = _State(hp, n_attention_wv=sum(c in ("v", "qkv", "kv_b") for c in cats.values()),
                tied="output.weight" not in cats)
    out = {}
    for name in names:
        shape, current = tensors[name]
        if not allows_quantization(name, shape, hp.arch):
            out[name] = current
            continue
        t = default
        if _block(default) > 1:  # ggml_is_quantized
            if not pure:
                t = _mixture(st, t, name, shape, ftype, cats[name])
            t = _fallback(name, int(shape[-1]), t)
        out[name] = t
    return out
