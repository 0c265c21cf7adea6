"""`realm-jax quantize`: llama.cpp's per-tensor mixtures (realm_jax.mixture) and whole files (realm_jax.requantize).

Without llama-cpp-python: a synthetic F32 llama model (scripts/make_synthetic_model.py) quantized to Q8_0 through
the command line, its tensors against gguf-py's quantizer and its metadata against the source's; the errors.
With it: the type of every tensor against llama.cpp's own choice (`llama_quant_compute_types`, no quantizing)
for every file type on model shapes that reach each rule, and whole files byte for byte against
`llama_model_quantize` of the same source (the F32 model, and a file of i-quants requantized), which llama.cpp
then loads and runs.
"""

from __future__ import annotations

import ctypes
import importlib.util
import pathlib
import sys

import gguf
import numpy as np
import pytest

import realm_jax
from realm_jax import mixture
from realm_jax.cli import main
from realm_jax.errors import UnsupportedFormatError, WriteError
from realm_jax.quant import unpack
from realm_jax.requantize import quantize_gguf

ROOT = pathlib.Path(__file__).resolve().parents[1]
NEEDS_LLAMA = "llama-cpp-python not installed: pip install 'realm-jax[llama]'"


@pytest.fixture(scope="module")
def synthetic():
    spec = importlib.util.spec_from_file_location("make_synthetic_model", ROOT / "scripts" / "make_synthetic_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory, synthetic):
    """The 2-layer synthetic llama (D 256, F 512, V 1024, untied output) as an F32 GGUF."""
    path = tmp_path_factory.mktemp("f32") / "llama-s-f32.gguf"
    synthetic.write_source(path, synthetic.SIZES["s"])
    return path


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """quantize_gguf's output for (source, --type), written once for the tests that read it."""
    out_dir, done = tmp_path_factory.mktemp("ours"), {}

    def get(src, type_name):
        if (src, type_name) not in done:
            done[src, type_name] = out_dir / f"{pathlib.Path(src).stem}-{type_name}.gguf"
            quantize_gguf(src, done[src, type_name], type_name)
        return done[src, type_name]

    return get


# --- without llama.cpp ---------------------------------------------------------------------------------------
def test_command_writes_q8_0_with_the_metadata(f32_model, tmp_path, capsys):
    out = tmp_path / "q8_0.gguf"
    assert main(["quantize", str(f32_model), str(out), "--type", "q8_0"]) == 0
    assert "Q8_0 x16" in capsys.readouterr().out
    src_meta, src = realm_jax.read_gguf(f32_model)
    meta, back = realm_jax.read_gguf(out)
    assert meta.pop("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert meta.pop("general.quantization_version") == 2
    src_meta.pop("general.file_type")
    assert list(meta) == list(src_meta) and all(np.array_equal(meta[k], src_meta[k]) for k in meta)
    assert list(back) == mixture.llama_order(src)
    for name, qt in back.items():
        x = np.asarray(realm_jax.dequantize(src[name]))
        if x.ndim == 1:  # norms stay F32
            assert qt.fmt == "F32" and np.array_equal(np.asarray(qt.planes["w"]), x)
        else:
            assert qt.fmt == "Q8_0"
            expected = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
            assert np.array_equal(unpack(qt), expected), name


def test_command_checks_its_paths(f32_model, tmp_path, capsys):
    for argv, match in [([str(f32_model), str(f32_model)], "is IN"), ([" ", "x.gguf"], "IN is empty"),
                        ([str(f32_model), str(tmp_path / "no" / "x.gguf")], "does not exist")]:
        assert main(["quantize", *argv, "--type", "Q8_0"]) == 2
        assert match in capsys.readouterr().err


def test_the_output_must_be_a_file_path(f32_model, tmp_path, capsys):
    """OUT is written beside it, then renamed over it: a device or a folder there is refused, never replaced;
    a write the system refuses is a WriteError naming OUT."""
    for out, match in [("/dev/null", "exists and is not a regular file"),
                       (tmp_path, "exists and is not a regular file"), (tmp_path / "no" / "x.gguf", "does not exist")]:
        with pytest.raises(WriteError, match=f"{out}: .*{match}"):
            quantize_gguf(f32_model, out, "Q8_0")
        assert main(["quantize", str(f32_model), str(out), "--type", "Q8_0"]) == 2
        assert match in capsys.readouterr().err
    assert pathlib.Path("/dev/null").is_char_device()
    with pytest.raises(WriteError, match=r"/proc/x\.gguf: cannot be written: "):  # a folder no file can be made in
        quantize_gguf(f32_model, "/proc/x.gguf", "Q8_0")


def test_a_read_error_names_the_input_not_the_output(f32_model, tmp_path, monkeypatch):
    """EIO while a tensor of the input is read is the input's UnreadableFileError, not OUT's WriteError;
    nothing is left beside OUT."""
    from realm_jax import gguf as reader
    from realm_jax.errors import UnreadableFileError

    def eio(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(reader.os, "preadv", eio)
    with pytest.raises(UnreadableFileError, match=rf"{f32_model.name}: tensor '.+' cannot be read at byte \d+: "):
        quantize_gguf(f32_model, tmp_path / "out.gguf", "Q8_0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), OSError("4096 requested and 0 written")])
def test_a_full_disk_says_so(f32_model, tmp_path, monkeypatch, error):
    """ENOSPC, and numpy's short write (which carries no errno), name OUT, the cause and the bytes free
    there; nothing is left beside OUT."""
    import gguf

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    cause = "No space left on device" if error.errno else r"the file system took less than was written \(4096 requested"
    with pytest.raises(WriteError, match=rf"out\.gguf: cannot be written: {cause}.*; [\d,]+ bytes free on its file system"):
        quantize_gguf(f32_model, tmp_path / "out.gguf", "Q8_0")
    assert list(tmp_path.iterdir()) == []


def test_values_the_type_cannot_hold_name_the_tensor(tmp_path):
    from realm_jax.errors import ArgumentError

    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    x[3, 7] = np.nan
    src = realm_jax.write_gguf(tmp_path / "nan.gguf", {"blk.0.ffn_up.weight": realm_jax.quantize(x, "F32")},
                               arch="llama", metadata={"llama.block_count": 1})
    # the element of the tensor, not of a chunk of it
    with pytest.raises(ArgumentError, match=r"nan\.gguf: tensor 'blk\.0\.ffn_up\.weight' \(F32 -> Q8_0\): quantize: "
                                            r"x\[3, 7\]=nan is not finite"):
        quantize_gguf(src, tmp_path / "out.gguf", "Q8_0")
    x[3, 7], x[40, 100] = 0, 1e30  # a block past an f16 scale: named in the tensor's rows too
    src = realm_jax.write_gguf(src, {"blk.0.ffn_up.weight": realm_jax.quantize(x, "F32")}, arch="llama",
                               metadata={"llama.block_count": 1})
    with pytest.raises(ArgumentError, match=r"the block x\[40, 96:128\] is too large for Q8_0"):
        quantize_gguf(src, tmp_path / "out.gguf", "Q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.gguf"]


def test_the_temporary_file_is_a_fresh_name(f32_model, tmp_path):
    """OUT is written under a new name beside it: an input called OUT.tmp, or a file there, is never touched."""
    src = tmp_path / "m.gguf.tmp"
    src.write_bytes(f32_model.read_bytes())
    other = tmp_path / "n.gguf.tmp"
    other.write_text("mine")
    quantize_gguf(src, tmp_path / "m.gguf", "Q8_0")
    quantize_gguf(src, tmp_path / "n.gguf", "Q8_0")
    assert src.read_bytes() == f32_model.read_bytes() and other.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.gguf.tmp", "n.gguf", "n.gguf.tmp"]


def _source(path, metadata, tensor_type=gguf.GGMLQuantizationType.F32):
    """A one-tensor llama file whose metadata is written as given (gguf-py's writer, with its types)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, (value, vtype, sub) in metadata.items():
        writer.add_key_value(key, value, vtype, sub_type=sub)
    data = np.zeros((4, 64), np.int32 if tensor_type == gguf.GGMLQuantizationType.I32 else np.float32)
    writer.add_tensor("blk.0.ffn_up.weight", data, raw_dtype=tensor_type)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    return path


def test_metadata_is_copied_with_its_types_and_bad_hparams_are_named(tmp_path):
    from realm_jax.errors import MetadataError
    from realm_jax.gguf import open_gguf

    T = gguf.GGUFValueType
    one = {"llama.block_count": (1, T.UINT32, None)}
    src = _source(tmp_path / "typed.gguf", one | {"x.i32": (7, T.INT32, None), "x.u64": (7, T.UINT64, None),
                                                 "x.i8s": ([1, -2], T.ARRAY, T.INT8), "GGUF.own": ("k", T.STRING, None),
                                                 "x.strs": (["a", "b"], T.ARRAY, T.STRING)})
    quantize_gguf(src, tmp_path / "out.gguf", "Q8_0")
    with open_gguf(tmp_path / "out.gguf") as f:
        types = f.metadata_types
        assert (types["x.i32"], types["x.u64"], types["x.i8s"], types["x.strs"]) == (
            ("INT32", None), ("UINT64", None), ("ARRAY", "INT8"), ("ARRAY", "STRING"))
        assert f.metadata["GGUF.own"] == "k" and list(f.metadata["x.i8s"]) == [1, -2]
    nested = _source(tmp_path / "nested.gguf", one | {"x.n": ([[1, 2], [3]], T.ARRAY, T.ARRAY)})
    with pytest.raises(MetadataError, match=r"nested\.gguf: metadata key 'x\.n' holds arrays of arrays"):
        quantize_gguf(nested, tmp_path / "out2.gguf", "Q8_0")
    for value, vtype in [(float("nan"), T.FLOAT32), ("12", T.STRING), (-5, T.INT32), (2**40, T.UINT64)]:
        bad = _source(tmp_path / "bad.gguf", {"llama.block_count": (value, vtype, None)})
        with pytest.raises(MetadataError,
                           match=r"bad\.gguf: llama\.block_count=.* must be an integer in \[0, 2\*\*31\)"):
            quantize_gguf(bad, tmp_path / "out3.gguf", "Q8_0")
    ints = _source(tmp_path / "i32.gguf", one, gguf.GGMLQuantizationType.I32)
    with pytest.raises(UnsupportedFormatError,
                       match=r"i32\.gguf: tensor 'blk\.0\.ffn_up\.weight' is I32, which holds no weights"):
        quantize_gguf(ints, tmp_path / "out4.gguf", "Q8_0")
    from realm_jax.errors import ArgumentError

    with pytest.raises(ArgumentError, match="type_name=None must be a str"):
        quantize_gguf(src, tmp_path / "out5.gguf", None)
    assert not list(tmp_path.glob("out[2-5].gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_errors_name_the_file_tensor_and_type(f32_model, tmp_path):
    out = tmp_path / "out.gguf"
    with pytest.raises(UnsupportedFormatError, match=r"llama-s-f32\.gguf: tensor 'blk\.0\.attn_k\.weight' gets type "
                       r"IQ2_XXS .*importance matrix"):
        quantize_gguf(f32_model, out, "IQ2_XXS")
    with pytest.raises(UnsupportedFormatError, match=r"tensor 'blk\.0\.attn_k\.weight' gets type TQ2_0 .*cannot write"):
        quantize_gguf(f32_model, out, "TQ2_0")
    with pytest.raises(UnsupportedFormatError, match="--type Q9_9: not a llama.cpp file type"):
        quantize_gguf(f32_model, out, "Q9_9")
    unreadable = tmp_path / "q1_0.gguf"  # a tensor realm-jax cannot read must change type
    writer = gguf.GGUFWriter(str(unreadable), "llama")
    writer.add_block_count(1)
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((2, 36), np.uint8), raw_shape=(2, 36),
                      raw_dtype=gguf.GGMLQuantizationType.Q1_0)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedFormatError, match=r"q1_0\.gguf: tensor 'blk\.0\.ffn_up\.weight'.*Q1_0"):
        quantize_gguf(unreadable, out, "Q8_0")
    assert not list(tmp_path.glob("out.gguf*"))


def test_fallbacks_for_row_lengths():
    hp = mixture.Hparams("llama", n_layer=1, n_head=1, n_head_kv=1)
    tensors = {"blk.0.ffn_up.weight": ((8, 640), "F32"), "blk.0.ffn_gate.weight": ((8, 100), "F32"),
               "blk.0.attn_q.weight": ((8, 512), "F32"), "output_norm.weight": ((640,), "F32")}
    assert mixture.plan(tensors, "Q4_K_M", hp) == {"blk.0.attn_q.weight": "Q4_K", "blk.0.ffn_gate.weight": "F16",
                                                   "blk.0.ffn_up.weight": "Q5_0", "output_norm.weight": "F32"}
    assert mixture.plan(tensors, "IQ4_XS", hp, pure=True)["blk.0.ffn_up.weight"] == "IQ4_NL"


# --- against llama.cpp -----------------------------------------------------------------------------------------
class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _ModelDesc(ctypes.Structure):  # llama-ext.h's llama_quant_model_desc
    _fields_ = [("architecture", ctypes.c_char_p)] + [(f, ctypes.c_uint32) for f in (
        "n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert", "n_embd_head_k", "n_embd_head_v")]


_HOOKS = {"model_from": "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc",
          "init": "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params",
          "compute": "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem",
          "free": "_Z16llama_quant_freeP19quantize_state_impl"}


def _llama_libs():
    llama_cpp = pytest.importorskip("llama_cpp", reason=NEEDS_LLAMA)
    lib = pathlib.Path(llama_cpp.__file__).parent / "lib"
    llama, ggml = ctypes.CDLL(str(lib / "libllama.so")), ctypes.CDLL(str(lib / "libggml-base.so"))
    # llama-ext.h's C++ test hooks, exported by llama.cpp's library under their mangled names
    missing = [sym for sym in _HOOKS.values() if not hasattr(llama, sym)]
    if missing:
        pytest.skip(f"this llama.cpp build does not export {missing}")
    model_from, init, compute, free = (getattr(llama, _HOOKS[k]) for k in ("model_from", "init", "compute", "free"))
    model_from.restype, model_from.argtypes = ctypes.c_void_p, [ctypes.POINTER(_ModelDesc)]
    init.restype, init.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p]
    compute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    free.argtypes = [ctypes.c_void_p]
    ggml.ggml_init.restype, ggml.ggml_init.argtypes = ctypes.c_void_p, [_InitParams]
    ggml.ggml_new_tensor.restype = ctypes.c_void_p
    ggml.ggml_new_tensor.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
    ggml.ggml_set_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ggml.ggml_free.argtypes = [ctypes.c_void_p]
    llama.llama_model_free.argtypes = [ctypes.c_void_p]
    return llama_cpp, model_from, init, compute, free, ggml, llama


# Model shapes that reach the rules: (arch, layers, heads, kv heads, experts, width, ffn, vocab, tied output).
# Widths 576 and 640 are not multiples of 256 (fallbacks), 100 not of 32 (F16); 80 layers with GQA is a 70B.
MODELS = [
    ("llama", 2, 4, 2, 0, 256, 512, 1024, False),
    ("llama", 8, 8, 2, 0, 512, 1536, 2048, True),
    ("llama", 80, 8, 1, 0, 256, 256, 512, False),
    ("llama", 24, 9, 3, 0, 576, 1536, 1024, True),
    ("falcon", 16, 4, 4, 0, 640, 2560, 512, False),
    ("llama", 4, 8, 8, 8, 256, 100, 512, False),
]


def _model_tensors(arch, n_layer, n_head, n_head_kv, n_expert, d, ffn, vocab, tied):
    """name -> numpy shape, the tensors of such a model (fused attn_qkv for falcon, expert stacks for MoE)."""
    head = d // n_head
    t = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,)} | ({} if tied else {"output.weight": (vocab, d)})
    for i in range(n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = (d,)
        if arch == "falcon":
            t[p + "attn_qkv.weight"] = ((n_head + 2 * n_head_kv) * head, d)
        else:
            t |= {p + "attn_q.weight": (d, d), p + "attn_k.weight": (n_head_kv * head, d),
                  p + "attn_v.weight": (n_head_kv * head, d)}
        t[p + "attn_output.weight"] = (d, d)
        if n_expert:
            t |= {p + "ffn_gate_inp.weight": (n_expert, d), p + "ffn_gate_exps.weight": (n_expert, ffn, d),
                  p + "ffn_up_exps.weight": (n_expert, ffn, d), p + "ffn_down_exps.weight": (n_expert, d, ffn)}
        else:
            t |= {p + "ffn_gate.weight": (ffn, d), p + "ffn_up.weight": (ffn, d), p + "ffn_down.weight": (d, ffn)}
    return t


@pytest.mark.parametrize("model", MODELS, ids=lambda m: f"{m[0]}-{m[1]}L-{m[2]}x{m[3]}-e{m[4]}-d{m[5]}")
def test_tensor_types_equal_llama_cpps_choice(model):
    llama_cpp, model_from, init, compute, free, ggml, llama = _llama_libs()
    arch, n_layer, n_head, n_head_kv, n_expert, d, ffn = model[:7]
    shapes = _model_tensors(*model)
    desc = _ModelDesc(arch.encode(), d, ffn, n_layer, n_head, n_head_kv, n_expert, d // n_head, d // n_head)
    lm = model_from(ctypes.byref(desc))
    params = llama_cpp.llama_model_quantize_default_params()
    qs = init(lm, ctypes.cast(ctypes.byref(params), ctypes.c_void_p))
    ctx = ggml.ggml_init(_InitParams(64 << 20, None, True))
    try:
        names = list(shapes)
        ptrs = (ctypes.c_void_p * len(names))()
        for i, name in enumerate(names):
            ne = (ctypes.c_int64 * 4)(*shapes[name][::-1])
            ptrs[i] = ggml.ggml_new_tensor(ctx, int(gguf.GGMLQuantizationType.F32), len(shapes[name]), ne)
            ggml.ggml_set_name(ptrs[i], name.encode())
        # llama.cpp visits the tensors in its loader's order; its counters depend on it
        order = mixture.llama_order(names)
        ptrs = (ctypes.c_void_p * len(names))(*(ptrs[names.index(n)] for n in order))
        hp = mixture.Hparams(arch, n_layer, n_head, n_head_kv, n_expert)
        checked = 0
        for ftype in mixture.FILE_TYPES:
            try:
                ours = mixture.plan({n: (s, "F32") for n, s in shapes.items()}, ftype, hp)
            except UnsupportedFormatError:  # no fallback (Q1_0 rows of 640): llama.cpp throws through ctypes
                continue
            out = (ctypes.c_int * len(names))()
            compute(qs, mixture.file_type_id(ftype), ptrs, out, len(names))
            theirs = {n: gguf.GGMLQuantizationType(out[i]).name for i, n in enumerate(order)}
            assert ours == theirs, (ftype, {n: (ours[n], theirs[n]) for n in order if ours[n] != theirs[n]})
            checked += 1
        assert checked >= len(mixture.FILE_TYPES) - 1
    finally:
        ggml.ggml_free(ctx)
        free(qs)
        llama.llama_model_free(lm)


# (--type, llama.cpp's file type, pure): the acceptance's four file types and one single tensor type.
FILES = [("Q4_K_M", "Q4_K_M", False), ("Q6_K", "Q6_K", False), ("Q8_0", "Q8_0", False),
         ("IQ4_XS", "IQ4_XS", False), ("Q4_K", "Q4_K_M", True)]


@pytest.mark.parametrize(("type_name", "ftype", "pure"), FILES, ids=[f[0] for f in FILES])
def test_file_equals_llama_cpps_quantize(f32_model, ours, tmp_path, type_name, ftype, pure):
    pytest.importorskip("llama_cpp", reason=NEEDS_LLAMA)
    _assert_same_as_llama_cpp(f32_model, ours(f32_model, type_name), tmp_path, ftype, pure)


def test_requantized_file_equals_llama_cpps(ours, tmp_path):
    """From a file of IQ1_S..IQ3_XXS and Q8_0 tensors (llama.cpp's --allow-requantize)."""
    pytest.importorskip("llama_cpp", reason=NEEDS_LLAMA)
    src = ROOT / "tests" / "data" / "synthetic" / "llama-s-iq-random.gguf"
    _assert_same_as_llama_cpp(src, ours(src, "Q4_K_M"), tmp_path, "Q4_K_M", False)


def _assert_same_as_llama_cpp(src, ours, tmp_path, ftype, pure):
    import llama_cpp

    theirs = tmp_path / "theirs.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}"), 2, pure
    params.allow_requantize = True
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(theirs).encode(), params) == 0
    with realm_jax.open_gguf(ours) as a, realm_jax.open_gguf(theirs) as b:
        assert {n: t.type_name for n, t in a.tensors.items()} == {n: t.type_name for n, t in b.tensors.items()}
        differ = [n for n in a.tensors if not np.array_equal(a.tensor_bytes(n), b.tensor_bytes(n))]
        assert not differ, f"tensors differ from llama.cpp's: {differ}"
    assert ours.read_bytes() == theirs.read_bytes()  # metadata and layout too


def test_llama_cpp_runs_the_output(f32_model, ours):
    llama_cpp = pytest.importorskip("llama_cpp", reason=NEEDS_LLAMA)
    llm = llama_cpp.Llama(str(ours(f32_model, "Q4_K_M")), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    ids = llm.tokenize(b"Once upon a time, there was a little girl", add_bos=True)
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)])
    assert logits.shape == (len(ids), 1024) and np.isfinite(logits).all() and logits.std() > 1
