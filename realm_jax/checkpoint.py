"""GGUF files to and from `QTensor`s: `read_gguf` and `write_gguf`."""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from realm_jax.errors import MetadataError, QTensorError, UnsupportedFormatError
from realm_jax.gguf import open_gguf
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
        tensors = {}
        total = sum(t.nbytes for t in f.tensors.values())
        # One buffer for every tensor's bytes (repack copies them into planes): fresh pages for each would
        # make the read ~20% slower than the map's (gemma3: 0.59 against 0.47 s; 0.50 with the buffer).
        buffer = np.empty(max((t.nbytes for t in f.tensors.values()), default=0), np.uint8)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {f.path.name}", disable=not progress,
                  file=sys.stderr) as bar:
            for name, info in f.tensors.items():
                what = f"{f.path}: tensor {name!r}"
                fmt = format_for_ggml_type(info.ggml_type, what=what)
                tensors[name] = repack(f.read_tensor(name, out=buffer), fmt.name, info.shape, what=what)
                bar.update(info.nbytes)
        return dict(f.metadata), tensors


def write_gguf(path: str | os.PathLike, tensors: Mapping[str, QTensor], *, arch: str = "realm-jax",
               metadata: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Write `QTensor`s (any supported format, Q8_K included) and metadata to a GGUF v3 file.

    Args:
      path: the file to write.
      tensors: name -> QTensor; planes may be numpy or jax arrays.
      arch: general.architecture.
      metadata: extra key -> value pairs (str, bool, int, float or lists of them), typed as gguf-py's
        writer infers them.
    """
    import gguf

    path = pathlib.Path(path)
    metadata = dict(metadata or {})
    if metadata.get("general.architecture", arch) != arch:
        raise MetadataError(f"write_gguf: metadata general.architecture={metadata['general.architecture']!r} "
                            f"conflicts with arch={arch!r}")
    metadata.pop("general.architecture", None)
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        value = _plain(value)
        if key == "general.alignment":  # the writer must pad the data to it, not only record it
            writer.add_custom_alignment(value)
            continue
        writer.add_key_value(key, value, _value_type(key, value))
    for name, qt in tensors.items():
        if not isinstance(qt, QTensor):
            raise QTensorError(f"write_gguf: tensor {name!r} is a {type(qt).__name__}, not a QTensor")
        raw = unpack(qt)
        try:
            qtype = gguf.GGMLQuantizationType[qt.fmt]
        except KeyError:
            raise UnsupportedFormatError(f"write_gguf: tensor {name!r} has format {qt.fmt}") from None
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _plain(value: Any) -> Any:
    """numpy arrays and scalars (as read_gguf returns them) -> Python values the writer accepts."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# Keys llama.cpp reads as 32-bit: written as such so llama.cpp (and open_gguf, for the alignment) accept them.
_UINT32_KEYS = ("general.alignment", "general.file_type", "general.quantization_version", ".block_count",
                ".context_length", ".embedding_length", ".feed_forward_length", ".head_count", ".head_count_kv",
                ".key_length", ".value_length", ".dimension_count", ".sliding_window", ".vocab_size", "_token_id")


def _value_type(key: str, value: Any):
    import gguf

    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, int):
        if key.endswith(_UINT32_KEYS) and 0 <= value < 2**32:
            return gguf.GGUFValueType.UINT32
        return gguf.GGUFValueType.INT64 if value < 0 else gguf.GGUFValueType.UINT64
    if isinstance(value, float):
        return gguf.GGUFValueType.FLOAT32
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    if isinstance(value, list) and value:
        return gguf.GGUFValueType.ARRAY
    raise MetadataError(f"write_gguf: metadata {key!r} has unsupported type {type(value).__name__} "
                        f"(str, bool, int, float, or a non-empty list of one of them)")
