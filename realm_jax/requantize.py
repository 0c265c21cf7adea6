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
import sys
from typing import Any

import numpy as np

from realm_jax import mixture
from realm_jax.errors import ArgumentError, MetadataError, UnsupportedFormatError, WriteError
from realm_jax.gguf import open_gguf
from realm_jax.inputs import as_path, check_output_path

__all__ = ["CHUNK_ELEMENTS", "MIN_CHUNK", "Target", "quantize_gguf", "target"]

CHUNK_ELEMENTS = 1 << 20  # elements quantized per call (4 MiB of f32; a power of two, a multiple of every block)
MIN_CHUNK = 1 << 18  # smaller chunks are padded to this: quantizing 2^18 elements takes ~0.03 s, compiling ~1.5 s
_QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
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


def _copy_metadata(path, writer) -> None:
    """Every key of the file with its value type (gguf-py's reader keeps them), as gguf_new_metadata does."""
    import gguf

    for field in gguf.GGUFReader(path).fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in _DROPPED_KEYS:
            continue
        if field.name == "general.alignment":  # the writer must pad the data to it, not only record it
            writer.add_custom_alignment(int(field.contents()))
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)


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


def _requantize(raw: np.ndarray, n_elements: int, src: str, dst: str, bar) -> np.ndarray:
    """A tensor's bytes in `src` -> in `dst`, in chunks of at most CHUNK_ELEMENTS elements."""
    from realm_jax.quant import get_format

    fs = get_format(src)
    parts = []
    for start in range(0, n_elements, CHUNK_ELEMENTS):
        n = min(CHUNK_ELEMENTS, n_elements - start)
        lo, hi = start // fs.block_size * fs.type_size, (start + n) // fs.block_size * fs.type_size
        parts.append(_convert(raw[lo:hi], src, dst, n))
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

    tgt = target(type_name)
    src, dst = as_path(src, "IN"), check_output_path(dst, "OUT")
    with open_gguf(src) as f:
        if int(f.metadata.get("split.count", 1)) > 1:
            raise MetadataError(f"{f.path}: a split file (split.count={f.metadata['split.count']}); merge it first")
        hp = mixture.hparams_from_metadata(f.metadata, what=str(f.path))
        types = mixture.plan({n: (i.shape, i.type_name) for n, i in f.tensors.items()}, tgt.file_type, hp,
                             pure=tgt.pure, default=tgt.default)
        _check_writable(f.path, types, f.tensors, tgt)
        tmp = dst.with_name(dst.name + ".tmp")
        writer = gguf.GGUFWriter(tmp, hp.arch)
        try:
            _copy_metadata(f.path, writer)
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
            # Each tensor read with pread into one buffer (as read_gguf does): a file cut under a map is a SIGBUS.
            buffer = np.empty(max((t.nbytes for t in f.tensors.values()), default=0), np.uint8)
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
                            data = _requantize(raw, math.prod(info.shape), info.type_name, t, bar)
                        except ArgumentError as e:  # values the type cannot hold (the index is of a chunk)
                            raise ArgumentError(f"{f.path}: tensor {name!r} ({info.type_name} -> {t}): {e}") from None
                    writer.write_tensor_data(data)
            writer.close()
            tmp.replace(dst)
        except BaseException as e:
            writer.close()
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):  # the write's (a full disk, a read-only folder): the reading's are GGUFErrors
                raise WriteError(f"{dst}: cannot be written: {e.strerror or e}") from None
            raise
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return {"file": str(dst), "file_type": tgt.file_type, "types": counts, "bytes_in": total,
            "bytes_out": sum(sizes.values())}
