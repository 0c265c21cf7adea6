"""Accuracy and speed per precision policy: f32, bf16, f16 and auto, against f32, on a fixed text.

For each model (both real models and the synthetic k-quant models) and policy: teacher-forced top-1
agreement with the f32 policy and KL(p_f32 || p_policy) over the full vocabulary on the recorded long
prompt (tests/data/llama_ref/manifest.json, >= 256 tokens), whether any logit or cache entry is NaN/Inf,
and prefill/decode tokens/s (benchmarks/e2e.py's measurement; real models only, --speed).

    python benchmarks/precision.py [--speed] [--runs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

POLICIES = ["f32", "bf16", "f16", "auto"]
REAL = ["gemma3-270m-q4_k_m", "smollm2-135m-instruct-q4_1"]
SYNTHETIC = ["llama-k-q4_k_m", "llama-k-q5_k_m", "llama-k-q6_k", "llama-k-q8_0"]


def model_file(name: str) -> pathlib.Path:
    from realm_jax import assets
    from realm_jax.reference import reference_dir

    return reference_dir().parent / "synthetic" / f"{name}.gguf" if name in SYNTHETIC else assets.model_path(name)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def policy_accuracy(name: str, text: str) -> list[dict]:
    """Per policy: top-1 agreement and KL against the f32 policy, and whether everything stayed finite."""
    import jax

    import realm_jax
    from realm_jax.sampling import SamplingConfig

    results, reference = [], None
    for policy in POLICIES:
        model = realm_jax.load(model_file(name), policy=policy, progress=False)
        ids = model.tokenizer.encode(text)
        logits = model.logits(ids)
        gen = model.start([ids], max_new_tokens=1, sampling=SamplingConfig())
        cache_finite = all(bool(np.isfinite(np.asarray(a, np.float32)).all()) for a in jax.tree.leaves(gen.cache))
        if reference is None:
            reference = log_softmax(logits)
        ours = log_softmax(logits)
        kl = (np.exp(reference) * (reference - ours)).sum(-1)
        results.append({"model": name, "policy": policy, "resolved": str(model.policy), "tokens": len(ids),
                        "top1_vs_f32": float((ours.argmax(1) == reference.argmax(1)).mean()),
                        "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
                        "finite": bool(np.isfinite(logits).all()) and cache_finite})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", action="store_true", help="also measure prefill/decode tokens/s (real models)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()

    from realm_jax.reference import load_manifest

    text = load_manifest()["prompts"][-1]
    rows = [r for name in REAL + SYNTHETIC for r in policy_accuracy(name, text)]
    if args.speed:
        sys.path.insert(0, str(pathlib.Path(__file__).parent))
        from e2e import _run_worker

        for r in rows:
            if r["model"] in REAL:
                speed = _run_worker(["realm", r["model"], "--runs", str(args.runs), "--policy", r["policy"]])
                r.update({k: speed[k] for k in ("prefill_tps", "decode_tps", "peak_rss_mib") if k in speed})
    print("| model | policy | tokens | top-1 vs f32 | mean KL vs f32 | max KL | all finite | prefill tok/s "
          "| decode tok/s |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        speed = (f"{r['prefill_tps']:.0f} | {r['decode_tps']:.1f}" if "prefill_tps" in r else "- | -")
        print(f"| {r['model']} | {r['policy']} | {r['tokens']} | {r['top1_vs_f32']:.4f} | {r['kl_mean']:.2e} "
              f"| {r['kl_max']:.2e} | {'yes' if r['finite'] else 'NO'} | {speed} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
