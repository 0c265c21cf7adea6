"""Record llama.cpp's logits and greedy continuations as reference data for the default test suite.

For each model (the two real models and the synthetic files written by
``scripts/make_synthetic_model.py``) and each prompt in `PROMPTS`, llama.cpp (llama-cpp-python, CPU,
2 threads) tokenizes the text (BOS as the file asks, special tokens not parsed), evaluates all positions
teacher-forced in one batch, and then decodes `GREEDY_STEPS` tokens greedily (argmax, which is what
temperature 0 / top_k=1 samples; end-of-sequence tokens do not stop it). The two shortest prompts are also
evaluated one token at a time, to document llama.cpp's own noise: it quantizes activations inside its
matmuls, so its batched and token-by-token logits differ (see FACTS.md).

Output: ``tests/data/llama_ref/<model>.npz`` (one per model; zip entries written with a fixed timestamp,
so a rerun writes the same bytes wherever llama.cpp is deterministic) and
``tests/data/llama_ref/manifest.json``. Arrays for prompt i (T positions, K = 64, S = GREEDY_STEPS):

- ``p{i}_text``: the prompt (0-d unicode array); ``p{i}_ids``: int32 [T], llama.cpp's tokens.
- ``p{i}_topk_ids`` int32 [T, K], ``p{i}_topk_logits`` float32 [T, K]: the K largest logits of the batched
  evaluation at each position, largest first (ties by token id); ``p{i}_lse`` float64 [T]: the log-sum-exp
  of the position's logits over the full vocabulary.
- ``p{i}_greedy`` int32 [S]: the greedy continuation; ``p{i}_greedy_margin`` float32 [S]: llama.cpp's
  top-1 minus top-2 logit at each step.
- ``p{i}_tbt_topk_ids``, ``p{i}_tbt_topk_logits``, ``p{i}_tbt_lse``: the same for the token-by-token
  evaluation, for the two shortest prompts only.

With these a consumer computes, without llama.cpp: top-1 agreement (``topk_ids[:, 0]``), top-k overlap
for k <= K, llama.cpp's top-1 margin (``topk_logits[:, 0] - topk_logits[:, 1]``), and KL(p_llama || p_ours)
with llama's distribution coarse-grained to its top K tokens plus one "rest" bin:

    p_j = exp(topk_logits_j - lse),  P = sum_j p_j,  q_j = softmax(ours)[topk_ids_j],  Q = sum_j q_j
    KL = sum_j p_j (log p_j - log q_j) + (1 - P) (log(1 - P) - log(1 - Q))

By the log-sum inequality this is a lower bound of the full-vocabulary KL, tight where the rest bin holds
little mass (``max_rest_mass`` per prompt in the manifest: a few percent on the synthetic models, up to
about half on gemma3's flat 262k-token tail). `realm_jax.reference` implements it.

Run: ``.venv/bin/python scripts/record_llama_logits.py [MODEL ...]`` (every model, or the ones named, which
are merged into the existing manifest; needs llama-cpp-python: ``make llama``; about a minute on 2 cores).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import pathlib
import sys
import zipfile

import numpy as np

from realm_jax import assets
from realm_jax.reference import CONFIDENT_MARGIN, PromptReference, compare_logits

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "tests" / "data" / "llama_ref"
SYNTHETIC_DIR = REPO / "tests" / "data" / "synthetic"

TOP_K = 64
GREEDY_STEPS = 32
N_THREADS = 2
N_CTX = 1024  # fits the longest prompt (~760 tokens with the synthetic vocabulary) plus the continuation
TBT_PROMPTS = 2  # the shortest prompts are also evaluated token by token

REAL_MODELS = ["gemma3-270m-q4_k_m", "smollm2-135m-instruct-q4_1"]
SYNTHETIC_MODELS = ["llama-k-q4_k_m", "llama-k-q5_k_m", "llama-k-q6_k", "llama-k-q8_0", "llama-s-q2_k",
                    "llama-s-q3_k_s", "llama-s-q3_k_m", "llama-s-iq4_nl", "llama-s-iq4_xs", "llama-s-iq3_s",
                    "llama-s-tq2_0", "llama-s-iq-random"]

PROMPTS = [
    "The capital of France is Paris, and",
    (
        "Once upon a time, in a small village at the edge of a great forest, there lived an old woodcutter "
        "and his two children. Every morning he walked into the forest with his axe, and every evening he "
        "came home tired but happy."
    ),
    (
        "def fibonacci(n):\n"
        '    """Return the n-th Fibonacci number."""\n'
        "    a, b = 0, 1\n"
        "    for _ in range(n):\n"
        "        a, b = b, a + b\n"
        "    return a\n\n\n"
        'if __name__ == "__main__":\n'
        "    print([fibonacci(i) for i in range(10)])\n"
    ),
    (
        "User: Can you explain in two sentences why the sky is blue?\n"
        "Assistant: Sunlight is made of many colors, and the air scatters the short blue wavelengths much "
        "more than the long red ones."
    ),
    (
        "The history of computing is a story of people trying to make machines do the work of thinking. In "
        "the seventeenth century, Blaise Pascal built a mechanical calculator that could add and subtract "
        "numbers, and Gottfried Leibniz later designed a machine that could also multiply. Two centuries "
        "after that, Charles Babbage drew up plans for an analytical engine, a general purpose computer made "
        "of gears and levers, and Ada Lovelace wrote what many consider the first program for it. The engine "
        "was never finished, but the ideas survived. In the twentieth century, engineers replaced gears with "
        "relays, then with vacuum tubes, and finally with transistors. Each step made computers smaller, "
        "faster and cheaper. During the Second World War, machines such as Colossus and ENIAC were built to "
        "break codes and to compute the paths of shells. After the war, companies began to sell computers to "
        "banks, insurance firms and government offices, where they kept records and printed bills. The "
        "invention of the integrated circuit in the late nineteen fifties put many transistors on a single "
        "chip, and the microprocessor of the early seventies put a whole computer on one. Personal computers "
        "arrived a few years later, first as kits for hobbyists and then as finished machines for homes and "
        "offices. The spread of networks in the eighties and nineties connected these machines to each "
        "other, and the world wide web made it easy for anyone to publish a page that could be read around "
        "the globe. Today, a phone in a pocket holds more computing power than all the machines of the "
        "nineteen sixties together, and software written by millions of people runs everything from cars to "
        "power plants to the small thermostat on the kitchen wall."
    ),
]


def model_file(name: str) -> pathlib.Path:
    if name in SYNTHETIC_MODELS:
        path = SYNTHETIC_DIR / f"{name}.gguf"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run scripts/make_synthetic_model.py first")
        return path
    return assets.model_path(name)


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[T, V] float32 -> top-k ids int32 [T, k] (largest first, ties by id), their logits, lse float64 [T]."""
    kth = np.partition(logits, -k, axis=1)[:, -k]  # the k-th largest value of each row
    ids = np.empty((logits.shape[0], k), np.int32)
    for t, row in enumerate(logits):
        cand = np.flatnonzero(row >= kth[t])  # all tied candidates, so the tie-break by id is exact
        ids[t] = cand[np.lexsort((cand, -row[cand]))[:k]]
    vals = np.take_along_axis(logits, ids, axis=1).astype(np.float32)
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]
    return ids, vals, lse


def dense_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(p) || softmax(q)) per row, in float64, over the full vocabulary."""
    p = p_logits.astype(np.float64)
    q = q_logits.astype(np.float64)
    lp = p - p.max(1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    lq = q - q.max(1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(1, keepdims=True))
    return (np.exp(lp) * (lp - lq)).sum(1)


def _sig(x: float) -> float:
    """Six significant digits: the manifest's figures stay readable and equal across reruns."""
    return float(f"{float(x):.6g}")


def save_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """`np.savez_compressed` with a fixed zip timestamp, so equal arrays give equal bytes."""
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())
    tmp.replace(path)


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record_model(name: str) -> tuple[dict[str, np.ndarray], dict]:
    import llama_cpp

    path = model_file(name)
    llm = llama_cpp.Llama(
        str(path), n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, logits_all=True,
        n_threads=N_THREADS, n_threads_batch=N_THREADS, seed=0, verbose=False,
    )  # fmt: skip
    arrays: dict[str, np.ndarray] = {}
    summary: dict = {"file": str(path.name), "sha256": sha256(path), "n_vocab": llm.n_vocab(), "prompts": []}
    ids_all = [llm.tokenize(text.encode(), add_bos=True, special=False) for text in PROMPTS]
    shortest = sorted(range(len(PROMPTS)), key=lambda i: len(ids_all[i]))[:TBT_PROMPTS]
    for i, (text, ids) in enumerate(zip(PROMPTS, ids_all)):
        if len(ids) + GREEDY_STEPS > N_CTX:
            raise ValueError(f"prompt {i} has {len(ids)} tokens on {name}; {N_CTX=} is too small")
        llm.reset()
        llm.eval(ids)
        batched = np.array(llm.scores[: len(ids)], dtype=np.float32)
        greedy, margins = [], []
        for _ in range(GREEDY_STEPS):
            row = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            top2 = np.partition(row, -2)[-2:]
            token = int(np.argmax(row))
            greedy.append(token)
            margins.append(float(top2[1] - top2[0]))
            llm.eval([token])
        tk_ids, tk_logits, lse = top_k(batched, TOP_K)
        margin = tk_logits[:, 0] - tk_logits[:, 1]
        rest = 1.0 - np.exp(tk_logits.astype(np.float64) - lse[:, None]).sum(1)
        p = f"p{i}_"
        arrays.update({
            p + "text": np.array(text), p + "ids": np.asarray(ids, np.int32),
            p + "topk_ids": tk_ids, p + "topk_logits": tk_logits, p + "lse": lse,
            p + "greedy": np.asarray(greedy, np.int32), p + "greedy_margin": np.asarray(margins, np.float32),
        })  # fmt: skip
        info = {
            "n_tokens": len(ids),
            "confident_fraction": round(float((margin >= CONFIDENT_MARGIN).mean()), 4),
            "median_margin": round(float(np.median(margin)), 4),
            "max_rest_mass": _sig(rest.max()),
            "greedy_confident_steps": int((np.asarray(margins) >= CONFIDENT_MARGIN).sum()),
        }
        if i in shortest:
            llm.reset()
            for token in ids:
                llm.eval([token])
            tbt = np.array(llm.scores[: len(ids)], dtype=np.float32)
            t_ids, t_logits, t_lse = top_k(tbt, TOP_K)
            arrays.update({p + "tbt_topk_ids": t_ids, p + "tbt_topk_logits": t_logits, p + "tbt_lse": t_lse})
            ref = PromptReference(text, np.asarray(ids), tk_ids, tk_logits, lse, np.zeros(0), np.zeros(0))
            cmp = compare_logits(tbt, ref)  # token-by-token as "ours", batched as the reference
            kl = dense_kl(batched, tbt)
            info["batched_vs_token_by_token"] = {
                "top1_agreement": cmp["top1_agreement"],
                "top1_agreement_confident": cmp["top1_agreement_confident"],
                "max_margin_of_disagreement": _sig(cmp["max_margin_of_disagreement"]),
                "topk_overlap": cmp["topk_overlap"],
                "max_abs_logit_diff": _sig(np.abs(batched - tbt).max()),
                "kl_mean": _sig(kl.mean()),
                "kl_max": _sig(kl.max()),
                "kl_top64_mean": _sig(cmp["kl_mean"]),
            }
        summary["prompts"].append(info)
    llm.close()
    n_pos = sum(len(x) for x in ids_all)
    margins_all = np.concatenate([arrays[f"p{i}_topk_logits"][:, 0] - arrays[f"p{i}_topk_logits"][:, 1]
                                  for i in range(len(PROMPTS))])  # fmt: skip
    summary["n_positions"] = n_pos
    summary["confident_fraction"] = round(float((margins_all >= CONFIDENT_MARGIN).mean()), 4)
    return arrays, summary


def build_info() -> dict:
    import llama_cpp

    lib = pathlib.Path(llama_cpp.__file__).parent / "lib"
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "llama_version": llama_cpp.llama_version().decode(),
        "libraries": sorted(p.name for p in lib.glob("*.so.*.*")),
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
    }


def main(names: list[str]) -> int:
    """Record every model, or (with names) only those, keeping the other models' entries of the manifest;
    a model recorded alone carries its own date and llama.cpp build in the manifest."""
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    unknown = [n for n in names if n not in REAL_MODELS + SYNTHETIC_MODELS]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; known: {', '.join(REAL_MODELS + SYNTHETIC_MODELS)}")
    manifest = {
        "command": "python scripts/make_synthetic_model.py && python scripts/record_llama_logits.py",
        "date": datetime.date.today().isoformat(),
        "llama_cpp": build_info(),
        "settings": {
            "n_threads": N_THREADS, "n_ctx": N_CTX, "n_batch": N_CTX, "n_ubatch": N_CTX, "flash_attn": False,
            "seed": 0, "top_k": TOP_K, "greedy_steps": GREEDY_STEPS, "add_bos": "as the file says",
            "parse_special": False, "confident_margin": CONFIDENT_MARGIN,
        },  # fmt: skip
        "prompts": PROMPTS,
        "models": {},
    }
    path = OUT_DIR / "manifest.json"
    if names and path.is_file():
        previous = json.loads(path.read_text())
        if previous["prompts"] != PROMPTS or previous["settings"] != manifest["settings"]:
            raise SystemExit(f"{path} was recorded with other prompts or settings: record every model")
        manifest = previous
    for name in names or REAL_MODELS + SYNTHETIC_MODELS:
        arrays, summary = record_model(name)
        if names:
            summary = {"date": datetime.date.today().isoformat(), "llama_cpp": build_info(), **summary}
        save_npz(OUT_DIR / f"{name}.npz", arrays)
        manifest["models"][name] = summary
        key = "batched_vs_token_by_token"
        noise = [p[key] for p in summary["prompts"] if key in p]
        print(
            f"{name}: {summary['n_positions']} positions, tokens per prompt "
            f"{[p['n_tokens'] for p in summary['prompts']]}, margin >= {CONFIDENT_MARGIN} at "
            f"{summary['confident_fraction']:.1%}; batched vs token-by-token: "
            + "; ".join(f"top-1 {n['top1_agreement']:.3f} max|d| {n['max_abs_logit_diff']:.3f} "
                        f"KL mean {n['kl_mean']:.1e} max {n['kl_max']:.1e} "
                        f"max margin of a flip {n['max_margin_of_disagreement']:.3f}" for n in noise)
        )  # fmt: skip
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    sizes = {p.name: p.stat().st_size for p in sorted(OUT_DIR.iterdir())}
    synthetic = sum(p.stat().st_size for p in SYNTHETIC_DIR.glob("*.gguf"))
    print(f"{OUT_DIR.relative_to(REPO)}: {sum(sizes.values()) / 2**20:.2f} MiB "
          f"({', '.join(f'{k} {v / 2**10:.0f} KiB' for k, v in sizes.items())})")  # fmt: skip
    print(f"committed data in total: {(sum(sizes.values()) + synthetic) / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
