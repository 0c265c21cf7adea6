"""write_gguf / read_gguf round trips, Q8_K as a weight format, and the model assets."""

from __future__ import annotations

import mmap
import os

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
    with pytest.raises(MetadataError, match="'t.empty' holds an empty list"):
        realm_jax.write_gguf(tmp_path / "d.gguf", {"w": q}, metadata={"t.empty": []})


def test_metadata_types_are_kept_or_refused(tmp_path, rng):
    """numpy arrays keep their dtype; Python ints take the smallest of INT32/INT64/UINT64 a list fits; a float
    float32 cannot hold is refused, not rounded to 0 or inf (FLOAT32 is what llama.cpp reads)."""
    q = random_qtensor("Q8_0", 2, 64, rng)
    meta = {"t.u64": np.array([2**40, 5], np.uint64), "t.i64": [1, 2**40], "t.u64l": [1, 2**63], "t.big": 2**63,
            "t.f64": np.float64(1e-50), "t.nest": [[1, 2], [3]], "t.f": 0.5}
    read, _ = realm_jax.read_gguf(realm_jax.write_gguf(tmp_path / "t.gguf", {"w": q}, metadata=meta))
    assert read["t.u64"].dtype == np.uint64 and read["t.u64"].tolist() == [2**40, 5]
    assert read["t.i64"].dtype == np.int64 and read["t.u64l"].dtype == np.uint64 and read["t.big"] == 2**63
    assert read["t.f64"] == 1e-50 and [a.tolist() for a in read["t.nest"]] == [[1, 2], [3]] and read["t.f"] == 0.5
    # A Python int scalar: UINT32 where it fits, the type llama.cpp checks its integer keys for (an MoE's
    # llama.expert_count as UINT64 made llama.cpp refuse the file); else INT32, INT64, UINT64.
    ints = {"llama.expert_count": 8, "t.zero": 0, "t.neg": -3, "t.u": 2**32, "t.n": -(2**40)}
    with realm_jax.open_gguf(realm_jax.write_gguf(tmp_path / "i.gguf", {"w": q}, metadata=ints)) as f:
        assert [f.metadata_types[k][0] for k in ints] == ["UINT32", "UINT32", "INT32", "UINT64", "INT64"]
        assert [f.metadata[k] for k in ints] == list(ints.values())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(metadata={"t.x": 2**70}), "MetadataError", r"'t.x'=1180591620717411303424 does not fit INT64 or UINT64"),
    (dict(metadata={"t.x": [-1, 2**63]}), "MetadataError", "ints no one GGUF integer type holds"),
    (dict(metadata={"t.x": [[1, 2**40]]}), "MetadataError", "nests an int outside INT32"),
    (dict(metadata={"t.x": [1, "a", 2.0]}), "MetadataError", r"mixes or holds unsupported types \(float, int, str"),
    (dict(metadata={"t.x": [True, 5]}), "MetadataError", r"mixes or holds unsupported types \(bool, int\)"),
    (dict(metadata={"t.x": 1e300}), "MetadataError", "'t.x'=1e\\+300 is not one float32 can hold"),
    (dict(metadata={"t.x": 1e-50}), "MetadataError", "'t.x'=1e-50 is not one float32 can hold"),
    (dict(metadata={"t.x": {"a": 1}}), "MetadataError", "unsupported type dict"),
    (dict(metadata={3: "a"}), "MetadataError", "metadata key 3 must be a str"),
    (dict(metadata={"t.\udcff": "a"}), "MetadataError", "is not valid Unicode text"),
    (dict(metadata={"t.x": "a\udcff"}), "MetadataError", "'t.x' is not valid Unicode text"),
    (dict(metadata={"k" * 65536: 1}), "MetadataError", "longer than GGUF's 65535 bytes"),
    (dict(metadata={"general.alignment": 7}), "MetadataError", "'general.alignment'=7 must be a power of two"),
    # more than read_gguf's 512 MiB header budget: refused before anything is converted (a view: no memory)
    (dict(metadata={"t.x": np.broadcast_to(np.float32(0), (150_000_000,))}), "MetadataError",
     r"the metadata \(by key 't\.x'\) would take more memory to read back than read_gguf allows"),
    (dict(metadata={"t.x": ["a"] * 6_100_000}), "MetadataError", "would take more memory to read back"),
    (dict(metadata={"general.alignment": 2**17}), "MetadataError", r"'general\.alignment'=131072 must be a power of "
                                                                    r"two up to 65536"),
    (dict(tensors={"w": realm_jax.quantize(np.ones((1, 1, 2, 2, 32), np.float32), "Q8_0")}), "QTensorError",
     r"tensor 'w' has 5 dimensions \[1, 1, 2, 2, 32\]; GGUF holds at most 4"),
    (dict(metadata="abc"), "ArgumentError", "metadata must be a mapping"),
    (dict(tensors={"a" * 64: None}), "MetadataError", "must be a str of 1 to 63 UTF-8 bytes"),
    (dict(tensors=[1]), "ArgumentError", "tensors must be a mapping"),
    (dict(tensors={"w": np.zeros(3)}), "QTensorError", "tensor 'w' is a ndarray, not a QTensor"),
    (dict(arch=None), "ArgumentError", "arch=None must be a non-empty str"),
    (dict(path=None), "ArgumentError", r"^write_gguf: path must be a str, bytes or os\.PathLike, got NoneType None$"),
    (dict(path=""), "ArgumentError", r"^write_gguf: path is empty$"),
    (dict(path="."), "WriteError", "exists and is not a regular file"),
    (dict(path="/dev/null"), "WriteError", "/dev/null: exists and is not a regular file"),
    (dict(path="no/such/folder/x.gguf"), "WriteError", "the folder no/such/folder does not exist"),
])
def test_write_gguf_refuses_what_it_cannot_write_and_leaves_the_file(tmp_path, rng, kwargs, error, match):
    """Everything is checked before a byte is written, and the file is written beside the path and renamed:
    a failed write leaves the file that was there, and nothing else."""
    from realm_jax import errors

    q = random_qtensor("Q8_0", 2, 64, rng)
    path = realm_jax.write_gguf(tmp_path / "m.gguf", {"w": q}, metadata={"t.x": 1})
    before = path.read_bytes()
    args = {"path": path, "tensors": {"w": q}} | kwargs
    with pytest.raises(getattr(errors, error), match=match):
        realm_jax.write_gguf(args.pop("path"), args.pop("tensors"), **args)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


@pytest.mark.parametrize("readers", [1, 3])
def test_layers_placed_for_fusing_and_stacking(tmp_path, rng, monkeypatch, readers):
    """read_gguf places q|k|v and gate|up of one format side by side and consecutive layers' tensors one
    after another, 64-byte aligned: the fused weights and the stacked layers are views, not copies, and the
    values are the file's (read a few rows at a time, by one thread or by several, as a large file is).
    A layer whose type differs starts a buffer of its own."""
    from realm_jax import checkpoint
    from realm_jax.models.transformer import _stack
    from realm_jax.quant import concat_rows

    monkeypatch.setattr(checkpoint, "_CHUNK", 1000)  # several reads per tensor
    monkeypatch.setattr(checkpoint, "_readers", lambda nbytes: readers)
    kinds = {"attn_q.weight": ("Q4_K", 64), "attn_k.weight": ("Q4_K", 32), "attn_v.weight": ("Q4_K", 32),
             "ffn_gate.weight": ("Q8_0", 96), "ffn_up.weight": ("Q8_0", 96), "attn_norm.weight": ("F32", 1)}
    tensors = {}
    for i in range(3):
        for name, (fmt, rows) in kinds.items():
            fmt = "Q5_0" if (i, name) == (2, "ffn_up.weight") else fmt
            qt = random_qtensor(fmt, rows, 256, rng)
            tensors[f"blk.{i}.{name}"] = realm_jax.QTensor(fmt, (256,), {"w": qt.planes["w"][0]}) if fmt == "F32" else qt
    tensors["token_embd.weight"] = random_qtensor("Q6_K", 10, 256, rng)
    _, back = realm_jax.read_gguf(realm_jax.write_gguf(tmp_path / "layers.gguf", tensors))
    for name, qt in tensors.items():
        assert back[name].shape == qt.shape and np.array_equal(unpack(back[name]), unpack(qt)), name
        assert all(p.ctypes.data % 64 == 0 for p in back[name].planes.values()) or name.startswith("blk.") \
            and not name.startswith("blk.0.")
    qkv = [[back[f"blk.{i}.attn_{x}.weight"] for x in "qkv"] for i in range(3)]
    fused = [concat_rows(parts) for parts in qkv]
    for parts, f in zip(qkv, fused):
        assert np.shares_memory(f.planes["qs"], parts[0].planes["qs"])
        assert np.array_equal(unpack(f), np.concatenate([unpack(p) for p in parts]))
    stacked = _stack(*[f.planes["qs"] for f in fused])
    assert isinstance(stacked, np.ndarray) and stacked.ctypes.data == fused[0].planes["qs"].ctypes.data
    np.testing.assert_array_equal(stacked, np.stack([f.planes["qs"] for f in fused]))
    norms = _stack(*[back[f"blk.{i}.attn_norm.weight"].planes["w"] for i in range(3)])
    assert isinstance(norms, np.ndarray) and norms.shape == (3, 256)
    gateup = [concat_rows([back[f"blk.{i}.ffn_gate.weight"], back[f"blk.{i}.ffn_up.weight"]]) for i in range(2)]
    assert isinstance(_stack(*[g.planes["qs"] for g in gateup]), np.ndarray)
    # Layer 2's gate and up differ in format: not fused, and its gate is not in layers 0-1's buffer.
    assert not np.shares_memory(back["blk.2.ffn_gate.weight"].planes["qs"], gateup[0].planes["qs"])
    assert not isinstance(_stack(*[back[f"blk.{i}.ffn_gate.weight"].planes["qs"] for i in (1, 2)]), np.ndarray)


def _vm_flags(address: int) -> list[str]:
    """The kernel's VmFlags of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE") or not os.path.exists("/proc/self/smaps"),
                    reason="needs Linux's madvise and /proc/self/smaps")
def test_huge_pages_asked_for_outside_the_layers_only(tmp_path, rng, monkeypatch):
    """Large buffers are maps of their own: the tensors outside the layers (the embedding, the output
    projection, read whole by every decode step) ask for transparent huge pages (VmFlags "hg"), the layers'
    buffers do not (where the kernel compacts memory for them, an 8B-shaped file loaded 2.5x slower), and
    both hold the file's values, page-aligned."""
    from realm_jax import checkpoint

    monkeypatch.setattr(checkpoint, "_MAPPED", 4096)  # these small tensors take the large buffers' path
    tensors = {f"blk.{i}.attn_q.weight": random_qtensor("Q8_0", 64, 256, rng) for i in range(2)}
    tensors["token_embd.weight"] = random_qtensor("Q8_0", 64, 256, rng)
    _, back = realm_jax.read_gguf(realm_jax.write_gguf(tmp_path / "pages.gguf", tensors))
    for name, qt in tensors.items():
        assert np.array_equal(unpack(back[name]), unpack(qt)), name
    embd, layer = back["token_embd.weight"].planes["qs"], back["blk.0.attn_q.weight"].planes["qs"]
    assert embd.ctypes.data % 4096 == 0 and layer.ctypes.data % 4096 == 0 and layer.flags.writeable
    assert "hg" in _vm_flags(embd.ctypes.data)
    assert "hg" not in _vm_flags(layer.ctypes.data)


def test_each_structures_layers_placed_side_by_side(tmp_path, rng):
    """Layers of two structures, alternating (ffn_down in Q4_K or Q8_0): each structure's layers lie one
    after another in every buffer they share, so that both its stack (`transformer.Variants`) and each
    stretch of it are views. The order of a layer's tensors in the file and its norm's type (norms become
    f32 params) do not make a structure of their own."""
    from realm_jax.models.transformer import _stack

    tensors = {}
    for i in range(5):
        layer = {"attn_q.weight": random_qtensor("Q4_K", 64, 256, rng),
                 "ffn_down.weight": random_qtensor("Q4_K" if i in (0, 1, 3) else "Q8_0", 32, 256, rng),
                 "attn_norm.weight": realm_jax.QTensor("F16" if i == 3 else "F32", (256,),
                                                       {"w": np.ones(256, np.float16 if i == 3 else np.float32)})}
        for name in (reversed(layer) if i == 1 else layer):  # layer 1's tensors in another order
            tensors[f"blk.{i}.{name}"] = layer[name]
    _, back = realm_jax.read_gguf(realm_jax.write_gguf(tmp_path / "mixed.gguf", tensors))

    def stacked(name, layers):
        return _stack(*[back[f"blk.{i}.{name}"].planes["qs"] for i in layers])

    for layers in ((0, 1, 3), (0, 1), (2, 4), (3,)):  # a structure's layers, a stretch of them
        for name in ("attn_q.weight", "ffn_down.weight"):
            assert isinstance(stacked(name, layers), np.ndarray), (name, layers)
    assert not isinstance(stacked("attn_q.weight", (1, 2)), np.ndarray)  # two structures: not side by side


def test_a_replaced_file_keeps_its_permissions(tmp_path, rng):
    """Written beside it and renamed over it: the new file takes the old one's mode (0600 stays 0600)."""
    import stat

    q = random_qtensor("Q8_0", 2, 64, rng)
    path = realm_jax.write_gguf(tmp_path / "m.gguf", {"w": q})
    path.chmod(0o600)
    realm_jax.write_gguf(path, {"w": q}, metadata={"t.x": 2})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and realm_jax.read_gguf(path)[0]["t.x"] == 2
