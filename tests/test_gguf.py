"""realm_jax.gguf: the parser agrees with gguf-py's GGUFReader, and every bad file gets its own error."""

from __future__ import annotations

import os
import pathlib
import struct
import sys
import time

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from realm_jax import assets, errors
from realm_jax.gguf import GGML_TYPES, open_gguf
import background
from helpers import REAL_MODELS

TESTS = pathlib.Path(__file__).resolve().parent


# --- comparison with gguf-py ------------------------------------------------------------------
def _flatten(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return [x for v in value for x in (_flatten(v) if isinstance(v, (list, np.ndarray)) else [v])]
    return value


def _first_leaf(value):
    while isinstance(value, list) and value and not isinstance(value[0], str):
        value = value[0]
    return value


_PY_TYPES = {V.STRING: str, V.BOOL: bool, V.FLOAT32: float, V.FLOAT64: float}


def assert_matches_reader(gf, reader: gguf.GGUFReader) -> None:
    """Metadata, layout and tensor bytes of `gf` equal what gguf-py's reader finds in the same file."""
    assert gf.version == reader.fields["GGUF.version"].contents()
    assert gf.alignment == reader.alignment
    assert gf.data_offset == reader.data_offset
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(gf.metadata) == list(fields)
    for key, field in fields.items():
        mine, theirs = gf.metadata[key], field.contents()
        if field.types[0] != V.ARRAY:
            expected_type = _PY_TYPES.get(field.types[0], int)
            assert type(mine) is expected_type, key
            assert mine == theirs, key
            continue
        leaf_type = field.types[-1]
        if leaf_type == V.STRING:
            assert _flatten(mine) == theirs, key
        elif leaf_type != V.ARRAY:  # an empty array of arrays has no leaf type to check
            leaf = _first_leaf(mine)
            assert isinstance(leaf, np.ndarray), key
            assert leaf.dtype == np.dtype(reader.gguf_scalar_to_np[leaf_type]), key
            assert not leaf.flags.writeable, key
            assert _flatten(mine) == theirs, key
    assert list(gf.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = gf.tensors[t.name]
        assert info.name == t.name
        assert (info.ggml_type, info.type_name) == (int(t.tensor_type), t.tensor_type.name), t.name
        assert info.shape == tuple(reversed(t.shape.tolist())), t.name
        assert (info.offset, info.nbytes) == (t.data_offset, t.n_bytes), t.name
        data = gf.tensor_bytes(t.name)
        assert data.dtype == np.uint8 and data.shape == (t.n_bytes,) and not data.flags.writeable
        assert np.array_equal(data, np.asarray(t.data).reshape(-1).view(np.uint8)), t.name


def check_real_models(paths: list[str]) -> None:
    """`assert_matches_reader` on each file (the background check below runs it)."""
    for path in paths:
        with open_gguf(path) as gf:
            assert_matches_reader(gf, gguf.GGUFReader(path))
        print("matches gguf-py:", path)


# gguf-py's reader parses gemma3's 262k-token vocabulary in pure Python (~18 s, SmolLM2's ~7 s): a check of its
# own process, which runs while the in-process tests do (tests/background.py).
@background.job(__file__, "reader_check")
def _reader_job():
    paths = [str(assets.model_path(name)) for name in REAL_MODELS]
    script = "import sys; from test_gguf import check_real_models; check_real_models(sys.argv[1:])"
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return [sys.executable, "-c", script, *paths], env, 600


def test_real_models_match_reader(reader_check):
    assert reader_check.returncode == 0, reader_check.stderr[-3000:]
    assert reader_check.stdout.count("matches gguf-py:") == len(REAL_MODELS)


@pytest.fixture(scope="module")
def reader_check():
    return background.result(__file__, "reader_check")


def test_real_model_summary(real_model_path):
    with open_gguf(real_model_path) as gf:
        assert gf.architecture in ("gemma3", "llama")
        types = {info.type_name for info in gf.tensors.values()}
        expected = {"gemma3": {"F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"}, "llama": {"F32", "Q8_0", "Q4_1"}}
        assert types == expected[gf.architecture]
        tokens = gf.metadata["tokenizer.ggml.tokens"]
        assert isinstance(tokens, list) and all(isinstance(t, str) for t in tokens[:100])


def _write_with_gguf_py(path, *, alignment=None):
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_key_value("t.u8", 255, V.UINT8)
    w.add_key_value("t.i8", -128, V.INT8)
    w.add_key_value("t.u16", 65535, V.UINT16)
    w.add_key_value("t.i16", -32768, V.INT16)
    w.add_key_value("t.u32", 2**32 - 1, V.UINT32)
    w.add_key_value("t.i32", -(2**31), V.INT32)
    w.add_key_value("t.f32", 0.1, V.FLOAT32)
    w.add_key_value("t.bool_true", True, V.BOOL)
    w.add_key_value("t.bool_false", False, V.BOOL)
    w.add_key_value("t.str", "héllo ✓", V.STRING)
    w.add_key_value("t.u64", 2**64 - 1, V.UINT64)
    w.add_key_value("t.i64", -(2**63), V.INT64)
    w.add_key_value("t.f64", 1e300, V.FLOAT64)
    for sub in (V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64):
        w.add_key_value(f"t.arr_{sub.name.lower()}", [0, 1, 7], V.ARRAY, sub_type=sub)
    w.add_key_value("t.arr_f32", [0.5, -1.25, 3e-8], V.ARRAY, sub_type=V.FLOAT32)
    w.add_key_value("t.arr_f64", [0.5, -1.25, 3e-300], V.ARRAY, sub_type=V.FLOAT64)
    w.add_key_value("t.arr_bool", [True, False, True], V.ARRAY)
    w.add_key_value("t.arr_str", ["a", "", "✓ü", "<0x0A>"], V.ARRAY)
    w.add_key_value("t.nested", [[1, 2], [3, 4, 5]], V.ARRAY)
    w.add_key_value("t.nested_str", [["x", "y"], ["z"]], V.ARRAY)
    w.add_key_value("t.nested3", [[[1.5], [2.5, 3.5]], [[4.5]]], V.ARRAY)
    w.add_tensor("vec_f32", rng.standard_normal(64).astype(np.float32))
    w.add_tensor("mat_f16", rng.standard_normal((4, 32)).astype(np.float16))
    w.add_tensor("cube_f32", rng.standard_normal((2, 3, 32)).astype(np.float32))
    w.add_tensor("q8_0", rng.integers(0, 256, (3, 2 * 34), dtype=np.uint8), raw_dtype=Q.Q8_0)
    w.add_tensor("q4_k", rng.integers(0, 256, (2, 144), dtype=np.uint8), raw_dtype=Q.Q4_K)
    w.add_tensor("q6_k_3d", rng.integers(0, 256, (2, 2, 2 * 210), dtype=np.uint8), raw_dtype=Q.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64, 1])
def test_gguf_py_written_file_matches_reader(tmp_path, alignment):
    path = _write_with_gguf_py(tmp_path / "w.gguf", alignment=alignment)
    with open_gguf(path) as gf:
        assert_matches_reader(gf, gguf.GGUFReader(path))
        assert gf.alignment == (alignment or 32)
        assert gf.architecture == "llama"
        assert gf.tensors["q4_k"].shape == (2, 256)
        assert gf.tensors["q6_k_3d"].shape == (2, 2, 512)
        assert gf.tensors["cube_f32"].shape == (2, 3, 32)
        assert gf.metadata["t.f32"] == float(np.float32(0.1))
        assert gf.metadata["t.nested3"][0][1].tolist() == [2.5, 3.5]
        assert gf.metadata["t.nested_str"] == [["x", "y"], ["z"]]


def test_v2_file_matches_reader(tmp_path):
    # GGUF v2 moved counts and lengths from u32 (v1) to u64; v3 only added big-endian files, so a v2 file
    # has the v3 layout byte for byte (gguf-py's reader and llama.cpp's gguf.cpp read both alike).
    data = bytearray(_write_with_gguf_py(tmp_path / "v3.gguf").read_bytes())
    data[4:8] = struct.pack("<I", 2)
    path = tmp_path / "v2.gguf"
    path.write_bytes(bytes(data))
    with open_gguf(path) as gf:
        assert gf.version == 2
        assert_matches_reader(gf, gguf.GGUFReader(path))


# --- files built byte by byte -----------------------------------------------------------------
def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _ti(name: str | bytes, ne: tuple[int, ...], type_id: int, offset: int) -> bytes:
    return _s(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, type_id, offset)


ARCH = _kv("general.architecture", V.STRING, _s("llama"))


def _file(kvs=(ARCH,), tis=(), data=b"", *, version=3, n_kv=None, n_tensors=None, alignment=32) -> bytes:
    n_kv = len(kvs) if n_kv is None else n_kv
    n_tensors = len(tis) if n_tensors is None else n_tensors
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(kvs) + b"".join(tis)
    return head + bytes(-len(head) % alignment) + data


F32_ROW = _ti("w", (8,), Q.F32, 0)


@pytest.fixture
def write(tmp_path):
    def write(data: bytes, name: str = "case.gguf"):
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return write


def _raises(path, cls, *needles):
    with pytest.raises(cls) as info:
        open_gguf(path)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for needle in (path.name, *needles):
        assert str(needle) in message, message
    return message


def test_hand_built_v2_and_v3(write):
    for version in (2, 3):
        path = write(_file(tis=[F32_ROW], data=np.arange(8, dtype=np.float32).tobytes(), version=version))
        with open_gguf(path) as gf:
            assert gf.version == version
            assert gf.tensors["w"].shape == (8,)
            assert gf.tensor_bytes("w").view(np.float32).tolist() == list(range(8))
            assert_matches_reader(gf, gguf.GGUFReader(path))


def test_api_details(write):
    empty = _kv("a", V.ARRAY, struct.pack("<IQ", V.INT32, 0))
    path = write(_file(kvs=[empty], tis=[F32_ROW], data=bytes(32)))
    gf = open_gguf(path)
    assert gf.architecture is None
    assert gf.metadata["a"].dtype == np.int32 and gf.metadata["a"].shape == (0,)
    assert "case.gguf" in repr(gf)
    view = gf.tensor_bytes("w")
    with pytest.raises(ValueError):
        view[0] = 1
    with pytest.raises(errors.MissingTensorError, match="nope"):
        gf.tensor_bytes("nope")
    with gf:
        pass
    assert view.sum() == 0  # a view outlives close
    with pytest.raises(errors.UnreadableFileError, match="closed"):
        gf.tensor_bytes("w")
    gf.close()  # idempotent


def _matrix_file(write):
    """A file with one F32 tensor 'm' of 4 rows of 8 (32 bytes a row), values 0..31."""
    return write(_file(tis=[_ti("m", (8, 4), Q.F32, 0)], data=np.arange(32, dtype=np.float32).tobytes()))


_NO_M = r"case\.gguf: no tensor is named 'nope'; the file's tensors \(1\) are 'm'$"
_OUT = (r"case\.gguf: out must be a writable C-contiguous 1-D uint8 numpy array of at least {} bytes for tensor 'm', "
        "got ")
_ROWS = r"case\.gguf: {}; start and stop must be ints with 0 <= start <= stop <= 4 \(the rows of tensor 'm'\)$"
_RANGE = "rows start={}, stop={} are out of range"
_CLOSED = r"case\.gguf: the GGUF file is closed; tensor 'm' is not read from it"


def _read_only(n):
    out = np.zeros(n, np.uint8)
    out.flags.writeable = False
    return out


@pytest.mark.parametrize("call, cls, pattern", [
    (lambda gf: gf.tensor_bytes("nope"), errors.MissingTensorError, _NO_M),
    (lambda gf: gf.read_tensor("nope"), errors.MissingTensorError, _NO_M),
    (lambda gf: gf.read_tensor_rows("nope", 0, 1), errors.MissingTensorError, _NO_M),
    (lambda gf: gf.read_tensor(3), errors.ArgumentError, r"case\.gguf: a tensor name must be a str, got int 3$"),
    (lambda gf: gf.read_tensor("m", out=np.zeros(10, np.float32)), errors.ArgumentError,
     _OUT.format(128) + r"float32\[10\]: not uint8, only 10 bytes$"),
    (lambda gf: gf.read_tensor("m", out=[0] * 10), errors.ArgumentError, _OUT.format(128) + "list$"),
    (lambda gf: gf.read_tensor("m", out=np.zeros((2, 128), np.uint8)), errors.ArgumentError,
     _OUT.format(128) + r"uint8\[2, 128\]: not 1-D$"),
    (lambda gf: gf.read_tensor("m", out=np.zeros(256, np.uint8)[::2]), errors.ArgumentError,
     _OUT.format(128) + r"uint8\[128\]: not C-contiguous$"),
    (lambda gf: gf.read_tensor("m", out=_read_only(128)), errors.ArgumentError,
     _OUT.format(128) + r"uint8\[128\]: read-only$"),
    (lambda gf: gf.read_tensor_rows("m", 1, 3, out=np.zeros(63, np.uint8)), errors.ArgumentError,
     _OUT.format(64) + r"uint8\[63\]: only 63 bytes$"),
    (lambda gf: gf.read_tensor_rows("m", 3, 2), errors.ArgumentError, _ROWS.format(_RANGE.format(3, 2))),
    (lambda gf: gf.read_tensor_rows("m", -1, 2), errors.ArgumentError, _ROWS.format(_RANGE.format(-1, 2))),
    (lambda gf: gf.read_tensor_rows("m", 0, 5), errors.ArgumentError, _ROWS.format(_RANGE.format(0, 5))),
    (lambda gf: gf.read_tensor_rows("m", 0.5, 2), errors.ArgumentError, _ROWS.format(r"start=0\.5 is a float")),
    (lambda gf: gf.read_tensor_rows("m", 0, 2.0), errors.ArgumentError, _ROWS.format(r"stop=2\.0 is a float")),
    (lambda gf: gf.read_tensor_rows("m", True, 2), errors.ArgumentError, _ROWS.format(r"start=True is a bool")),
    (lambda gf: gf.read_tensor_rows("m", 0, "2"), errors.ArgumentError, _ROWS.format(r"stop='2' is a str")),
    (lambda gf: (gf.close(), gf.tensor_bytes("m")), errors.UnreadableFileError, _CLOSED),
    (lambda gf: (gf.close(), gf.read_tensor("m")), errors.UnreadableFileError, _CLOSED),
    (lambda gf: (gf.close(), gf.read_tensor_rows("m", 0, 1)), errors.UnreadableFileError, _CLOSED),
], ids=["missing-bytes", "missing-read", "missing-rows", "name-int", "out-float32", "out-list", "out-2d",
        "out-strided", "out-read-only", "out-short", "rows-reversed", "rows-negative", "rows-past-end",
        "start-float", "stop-float", "start-bool", "stop-str", "closed-bytes", "closed-read", "closed-rows"])
def test_bad_tensor_reads_raise_one_named_error(write, call, cls, pattern):
    """A missing tensor, a bad `out`, rows out of range or not ints, a closed file: one RealmError each,
    naming the file and the tensor or argument, never a KeyError or TypeError from inside."""
    with open_gguf(_matrix_file(write)) as gf:
        with pytest.raises(cls) as info:
            call(gf)
        assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
        assert info.match(pattern)


def test_read_tensor_rows_takes_numpy_ints(write):
    with open_gguf(_matrix_file(write)) as gf:
        rows = gf.read_tensor_rows("m", np.int64(1), np.uint32(3), out=np.zeros(64, np.uint8))
        assert rows.view(np.float32).tolist() == list(range(8, 24))
        assert gf.read_tensor_rows("m", 2, 2).shape == (0,)
        assert gf.read_tensor_rows("m", 0, 4).view(np.float32).tolist() == list(range(32))


@pytest.mark.parametrize("path, pattern", [
    (None, r"^open_gguf: path must be a str, bytes or os\.PathLike, got NoneType None$"),
    (3, r"^open_gguf: path must be a str, bytes or os\.PathLike, got int 3$"),
    (["a.gguf"], r"got list \['a\.gguf'\]$"),
    ("", r"^open_gguf: path is empty$"),
    (b"", r"^open_gguf: path is empty$"),
], ids=["none", "int", "list", "empty-str", "empty-bytes"])
def test_open_gguf_refuses_a_path_that_is_not_one(path, pattern):
    with pytest.raises(errors.ArgumentError, match=pattern) as info:
        open_gguf(path)
    assert type(info.value) is errors.ArgumentError


def test_open_gguf_takes_bytes_paths(write, tmp_path):
    """As `open` does: bytes, or a path-like object giving bytes, name the file their decoded str names."""
    path = write(_file(tis=[F32_ROW], data=np.arange(8, dtype=np.float32).tobytes()))

    class BytesPath:
        def __fspath__(self):
            return os.fsencode(path)

    for given in (os.fsencode(path), BytesPath()):
        with open_gguf(given) as gf:
            assert gf.path == path
            assert gf.read_tensor("w").view(np.float32).tolist() == list(range(8))
    with pytest.raises(errors.MissingFileError, match="nope.gguf: no such file"):
        open_gguf(os.fsencode(tmp_path / "nope.gguf"))


def test_ggml_types_match_gguf_py():
    assert GGML_TYPES == {int(t): (t.name, *gguf.GGML_QUANT_SIZES[t]) for t in Q}
    assert GGML_TYPES[Q.Q4_K] == ("Q4_K", 256, 144)


def test_type_realm_jax_does_not_compute_with_still_opens(write):
    path = write(_file(tis=[_ti("iq", (256, 2), Q.IQ2_XS, 0)], data=bytes(2 * 74)))
    with open_gguf(path) as gf:
        assert (gf.tensors["iq"].type_name, gf.tensors["iq"].nbytes) == ("IQ2_XS", 148)


# --- one test per cause -----------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = tmp_path / "absent.gguf"
    _raises(path, errors.MissingFileError)
    (tmp_path / "dir.gguf").mkdir()
    _raises(tmp_path / "dir.gguf", errors.MissingFileError, "regular file")


def test_not_gguf(write):
    _raises(write(b"PK\x03\x04" + bytes(100)), errors.NotGGUFError, "PK")
    _raises(write(b"GGU"[:2] + b"X"), errors.NotGGUFError)


@pytest.mark.parametrize("version", [0, 1, 4, 2**32 - 1])
def test_unsupported_version(write, version):
    _raises(write(_file(version=version)), errors.UnsupportedVersionError, version)


def test_big_endian_version(write):
    data = bytearray(_file())
    data[4:8] = struct.pack(">I", 3)
    _raises(write(bytes(data)), errors.UnsupportedVersionError, "big-endian")


def test_truncated_everywhere_in_the_header(write):
    kvs = [ARCH, _kv("k.arr", V.ARRAY, struct.pack("<IQ", V.STRING, 2) + _s("ab") + _s("cd"))]
    tis = [F32_ROW, _ti("v", (32,), Q.Q8_0, 64)]
    full = _file(kvs, tis, bytes(64 + 34))
    header_end = 24 + sum(map(len, kvs)) + sum(map(len, tis))
    count_floor = 24 + 2 * 13 + 2 * 32  # below this the counts alone exceed the file
    for cut in range(0, header_end):
        path = write(full[:cut], f"cut{cut}.gguf")
        expected = errors.ResourceLimitError if 24 <= cut < count_floor else errors.TruncatedFileError
        _raises(path, expected)
    assert "past the end" in _raises(write(full[: header_end - 3]), errors.TruncatedFileError, "'v'")


def test_unknown_metadata_value_type(write):
    _raises(write(_file([ARCH, _kv("bad.key", 13, b"")])), errors.MetadataError, "bad.key", 13)
    payload = struct.pack("<IQ", 77, 1)
    _raises(write(_file([_kv("bad.arr", V.ARRAY, payload)])), errors.MetadataError, "bad.arr", 77)


def test_invalid_utf8(write):
    _raises(write(_file([_kv(b"k\xff", V.UINT8, b"\x01")])), errors.MetadataError, "UTF-8")
    _raises(write(_file([_kv("s", V.STRING, _s(b"\xc3("))])), errors.MetadataError, "'s'", "UTF-8")
    strings = struct.pack("<IQ", V.STRING, 3) + _s("ok") + _s("ok") + _s(b"\xe2\x82")
    _raises(write(_file([_kv("toks", V.ARRAY, strings)])), errors.MetadataError, "'toks'", "string #2")
    bad_name = _ti(b"w\x80", (8,), Q.F32, 0)
    _raises(write(_file(tis=[bad_name], data=bytes(32))), errors.MetadataError, "tensor #0")


def test_bad_bool(write):
    _raises(write(_file([_kv("flag", V.BOOL, b"\x02")])), errors.MetadataError, "'flag'")
    bools = struct.pack("<IQ", V.BOOL, 3) + b"\x00\x01\x05"
    _raises(write(_file([_kv("flags", V.ARRAY, bools)])), errors.MetadataError, "'flags'")


@pytest.mark.parametrize(
    "vtype,payload",
    [(V.UINT32, struct.pack("<I", 48)), (V.UINT32, struct.pack("<I", 0)), (V.UINT64, struct.pack("<Q", 32))],
)
def test_bad_alignment(write, vtype, payload):
    path = write(_file([_kv("general.alignment", vtype, payload)]))
    _raises(path, errors.MetadataError, "general.alignment")


def test_architecture_not_a_string(write):
    kv = _kv("general.architecture", V.UINT32, struct.pack("<I", 1))
    _raises(write(_file([kv])), errors.MetadataError, "general.architecture", "STRING")


def test_duplicate_metadata_key(write):
    _raises(write(_file([ARCH, ARCH])), errors.MetadataError, "general.architecture", "twice")


def test_arrays_nested_too_deep(write):
    payload = struct.pack("<IQ", V.ARRAY, 1) * 5 + struct.pack("<IQ", V.UINT8, 0)
    _raises(write(_file([_kv("deep", V.ARRAY, payload)])), errors.ResourceLimitError, "'deep'")


@pytest.mark.parametrize("n_dims", [0, 5])
def test_bad_n_dims(write, n_dims):
    ti = _s("w") + struct.pack(f"<I{n_dims}QIQ", n_dims, *[1] * n_dims, Q.F32, 0)
    _raises(write(_file(tis=[ti], data=bytes(32))), errors.TensorShapeError, "'w'", f"{n_dims=}")


def test_zero_dim(write):
    _raises(write(_file(tis=[_ti("w", (8, 0), Q.F32, 0)], data=bytes(32))), errors.TensorShapeError, "'w'")


def test_dims_overflow(write):
    ti = _ti("huge", (2**40, 2**40), Q.F32, 0)
    _raises(write(_file(tis=[ti], data=bytes(32))), errors.TensorShapeError, "'huge'", 2**80)


def test_tensor_larger_than_file(write):
    ti = _ti("big", (2**20, 2**20), Q.F32, 0)
    _raises(write(_file(tis=[ti], data=bytes(32))), errors.TensorOutOfBoundsError, "'big'", 2**42)


@pytest.mark.parametrize("type_id", [4, 31, 99, 2**32 - 1])
def test_unknown_tensor_type(write, type_id):
    ti = _ti("w", (8,), type_id, 0)
    _raises(write(_file(tis=[ti], data=bytes(32))), errors.UnknownTensorTypeError, "'w'", type_id)


def test_row_not_multiple_of_block(write):
    ti = _ti("q", (100, 2), Q.Q4_K, 0)
    _raises(write(_file(tis=[ti], data=bytes(512))), errors.TensorShapeError, "'q'", "ne[0]=100", "block=256")


def test_misaligned_offset(write):
    tis = [_ti("a", (8,), Q.F32, 0), _ti("b", (8,), Q.F32, 40)]
    _raises(write(_file(tis=tis, data=bytes(96))), errors.MisalignedTensorError, "'b'", 40, "alignment=32")


def test_data_past_eof(write):
    tis = [_ti("a", (8,), Q.F32, 0), _ti("b", (16,), Q.F32, 32)]
    _raises(write(_file(tis=tis, data=bytes(64))), errors.TensorOutOfBoundsError, "'b'", "past the end")


def test_overlapping_tensors(write):
    tis = [_ti("a", (16,), Q.F32, 0), _ti("b", (8,), Q.F32, 32)]
    _raises(write(_file(tis=tis, data=bytes(64))), errors.TensorOverlapError, "'a'", "'b'")


def test_duplicate_tensor_name(write):
    tis = [_ti("a", (8,), Q.F32, 0), _ti("a", (8,), Q.F32, 32)]
    _raises(write(_file(tis=tis, data=bytes(64))), errors.DuplicateTensorError, "'a'")


def test_empty_file(write):
    _raises(write(b""), errors.TruncatedFileError, "empty")


# --- hostile headers: refused before any allocation or long loop -------------------------------
def _huge_key_length():
    data = bytearray(_file([_kv("k", V.UINT8, b"\x01")]))
    data[24:32] = struct.pack("<Q", 2**64 - 1)
    return bytes(data)


def _array(etype, count):
    return _file([_kv("a", V.ARRAY, struct.pack("<IQ", etype, count))])


@pytest.mark.parametrize(
    "build,cls,needle",
    [
        (lambda: _file(n_kv=2**62), errors.ResourceLimitError, "n_kv=4611686018427387904"),
        (lambda: _file(n_tensors=2**64 - 1), errors.ResourceLimitError, "n_tensors"),
        (lambda: _file([_kv("s", V.STRING, struct.pack("<Q", 2**63))]), errors.ResourceLimitError, "'s'"),
        (_huge_key_length, errors.ResourceLimitError, "metadata key #0"),
        (lambda: _array(V.UINT64, 2**60), errors.ResourceLimitError, "'a'"),
        (lambda: _array(V.STRING, 2**60), errors.ResourceLimitError, "'a'"),
        (lambda: _array(V.ARRAY, 2**60), errors.ResourceLimitError, "'a'"),
        (lambda: _file(tis=[_ti("t", (2**40, 2**40), Q.F32, 0)]), errors.TensorShapeError, "'t'"),
        (lambda: _file(tis=[_s("t") + struct.pack("<I", 2**32 - 1)]), errors.TensorShapeError, "'t'"),
    ],
)
def test_hostile_header_is_refused_promptly(write, build, cls, needle):
    path = write(build())
    start = time.perf_counter()
    _raises(path, cls, needle)
    assert time.perf_counter() - start < 5  # a hang guard, not a speed test (benchmarks/gguf_open.py)


def test_unreadable_file(tmp_path, monkeypatch):
    """An OSError while opening or mapping (permissions, I/O) becomes UnreadableFileError naming the file."""
    path = tmp_path / "locked.gguf"
    path.write_bytes(b"GGUF")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("realm_jax.gguf.mmap.mmap", refuse)
    with pytest.raises(errors.UnreadableFileError, match="locked.gguf.*Permission denied"):
        open_gguf(path)


def test_an_io_error_while_reading_names_the_file_and_where(write, monkeypatch):
    """EIO from the disk or a network file system, in the header or in a tensor's bytes, is an
    UnreadableFileError naming the file and the byte (and the tensor), not a bare OSError."""
    from realm_jax import gguf as reader

    path = write(_file([ARCH], tis=[F32_ROW], data=np.arange(8, dtype=np.float32).tobytes()))

    def eio(*args):
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(reader.os, "pread", eio)
        _raises(path, errors.UnreadableFileError, "header cannot be read at byte 0: Input/output error")
    with open_gguf(path) as gf:
        name = next(iter(gf.tensors))
        monkeypatch.setattr(reader.os, "preadv", eio)
        with pytest.raises(errors.UnreadableFileError, match=rf"case\.gguf: tensor '{name}' cannot be read at "
                                                                r"byte \d+: Input/output error"):
            gf.read_tensor(name)


# --- memory, not only the file: a sparse file claims gigabytes that take no room on disk --------------
def _sparse(path, head: bytes, size: int, at: dict[int, bytes] | None = None):
    """A file of `size` bytes that holds `head`, and `at`'s bytes at their offsets, and zeros that take no
    room on disk."""
    with open(path, "wb") as f:
        f.write(head)
        for offset, data in (at or {}).items():
            f.seek(offset)
            f.write(data)
        f.truncate(size)
    return path


# An array of two strings: 1 MiB, then 512 MiB (together past the budget).
_TWO_STRINGS = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _kv("a", V.ARRAY, struct.pack("<IQQ", V.STRING, 2, 1 << 20))


@pytest.mark.parametrize("head, size, at, needle", [
    (_array(V.UINT8, 3 << 30), 4 << 30, None, "array of 3221225472 UINT8 of metadata key 'a'"),
    (_array(V.STRING, 100 << 20), 1 << 30, None, "array of 104857600 STRING of metadata key 'a'"),
    (_file([_kv("s", V.STRING, struct.pack("<Q", 2 << 30))]), 3 << 30, None, "value of metadata key 's'"),
    (_TWO_STRINGS, 1 << 30, {len(_TWO_STRINGS) + (1 << 20): struct.pack("<Q", 1 << 29)},
     "strings #0..1 of metadata key 'a'"),
    (_file(n_tensors=8 << 20), 1 << 30, None, "n_tensors=8388608"),
])
def test_counts_past_the_memory_budget_are_refused_before_allocation(tmp_path, head, size, at, needle):
    """Counts the file's bytes could hold (a sparse file of a few KB on disk) but memory could not."""
    path = _sparse(tmp_path / "sparse.gguf", head, size, at)
    start = time.perf_counter()
    message = _raises(path, errors.ResourceLimitError, needle, "budget")
    assert time.perf_counter() - start < 5, message


def _two_tensor_file(write):
    tis = [_ti("a", (8,), Q.F32, 0), _ti("b", (8,), Q.F32, 32)]
    return write(_file(tis=tis, data=np.arange(16, dtype=np.float32).tobytes()))


@pytest.mark.parametrize("change, needle", [
    (lambda p: os.truncate(p, p.stat().st_size - 32), "truncated or extended"),
    (lambda p: (p.with_name("new.gguf").write_bytes(p.read_bytes()), os.replace(p.with_name("new.gguf"), p)),
     "replaced or removed"),
    (lambda p: os.utime(p, ns=(0, p.stat().st_mtime_ns + 10**9)), "rewritten"),
    (os.remove, "replaced or removed"),
])
def test_a_file_changed_after_opening_is_not_read(write, change, needle):
    """Checked before the map is touched: a page past a truncated end would kill the process (SIGBUS)."""
    path = _two_tensor_file(write)
    with open_gguf(path) as gf:
        assert gf.tensor_bytes("a").view(np.float32).tolist() == list(range(8))
        assert gf.read_tensor("a").view(np.float32).tolist() == list(range(8))
        assert gf.read_tensor("a", out=np.zeros(40, np.uint8)).view(np.float32).tolist() == list(range(8))
        with pytest.raises(errors.ArgumentError, match="at least 32 bytes"):
            gf.read_tensor("a", out=np.zeros(31, np.uint8))
        change(path)
        for read in (gf.tensor_bytes, gf.read_tensor):
            with pytest.raises(errors.FileChangedError, match=needle) as info:
                read("b")
            assert "case.gguf" in str(info.value) and "'b'" in str(info.value)


def test_the_header_is_read_a_window_at_a_time(write, monkeypatch):
    """With pread, never through the map: any window gives the same parse (here 64 bytes: strings, arrays
    and numbers straddle windows, a longer array is read on its own), and a file cut while its header is
    read is a FileChangedError, not the SIGBUS a page of the map past the new end raises."""
    from realm_jax import gguf as reader

    words = [f"w{i}" * (i % 7) for i in range(300)]
    kvs = [ARCH, _kv("a.words", V.ARRAY, struct.pack("<IQ", V.STRING, len(words)) + b"".join(map(_s, words))),
           _kv("a.nums", V.ARRAY, struct.pack("<IQ", V.FLOAT32, 100) + np.arange(100, dtype="<f4").tobytes()),
           _kv("a.n", V.UINT64, struct.pack("<Q", 7))]
    path = write(_file(kvs, tis=[F32_ROW], data=np.arange(8, dtype=np.float32).tobytes()))
    monkeypatch.setattr(reader, "_WINDOW", 64)
    with open_gguf(path) as gf:
        assert gf.metadata["a.words"] == words
        assert_matches_reader(gf, gguf.GGUFReader(path))
    real, calls = os.pread, []

    def cut(fd, n, offset):
        calls.append(offset)
        if len(calls) == 3:
            os.truncate(path, 200)
        return real(fd, n, offset)

    monkeypatch.setattr(reader.os, "pread", cut)
    _raises(path, errors.FileChangedError, "ended at byte 200 while its header was read", "changed after")


def test_keys_and_names_longer_than_gguf_allows(write):
    """Keys of more than 65,535 bytes (the spec's limit) and tensor names of 64 or more (ggml's, which
    llama.cpp enforces): error messages name them, so they must stay short."""
    _raises(write(_file([_kv("k" * 65536, V.UINT8, b"\x01")])), errors.MetadataError, "metadata key #0", "65536 bytes")
    _raises(write(_file(tis=[_ti("t" * 64, (8,), Q.F32, 0)], data=bytes(32))), errors.MetadataError,
            "name of tensor #0", "64 bytes")
    with open_gguf(write(_file(tis=[_ti("t" * 63, (8,), Q.F32, 0)], data=bytes(32)))) as gf:
        assert list(gf.tensors) == ["t" * 63]
