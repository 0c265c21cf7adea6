"""GGUF files to and from `QTensor`s: `read_gguf` and `write_gguf`."""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from realm_jax.errors import QTensorError, UnsupportedFormatError
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
      GGUFError subclasses for a bad file; UnsupportedFormatError for a tensor type realm-jax cannot
      compute with (the message names the file and the tensor).
    """
    from tqdm.auto import tqdm

    with open_gguf(path) as f:
        tensors = {}
        total = sum(t.nbytes for t in f.tensors.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {f.path.name}", disable=not progress,
                  file=sys.stderr) as bar:
            for name, info in f.tensors.items():
                what = f"{f.path}: tensor {name!r}"
                fmt = format_for_ggml_type(info.ggml_type, what=what)
                tensors[name] = repack(f.tensor_bytes(name), fmt.name, info.shape, what=what)
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
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
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


def _value_type(key: str, value: Any):
    import gguf

    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, int):
        return gguf.GGUFValueType.INT64 if value < 0 else gguf.GGUFValueType.UINT64
    if isinstance(value, float):
        return gguf.GGUFValueType.FLOAT32
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    if isinstance(value, (list, tuple, np.ndarray)):
        return gguf.GGUFValueType.ARRAY
    raise QTensorError(f"write_gguf: metadata {key!r} has unsupported type {type(value).__name__}")
