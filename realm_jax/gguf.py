"""Open and validate a GGUF file: header, metadata and tensor infos, with the tensor data memory-mapped.

The header is parsed here rather than with gguf-py's ``GGUFReader``, which builds one numpy array per
vocabulary string and takes seconds on a 262k-token vocabulary; this parser opens the same file in a
fraction of a second. Every field read from the file is checked before it is used, so a damaged or hostile
file ends in one `realm_jax.errors.GGUFError` subclass per cause, never in a big allocation, a long loop or
a stray ``struct.error``. Counts and lengths are checked against what the file's bytes can hold and against
a memory budget (`MEMORY_BUDGET`: what the parsed header may take as Python objects) before anything is
allocated: a sparse file can claim gigabytes that take no room on disk. The header is read with pread, a
window at a time, and the file stays open while it is mapped: `GGUFFile.read_tensor` (what `read_gguf`
uses) reads a tensor with pread, checking before and after that it is still the file that was opened (same
inode, size and modification time as before the header was read), so a file that changes under the reader
is an error, never a SIGBUS (which touching the map of a truncated file raises); `tensor_bytes` makes the
same check before it hands out a view of the map.

Layout (GGUF v2 and v3, little-endian; v2 only lacks v3's big-endian variant):
``magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv | n_kv x (string key, u32 type, value)
| n_tensors x (string name, u32 n_dims, n_dims x u64 ne, u32 ggml type, u64 offset) | padding to alignment
| tensor data``. A string is a u64 byte length and UTF-8 bytes; an array is a u32 element type, a u64
count and the elements.
"""

from __future__ import annotations

import dataclasses
import mmap
import operator
import os
import pathlib
import struct
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from realm_jax.errors import (
    ArgumentError,
    DuplicateTensorError,
    FileChangedError,
    MetadataError,
    MisalignedTensorError,
    MissingFileError,
    MissingTensorError,
    NotGGUFError,
    ResourceLimitError,
    TensorOutOfBoundsError,
    TensorOverlapError,
    TensorShapeError,
    TruncatedFileError,
    UnknownTensorTypeError,
    UnreadableFileError,
    UnsupportedVersionError,
)
from realm_jax.inputs import as_path, shown

__all__ = ["GGML_TYPES", "MAX_ARRAY_DEPTH", "MAX_KEY_BYTES", "MAX_NAME_BYTES", "MEMORY_BUDGET", "GGUFFile",
           "TensorInfo", "open_gguf"]

GGML_TYPES: dict[int, tuple[str, int, int]] = {
    int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType
}

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4  # llama.cpp rejects nested arrays; gguf-py writes them, real files have none
_MAX_ELEMENTS = 2**63 - 1  # ggml counts elements in int64_t

# GGUF value type ids (gguf.constants.GGUFValueType).
_STRING, _ARRAY, _BOOL, _UINT32 = 8, 9, 7, 4
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}
_SCALAR_STRUCTS = {t: struct.Struct("<" + f) for t, f in _SCALAR_FORMATS.items()}
_SCALAR_DTYPES = {t: np.dtype("<" + f) for t, f in _SCALAR_FORMATS.items()}  # bool (7) as its byte
_VALUE_TYPE_NAMES = {
    0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32", 7: "BOOL",
    8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64",
}  # fmt: skip
# The fewest bytes one element of each type can occupy: a bound on how many elements a file can hold.
_MIN_VALUE_SIZE = {t: d.itemsize for t, d in _SCALAR_DTYPES.items()} | {_STRING: 8, _ARRAY: 12}
MAX_KEY_BYTES = 65535  # the GGUF spec's longest metadata key
MAX_NAME_BYTES = 63  # ggml's GGML_MAX_NAME (64) less its NUL: llama.cpp refuses longer tensor names
_MIN_KV_SIZE = 8 + 4 + 1  # empty key, type, a one-byte value
_MIN_TENSOR_INFO_SIZE = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset

# What the parsed header may take in memory. gemma3's (a 262,144-token vocabulary) takes ~25 MB; a file that
# claims more is refused before the allocation. The costs are CPython's, rounded up: a str object is 49 bytes
# plus its characters when ASCII, 74-80 plus 2 or 4 bytes a character otherwise (its UTF-8 bytes are charged
# on top), rounded to 8 by the allocator, and a list slot 8 (measured: 6.9M one-character CJK strings take
# 83.6 bytes each); a metadata entry or tensor info adds a dict slot, a key or name and its value's objects.
MEMORY_BUDGET = 512 << 20
_WINDOW = 1 << 18  # bytes of the header read at once (gemma3's 6 MB in 24 reads: as fast as the map was)
_STR_COST = 80
_ARRAY_COST = 128
_KV_COST = 256
_TENSOR_INFO_COST = 512
_NAMES_SHOWN = 5  # tensor names a MissingTensorError lists: enough to show the file's naming scheme

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<4sIQQ")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's data lies in the file and how to read it.

    ``shape`` is in numpy order, the reverse of ggml's ``ne``: ``(..., rows, cols)`` with ``cols`` (``ne[0]``)
    the contiguous, block-quantized axis, as gguf-py's ``quants.dequantize`` returns it.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


class GGUFFile:
    """A validated, memory-mapped GGUF file. Use it as a context manager or call `close`."""

    def __init__(
        self,
        path: pathlib.Path,
        version: int,
        alignment: int,
        data_offset: int,
        metadata: dict[str, Any],
        tensors: dict[str, TensorInfo],
        mapping: mmap.mmap,
        fd: int,
        identity: tuple[int, int, int, int],
    ):
        self.path = path
        self.version = version
        self.alignment = alignment
        self.data_offset = data_offset
        self.metadata = metadata
        self.tensors = tensors
        self._mmap: mmap.mmap | None = mapping
        self._bytes: np.ndarray | None = np.frombuffer(mapping, dtype=np.uint8)
        self._fd: int | None = fd
        self._identity = identity  # taken before the header was read: a change during the parse shows too
        # Each key's GGUF value type as stored, by name ("UINT32", ...), with an array's element type (else
        # None): the metadata's ints are Python ints, and a writer that copies the file needs the types.
        self.metadata_types: dict[str, tuple[str, str | None]] = {}

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of one tensor, without copying them.

        Args:
            name: a key of `tensors`.

        Returns:
            A read-only uint8 view of the mapped file, shape ``(nbytes,)``. It stays valid after `close`, as
            long as the file is not truncated (which no mapping survives).

        Raises:
            MissingTensorError: no tensor is named `name`.
            UnreadableFileError: the file was closed.
            FileChangedError: the file was truncated, rewritten or replaced since it was opened.
        """
        info = self._unchanged_info(name)
        return self._bytes[info.offset : info.offset + info.nbytes]

    def read_tensor(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """A copy of one tensor's raw bytes, read with pread rather than through the map.

        A file truncated while a view of the map is read kills the process (SIGBUS); a read call returns
        short instead, so a file that changes before or during the read is an error here, never a signal.
        `read_gguf` reads every tensor this way into one buffer, at the speed of the map.

        Args:
            name: a key of `tensors`.
            out: a writable contiguous uint8 buffer of at least the tensor's bytes to read into (reused from
                tensor to tensor, it saves faulting in fresh pages: a tenth of the read time); None: a new one.

        Returns:
            A writable uint8 array, shape ``(nbytes,)``: the start of `out` when given.

        Raises:
            MissingTensorError: no tensor is named `name`.
            UnreadableFileError: the file was closed, or reading it failed (an I/O error).
            ArgumentError: `out` is not such a buffer.
            FileChangedError: the file was truncated, rewritten or replaced since it was opened.
        """
        return self._read(self._unchanged_info(name), out)

    def _read(self, info: TensorInfo, out: np.ndarray | None) -> np.ndarray:
        """info.nbytes bytes from info.offset, as `read_tensor` describes."""
        name = info.name
        if out is None:
            out = np.empty(info.nbytes, np.uint8)
        else:
            out = self._check_out(out, info)[: info.nbytes]
        done = 0
        while done < info.nbytes:  # one call reads at most ~2 GiB
            try:
                n = os.preadv(self._fd, [out[done:]], info.offset + done)
            except OSError as e:  # an I/O error of the disk or a network file system
                raise UnreadableFileError(f"{self.path}: tensor {name!r} cannot be read at byte {info.offset + done}: "
                                          f"{e.strerror or e}") from None
            if n == 0:
                break
            done += n
        self._check_unchanged(f"tensor {name!r}")  # a rewrite during the read would mix old and new bytes
        if done < info.nbytes:
            raise FileChangedError(f"{self.path}: the file ended at byte {info.offset + done} while tensor {name!r} "
                                   f"was read ({info.nbytes} bytes from {info.offset}); it changed after it was opened")
        return out

    def _check_out(self, out: Any, info: TensorInfo) -> np.ndarray:
        """`out` when preadv can fill its first info.nbytes bytes in place, else an ArgumentError."""
        if not isinstance(out, np.ndarray):
            got = type(out).__name__
        else:
            faults = [f for f, bad in (("not uint8", out.dtype != np.uint8), ("not 1-D", out.ndim != 1),
                                       ("not C-contiguous", not out.flags.c_contiguous),
                                       ("read-only", not out.flags.writeable),
                                       (f"only {out.size} bytes", out.size < info.nbytes)) if bad]
            if not faults:
                return out
            got = f"{out.dtype}{list(out.shape)}: {', '.join(faults)}"
        raise ArgumentError(f"{self.path}: out must be a writable C-contiguous 1-D uint8 numpy array of at least "
                            f"{info.nbytes} bytes for tensor {info.name!r}, got {got}")

    def read_tensor_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """`read_tensor` of rows [start, stop) of the tensor (its shape flattened to (rows, cols)): uint8
        ``((stop - start) * row bytes,)``, the start of `out` when given. `start` and `stop` are ints (numpy's
        too, not bools) with ``0 <= start <= stop <= rows``, else an ArgumentError; it raises as
        `read_tensor` does otherwise."""
        info = self._unchanged_info(name)
        rows = int(np.prod(info.shape[:-1], dtype=np.int64))
        valid = f"ints with 0 <= start <= stop <= {rows} (the rows of tensor {name!r})"
        for arg, value in (("start", start), ("stop", stop)):
            # A float or a bool would index a row by accident (True is row 1): refused, not rounded.
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise ArgumentError(f"{self.path}: {arg}={shown(value)} is a {type(value).__name__}; "
                                    f"start and stop must be {valid}")
        start, stop = operator.index(start), operator.index(stop)
        if not 0 <= start <= stop <= rows:
            raise ArgumentError(f"{self.path}: rows {start=}, {stop=} are out of range; start and stop must be "
                                f"{valid}")
        row_bytes = info.nbytes // max(rows, 1)
        part = dataclasses.replace(info, offset=info.offset + start * row_bytes, nbytes=(stop - start) * row_bytes)
        return self._read(part, out)

    def _unchanged_info(self, name: str) -> TensorInfo:
        """The info of tensor `name` of this open file, once the file is checked to be the one parsed."""
        if self._bytes is None:
            raise UnreadableFileError(f"{self.path}: the GGUF file is closed; tensor {name!r} is not read from "
                                      "it. Open it again.")
        if not isinstance(name, str):
            raise ArgumentError(f"{self.path}: a tensor name must be a str, got {type(name).__name__} "
                                f"{shown(name)}")
        info = self.tensors.get(name)
        if info is None:
            first = ", ".join(map(repr, list(self.tensors)[:_NAMES_SHOWN]))
            more = len(self.tensors) - _NAMES_SHOWN
            listed = f"{first}, and {more} more" if more > 0 else first or "none"
            raise MissingTensorError(f"{self.path}: no tensor is named {name!r}; the file's tensors "
                                     f"({len(self.tensors)}) are {listed}")
        self._check_unchanged(f"tensor {name!r}")
        return info

    def _check_unchanged(self, what: str) -> None:
        # Before any page of the map is touched: reading a page past a truncated end raises SIGBUS.
        now = _identity(os.fstat(self._fd))
        try:
            at_path = _identity(os.stat(self.path))[:2]
        except OSError:
            at_path = None
        if now != self._identity or at_path != self._identity[:2]:
            dev, ino, size, _ = self._identity
            if at_path != (dev, ino):
                change = "replaced or removed (the path names another file now)"
            elif now[2] != size:
                change = f"truncated or extended ({size} bytes when opened, {now[2]} now)"
            else:
                change = "rewritten (its modification time changed)"
            raise FileChangedError(f"{self.path}: the file was {change} after it was opened; {what} is not "
                                   "read from it. Open it again.")

    def close(self) -> None:
        """Release the file mapping; views returned by `tensor_bytes` keep their pages alive until freed."""
        self._bytes = None
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        if self._mmap is not None:
            mapping, self._mmap = self._mmap, None
            try:
                mapping.close()
            except BufferError:
                # Views handed out by tensor_bytes still export the buffer; the map is unmapped when the
                # last of them is garbage-collected.
                pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GGUFFile({str(self.path)!r}, version={self.version}, architecture={self.architecture!r}, "
            f"n_kv={len(self.metadata)}, n_tensors={len(self.tensors)})"
        )


def open_gguf(path: str | bytes | os.PathLike) -> GGUFFile:
    """Open a GGUF file, parse its header and validate every tensor's type, shape and byte range.

    Tensor data is memory-mapped, not read.

    Args:
        path: the ``.gguf`` file: a str, or bytes (decoded with `os.fsdecode`, as `open` takes them), or an
            `os.PathLike` of either; not empty.

    Returns:
        A `GGUFFile` with the metadata and tensor infos in file order.

    Raises:
        ArgumentError: `path` is not a str, bytes or path-like object, or is empty.
        GGUFError: a subclass per cause (see `realm_jax.errors`), naming the file and the field.
    """
    path = as_path(path, "open_gguf")
    if not path.exists():
        raise MissingFileError(f"{path}: no such file")
    if not path.is_file():
        raise MissingFileError(f"{path}: not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UnreadableFileError(f"{path}: cannot be read: {e.strerror or e}") from e
    mapping = None
    try:
        st = os.fstat(fd)
        size = st.st_size
        if size == 0:
            raise TruncatedFileError(f"{path}: the file is empty (0 bytes)")
        try:
            mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise UnreadableFileError(f"{path}: cannot be read: {e.strerror or e}") from e
        parser = _Parser(path, fd, size)
        parsed = parser.parse()
        f = GGUFFile(path, *parsed, mapping=mapping, fd=fd, identity=_identity(st))
        f.metadata_types = parser.types
        return f
    except BaseException:
        os.close(fd)
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                # A frame in the traceback still holds a view; the map goes when the traceback does.
                pass
        raise


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class _Parser:
    # Reads the header with pread, a window of it at a time, checking every length and count against the
    # bytes that remain. Not through the map: a file truncated while the header is parsed (a 262k-token
    # vocabulary takes ~0.2 s) would raise SIGBUS there; a read returns short instead.

    def __init__(self, path: pathlib.Path, fd: int, size: int):
        self.path = path
        self.fd = fd
        self.size = size
        self.pos = 0
        self.buf = b""  # the file's bytes [base, base + len(buf))
        self.base = 0
        self.budget = MEMORY_BUDGET  # bytes the parsed header may still take
        self.types: dict[str, tuple[str, str | None]] = {}  # each metadata key's value type (`metadata_types`)

    def _read(self, start: int, n: int) -> bytes:
        """The file's `n` bytes from `start` (within the size it had when opened)."""
        try:
            data = os.pread(self.fd, n, start)
        except OSError as e:
            raise self._io_error(e, start) from None
        if len(data) < n:  # one call reads at most ~2 GiB, or the file is shorter now
            out = bytearray(n)
            out[: len(data)] = data
            self._read_into(memoryview(out)[len(data) :], start + len(data))
            data = bytes(out)
        return data

    def _io_error(self, e: OSError, at: int) -> UnreadableFileError:
        """A read's I/O error (of the disk or a network file system), named by the file and the byte."""
        return UnreadableFileError(f"{self.path}: its header cannot be read at byte {at}: {e.strerror or e}")

    def _read_into(self, out, start: int) -> None:
        """Fill the writable buffer `out` with the file's bytes from `start`."""
        view, done = memoryview(out).cast("B"), 0
        while done < len(view):
            try:
                n = os.preadv(self.fd, [view[done:]], start + done)
            except OSError as e:
                raise self._io_error(e, start + done) from None
            if n == 0:
                raise FileChangedError(
                    f"{self.path}: the file ended at byte {start + done} while its header was read "
                    f"({self.size} bytes when opened); it changed after it was opened"
                )
            done += n

    def _window(self, start: int, end: int) -> tuple[bytes, int, int]:
        """Read the window [start, max(end, start + _WINDOW)) (end <= size: checked by the caller); the
        parse only moves forward, so the bytes before `start` are done with."""
        self.buf = self._read(start, min(self.size, max(end, start + _WINDOW)) - start)
        self.base = start
        return self.buf, start, start + len(self.buf)

    def _at(self, pos: int, n: int) -> int:
        """The offset in `buf` of the file's bytes [pos, pos + n), which lie in the file (checked)."""
        if pos < self.base or pos + n > self.base + len(self.buf):
            self._window(pos, pos + n)
        return pos - self.base

    def _charge(self, what: str, nbytes: int) -> None:
        """Take `nbytes` from the memory budget before they are allocated."""
        if nbytes > self.budget:
            raise ResourceLimitError(
                f"{self.path}: {what} would take ~{nbytes:,} bytes of memory, more than the reader's budget "
                f"allows ({self.budget:,} of {MEMORY_BUDGET:,} bytes left)"
            )
        self.budget -= nbytes

    def parse(self) -> tuple[int, int, int, dict[str, Any], dict[str, TensorInfo]]:
        version, n_tensors, n_kv = self._header()
        metadata, alignment = self._metadata(n_kv)
        infos = self._tensor_infos(n_tensors, alignment)
        data_offset = -(-self.pos // alignment) * alignment
        tensors = self._place_tensors(infos, data_offset)
        return version, alignment, data_offset, metadata, tensors

    # --- errors ---------------------------------------------------------------------------------
    def _truncated(self, what: str, pos: int, need: int) -> TruncatedFileError:
        return TruncatedFileError(
            f"{self.path}: {what} needs {need} bytes at offset {pos}, past the end of the file "
            f"({self.size} bytes)"
        )

    def _check_span(self, what: str, pos: int, need: int) -> None:
        # A claim no file of this size could meet is hostile or garbage, not a file cut short.
        if need > self.size:
            raise ResourceLimitError(
                f"{self.path}: {what} at offset {pos} claims {need} bytes, more than the whole file "
                f"({self.size} bytes)"
            )
        if pos + need > self.size:
            raise self._truncated(what, pos, need)

    # --- primitives -----------------------------------------------------------------------------
    def _u32(self, what: str) -> int:
        pos = self.pos
        if pos + 4 > self.size:
            raise self._truncated(what, pos, 4)
        self.pos = pos + 4
        at = self._at(pos, 4)  # first: it may read a new window into self.buf
        return _U32.unpack_from(self.buf, at)[0]

    def _u64(self, what: str) -> int:
        pos = self.pos
        if pos + 8 > self.size:
            raise self._truncated(what, pos, 8)
        self.pos = pos + 8
        at = self._at(pos, 8)
        return _U64.unpack_from(self.buf, at)[0]

    def _str(self, what: str, max_bytes: int | None = None) -> str:
        n = self._u64(f"length of {what}")
        pos = self.pos
        self._check_span(what, pos, n)
        if max_bytes is not None and n > max_bytes:
            raise MetadataError(f"{self.path}: {what} (offset {pos}) is {n} bytes long, more than the {max_bytes} "
                                "GGUF allows")
        self._charge(what, _STR_COST + n)
        self.pos = pos + n
        at = self._at(pos, n)
        try:
            return self.buf[at : at + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise MetadataError(
                f"{self.path}: {what} at offset {pos} is not valid UTF-8 ({e.reason})"
            ) from None

    # --- sections -------------------------------------------------------------------------------
    def _header(self) -> tuple[int, int, int]:
        at = self._at(0, min(self.size, _HEADER.size))
        head = self.buf[at : at + _HEADER.size]
        if head[:4] != _MAGIC[: len(head)]:
            raise NotGGUFError(
                f"{self.path}: not a GGUF file (starts with {head[:4]!r}, expected {_MAGIC!r})"
            )
        if len(head) < 8:
            raise self._truncated("the GGUF magic and version", 0, 8)
        version = _U32.unpack_from(head, 4)[0]
        if version not in _VERSIONS:
            if version & 0xFFFF == 0 and version != 0:
                swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
                raise UnsupportedVersionError(
                    f"{self.path}: version field {version:#010x} is {swapped} byte-swapped: a big-endian "
                    "GGUF file; big-endian files are unsupported"
                )
            supported = ", ".join(map(str, _VERSIONS))
            raise UnsupportedVersionError(
                f"{self.path}: GGUF version {version} is unsupported (supported: {supported})"
            )
        if len(head) < _HEADER.size:
            raise self._truncated("the GGUF header", 0, _HEADER.size)
        _, _, n_tensors, n_kv = _HEADER.unpack(head)
        self.pos = _HEADER.size
        room = self.size - self.pos
        if n_kv * _MIN_KV_SIZE + n_tensors * _MIN_TENSOR_INFO_SIZE > room:
            raise ResourceLimitError(
                f"{self.path}: header claims {n_kv=} metadata entries and {n_tensors=} tensors, more than "
                f"the {room} bytes after the header can hold (or the file is truncated)"
            )
        self._charge(f"the header's {n_kv=} metadata entries and {n_tensors=} tensor infos",
                     n_kv * _KV_COST + n_tensors * _TENSOR_INFO_COST)
        return version, n_tensors, n_kv

    def _metadata(self, n_kv: int) -> tuple[dict[str, Any], int]:
        metadata: dict[str, Any] = {}
        alignment = _DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key_pos = self.pos
            key = self._str(f"metadata key #{i}", max_bytes=MAX_KEY_BYTES)
            if key in metadata:
                raise MetadataError(f"{self.path}: metadata key {key!r} (offset {key_pos}) appears twice")
            vtype = self._u32(f"value type of metadata key {key!r}")
            etype = None
            if vtype == _ARRAY and self.pos + 4 <= self.size:  # the element type, which `_value` reads again
                at = self._at(self.pos, 4)  # first: it may read a new window into self.buf
                etype = _U32.unpack_from(self.buf, at)[0]
            value = self._value(vtype, key, depth=0)
            self.types[key] = (_VALUE_TYPE_NAMES[vtype], None if etype is None else _VALUE_TYPE_NAMES[etype])
            if key == "general.alignment":
                if vtype != _UINT32 or value <= 0 or value & (value - 1):
                    raise MetadataError(
                        f"{self.path}: metadata key {key!r} must be a UINT32 power of two > 0, got "
                        f"{_VALUE_TYPE_NAMES[vtype]} {value!r}"
                    )
                alignment = value
            elif key == "general.architecture" and vtype != _STRING:
                raise MetadataError(
                    f"{self.path}: metadata key {key!r} must be a STRING, got {_VALUE_TYPE_NAMES[vtype]}"
                )
            metadata[key] = value
        return metadata, alignment

    def _value(self, vtype: int, key: str, depth: int) -> Any:
        st = _SCALAR_STRUCTS.get(vtype)
        if st is not None:
            pos = self.pos
            if pos + st.size > self.size:
                raise self._truncated(f"value of metadata key {key!r}", pos, st.size)
            self.pos = pos + st.size
            at = self._at(pos, st.size)
            value = st.unpack_from(self.buf, at)[0]
            if vtype == _BOOL:
                if value > 1:
                    raise MetadataError(f"{self.path}: metadata key {key!r}: bool byte {value} is not 0 or 1")
                return bool(value)
            return value
        if vtype == _STRING:
            return self._str(f"value of metadata key {key!r}")
        if vtype == _ARRAY:
            return self._array(key, depth + 1)
        raise MetadataError(
            f"{self.path}: metadata key {key!r} has unknown value type {vtype} (offset {self.pos - 4})"
        )

    def _array(self, key: str, depth: int) -> Any:
        if depth > MAX_ARRAY_DEPTH:
            raise ResourceLimitError(
                f"{self.path}: metadata key {key!r} nests arrays {depth} deep (limit {MAX_ARRAY_DEPTH})"
            )
        etype = self._u32(f"element type of metadata key {key!r}")
        count = self._u64(f"element count of metadata key {key!r}")
        min_size = _MIN_VALUE_SIZE.get(etype)
        if min_size is None:
            raise MetadataError(
                f"{self.path}: metadata key {key!r} is an array of unknown value type {etype} "
                f"(offset {self.pos - 12})"
            )
        what = f"array of {count} {_VALUE_TYPE_NAMES[etype]} of metadata key {key!r}"
        pos = self.pos
        self._check_span(what, pos, count * min_size)
        dtype = _SCALAR_DTYPES.get(etype)
        # Each element as a numpy item, or as a Python object (its own strings' characters come on top).
        self._charge(what, _ARRAY_COST + count * (_STR_COST if dtype is None else dtype.itemsize))
        if dtype is not None:
            nbytes = count * dtype.itemsize
            self.pos = pos + nbytes
            native = dtype.newbyteorder("=")
            if nbytes > _WINDOW:  # read straight into the array, not into a window first
                arr = np.empty(count, dtype)
                self._read_into(arr.view(np.uint8), pos)
                arr = arr.astype(native, copy=False)
            else:
                at = self._at(pos, nbytes)
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=at).astype(native)
            if etype == _BOOL:
                if count and arr.max() > 1:
                    raise MetadataError(f"{self.path}: {what}: a bool byte is not 0 or 1")
                arr = arr.view(np.bool_)
            arr.flags.writeable = False
            return arr
        if etype == _STRING:
            return self._str_array(count, key)
        return [self._array(key, depth + 1) for _ in range(count)]

    def _str_array(self, count: int, key: str) -> list[str]:
        # The hot loop of a 262k-token vocabulary: locals only, offsets in the window, one bounds check per
        # string. The objects were charged to the budget by the caller; the characters must fit in it too,
        # so no string may end past `limit`, where the budget runs out. Past `end` (the window's end, or
        # nearer the limit) a string is a new window, or past the file's end or the budget: an error.
        size, start = self.size, self.pos
        limit = start + self.budget
        buf, base = self.buf, self.base
        if start < base or start > base + len(buf):
            buf, base, _ = self._window(start, start)
        off = start - base
        have, end = len(buf), min(len(buf), limit - base)
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        try:
            for _ in range(count):
                if off + 8 > have:
                    pos = base + off
                    if pos + 8 > size:
                        raise self._truncated(f"length of string #{len(out)} of metadata key {key!r}", pos, 8)
                    buf, base, _ = self._window(pos, pos + 8)
                    off, have, end = 0, len(buf), min(len(buf), limit - base)
                n = unpack(buf, off)[0]
                off += 8
                if off + n > end:
                    pos = base + off
                    if pos + n > limit or pos + n > size:  # past the budget or the file's end: raises
                        self._check_span(f"string #{len(out)} of metadata key {key!r}", pos, n)
                        self._charge(f"the strings #0..{len(out)} of metadata key {key!r}", pos + n - start)
                    buf, base, _ = self._window(pos, pos + n)
                    off, have, end = 0, len(buf), min(len(buf), limit - base)
                append(buf[off : off + n].decode("utf-8"))
                off += n
        except UnicodeDecodeError as e:
            raise MetadataError(
                f"{self.path}: string #{len(out)} of metadata key {key!r} (offset {base + off}) is not valid "
                f"UTF-8 ({e.reason})"
            ) from None
        pos = base + off
        self._charge(f"the strings of metadata key {key!r}", pos - start)
        self.pos = pos
        return out

    def _tensor_infos(self, n_tensors: int, alignment: int) -> list[tuple]:
        infos = []
        names: set[str] = set()
        for i in range(n_tensors):
            name = self._str(f"name of tensor #{i}", max_bytes=MAX_NAME_BYTES)
            if name in names:
                raise DuplicateTensorError(
                    f"{self.path}: tensor {name!r} appears twice (second is tensor #{i})"
                )
            names.add(name)
            what = f"tensor {name!r}"
            n_dims = self._u32(f"n_dims of {what}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise TensorShapeError(f"{self.path}: {what} has {n_dims=}, must be 1..{_MAX_DIMS}")
            ne = tuple(self._u64(f"ne[{d}] of {what}") for d in range(n_dims))
            type_id = self._u32(f"type of {what}")
            offset = self._u64(f"data offset of {what}")
            if type_id not in GGML_TYPES:
                raise UnknownTensorTypeError(f"{self.path}: {what} has unknown ggml type id {type_id}")
            type_name, block, type_size = GGML_TYPES[type_id]
            n_elements = 1
            for d in ne:
                n_elements *= d
            if n_elements == 0 or n_elements > _MAX_ELEMENTS:
                raise TensorShapeError(
                    f"{self.path}: {what} has dims {list(ne)} (ggml order): {n_elements} elements, must be "
                    f"1..{_MAX_ELEMENTS}"
                )
            if ne[0] % block:
                raise TensorShapeError(
                    f"{self.path}: {what} of type {type_name} has row length ne[0]={ne[0]}, which must be a "
                    f"multiple of {block=}"
                )
            nbytes = n_elements // block * type_size
            if nbytes > self.size:
                raise TensorOutOfBoundsError(
                    f"{self.path}: {what} of type {type_name} and dims {list(ne)} needs {nbytes} bytes, more "
                    f"than the whole file ({self.size} bytes)"
                )
            if offset % alignment:
                raise MisalignedTensorError(
                    f"{self.path}: {what} has data offset {offset}, not a multiple of {alignment=}"
                )
            infos.append((name, ne[::-1], type_id, offset, nbytes))
        return infos

    def _place_tensors(self, infos: list[tuple], data_offset: int) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for name, shape, type_id, offset, nbytes in infos:
            start = data_offset + offset
            if start + nbytes > self.size:
                raise TensorOutOfBoundsError(
                    f"{self.path}: tensor {name!r} of type {GGML_TYPES[type_id][0]} spans bytes [{start}, "
                    f"{start + nbytes}), past the end of "
                    f"the file ({self.size} bytes; data section starts at {data_offset})"
                )
            tensors[name] = TensorInfo(name, shape, type_id, GGML_TYPES[type_id][0], start, nbytes)
        ranges = sorted(tensors.values(), key=lambda t: t.offset)
        for prev, cur in zip(ranges, ranges[1:]):
            if cur.offset < prev.offset + prev.nbytes:
                raise TensorOverlapError(
                    f"{self.path}: tensor {cur.name!r} at bytes [{cur.offset}, {cur.offset + cur.nbytes}) "
                    f"overlaps tensor {prev.name!r} at [{prev.offset}, {prev.offset + prev.nbytes})"
                )
        return tensors
