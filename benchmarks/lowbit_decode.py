"""Decode speed per weight byte of a model in each lower-bit format against Q4_K, on this machine's default impl.

A synthetic llama (scripts/make_synthetic_model.py's weights at a larger size: D 2048, 16 heads / 4 KV heads of
128, F 5632, --layers, V 1024) is written as F32, then `realm-jax quantize --type FMT` writes it in each format:
llama.cpp's mixture where FMT is a file type (a Q2_K file has Q3_K attn_v, attn_output and ffn_down and a Q6_K
output; an IQ4_XS file a Q6_K output), one tensor type on every matrix otherwise (Q4_K, llama.cpp's --pure); `realm_jax.bench.measure` times greedy decode on each,
rounds interleaved. A decode step reads every matrix once, so tokens/s x matrix bytes is the weight bytes
streamed per second; the table gives it relative to Q4_K's.

    python benchmarks/lowbit_decode.py --formats Q4_K,Q2_K,IQ4_XS --layers 2 --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import sys
import tempfile

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import realm_jax  # noqa: E402
from realm_jax.bench import git_revision, measure  # noqa: E402
from realm_jax.requantize import quantize_gguf  # noqa: E402


def synthetic_module():
    spec = importlib.util.spec_from_file_location("make_synthetic_model", ROOT / "scripts" / "make_synthetic_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.D_MODEL, module.N_HEADS, module.N_KV_HEADS, module.HEAD_DIM = 2048, 16, 4, 128
    return module


def matrix_bytes(path) -> int:
    with realm_jax.open_gguf(path) as f:
        return sum(t.nbytes for n, t in f.tensors.items() if len(t.shape) == 2 and n != "token_embd.weight")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="Q4_K,Q2_K,IQ4_XS")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of `measure` (medians of 3 runs)")
    ap.add_argument("--json", type=pathlib.Path)
    args = ap.parse_args()
    fmts = args.formats.split(",")
    synthetic = synthetic_module()
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "f32.gguf"
        synthetic.write_source(src, synthetic.Size(n_layers=args.layers, ffn=5632))
        paths = {fmt: quantize_gguf(src, pathlib.Path(tmp) / f"{fmt}.gguf", fmt)["file"] for fmt in fmts}
        models = {fmt: realm_jax.load(path) for fmt, path in paths.items()}
        nbytes = {fmt: matrix_bytes(path) for fmt, path in paths.items()}
        tps = {fmt: [] for fmt in fmts}
        for _ in range(args.rounds):
            for fmt, model in models.items():
                tps[fmt].append(measure(model, prompt_tokens=8, decode_tokens=args.decode_tokens)["decode_tps"])
        impl = models[fmts[0]].impl
    rows = [{"format": fmt, "decode_tps": statistics.median(tps[fmt]), "matrix_bytes": nbytes[fmt],
             "weight_gbps": statistics.median(tps[fmt]) * nbytes[fmt] / 1e9} for fmt in fmts]
    base = next((r["weight_gbps"] for r in rows if r["format"] == "Q4_K"), None)
    print(f"impl {impl}, {args.layers} layers, D 2048, F 5632; median of {args.rounds} interleaved rounds")
    print(f"{'format':<8}{'MiB':>8}{'tok/s':>8}{'GB/s':>7}  GB/s vs Q4_K")
    for r in rows:
        r["gbps_vs_q4_k"] = r["weight_gbps"] / base if base else None
        vs = f"{r['gbps_vs_q4_k']:.2f}x" if base else "-"
        print(f"{r['format']:<8}{r['matrix_bytes'] / 2**20:>8.1f}{r['decode_tps']:>8.1f}{r['weight_gbps']:>7.2f}  {vs}")
    if args.json:
        meta = {"revision": git_revision(ROOT), "jax": jax.__version__, "impl": impl, "layers": args.layers,
                "samples": tps}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
