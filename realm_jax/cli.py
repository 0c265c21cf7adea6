"""The `realm-jax` command line.

    realm-jax inspect [FILE] [--json]     architecture, metadata summary, tensors per type

Errors of realm-jax end in a one-line message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from realm_jax.errors import RealmError

__all__ = ["main"]

_ARCH_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length",
              "attention.head_count", "attention.head_count_kv", "attention.key_length",
              "attention.sliding_window", "rope.freq_base", "vocab_size")


def _summarize_value(value: Any) -> Any:
    """Scalars as they are (long strings shortened); arrays as {"array": element type, "length": n}."""
    if isinstance(value, np.ndarray):
        return {"array": str(value.dtype), "length": int(value.size)}
    if isinstance(value, list):
        kind = type(value[0]).__name__ if value else "empty"
        return {"array": kind, "length": len(value)}
    if isinstance(value, str) and len(value) > 80:
        return value[:77] + "..."
    return value


def _file_type_name(file_type: Any) -> str | None:
    from gguf import LlamaFileType

    try:
        return LlamaFileType(file_type).name
    except (ValueError, TypeError):
        return None if file_type is None else f"unknown ({file_type})"


def inspect_report(path: str) -> dict[str, Any]:
    """What `realm-jax inspect` shows, as a JSON-ready dict. Reads the header only."""
    from realm_jax.gguf import open_gguf
    from realm_jax.quant import FORMATS

    with open_gguf(path) as f:
        arch = f.architecture
        per_type: dict[str, dict[str, Any]] = {}
        for info in f.tensors.values():
            row = per_type.setdefault(info.type_name, {"type": info.type_name, "count": 0, "elements": 0,
                                                       "bytes": 0, "supported": info.type_name in FORMATS})
            row["count"] += 1
            row["elements"] += math.prod(info.shape)
            row["bytes"] += info.nbytes
        for row in per_type.values():
            row["bits_per_weight"] = round(8 * row["bytes"] / row["elements"], 4)
        rows = sorted(per_type.values(), key=lambda r: -r["bytes"])
        elements = sum(r["elements"] for r in rows)
        nbytes = sum(r["bytes"] for r in rows)
        return {
            "file": str(f.path),
            "gguf_version": f.version,
            "architecture": arch,
            "name": f.metadata.get("general.name"),
            "file_type": _file_type_name(f.metadata.get("general.file_type")),
            "model": {k: f.metadata[f"{arch}.{k}"] for k in _ARCH_KEYS if f"{arch}.{k}" in f.metadata},
            "metadata": {k: _summarize_value(v) for k, v in f.metadata.items()},
            "tensor_types": rows,
            "totals": {"tensors": len(f.tensors), "elements": elements, "bytes": nbytes,
                       "bits_per_weight": round(8 * nbytes / elements, 4) if elements else 0.0},
        }


def _print_inspect(report: dict[str, Any]) -> None:
    print(f"file          {report['file']}")
    print(f"gguf version  {report['gguf_version']}")
    print(f"architecture  {report['architecture']}")
    if report["name"]:
        print(f"name          {report['name']}")
    if report["file_type"]:
        print(f"file type     {report['file_type']}")
    for key, value in report["model"].items():
        print(f"  {key:<26}{value}")
    print(f"\nmetadata ({len(report['metadata'])} keys)")
    for key, value in report["metadata"].items():
        if isinstance(value, dict):
            value = f"[{value['length']} x {value['array']}]"
        elif isinstance(value, float):
            value = f"{value:.7g}"  # f32 metadata, shown without its f64 repr's noise
        print(f"  {key:<40}{value}")
    t = report["totals"]
    print(f"\ntensors ({t['tensors']}, {t['elements'] / 1e6:.1f} M weights, {t['bytes'] / 2**20:.1f} MiB, "
          f"{t['bits_per_weight']:.2f} bits/weight)")
    print(f"  {'type':<6}{'count':>7}{'weights':>14}{'MiB':>10}{'bits/w':>9}  supported")
    for r in report["tensor_types"]:
        print(f"  {r['type']:<6}{r['count']:>7}{r['elements']:>14,}{r['bytes'] / 2**20:>10.2f}"
              f"{r['bits_per_weight']:>9.3f}  {'yes' if r['supported'] else 'no'}")


def _cmd_inspect(args: argparse.Namespace) -> int:
    if args.file is None:
        from realm_jax.assets import default_model_path

        args.file = str(default_model_path())
    report = inspect_report(args.file)
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
    else:
        _print_inspect(report)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realm-jax", description="GGUF-quantized language models on JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show a GGUF file's architecture, metadata and tensor types")
    p.add_argument("file", nargs="?", help="the GGUF file (default: the embedded gemma3-270m Q4_K_M)")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except RealmError as e:
        print(f"realm-jax: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `realm-jax inspect | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
