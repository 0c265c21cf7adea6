"""GGUF files to and from `QTensor`s: `read_gguf` and `write_gguf`."""

from __future__ import annotations

import concurrent.futures
import mmap
import os
import pathlib
import secrets
import stat
import sys
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from realm_jax.errors import ArgumentError, MetadataError, QTensorError, UnsupportedFormatError, WriteError
from realm_jax import gguf as gguf_reader
from realm_jax.gguf import MAX_ARRAY_DEPTH, MAX_KEY_BYTES, MAX_NAME_BYTES, open_gguf
from realm_jax.inputs import check_output_path, shown, write_error
from realm_jax.quant import QTensor, format_for_ggml_type, repack, unpack

__all__ = ["read_gguf", "write_gguf"]


def read_gguf(path: str | os.PathLike, *, progress: bool = False) -> tuple[dict[str, Any], dict[str, QTensor]]:
    """Read a GGUF file into its metadata and its tensors as `QTensor`s with numpy planes.

    Args:
      path: the GGUF file (v2 or v3).
      progress: show a progress bar (bytes repacked) on stderr.

    Returns:
      (metadata, tensors): metadata key -> value in file order; tensor name -> QTensor of the tensor's
      logical shape (..., rows, cols). Move a QTensor to a device with `jax.device_put`.

    Raises:
      GGUFError subclasses for a bad file (FileChangedError for one truncated, rewritten or replaced while it
      is read); UnsupportedFormatError for a tensor type realm-jax cannot compute with (the message names the
      file and the tensor).
    """
    from tqdm.auto import tqdm

    with open_gguf(path) as f:
        formats = {name: format_for_ggml_type(info.ggml_type, what=f"{f.path}: tensor {name!r}")
                   for name, info in f.tensors.items()}
        places = _places(f.tensors, formats)
        total = sum(t.nbytes for t in f.tensors.values())
        # Tensors are read a few MiB of rows at a time through a small buffer per thread (fresh pages for each
        # would make the read ~20% slower than the map's) and repacked into their place in `places`' buffers,
        # by `_readers(total)` threads: the repack is numpy work that releases the GIL, and on one thread it took
        # 1.5x the time of reading the file (an 8B-shaped Q4_K_M file: 12.7 s against 5.0 s for one read).
        def row_bytes(t):
            return t.nbytes // max(1, int(np.prod(t.shape[:-1], dtype=np.int64)))

        largest = max((t.nbytes for t in f.tensors.values()), default=0)
        size = max(min(largest, _CHUNK), max(map(row_bytes, f.tensors.values()), default=0))
        jobs, tensors, flat = [], {}, {}
        for name, info in f.tensors.items():
            rows = int(np.prod(info.shape[:-1], dtype=np.int64))
            flat[name] = {k: v.reshape(rows, -1) for k, v in places[name].items()}
            step = max(1, size // max(row_bytes(info), 1))
            jobs += [(name, r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
            tensors[name] = QTensor(formats[name].name, info.shape, places[name])
        local, lock = threading.local(), threading.Lock()
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {f.path.name}", disable=not progress,
                  file=sys.stderr) as bar:
            def read(job):
                name, r0, r1 = job
                if not hasattr(local, "buffer"):
                    local.buffer = np.empty(size, np.uint8)
                info = f.tensors[name]
                raw = f.read_tensor_rows(name, r0, r1, out=local.buffer)
                part = repack(raw, formats[name].name, (r1 - r0, info.shape[-1]),
                              what=f"{f.path}: tensor {name!r}").planes
                for k, v in flat[name].items():
                    v[r0:r1] = part[k]
                with lock:
                    bar.update(raw.size)

            readers = _readers(total)
            if readers == 1:  # on the calling thread: its malloc arena is the one the later allocations use
                for job in jobs:
                    read(job)
                return dict(f.metadata), tensors
            with concurrent.futures.ThreadPoolExecutor(readers) as pool:
                futures = [pool.submit(read, job) for job in jobs]
                try:
                    for future in futures:
                        future.result()  # the first failure in file order is the one raised
                finally:
                    for future in futures:
                        future.cancel()
        return dict(f.metadata), tensors


_CHUNK = 16 << 20  # bytes of a tensor read at a time
_PARALLEL_BYTES = 1 << 30  # files with fewer tensor bytes are read on one thread (`_readers`)


def _readers(nbytes: int) -> int:
    """Threads that read and repack a file of `nbytes` tensor bytes: one for a file under `_PARALLEL_BYTES`,
    else one per core this process may run on, at most 4 (each holds a `_CHUNK` buffer and the repack's
    temporaries, ~4x that). Why not always: what each thread frees stays in its own malloc arena, which
    the main thread's allocations after the load (the tokenizer, the compiler) do not reuse; for gemma3-270m
    (241 MiB) two threads raised the peak RSS of a generation by 20-50 MiB and saved well under a second."""
    if nbytes < _PARALLEL_BYTES:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


_ALIGN = 64  # XLA:CPU takes a numpy array this aligned without a copy (jax.device_put aliases it)
# Per-layer tensors that `models.fuse_projections` joins by rows, in its order: placed side by side, their
# join is a view, not a copy.
_FUSED = (("attn_q.weight", "attn_k.weight", "attn_v.weight"), ("ffn_gate.weight", "ffn_up.weight"))


_MAPPED = 4 << 20  # buffers of at least this many bytes get pages of their own (`_aligned`)


def _aligned(shape: tuple[int, ...], dtype, *, huge: bool = False) -> np.ndarray:
    """An uninitialized array, 64-byte aligned. Buffers of `_MAPPED` bytes and more are anonymous maps whose
    transparent huge pages are asked for (MADV_HUGEPAGE) only where `huge`: numpy asks for them on every large
    array, and where the kernel compacts memory to find them (the default "defrag=madvise") the first touch of
    each 2 MiB page can cost milliseconds. For an 8B-shaped file's layers that tripled the load (8.1-8.9 s
    against 3.1-3.6 s, the file read once in 2.3-2.5 s) for no decode speed (4.1-4.5 tok/s either way); the
    tensors outside the layers (the embedding, the output projection, read whole by every decode step) keep
    them: on 4 KiB pages gemma3-270m's decode was 20% slower (60 against 75 tok/s)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes >= _MAPPED and hasattr(mmap, "MAP_PRIVATE"):
        # Private (a shared anonymous map would be shared memory, under other huge-page rules); page-aligned;
        # unmapped when the last view of it goes. Where the kernel refuses the map, numpy's allocation below
        # says so (its MemoryError names the size and shape).
        try:
            region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
        except OSError:
            region = None
        if region is not None:
            if huge and hasattr(mmap, "MADV_HUGEPAGE"):
                region.madvise(mmap.MADV_HUGEPAGE)
            return np.frombuffer(region, dtype, nbytes // dtype.itemsize).reshape(shape)
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _places(infos, formats) -> dict[str, dict[str, np.ndarray]]:
    """Where each tensor's planes go: views into buffers laid out so that the model's params need no copy.
    The tensors of layers with the same name, type and shape share one buffer per plane [layers, ...], each
    layer's a view of its slot (`transformer.stack_layers` takes the buffer as it is), the layers ordered by
    structure, then by number (so that both kinds of stack are views),
    and q|k|v and gate|up of one format and width sit side by side within a slot (so does their fused
    weight, `quant.concat_rows`). Every buffer starts 64-byte aligned, so that `jax.device_put` on CPU
    aliases it (no second copy of the weights at load). Other tensors get buffers of their own."""
    by_layer: dict[int, dict[str, str]] = {}
    for name in infos:
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
            by_layer.setdefault(int(parts[1]), {})[parts[2]] = name
    groups: dict[int, list[tuple[str, ...]]] = {}  # layer -> its tensors' suffixes, grouped
    for i, names in by_layer.items():
        left = dict(names)
        out = []
        for fused in _FUSED:
            if all(n in left for n in fused):
                kinds = {(infos[left[n]].ggml_type, infos[left[n]].shape[1:], len(infos[left[n]].shape)) for n in fused}
                if len(kinds) == 1 and len(infos[left[fused[0]]].shape) == 2:
                    out.append(fused)
                    for n in fused:
                        del left[n]
        out.extend((n,) for n in left)
        groups[i] = out

    def signature(i: int, group: tuple[str, ...]):
        return tuple((infos[by_layer[i][n]].ggml_type, infos[by_layer[i][n]].shape) for n in group)

    def structure(i: int) -> tuple:
        """What makes layer i's params' structure: its matrices' groups, types and shapes, in any order in
        the file (vectors, the norms, become f32 params whatever their type)."""
        return tuple(sorted((g, signature(i, g)) for g in groups[i] if len(infos[by_layer[i][g[0]]].shape) > 1))

    # Layers of one structure one after another, in layer order within each structure: a stretch of
    # consecutive layers of one structure, and all of a structure's layers (a `transformer.Variants` stack),
    # are then each a run of slots of the buffers.
    kinds: dict[tuple, int] = {}
    kind = {i: kinds.setdefault(structure(i), len(kinds)) for i in sorted(groups)}
    order = sorted(groups, key=lambda i: (kind[i], i))
    after = dict(zip(order, order[1:]))
    places: dict[str, dict[str, np.ndarray]] = {}
    done = set()
    for i in order:
        for group in groups[i]:
            if (i, group) in done:
                continue
            sig, run = signature(i, group), [i]
            while run[-1] in after and group in groups[after[run[-1]]] and signature(after[run[-1]], group) == sig:
                run.append(after[run[-1]])
            first = infos[by_layer[i][group[0]]]
            fmt = formats[first.name]
            lead, n_blocks = first.shape[:-1], first.shape[-1] // fmt.block_size
            rows = [infos[by_layer[i][n]].shape[0] if len(group) > 1 else None for n in group]
            for plane in fmt.planes:
                shape = (sum(rows), n_blocks * plane.count) if len(group) > 1 else (*lead, n_blocks * plane.count)
                buf = _aligned((len(run), *shape), plane.dtype)
                for slot, layer in enumerate(run):
                    r0 = 0
                    for n, r in zip(group, rows):
                        view = buf[slot] if r is None else buf[slot, r0:r0 + r]
                        places.setdefault(by_layer[layer][n], {})[plane.name] = view
                        r0 += r or 0
            done.update((layer, group) for layer in run)
    for name, info in infos.items():
        if name not in places:
            fmt = formats[name]
            n_blocks = info.shape[-1] // fmt.block_size
            places[name] = {p.name: _aligned((*info.shape[:-1], n_blocks * p.count), p.dtype, huge=True)
                            for p in fmt.planes}
    return places


def write_gguf(path: str | os.PathLike, tensors: Mapping[str, QTensor], *, arch: str = "realm-jax",
               metadata: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Write `QTensor`s (any supported format, Q8_K included) and metadata to a GGUF v3 file.

    Everything is checked before a byte is written, and the file is written beside `path` and renamed over
    it once complete: a write that fails leaves what was at `path`.

    Args:
      path: the file to write (a regular file or none yet, in a folder that exists).
      tensors: name -> QTensor; planes may be numpy or jax arrays. Names of at most 63 UTF-8 bytes.
      arch: general.architecture.
      metadata: extra key -> value pairs: str, bool, int, float or non-empty lists of one of them, nested at
        most four deep, or numpy arrays and scalars (as `read_gguf` returns them: their dtype is kept). A
        Python float is written as FLOAT32 (the type llama.cpp reads), so it must be one float32 can hold
        (0.1 is stored as 0.10000000149); an int as UINT32 where it fits (the type llama.cpp reads its
        integer keys as), else INT32, INT64 or UINT64 (INT32 in lists that fit, as gguf-py writes them).
        general.alignment: a power of two up to MAX_ALIGNMENT.

    Raises:
      ArgumentError: path, tensors, arch or metadata of the wrong type. MetadataError: a key or value GGUF
      cannot hold as given, or one `read_gguf` would refuse. QTensorError, UnsupportedFormatError: a tensor.
      WriteError: the path is not a file path, or the system refused the write.
    """
    import gguf

    path = check_output_path(path, "write_gguf")
    if not isinstance(arch, str) or not arch:
        raise ArgumentError(f"write_gguf: arch={shown(arch)} must be a non-empty str")
    _utf8(arch, "arch")
    if not isinstance(tensors, Mapping):
        raise ArgumentError(f"write_gguf: tensors must be a mapping of names to QTensors, not a "
                            f"{type(tensors).__name__}")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ArgumentError(f"write_gguf: metadata must be a mapping of keys to values, not a "
                            f"{type(metadata).__name__}")
    metadata = dict(metadata or {})
    if metadata.get("general.architecture", arch) != arch:
        raise MetadataError(f"write_gguf: metadata general.architecture={shown(metadata['general.architecture'])} "
                            f"conflicts with arch={arch!r}")
    metadata.pop("general.architecture", None)
    _check_read_cost(metadata, len(tensors) if isinstance(tensors, Mapping) else 0)  # before any .tolist()
    values = [(key, *_typed(key, value)) for key, value in metadata.items()]
    raws = []
    for name, qt in tensors.items():
        if not isinstance(name, str) or not 0 < len(_utf8(name, f"tensor name {shown(name)}")) <= MAX_NAME_BYTES:
            raise MetadataError(f"write_gguf: tensor name {shown(name)} must be a str of 1 to {MAX_NAME_BYTES} "
                                "UTF-8 bytes (ggml's limit, which readers hold files to)")
        if not isinstance(qt, QTensor):
            raise QTensorError(f"write_gguf: tensor {name!r} is a {type(qt).__name__}, not a QTensor")
        if len(qt.shape) > 4:
            raise QTensorError(f"write_gguf: tensor {name!r} has {len(qt.shape)} dimensions {list(qt.shape)}; GGUF "
                               "holds at most 4 (ggml's GGML_MAX_DIMS)")
        try:
            qtype = gguf.GGMLQuantizationType[qt.fmt]
        except KeyError:
            raise UnsupportedFormatError(f"write_gguf: tensor {name!r} has format {qt.fmt}") from None
        raws.append((name, unpack(qt), qtype))
    tmp = _fresh_file(path)
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        for key, value, vtype, sub_type in values:
            if key == "general.alignment":  # the writer must pad the data to it, not only record it
                writer.add_custom_alignment(value)
            else:
                writer.add_key_value(key, value, vtype, sub_type)
        for name, raw, qtype in raws:
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _read_cost(value: Any) -> int:
    """About what `read_gguf` charges its memory budget for a metadata value (`realm_jax.gguf`'s costs)."""
    if isinstance(value, str):
        return gguf_reader._STR_COST + len(value)
    if isinstance(value, np.ndarray):
        return gguf_reader._ARRAY_COST + value.size * value.dtype.itemsize
    if isinstance(value, (list, tuple)):
        # numbers read back as one numpy array (at most 8 bytes each); a string array's slot, length and bytes;
        # a nested array's slot and its own cost
        return gguf_reader._ARRAY_COST + sum(
            8 if isinstance(v, (int, float, np.generic)) else
            gguf_reader._STR_COST + 8 + len(v) if isinstance(v, str) else gguf_reader._STR_COST + _read_cost(v)
            for v in value)
    return 0


def _check_read_cost(metadata: Mapping[str, Any], n_tensors: int) -> None:
    """MetadataError where `read_gguf` would refuse the file for its header's size (before anything is
    converted: a huge numpy array would go through .tolist())."""
    budget = gguf_reader.MEMORY_BUDGET - (len(metadata) + 1) * gguf_reader._KV_COST \
        - n_tensors * gguf_reader._TENSOR_INFO_COST
    for key, value in metadata.items():
        budget -= gguf_reader._STR_COST + (len(key) if isinstance(key, str) else 0) + _read_cost(value)
        if budget < 0:
            raise MetadataError(f"write_gguf: the metadata (by key {shown(key)}) would take more memory to read back "
                                f"than read_gguf allows a header ({gguf_reader.MEMORY_BUDGET:,} bytes): it would "
                                "refuse the file")


def _fresh_file(path: pathlib.Path) -> pathlib.Path:
    """A new empty file beside `path`, to write and rename over it: with the permissions of the file at
    `path` where there is one (a 0600 file stays 0600), else the umask's."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = None
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            try:
                if mode is not None:
                    os.fchmod(fd, mode)
            finally:
                os.close(fd)
            return tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise write_error(path, e) from None
    raise WriteError(f"{path}: no free name for a temporary file beside it")


_INT32 = (-(2**31), 2**31 - 1)
MAX_ALIGNMENT = 1 << 16  # the largest general.alignment write_gguf writes (llama.cpp's files use 32)


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise MetadataError(f"write_gguf: {what} is not valid Unicode text (a lone surrogate)") from None


def _typed(key: Any, value: Any) -> tuple[Any, Any, Any]:
    """A metadata value checked and typed for gguf-py's writer: (value, GGUFValueType, array sub-type)."""
    import gguf

    T = gguf.GGUFValueType
    if not isinstance(key, str):
        raise MetadataError(f"write_gguf: metadata key {shown(key)} must be a str")
    if len(_utf8(key, f"metadata key {shown(key)}")) > MAX_KEY_BYTES:
        raise MetadataError(f"write_gguf: metadata key {shown(key)} is longer than GGUF's {MAX_KEY_BYTES} bytes")
    what = f"metadata {key!r}"
    if key == "general.alignment":
        if not _is_int(value) or not 0 < int(value) <= MAX_ALIGNMENT or int(value) & (int(value) - 1):
            raise MetadataError(f"write_gguf: {what}={shown(value)} must be a power of two up to {MAX_ALIGNMENT} "
                                "(each tensor is padded to it)")
        return int(value), T.UINT32, None
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype in _ARRAY_TYPES:
        if not value.size:
            raise MetadataError(f"write_gguf: {what} is an empty array (gguf-py writes none)")
        if value.dtype.kind == "f" and not _fits(value.astype(np.float64), value.dtype):
            raise MetadataError(f"write_gguf: {what} holds a value {value.dtype} cannot hold")
        return value.tolist(), T.ARRAY, T[_ARRAY_TYPES[value.dtype]]
    if isinstance(value, np.generic) and value.dtype in _ARRAY_TYPES and value.dtype.kind != "b":
        return value.item(), T[_ARRAY_TYPES[value.dtype]], None
    value = _plain(value)
    vtype = _scalar_type(key, value, what)
    if vtype is not None:
        return value, vtype, None
    if isinstance(value, list):
        return value, T.ARRAY, _list_type(value, what, depth=1)
    raise MetadataError(f"write_gguf: {what} has unsupported type {type(value).__name__} (str, bool, int, float, "
                        f"a non-empty list of one of them, or a numpy array)")


_ARRAY_TYPES = {np.dtype(t): name for t, name in (
    (np.uint8, "UINT8"), (np.int8, "INT8"), (np.uint16, "UINT16"), (np.int16, "INT16"), (np.uint32, "UINT32"),
    (np.int32, "INT32"), (np.uint64, "UINT64"), (np.int64, "INT64"), (np.float32, "FLOAT32"),
    (np.float64, "FLOAT64"), (np.bool_, "BOOL"))}


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _fits(values: np.ndarray, dtype) -> bool:
    """Whether every finite value stays finite, and every nonzero one nonzero, in `dtype`."""
    big = np.abs(values[np.isfinite(values)])
    return bool(np.all(big <= np.finfo(dtype).max) and np.all((big == 0) | (big.astype(dtype) != 0)))


def _scalar_type(key: str, value: Any, what: str):
    """The GGUF type of a scalar (None for a list), checked to hold it."""
    import gguf

    T = gguf.GGUFValueType
    if isinstance(value, bool):
        return T.BOOL
    if isinstance(value, int):  # llama.cpp reads its integer keys as UINT32 (and checks the type)
        if 0 <= value < 2**32:
            return T.UINT32
        if _INT32[0] <= value < 0:
            return T.INT32
        if not -(2**63) <= value < 2**64:
            raise MetadataError(f"write_gguf: {what}={shown(value)} does not fit INT64 or UINT64")
        return T.INT64 if value < 0 else T.UINT64
    if isinstance(value, float):
        if not _fits(np.array([value]), np.float32):
            raise MetadataError(f"write_gguf: {what}={value!r} is not one float32 can hold (written as FLOAT32, "
                                f"the type llama.cpp reads; pass np.float64(...) for FLOAT64)")
        return T.FLOAT32
    if isinstance(value, str):
        _utf8(value, what)
        return T.STRING
    return None


def _list_type(values: list, what: str, depth: int):
    """The element type of a non-empty list (gguf-py writes one type an array; in nested arrays, ints as INT32
    and floats as FLOAT32, the types it infers), each element checked."""
    import gguf

    T = gguf.GGUFValueType
    if not values:
        raise MetadataError(f"write_gguf: {what} holds an empty list (gguf-py writes none)")
    if depth > MAX_ARRAY_DEPTH:
        raise MetadataError(f"write_gguf: {what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
    kinds = {bool if isinstance(v, bool) else type(v) for v in values}
    if len(kinds) > 1 or kinds - {bool, int, float, str, list}:
        names = ", ".join(sorted(k.__name__ for k in kinds))
        raise MetadataError(f"write_gguf: {what} mixes or holds unsupported types ({names}): a GGUF array holds one "
                            "of str, bool, int, float or list")
    kind = kinds.pop()
    if kind is list:
        for v in values:
            _list_type(v, what, depth + 1)
        return T.ARRAY
    if kind is str:
        for v in values:
            _utf8(v, what)
        return T.STRING
    if kind is bool:
        return T.BOOL
    if kind is float:
        if not _fits(np.array(values, np.float64), np.float32):
            raise MetadataError(f"write_gguf: {what} holds a float that float32 cannot hold")
        return T.FLOAT32
    low, high = min(values), max(values)
    if _INT32[0] <= low and high <= _INT32[1]:
        return T.INT32
    if depth > 1:
        raise MetadataError(f"write_gguf: {what} nests an int outside INT32 (the type gguf-py writes there)")
    if -(2**63) <= low and high < 2**63:
        return T.INT64
    if 0 <= low and high < 2**64:
        return T.UINT64
    raise MetadataError(f"write_gguf: {what} holds ints no one GGUF integer type holds ({low} to {high})")


def _plain(value: Any) -> Any:
    """numpy arrays and scalars (as read_gguf returns them) -> Python values the writer accepts."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


