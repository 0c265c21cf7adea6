"""The `realm-jax` command line.

    realm-jax generate PROMPT [--model FILE] [sampling options]   stream a continuation
    realm-jax chat [--model FILE] [--system TEXT]                   chat on stdin with an instruct model
    realm-jax inspect [FILE] [--json] [--precision P]               architecture, metadata, tensors per type

The default model is the embedded gemma3-270m Q4_K_M. Errors end in a one-line message on stderr and
exit status 2.
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
    if "memory" in report:
        m = report["memory"]
        print(f"\nmemory under precision {m['policy']}")
        print(f"  params (as loaded)          {m['params_bytes']:>14,} bytes  ({m['params_bytes'] / 2**20:.1f} MiB)")
        print(f"  KV cache per token          {m['kv_bytes_per_token']:>14,} bytes")
        print(f"  KV cache at {m['context_length']:>6} tokens   {m['kv_bytes_full_context']:>14,} bytes  "
              f"({m['kv_bytes_full_context'] / 2**20:.1f} MiB)")


def _cmd_inspect(args: argparse.Namespace) -> int:
    if args.file is None:
        from realm_jax.assets import default_model_path

        args.file = str(default_model_path())
    report = inspect_report(args.file)
    if args.precision is not None:
        from realm_jax.runtime import memory_plan

        report["memory"] = memory_plan(args.file, args.precision)
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
    else:
        _print_inspect(report)
    return 0


def _load(args: argparse.Namespace):
    from realm_jax.assets import default_model_path
    from realm_jax.errors import SamplingError
    from realm_jax.runtime import load
    from realm_jax.sampling import SamplingConfig

    # Bad arguments fail before the model loads.
    SamplingConfig(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    if args.max_new_tokens < 1:
        raise SamplingError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")

    return load(args.model or default_model_path(), policy=args.precision, progress=True)


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)


def _cmd_generate(args: argparse.Namespace) -> int:
    model = _load(args)
    pieces = model.generate(args.prompt, stream=True, **_sampling_kwargs(args))
    sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    model = _load(args)
    if model.tokenizer.chat_template is None:
        from realm_jax.errors import MetadataError

        raise MetadataError(f"{model.path}: the file has no chat template (tokenizer.chat_template); "
                            "chat needs an instruct model such as SmolLM2-135M-Instruct")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        reply = []
        if interactive:
            print("assistant> ", end="", flush=True)
        # A template that writes its BOS must not get a second one from the tokenizer.
        bos = model.tokenizer.bos_id
        has_bos = bos is not None and prompt.startswith(model.tokenizer.token_text(bos))
        for piece in model.generate(prompt, stream=True, add_bos=False if has_bos else None, **_sampling_kwargs(args)):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"realm-jax: error: {message} (see --help)\n")


def _add_model_options(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--model", help="a GGUF file (default: the embedded gemma3-270m Q4_K_M)")
    p.add_argument("--precision", default=None, help="precision policy: f32, bf16, f16, auto, or "
                   "params=..,compute=..,kv=.. (default: auto for the device)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="a string that ends the generation (repeatable)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="realm-jax", description="GGUF-quantized language models on JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("generate", help="stream a continuation of a prompt")
    p.add_argument("prompt")
    _add_model_options(p, max_new_tokens=128)
    p.set_defaults(func=_cmd_generate)
    p = sub.add_parser("chat", help="chat with an instruct model, one user message per stdin line")
    p.add_argument("--system", default=None, help="a system message")
    _add_model_options(p, max_new_tokens=256)
    p.set_defaults(func=_cmd_chat)
    p = sub.add_parser("inspect", help="show a GGUF file's architecture, metadata and tensor types")
    p.add_argument("file", nargs="?", help="the GGUF file (default: the embedded gemma3-270m Q4_K_M)")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.add_argument("--precision", default=None, help="also report the bytes loading with this precision "
                   "policy allocates (params, KV cache): f32, bf16, f16, auto, or params=..,compute=..,kv=..")
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
