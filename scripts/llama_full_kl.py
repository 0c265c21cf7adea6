"""Full-vocabulary KL(p_llama || p_realm) on the recorded prompts, with llama.cpp run live (needs the
llama extra). The test suite's KL uses llama.cpp's recorded top-64 logits plus one rest bin, a lower bound;
this script measures the exact figure.

    python scripts/llama_full_kl.py [--policies f32 auto]
"""

from __future__ import annotations

import argparse

import numpy as np

import realm_jax
from realm_jax import assets
from realm_jax.reference import load_reference


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main() -> None:
    import llama_cpp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", nargs="+", default=["f32", "auto"])
    args = parser.parse_args()
    print("| model | policy | positions | mean KL | max KL |")
    print("|---|---|---:|---:|---:|")
    for name in ["gemma3-270m-q4_k_m", "smollm2-135m-instruct-q4_1"]:
        path = str(assets.model_path(name))
        llm = llama_cpp.Llama(path, n_ctx=1024, logits_all=True, n_threads=2, verbose=False)
        refs = load_reference(name)
        theirs = []
        for ref in refs:
            llm.reset()
            llm.eval(list(ref.ids))
            theirs.append(log_softmax(np.array(llm.scores[: len(ref.ids)])))
        for policy in args.policies:
            model = realm_jax.load(path, policy=policy, progress=False)
            kl = np.concatenate([(np.exp(t) * (t - log_softmax(model.logits(list(r.ids))))).sum(-1)
                                 for t, r in zip(theirs, refs)])
            print(f"| {name} | {policy} | {len(kl)} | {kl.mean():.5f} | {kl.max():.4f} |")


if __name__ == "__main__":
    main()
