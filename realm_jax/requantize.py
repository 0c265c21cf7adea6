"""`realm-jax quantize`: a GGUF file requantized to a llama.cpp file type (or one tensor type) with the jnp
quantizers, on whatever device JAX has.

The tensor types follow llama.cpp's mixture for the file type (`realm_jax.mixture`); every other tensor is
copied as it is. A tensor is dequantized to f32 (exactly: F32/F16/BF16 in numpy, the others with `dequantize`,
bit-identical to llama.cpp's) and quantized with `realm_jax.quant.quantize`, which without an importance matrix
is the algorithm llama.cpp's quantize runs, so the tensors come out as llama.cpp writes them. Quantizers work
block by block, so a tensor is processed as a flat run of blocks, in chunks padded to a power of two of at
least MIN_CHUNK elements: a compilation (~1.5 s for a k-quant on the 2-core CPU) then serves every tensor up to
that size, and a model needs at most three per type. The metadata is copied with its value types;
general.quantization_version and general.file_type are set, as llama.cpp does. Tensors are written in
llama.cpp's order.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from typing import Any

import numpy as np

from realm_jax import mixture, preflight
from realm_jax.checkpoint import _fresh_file
from realm_jax.errors import ArgumentError, MetadataError, UnsupportedFormatError
from realm_jax.gguf import open_gguf
from realm_jax.inputs import as_path, check_output_path, shown, write_error

__all__ = ["CHUNK_ELEMENTS", "MIN_CHUNK", "Target", "quantize_gguf", "target"]

CHUNK_ELEMENTS = 1 << 20  # elements quantized per call (4 MiB of f32; a power of two, a multiple of every block)
MIN_CHUNK = 1 << 18  # smaller chunks are padded to this: quantizing 2^18 elements takes ~0.03 s, compiling ~1.5 s
_QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
_NOT_WEIGHTS = ("I8", "I16", "I32", "I64", "F64")  # tensor types llama.cpp's quantize cannot convert
_DROPPED_KEYS = ("general.quantization_version", "general.file_type", "split.no", "split.count",
                 "split.tensors.count")


@dataclasses.dataclass(frozen=True)
class Target:
    """What `--type` asks for: a llama.cpp file type and the tensor type most tensors get; `pure` for one
    tensor type on every quantizable tensor (llama.cpp's --pure)."""

    name: str
    file_type: str
    default: str
    pure: bool

    @property
    def file_type_id(self) -> int:
        return mixture.file_type_id(self.file_type)


def target(name: str) -> Target:
    """The `Target` of `--type NAME`: a file type ("Q4_K_M") or a tensor type ("Q4_K")."""
    from gguf import GGMLQuantizationType

    key = name.upper()
    if key in mixture.FILE_TYPES:
        return Target(key, key, mixture.FILE_TYPES[key], pure=False)
    if key in GGMLQuantizationType.__members__:
        # Written under the file type whose default it is (the _M one of several), else GUESSED (Q8_K).
        by_default = sorted((not ft.endswith("_M"), ft) for ft, t in mixture.FILE_TYPES.items() if t == key)
        return Target(key, by_default[0][1] if by_default else "GUESSED", key, pure=True)
    raise UnsupportedFormatError(f"--type {name}: not a llama.cpp file type ({', '.join(mixture.FILE_TYPES)}) "
                                 "or a GGUF tensor type")


def _check_writable(path, types: dict[str, str], infos, tgt: Target) -> None:
    """Every tensor that changes type: readable by realm-jax, written without an importance matrix, and of a
    type realm-jax quantizes to; else one error naming the file, tensor and type."""
    from realm_jax.quant import FORMATS, format_for_ggml_type

    writable = [name for name, f in FORMATS.items() if f.quantize is not None]
    for name, t in types.items():
        info = infos[name]
        if t == info.type_name:
            continue
        if mixture.requires_imatrix(name, t, tgt.file_type):
            raise UnsupportedFormatError(f"{path}: tensor {name!r} gets type {t} under {tgt.name}, which llama.cpp "
                                         "writes only with an importance matrix (realm-jax quantizes without one)")
        if t not in FORMATS or FORMATS[t].quantize is None:
            raise UnsupportedFormatError(f"{path}: tensor {name!r} gets type {t} under {tgt.name}, which realm-jax "
                                         f"cannot write; it writes {', '.join(writable)}")
        format_for_ggml_type(info.ggml_type, what=f"{path}: tensor {name!r}")
        if info.type_name in _NOT_WEIGHTS:
            raise UnsupportedFormatError(f"{path}: tensor {name!r} is {info.type_name}, which holds no weights to "
                                         f"quantize (llama.cpp refuses to convert it); it would get type {t}")


def _copy_metadata(f, writer) -> None:
    """Every key of the open file `f` with its value type as stored (`GGUFFile.metadata_types`), as
    gguf_new_metadata copies them; arrays of arrays (which llama.cpp does not read) and empty arrays (which
    gguf-py cannot write) are refused."""
    import gguf

    T = gguf.GGUFValueType
    for key, value in f.metadata.items():
        if key == "general.architecture" or key in _DROPPED_KEYS:
            continue
        if key == "general.alignment":  # the writer must pad the data to it, not only record it
            writer.add_custom_alignment(int(value))
            continue
        vtype, etype = f.metadata_types[key]
        if vtype == "ARRAY":
            if etype == "ARRAY":
                raise MetadataError(f"{f.path}: metadata key {key!r} holds arrays of arrays, which llama.cpp does "
                                    "not read; realm-jax does not copy them (remove the key first)")
            value = value.tolist() if isinstance(value, np.ndarray) else list(value)
            if not value:
                raise MetadataError(f"{f.path}: metadata key {key!r} is an empty array, which gguf-py's writer "
                                    "cannot write (remove the key first)")
        writer.add_key_value(key, value, T[vtype], sub_type=T[etype] if etype else None)


def _convert(raw: np.ndarray, src: str, dst: str, n_elements: int) -> np.ndarray:
    """The bytes of `n_elements` consecutive elements (whole blocks of both types) in `src` -> in `dst`."""
    import jax.numpy as jnp

    from realm_jax.quant import DENSE_FORMATS, dequantize, get_format, quantize, repack, unpack

    fs, fd = get_format(src), get_format(dst)
    padded = max(1 << max(n_elements - 1, 0).bit_length(), MIN_CHUNK)
    dense = {name: dtype for dtype, name in DENSE_FORMATS.items()}.get(src)
    if dense is not None:  # converted in numpy: XLA on a CPU would flush subnormal inputs to zero
        x = np.zeros(padded, np.float32)
        x[:n_elements] = raw.view(dense).astype(np.float32)
    else:
        src_bytes = np.zeros(padded // fs.block_size * fs.type_size, np.uint8)  # zero blocks: finite values
        src_bytes[: raw.size] = raw
        x = dequantize(repack(src_bytes, src, (padded // fs.block_size, fs.block_size)), jnp.float32)
    out = unpack(quantize(x.reshape(-1, fd.block_size), dst))
    return out.reshape(-1)[: n_elements // fd.block_size * fd.type_size]


def _requantize(raw: np.ndarray, shape: tuple[int, ...], src: str, dst: str, bar) -> np.ndarray:
    """A tensor's bytes in `src` -> in `dst`, in chunks of at most CHUNK_ELEMENTS elements. A value `dst`
    cannot hold is an ArgumentError naming its element (or block) in the tensor's `shape`."""
    from realm_jax.quant import get_format

    fs, block = get_format(src), get_format(dst).block_size
    n_elements = math.prod(shape)
    parts = []
    for start in range(0, n_elements, CHUNK_ELEMENTS):
        n = min(CHUNK_ELEMENTS, n_elements - start)
        lo, hi = start // fs.block_size * fs.type_size, (start + n) // fs.block_size * fs.type_size
        try:
            parts.append(_convert(raw[lo:hi], src, dst, n))
        except ArgumentError as e:  # its index is one of the chunk as [blocks, block]: made the tensor's
            def at(m: re.Match) -> str:
                first = start + int(m[1]) * block + int(m[2])
                where = [int(i) for i in np.unravel_index(first, shape)]
                return f"x[{', '.join(map(str, where[:-1] + [f'{where[-1]}:{where[-1] + block}']))}]" if m[3] \
                    else f"x{where}"
            raise ArgumentError(re.sub(r"x\[(\d+), (\d+)(:\d+)?\]", at, str(e), count=1)) from None
        bar.update(hi - lo)
    return np.concatenate(parts)


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, type_name: str, *,
                  progress: bool = False) -> dict[str, Any]:
    """Requantize the GGUF file `src` to `type_name` into `dst`, with llama.cpp's per-tensor mixture.

    Args:
      src: a GGUF file (F32/F16/BF16 or quantized tensors; realm-jax must read those that change type).
      dst: the file to write (replaced atomically).
      type_name: a llama.cpp file type (Q4_K_M, Q5_K_S, Q6_K, Q8_0, Q3_K_M, Q2_K, IQ4_XS, ...) or a tensor
        type (Q4_K, ...: every quantizable tensor, llama.cpp's --pure).
      progress: show a progress bar (bytes read) on stderr.

    Returns:
      A summary: file, file_type, tensor count per type, bytes in and out.

    Raises:
      UnsupportedFormatError naming the file, tensor and type where a tensor would get a type realm-jax cannot
      write (or one llama.cpp writes only from an importance matrix); GGUFError subclasses for a bad file.
    """
    import gguf
    from tqdm.auto import tqdm

    if not isinstance(type_name, str):
        raise ArgumentError(f"quantize_gguf: type_name={shown(type_name)} must be a str (a file type such as "
                            "Q4_K_M, or a tensor type)")
    tgt = target(type_name)
    src, dst = as_path(src, "IN"), check_output_path(dst, "OUT")
    with open_gguf(src) as f:
        if int(f.metadata.get("split.count", 1)) > 1:
            raise MetadataError(f"{f.path}: a split file (split.count={f.metadata['split.count']}); merge it first")
        hp = mixture.hparams_from_metadata(f.metadata, what=str(f.path))
        try:
            types = mixture.plan({n: (i.shape, i.type_name) for n, i in f.tensors.items()}, tgt.file_type, hp,
                                 pure=tgt.pure, default=tgt.default)
        except UnsupportedFormatError as e:  # it names the tensor: and the file
            raise UnsupportedFormatError(f"{f.path}: {e}") from None
        _check_writable(f.path, types, f.tensors, tgt)
        # Each tensor read with pread into one buffer (as read_gguf does): a file cut under a map is a SIGBUS.
        largest = max((t.nbytes for t in f.tensors.values()), default=0)
        preflight.check_fits(f"{f.path}: quantizing its largest tensor ({largest:,} bytes)", largest,
                             free=preflight.host_free())
        tmp = _fresh_file(dst)  # a new name beside OUT (never an existing file: the input's, or OUT.tmp)
        writer = gguf.GGUFWriter(tmp, hp.arch)
        try:
            _copy_metadata(f, writer)
            writer.add_quantization_version(_QUANTIZATION_VERSION)
            writer.add_file_type(tgt.file_type_id)
            sizes = {}
            for name, t in types.items():
                info = f.tensors[name]
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]]
                sizes[name] = math.prod(info.shape) // block * type_size
                writer.add_tensor_info(name, info.shape, np.dtype(np.float32), sizes[name],
                                       raw_dtype=gguf.GGMLQuantizationType[t])
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            total = sum(f.tensors[n].nbytes for n in types)
            buffer = np.empty(largest, np.uint8)
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"quantizing {src.name} to {tgt.name}",
                      disable=not progress, file=sys.stderr) as bar:
                for name, t in types.items():
                    info = f.tensors[name]
                    raw = f.read_tensor(name, out=buffer)
                    if t == info.type_name:  # copied as it is
                        data = raw
                        bar.update(info.nbytes)
                    else:
                        try:
                            data = _requantize(raw, tuple(info.shape), info.type_name, t, bar)
                        except ArgumentError as e:  # values the type cannot hold
                            raise ArgumentError(f"{f.path}: tensor {name!r} ({info.type_name} -> {t}): {e}") from None
                    writer.write_tensor_data(data)
            writer.close()
            tmp.replace(dst)
        except BaseException as e:
            writer.close()
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):  # the write's (a full disk, a read-only folder): the reading's are GGUFErrors
                raise write_error(dst, e) from None
            raise
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return {"file": str(dst), "file_type": tgt.file_type, "types": counts, "bytes_in": total,
            "bytes_out": sum(sizes.values())}
