"""End to end on an 8B llama's shapes: prefill and decode tokens/s with the weights kept quantized (the
platform's kernels) and with the XLA reference (weights dequantized to bf16 at load), in one run.

The real model files are not available on a lent GPU machine, so the script writes one there: an 8B llama's
layer shapes (D 4096, F 14336, 32 heads, 8 KV heads, 32 layers), Q4_K matrices with Q6_K attn_v and
ffn_down on every other layer and a Q6_K output, as Q4_K_M files have, random valid blocks (small f16
scales, random quants), and the synthetic test model's 1024-token vocabulary (only the layers are timed):
about 3.9 GB. Its text is noise; its speed is the point.

For each impl it reports prefill tokens/s at each prompt length and decode tokens/s
(`realm_jax.bench.measure`), the warm-up (compile) time and the load time, the weight-bytes limit (bytes of
the layers over the device's copy bandwidth, measured in the same run), and, where the CUPTI profiler is
available, one decode step's device time split into the linear layers' kernels and the rest. With
`--second-process`, the time to the first token of a new process once the persistent compilation cache
(`realm_jax.compile_cache`) holds the model's programs: a first process fills it, a second one is timed
(its import, load, and first token, the compiles in it served from the cache).

    python benchmarks/gpu_8b.py [--impls auto,xla] [--layers 32] [--prompt-tokens 128,512,2048]
                                [--decode-tokens 64] [--second-process] [--dir /tmp/realm-8b] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

import numpy as np

_START = time.perf_counter()  # the interpreter's start, near enough: what `--first-token` counts from
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

D, F, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 8, 1024
SOURCE = ROOT / "tests" / "data" / "synthetic" / "llama-k-q4_k_m.gguf"  # its tokenizer and metadata
MATMUL_KERNELS = ("decode_", "gemm", "gemv", "cutlass", "xmma", "dot", "matmul", "triton")


def random_tensor(fmt: str, rows: int, cols: int, rng: np.random.Generator):
    """A QTensor of random valid blocks: random bytes, the float fields small finite values."""
    from realm_jax.quant import get_format, repack

    f = get_format(fmt)
    n_blocks = cols // f.block_size
    raw = rng.integers(0, 256, size=(rows, n_blocks, f.type_size), dtype=np.uint8)
    offset = 0
    for field in f.fields:
        dt = np.dtype(field.dtype)
        if dt.kind == "f":
            values = (rng.standard_normal((rows, n_blocks, field.count)) * 0.002).astype(dt)
            raw[..., offset : offset + field.nbytes] = values.view(np.uint8).reshape(rows, n_blocks, -1)
        offset += field.nbytes
    return repack(raw.reshape(rows, -1), fmt, (rows, cols))


def write_model(path: pathlib.Path, layers: int) -> pathlib.Path:
    """The 8B-shaped Q4_K_M-like GGUF at `path` (kept between runs)."""
    from realm_jax.checkpoint import read_gguf, write_gguf
    from realm_jax.quant import quantize

    if path.exists():
        return path
    metadata, _ = read_gguf(SOURCE)
    metadata = {k: v for k, v in metadata.items() if k != "general.architecture"}
    metadata |= {"llama.embedding_length": D, "llama.feed_forward_length": F, "llama.attention.head_count": HEADS,
                 "llama.attention.head_count_kv": KV_HEADS, "llama.block_count": layers,
                 "llama.context_length": 4096, "llama.rope.dimension_count": D // HEADS}
    rng = np.random.default_rng(0)
    ones = np.ones(D, np.float32)
    tensors = {"token_embd.weight": random_tensor("Q4_K", VOCAB, D, rng), "output_norm.weight": quantize(ones, "F32"),
               "output.weight": random_tensor("Q6_K", VOCAB, D, rng)}
    head = D // HEADS
    for i in range(layers):
        heavy = "Q6_K" if i % 2 == 0 else "Q4_K"  # Q4_K_M: Q6_K attn_v and ffn_down on every other layer
        shapes = {"attn_q": ("Q4_K", HEADS * head, D), "attn_k": ("Q4_K", KV_HEADS * head, D),
                  "attn_v": (heavy, KV_HEADS * head, D), "attn_output": ("Q4_K", D, HEADS * head),
                  "ffn_gate": ("Q4_K", F, D), "ffn_up": ("Q4_K", F, D), "ffn_down": (heavy, D, F)}
        for name, (fmt, rows, cols) in shapes.items():
            tensors[f"blk.{i}.{name}.weight"] = random_tensor(fmt, rows, cols, rng)
        tensors[f"blk.{i}.attn_norm.weight"] = quantize(ones, "F32")
        tensors[f"blk.{i}.ffn_norm.weight"] = quantize(ones, "F32")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    write_gguf(tmp, tensors, arch="llama", metadata=metadata)
    tmp.rename(path)
    return path


def copy_bandwidth() -> float:
    """Bytes per second of a device copy (read + write) of 1 GiB."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((1 << 28,), jnp.float32)
    f = jax.jit(lambda a: a + 1)
    jax.block_until_ready(f(x))
    t0 = time.perf_counter()
    for _ in range(10):
        x = f(x)
    jax.block_until_ready(x)
    return 2 * x.nbytes * 10 / (time.perf_counter() - t0)


def step_split(model) -> dict | None:
    """One decode step's device time (CUPTI), split into the linear layers' kernels and the rest (GPU)."""
    import jax

    if jax.default_backend() != "gpu":
        return None
    try:
        from jax.experimental.mosaic.gpu import profiler

        from realm_jax import runtime
        from realm_jax.sampling import SamplingConfig
    except ImportError:
        return None
    gen = model.start([[1] * 16], max_new_tokens=4, sampling=SamplingConfig(), stop_ids=())
    args, static = gen._decode_args(1)
    try:
        with model.mesh_context():
            _, kernels = profiler.measure(functools.partial(runtime._decode, **static), aggregate=False)(*args)
    except (RuntimeError, TypeError) as e:
        return {"error": str(e)}
    if not kernels:
        return None
    matmul = sum(ms for name, ms in kernels if any(k in name.lower() for k in MATMUL_KERNELS))
    total = sum(ms for _, ms in kernels)
    return {"step_ms": total, "matmul_ms": matmul, "other_ms": total - matmul, "kernels": len(kernels)}


def first_token(path: str, impl: str, prompt_tokens: int) -> dict:
    """In this process: load `path`, then prefill a prompt of `prompt_tokens` until its first token is on the
    host; seconds since the interpreter started for each stage (what a user of a new process waits)."""
    start = _START
    import jax

    import realm_jax
    from realm_jax.sampling import SamplingConfig

    imported = time.perf_counter()
    model = realm_jax.load(path, impl=impl, progress=False)
    loaded = time.perf_counter()
    ids = np.random.default_rng(0).integers(1, model.config.vocab_size, (1, prompt_tokens)).tolist()
    gen = model.start(ids, max_new_tokens=2, sampling=SamplingConfig(), stop_ids=())
    jax.device_get(gen.token)
    done = time.perf_counter()
    return {"import_s": imported - start, "load_s": loaded - imported, "first_token_s": done - loaded,
            "total_s": done - start}


def second_process(path: pathlib.Path, impl: str, prompt_tokens: int) -> dict:
    """The first token of a second new process, the first having filled the compilation cache."""
    import subprocess

    command = [sys.executable, __file__, "--first-token", str(path), "--impls", impl,
               "--prompt-tokens", str(prompt_tokens)]
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]) | {"wall_s": time.perf_counter() - t0})
    return {"cold": runs[0], "warm": runs[1]}


def main(argv=None) -> int:
    import jax

    import realm_jax
    from realm_jax.bench import git_revision, measure

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--impls", default="auto,xla", help="impl values to compare (default auto,xla)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt-tokens", default="128", help="prompt lengths, comma-separated")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("/tmp/realm-8b"))
    ap.add_argument("--json", type=pathlib.Path)
    ap.add_argument("--second-process", action="store_true",
                    help="also time the first token of a new process with the compilation cache filled")
    ap.add_argument("--first-token", metavar="FILE", help=argparse.SUPPRESS)  # the timed new process
    args = ap.parse_args(argv)
    try:
        prompts = [int(v) for v in args.prompt_tokens.split(",") if v]
    except ValueError:
        ap.error(f"--prompt-tokens takes integers, comma-separated, got {args.prompt_tokens!r}")
    if not prompts or min(prompts) < 1:
        ap.error("--prompt-tokens takes positive lengths")
    if args.first_token:
        print(json.dumps(first_token(args.first_token, args.impls, prompts[0])))
        return 0
    t0 = time.perf_counter()
    path = write_model(args.dir / f"llama-8b-shape-{args.layers}l-q4_k_m.gguf", args.layers)
    print(f"{path} ({path.stat().st_size / 1e9:.2f} GB) ready in {time.perf_counter() - t0:.0f} s", flush=True)
    bandwidth = copy_bandwidth()
    layer_bytes = path.stat().st_size  # the layers are nearly all of it (vocabulary 1024)
    rows = []
    for impl in [v for v in args.impls.split(",") if v]:
        t0 = time.perf_counter()
        model = realm_jax.load(path, impl=impl, progress=False)
        load_s = time.perf_counter() - t0
        speeds = [measure(model, prompt_tokens=n, decode_tokens=args.decode_tokens, runs=args.runs) for n in prompts]
        row = {"impl": impl, "backend": model.impl, "policy": str(model.policy), "load_s": load_s, **speeds[0],
               "prefill_tps_by_prompt": {s["prompt_tokens"]: s["prefill_tps"] for s in speeds},
               "warmup_s_by_prompt": {s["prompt_tokens"]: s["warmup_s"] for s in speeds},
               "decode_limit_tps": bandwidth / layer_bytes, "step": step_split(model)}
        del model
        if args.second_process:
            row["second_process"] = second_process(path, impl, prompts[0])
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "commit": git_revision(ROOT),
            "copy_gbps": bandwidth / 1e9, "file_gb": layer_bytes / 1e9, "date": time.strftime("%Y-%m-%d"),
            "command": "python benchmarks/gpu_8b.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"{meta['device']}, copy {bandwidth / 1e9:.0f} GB/s, {layer_bytes / 1e9:.2f} GB of weights: "
          f"decode limit {bandwidth / layer_bytes:.0f} tok/s")
    print("| impl | backend | prefill tok/s (prompt) | decode tok/s | warm-up s (prompt) | load s | "
          "decode step ms (matmul / rest) | new process, warm cache: first token s (process wall) |")
    print("|---|---|---|---:|---|---:|---|---|")
    for r in rows:
        st = r["step"] or {}
        split = f"{st['step_ms']:.2f} ({st['matmul_ms']:.2f} / {st['other_ms']:.2f})" if "step_ms" in st else "-"
        prefill = ", ".join(f"{v:.0f} ({n})" for n, v in r["prefill_tps_by_prompt"].items())
        warm = ", ".join(f"{v:.1f} ({n})" for n, v in r["warmup_s_by_prompt"].items())
        sp = r.get("second_process") or {}
        second = (f"{sp['warm']['first_token_s']:.1f} ({sp['warm']['wall_s']:.1f}; first process "
                  f"{sp['cold']['wall_s']:.1f})" if "warm" in sp else sp.get("error", "-"))
        print(f"| {r['impl']} | {r['backend']} | {prefill} | {r['decode_tps']:.1f} | {warm} | {r['load_s']:.1f} | "
              f"{split} | {second} |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
