"""End-to-end speed: prefill tokens/s (a 128-token prompt) and decode tokens/s (64 tokens), realm-jax against
llama.cpp (llama-cpp-python) on the same files, in one run.

Each runtime runs in its own subprocess so its peak memory (RSS) is its own. Times are medians over
--runs repetitions after one warm-up (realm-jax's warm-up includes its jit compilation, reported apart).
With --rounds R the two runtimes alternate R times per model (first one, then the other, the order
swapped each round), because this kind of machine drifts by 10-20% within minutes: each figure is the
median over the rounds, and the ratio is the median of the rounds' own ratios (their range is shown).

    python benchmarks/e2e.py [--models gemma3-270m-q4_k_m smollm2-135m-instruct-q4_1] [--policy auto]
                             [--threads 2] [--runs 5] [--rounds 3] [--json out.json]
                             [--baseline OTHER/.venv/bin/python]

The table names the CPU (model and the vector extensions the kernels use) and a memory bound: JAX's own
floor (the peak RSS of a process that imports jax and runs one tiny jitted function, measured in the same
run) plus 1.2x the file's size, or 1.5x llama.cpp's peak RSS, whichever is larger.

Without llama-cpp-python installed, the llama.cpp columns say so and only realm-jax is measured.
``REALM_JAX_NATIVE_PREFILL=int8`` in the environment reaches the realm-jax worker (the opt-in int8 prefill
product, `realm_jax.native.int8_prefill`); the policy column says so.
`--baseline PYTHON` also measures realm-jax as another interpreter imports it (e.g. the venv of a checkout
of the parent commit), in the same rounds: the table adds its speeds and this tree's ratio to them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

PROMPT_TOKENS = 128
DECODE_TOKENS = 64
MODELS = ["gemma3-270m-q4_k_m", "smollm2-135m-instruct-q4_1"]


def _prompt_ids(vocab_size: int) -> list[int]:
    # A fixed pseudo-random prompt: both runtimes see the same ids, and no tokenizer time is measured.
    import numpy as np

    return np.random.default_rng(0).integers(100, min(vocab_size, 30000), PROMPT_TOKENS).tolist()


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_floor() -> dict:
    import jax
    import jax.numpy as jnp

    jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.ones(4)))
    return {"peak_rss_mib": _peak_rss_mib()}


def cpu_description() -> str:
    """The CPU's model name and which of the vector extensions the native kernels use it has."""
    from realm_jax.native import cpu_flags

    name, flags = platform.processor() or platform.machine(), cpu_flags()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    used = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")
    return f"{name} ({' '.join(f for f in used if f in flags) or 'none of ' + ', '.join(used)})"


def worker_realm(model: str, policy: str, runs: int) -> dict:
    from realm_jax import assets, runtime
    from realm_jax.bench import measure

    start = time.perf_counter()
    m = runtime.load(assets.model_path(model), policy=policy, progress=False)
    load_s = time.perf_counter() - start
    speed = measure(m, prompt_tokens=PROMPT_TOKENS, decode_tokens=DECODE_TOKENS, runs=runs)
    return {"prefill_tps": speed["prefill_tps"], "decode_tps": speed["decode_tps"], "load_s": load_s,
            "warmup_s": speed["warmup_s"], "peak_rss_mib": _peak_rss_mib(), "policy": str(m.policy),
            "native_prefill": os.environ.get("REALM_JAX_NATIVE_PREFILL", "bf16")}


def worker_llama(model: str, threads: int, runs: int) -> dict:
    import llama_cpp

    from realm_jax import assets

    llm = llama_cpp.Llama(str(assets.model_path(model)), n_ctx=512, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)
    ids = _prompt_ids(llm.n_vocab())

    def prefill() -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        return time.perf_counter() - t0

    def decode() -> float:
        llm.reset()
        llm.eval(ids)
        t0 = time.perf_counter()
        for i in range(DECODE_TOKENS):
            llm.eval([ids[i % len(ids)]])
        return time.perf_counter() - t0

    prefill(), decode()
    pre = statistics.median(prefill() for _ in range(runs))
    dec = statistics.median(decode() for _ in range(runs))
    return {"prefill_tps": PROMPT_TOKENS / pre, "decode_tps": DECODE_TOKENS / dec, "peak_rss_mib": _peak_rss_mib(),
            "version": llama_cpp.__version__}


def _run_worker(args: list[str], python: str = sys.executable) -> dict:
    proc = subprocess.run([python, __file__, "--worker", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(rounds: list[dict], peer: str = "llama_cpp") -> dict:
    """Medians over the rounds of each runtime's figures (peak RSS: the largest), and for each speed the
    (min, median, max) of the rounds' realm-jax / peer ratios."""
    out = {}
    for side in ("realm_jax", peer):
        ok = [r[side] for r in rounds if "error" not in r[side]]
        if not ok:
            out[side] = rounds[0][side]
            continue
        merged = dict(ok[-1])
        for key in ("prefill_tps", "decode_tps"):
            merged[key] = statistics.median(o[key] for o in ok)
        merged["peak_rss_mib"] = max(o["peak_rss_mib"] for o in ok)
        out[side] = merged
    ratios = {}
    for key in ("prefill_tps", "decode_tps"):
        each = [r["realm_jax"][key] / r[peer][key] for r in rounds
                if "error" not in r["realm_jax"] and "error" not in r[peer]]
        if each:
            ratios[key] = (min(each), statistics.median(each), max(each))
    out["ratios"] = ratios
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--policy", default="auto", help="realm-jax precision policy (e.g. auto, f32, bf16)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two runtimes per model")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--baseline", metavar="PYTHON", help="also measure realm-jax as this interpreter imports "
                        "it (another checkout's venv), alternating with the others")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, model = args.worker[0], args.worker[1]
        result = worker_realm(model, args.policy, args.runs) if kind == "realm" else \
            worker_floor() if kind == "floor" else worker_llama(model, args.threads, args.runs)
        print(json.dumps(result))
        return

    try:
        import llama_cpp  # noqa: F401

        have_llama = True
    except ImportError:
        have_llama = False
        print("llama-cpp-python is not installed (pip install 'realm-jax[llama]'): llama.cpp not measured",
              file=sys.stderr)
    if args.runs < 1 or args.rounds < 1:
        parser.error("--runs and --rounds must be at least 1")
    rows = []
    floor = _run_worker(["floor", "-"]).get("peak_rss_mib", float("nan"))
    for model in args.models:
        common = ["--runs", str(args.runs), "--policy", args.policy, "--threads", str(args.threads)]
        rounds = []
        for r in range(args.rounds):
            order = ["realm", "llama"] + (["baseline"] if args.baseline else [])
            order = order if r % 2 == 0 else order[::-1]
            got = {}
            for kind in order:
                if kind == "llama" and not have_llama:
                    got[kind] = {"error": "llama-cpp-python not installed"}
                elif kind == "baseline":
                    got[kind] = _run_worker(["realm", model, *common], python=args.baseline)
                else:
                    got[kind] = _run_worker([kind, model, *common])
            rounds.append({"realm_jax": got["realm"], "llama_cpp": got["llama"], "baseline": got.get("baseline")})
        from realm_jax import assets

        size = assets.model_path(model).stat().st_size / 2**20
        row = {"model": model, **_summary(rounds), "rounds": rounds, "file_mib": size, "floor_mib": floor}
        if args.baseline:
            row["baseline"] = _summary(rounds, peer="baseline")
        rows.append(row)

    print(f"prompt {PROMPT_TOKENS} tokens, decode {DECODE_TOKENS} tokens, llama.cpp threads {args.threads}, "
          f"median of {args.runs} per round, {args.rounds} rounds; {cpu_description()}; JAX floor {floor:.0f} MiB")
    print("| model | policy | realm-jax prefill tok/s | llama.cpp prefill tok/s | ratio (rounds) | realm-jax decode "
          "tok/s | llama.cpp decode tok/s | ratio (rounds) | realm-jax peak RSS MiB | llama.cpp peak RSS MiB | "
          "bound MiB (file MiB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    shown = args.policy + ("" if os.environ.get("REALM_JAX_NATIVE_PREFILL", "bf16") == "bf16" else
                           f" (REALM_JAX_NATIVE_PREFILL={os.environ['REALM_JAX_NATIVE_PREFILL']})")
    for r in rows:
        o, p = r["realm_jax"], r["llama_cpp"]
        if "error" in o:
            print(f"| {r['model']} | {shown} | error: {o['error']} |")
            continue

        def ratio(key):
            if key not in r["ratios"]:
                return "-"
            lo, mid, hi = r["ratios"][key]
            return f"{mid:.2f}x ({lo:.2f}-{hi:.2f})"

        print(f"| {r['model']} | {shown} | {o['prefill_tps']:.0f} | {p.get('prefill_tps', float('nan')):.0f} "
              f"| {ratio('prefill_tps')} | {o['decode_tps']:.1f} | {p.get('decode_tps', float('nan')):.1f} "
              f"| {ratio('decode_tps')} | {o['peak_rss_mib']:.0f} | {p.get('peak_rss_mib', float('nan')):.0f} "
              f"| {max(1.5 * p.get('peak_rss_mib', 0.0), floor + 1.2 * r['file_mib']):.0f} ({r['file_mib']:.0f}) |")
    if args.baseline:
        print(f"\nagainst the baseline ({args.baseline}), same rounds")
        print("| model | baseline prefill tok/s | ratio (rounds) | baseline decode tok/s | ratio (rounds) |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            b = r["baseline"]
            if "error" in b["baseline"] or "error" in b["realm_jax"]:
                print(f"| {r['model']} | error: {b['baseline'].get('error') or b['realm_jax'].get('error')} |")
                continue
            cells = []
            for key in ("prefill_tps", "decode_tps"):
                lo, mid, hi = b["ratios"][key]
                cells += [f"{b['baseline'][key]:.1f}", f"{mid:.2f}x ({lo:.2f}-{hi:.2f})"]
            print(f"| {r['model']} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
