"""write_gguf / read_gguf round trips, Q8_K as a weight format, and the model assets."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import realm_jax
from realm_jax import assets
from realm_jax.errors import ModelUnavailableError, UnsupportedFormatError
from realm_jax.quant import FORMATS, unpack
from helpers import random_qtensor


def test_every_format_written_and_read_back(tmp_path, rng):
    tensors = {f"t.{fmt}": random_qtensor(fmt, 3, 512, rng) for fmt in FORMATS}
    path = realm_jax.write_gguf(tmp_path / "all.gguf", tensors, metadata={"test.answer": 42, "test.name": "x"})
    metadata, back = realm_jax.read_gguf(path)
    assert metadata["general.architecture"] == "realm-jax" and metadata["test.answer"] == 42
    assert list(back) == list(tensors)
    for name, qt in tensors.items():
        assert back[name].fmt == qt.fmt and back[name].shape == qt.shape
        assert np.array_equal(unpack(back[name]), unpack(qt))
    reader = gguf.GGUFReader(path)  # gguf-py reads what we wrote, Q8_K included
    for t in reader.tensors:
        assert t.tensor_type.name == tensors[t.name].fmt
        assert np.array_equal(np.asarray(t.data).reshape(-1).view(np.uint8), unpack(tensors[t.name]).reshape(-1))


def test_q8_k_weights_quantized_written_read_and_used(tmp_path, rng):
    x = rng.standard_normal((8, 512)).astype(np.float32)
    qt = realm_jax.quantize(x, "Q8_K")
    path = realm_jax.write_gguf(tmp_path / "q8k.gguf", {"w": qt})
    _, back = realm_jax.read_gguf(path)
    w = back["w"]
    assert w.fmt == "Q8_K"
    dense = np.asarray(realm_jax.dequantize(w))
    assert np.abs(dense - x).max() < np.abs(x).max() / 127
    y = np.asarray(realm_jax.qmatmul(np.eye(512, dtype=np.float32)[:4], w))
    np.testing.assert_allclose(y, dense[:, :4].T, rtol=0, atol=1e-6)


def test_unsupported_tensor_type_names_file_and_tensor(tmp_path):
    path = tmp_path / "q1_0.gguf"  # Q1_0: a type gguf-py knows and realm-jax does not read
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((2, 18), np.uint8), raw_shape=(2, 18),
                      raw_dtype=gguf.GGMLQuantizationType.Q1_0)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedFormatError, match=r"q1_0\.gguf.*blk\.0\.ffn_up\.weight.*Q1_0"):
        realm_jax.read_gguf(path)
    # The header alone still opens: inspect works on files realm-jax cannot compute with.
    with realm_jax.open_gguf(path) as f:
        assert f.tensors["blk.0.ffn_up.weight"].type_name == "Q1_0"


def test_unknown_model_name():
    with pytest.raises(ModelUnavailableError, match="known models"):
        assets.model_path("gpt-5")


def test_default_model_is_the_cached_gemma3(gemma3_path):
    assert realm_jax.default_model_path() == gemma3_path
    with realm_jax.open_gguf(gemma3_path) as f:
        assert f.architecture == "gemma3"


def test_metadata_read_back_can_be_written_again(tmp_path, rng):
    from realm_jax.errors import MetadataError

    q = random_qtensor("Q8_0", 2, 64, rng)
    meta = {"general.alignment": 64, "llama.block_count": 3, "t.floats": [1.5, 2.5], "t.names": ["a", "b"],
            "t.flag": True, "t.neg": -7}
    first = realm_jax.write_gguf(tmp_path / "a.gguf", {"w": q}, arch="llama", metadata=meta)
    read, tensors = realm_jax.read_gguf(first)
    assert read["general.alignment"] == 64 and read["llama.block_count"] == 3
    assert np.array_equal(unpack(tensors["w"]), unpack(q))
    second = realm_jax.write_gguf(tmp_path / "b.gguf", {"w": q}, arch="llama", metadata=read)
    again, _ = realm_jax.read_gguf(second)
    assert {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in again.items()} == \
        {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in read.items()}
    with pytest.raises(MetadataError, match="conflicts"):
        realm_jax.write_gguf(tmp_path / "c.gguf", {"w": q}, arch="gemma3", metadata=read)
    with pytest.raises(MetadataError, match="unsupported type"):
        realm_jax.write_gguf(tmp_path / "d.gguf", {"w": q}, metadata={"t.empty": []})
