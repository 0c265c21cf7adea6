"""The synthetic files of the lower-bit types (tests/data/synthetic/llama-s-*.gguf, written by llama.cpp or, for
the types it writes only with an importance matrix, of random valid blocks): read losslessly and bit-exactly,
named by `inspect`, routed to the XLA reference by the Pallas backends; and clear errors for files that mix
these types with an unknown one or are cut short. (Their logits against llama.cpp: test_llama_reference.py.)"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

import realm_jax
from realm_jax import linear
from realm_jax.cli import main
from realm_jax.errors import GGUFError, UnsupportedFormatError
from realm_jax.linear.pallas import KERNEL_FORMATS
from realm_jax.quant import FORMATS, dequantize, unpack
from realm_jax.reference import reference_dir
from test_llama_reference import LOWBIT

FILES = [reference_dir().parent / "synthetic" / f"{name}.gguf" for name in LOWBIT]
NEW_TYPES = {"Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "TQ2_0", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S",
             "IQ3_XXS"}


@pytest.mark.parametrize("path", FILES, ids=LOWBIT)
def test_file_reads_bit_exact_and_lossless(path):
    """Every tensor: repack -> unpack gives the file's bytes, dequantize gives gguf-py's values bit for bit."""
    reader = gguf.GGUFReader(path)
    _, tensors = realm_jax.read_gguf(path)
    for t in reader.tensors:
        qt, raw = tensors[t.name], np.asarray(t.data)
        assert qt.fmt == t.tensor_type.name
        assert np.array_equal(unpack(qt).reshape(-1).view(np.uint8), raw.reshape(-1).view(np.uint8)), t.name
        want = gguf.quants.dequantize(raw, t.tensor_type)
        np.testing.assert_array_equal(np.asarray(dequantize(qt)).view(np.uint32), want.view(np.uint32), err_msg=t.name)


def test_inspect_names_every_type(capsys):
    seen = set()
    for path in FILES:
        assert main(["inspect", "--json", str(path)]) == 0
        report = json.loads(capsys.readouterr().out)
        assert all(r["supported"] for r in report["tensor_types"]), path
        seen |= {r["type"] for r in report["tensor_types"]}
        assert main(["inspect", str(path)]) == 0
        text = capsys.readouterr().out
        assert all(f"  {r['type']} " in text for r in report["tensor_types"]), text
    assert seen >= NEW_TYPES, NEW_TYPES - seen


@pytest.mark.parametrize("backend", ["triton", "mosaic_gpu", "mosaic_tpu"])
def test_pallas_backends_route_new_formats_to_the_reference(backend, capsys):
    """The new formats a Pallas backend has no kernel for (all but Q2_K, Q3_K, IQ4_NL, IQ4_XS and MXFP4, which
    the Triton backend's tensor-core GEMM and the Mosaic TPU kernel serve) are multiplied by the XLA
    reference on GPU and TPU, with the reason in `plan` (what inspect and the load log show)."""
    policy = realm_jax.Policy.of("bf16")
    served = linear.BACKENDS[backend].formats
    assert (backend in ("triton", "mosaic_tpu")) == ({"Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "MXFP4"} <= served)
    for fmt, f in FORMATS.items():
        if f.block_size == 1 or fmt in KERNEL_FORMATS or fmt in served:
            continue
        choice, serves = linear.plan(fmt, (4096, 4096), policy, impl=backend)
        assert choice.backend == "xla" and choice.reason.startswith(f"{backend}: no kernel for {fmt}"), fmt
        assert serves == "xla (dense BF16)"
    assert main(["inspect", "--json", "--impl", backend, str(FILES[-1])]) == 0
    served = [t for t in json.loads(capsys.readouterr().out)["linear_layers"]["tensors"] if t["role"] == "linear"]
    assert served and all(t["backend"] == "xla" and f"no kernel for {t['type']}" in t["reason"] for t in served)


def _write(path, tensors: dict[str, tuple[np.ndarray, str]]) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    for name, (raw, qtype) in tensors.items():
        writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_file_mixing_new_and_unknown_types(tmp_path, rng):
    """An IQ2_XXS tensor next to a Q1_0 one (a type realm-jax does not read): one error naming the file, the
    tensor and the type."""
    path = tmp_path / "mixed.gguf"
    _write(path, {"a.weight": (rng.integers(0, 256, (4, 66), dtype=np.uint8), "IQ2_XXS"),
                  "b.weight": (rng.integers(0, 256, (4, 18), dtype=np.uint8), "Q1_0")})
    with pytest.raises(UnsupportedFormatError, match=rf"{path}: tensor 'b.weight': ggml type Q1_0 is not supported"):
        realm_jax.read_gguf(path)


def test_a_cut_file_names_the_tensor_and_type(tmp_path, rng):
    path = tmp_path / "cut.gguf"
    _write(path, {"a.weight": (rng.integers(0, 256, (8, 110), dtype=np.uint8), "IQ3_S")})
    data = path.read_bytes()
    path.write_bytes(data[:-50])  # part of the last block is gone
    with pytest.raises(GGUFError, match=r"tensor 'a.weight' of type IQ3_S"):
        realm_jax.read_gguf(path)


@pytest.mark.parametrize("name", ["llama-s-q2_k", "llama-s-q3_k_m"])
def test_bf16_decode_on_the_integer_path_follows_llama_cpp(name):
    """Under the bf16 policy the native decode matmul multiplies Q2_K and Q3_K codes by x quantized to int16
    (qmatmul.cc's integer path; the f32 policy of test_llama_reference.py keeps the exact one): three
    prompts decoded in one batch give llama.cpp's greedy tokens until llama.cpp itself is unsure."""
    from realm_jax.reference import greedy_agreement, load_reference

    model = realm_jax.load(reference_dir().parent / "synthetic" / f"{name}.gguf", policy="bf16", progress=False)
    refs = load_reference(name)[:3]
    outs = model.generate_ids([list(ref.ids) for ref in refs], max_new_tokens=max(len(r.greedy) for r in refs),
                              stop_ids=())
    for i, (ref, ours) in enumerate(zip(refs, outs)):
        result = greedy_agreement(ours, ref)
        assert result["matches_until_uncertain"], (name, i, result)
