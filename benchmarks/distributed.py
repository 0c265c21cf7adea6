"""Distributed inference per strategy: tokens/s on the devices at hand, and the bytes collectives move per
decode step and per prefill, read from the compiled HLO, next to the theoretical minimum.

    python benchmarks/distributed.py [--model PATH | gemma3] [--strategies none tensor2 ... hybrid2x2x2]
                                     [--policy f32] [--impl auto] [--runs 3] [--cpu-devices 8]
                                     [--json out.json] [--markdown out.md]

Strategies (data x stage x model): none (1 device), tensorN (model=N), pipelineN (stage=N), dataN (data=N),
hybridDxSxM. A mesh the model refuses (e.g. tensor 8 over 4 query heads) is reported with its error and
skipped. Without a device count in XLA_FLAGS the script re-executes itself with
--xla_force_host_platform_device_count=8 (`--cpu-devices`; 0 leaves the environment alone); the strategies
then run on the default backend's devices.

Speed: prefill of a 128-token prompt (two prompt buckets: nothing padded) and 32 decode tokens in one
dispatch of the jitted loop, batch = the data degree (one row per data shard), median of --runs after a
warm-up that compiles. On simulated CPU devices every "device" shares the host's cores and a collective is
a memory copy: tokens/s there say little about a cluster. The bytes do carry over.

Bytes: per device, as the compiled SPMD program states them (`realm_jax.distributed.hlo`: an all-reduce or
collective-permute counts its operand, an all-gather its gathered result; an instruction in a loop counts
once per iteration). The decode loop's trip count is unknown (it stops on EOS): reading the program with 1
and with 2 iterations separates what each step moves from what the call moves once (at the loop's entry).
The count is static: a collective inside a conditional counts as if its branch always ran.

Theoretical minimum per device, per kind. B rows per data shard (B = batch / data), T tokens of the pass
(128 for the prefill, 1 for a decode step), D model width, Ls the most layers one stage holds (all L without
a pipeline), 4 bytes per element (the residual stream is f32 under every policy):
  none, data:  nothing (each data shard runs its own rows end to end).
  tensor:      all-reduce 2 * Ls * B * T * D * 4 (Megatron: one after the attention output and one after
               the down projection, per layer; the output head is replicated, so logits need no gather);
               a prefill's last layer needs only the last token's rows (its logits are all a prefill
               returns): 2 * ((L - 1) * T + 1) * B * D * 4 without a pipeline.
  pipeline:    collective-permute B * T * D * 4 (each stage but the last hands its output on once per pass:
               (S-1) * B * T * D * 4 summed over the stages).
  hybrid:      the sum of its parts: tensor's all-reduces over the Ls layers of one stage, and the pipeline's
               hand-off.
Anything else counts against a minimum of 0. Where the measured bytes differ, both and the ratio are shown.
What this runtime's pipeline adds (see BENCHMARKS.md for the measured accounting): the GPipe schedule runs
M + S - 1 ticks for M microbatches and hands on a buffer every tick, so (M + S - 1) / M times the minimum,
and its stage's collectives sit in a conditional that idle ticks skip, so the static count is that factor
too; the last stage's output reaches the others by a collective-permute and an all-reduce of B * T * D * 4;
the stages share the output head's rows, so the greedy sampler all-gathers each stage's top-1 (value and
index). With fewer KV heads than the model axis the replicated KV cache is all-gathered once per call.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import re
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "tests" / "data" / "synthetic" / "llama-k-q4_k_m.gguf"
ALIASES = {"gemma3": "gemma3-270m-q4_k_m", "smollm2": "smollm2-135m-instruct-q4_1"}
STRATEGIES = ["none", "tensor2", "tensor4", "tensor8", "pipeline2", "pipeline4", "data2", "data4", "data8",
              "hybrid2x2x2"]
PROMPT_TOKENS = 128
DECODE_TOKENS = 32
F32 = 4  # bytes per element of the residual stream
DEVICE_FLAG = "--xla_force_host_platform_device_count"
SECTIONS = ("decode_step", "decode_per_call", "prefill")
CPU_NOTE = ("{n} simulated devices share {cores} CPU cores: tokens/s measure XLA's emulation on one host "
            "(collectives are memory copies), not a cluster; the bytes are the figure that carries over.")


def parse_strategy(name: str) -> dict[str, int]:
    """The mesh sizes {data, stage, model} of a strategy name (none, tensorN, pipelineN, dataN, hybridDxSxM)."""
    if name == "none":
        return {"data": 1, "stage": 1, "model": 1}
    m = re.fullmatch(r"(tensor|pipeline|data)(\d+)", name)
    if m:
        axis = {"tensor": "model", "pipeline": "stage", "data": "data"}[m.group(1)]
        return {"data": 1, "stage": 1, "model": 1} | {axis: int(m.group(2))}
    m = re.fullmatch(r"hybrid(\d+)x(\d+)x(\d+)", name)
    if m:
        return dict(zip(("data", "stage", "model"), map(int, m.groups())))
    raise ValueError(f"strategy {name!r} must be none, tensorN, pipelineN, dataN or hybridDxSxM")


def minimum_bytes(mesh: dict[str, int], *, layers: int, width: int, rows: int, tokens: int) -> dict[str, int]:
    """The least bytes per device, per collective kind, that one pass of `rows` rows (per data shard) of
    `tokens` tokens needs under `mesh`; `layers` is the most layers one pipeline stage holds."""
    out = {}
    if mesh["model"] > 1:
        # Without a pipeline a prefill runs its last layer's attention output and FFN on the last token only
        # (its logits are all it needs): that layer's two all-reduces carry one token per row.
        full = layers - 1 if mesh["stage"] == 1 and tokens > 1 else layers
        out["all-reduce"] = 2 * (full * tokens + (layers - full)) * rows * width * F32
    if mesh["stage"] > 1:
        out["collective-permute"] = rows * tokens * width * F32
    return out


def stage_layers(model) -> int:
    """The most layers one pipeline stage of `model` holds (all of them without a pipeline)."""
    if model.pipeline is None:
        return model.config.n_layers
    runs = model.params["layers"]
    return max(sum(sum(i >= 0 for i in run.layer_ids[s]) for run in runs) for s in range(model.pipeline.n_stages))


def collective_table(model, mesh: dict[str, int], batch: int, prompt_tokens: int = PROMPT_TOKENS) -> dict:
    """Measured and minimum bytes per device for a decode step, a decode call (once, outside the loop) and a
    prefill of `batch` prompts of `prompt_tokens` tokens: {section: {kind: {"measured", "minimum"}}}."""
    from realm_jax.distributed.hlo import collective_bytes

    decode = model.compiled_text("decode", batch=batch, prompt_tokens=prompt_tokens)
    once, twice = collective_bytes(decode, unknown_trips=1), collective_bytes(decode, unknown_trips=2)
    step = {k: twice[k] - once.get(k, 0) for k in twice}
    measured = {"decode_step": step, "decode_per_call": {k: v - step.get(k, 0) for k, v in once.items()},
                "prefill": collective_bytes(model.compiled_text("prefill", batch=batch, prompt_tokens=prompt_tokens))}
    common = dict(layers=stage_layers(model), width=model.config.d_model, rows=batch // mesh["data"])
    minimum = {"decode_step": minimum_bytes(mesh, tokens=1, **common), "decode_per_call": {},
               "prefill": minimum_bytes(mesh, tokens=prompt_tokens, **common)}
    return {sec: {kind: {"measured": measured[sec].get(kind, 0), "minimum": minimum[sec].get(kind, 0)}
                  for kind in sorted(set(measured[sec]) | set(minimum[sec]))
                  if measured[sec].get(kind, 0) or minimum[sec].get(kind, 0)}
            for sec in SECTIONS}


def _timings(model, batch: int, runs: int) -> dict:
    from realm_jax.bench import measure

    speed = measure(model, prompt_tokens=PROMPT_TOKENS, decode_tokens=DECODE_TOKENS, batch=batch, runs=runs)
    return {key: speed[key] for key in ("prefill_tps", "decode_tps", "warmup_s")}


def measure(path, strategies=STRATEGIES, *, policy: str = "f32", impl: str = "auto", runs: int = 3,
            devices=None, log=None) -> tuple[list[dict], dict]:
    """One row per strategy: its mesh, batch, tokens/s, pipeline schedules and `collective_table`, or the
    error that refused it (too few devices, or a split the model cannot take); and the model's shape (from
    the first strategy that loads)."""
    import jax

    import realm_jax
    from realm_jax.distributed import MeshShape, make_mesh, strategy_of

    devices = list(jax.devices() if devices is None else devices)
    rows, info = [], {}
    for name in strategies:
        mesh = parse_strategy(name)
        n = mesh["data"] * mesh["stage"] * mesh["model"]
        row = {"name": name, "strategy": strategy_of(MeshShape(**mesh)), "mesh": mesh, "batch": mesh["data"]}
        rows.append(row)
        if n > len(devices):
            row["error"] = f"needs {n} devices, {len(devices)} at hand"
            continue
        t0 = time.perf_counter()
        try:
            model = realm_jax.load(path, policy=policy, impl=impl, progress=False,
                                   mesh=make_mesh(devices=devices[:n], **mesh) if n > 1 else None)
        except realm_jax.RealmError as e:
            row["error"] = f"{type(e).__name__}: {str(e).replace(str(path), pathlib.Path(path).name)}"
            if log:
                log(f"{name}: refused: {row['error']}")
            continue
        row["load_s"] = time.perf_counter() - t0
        c = model.config
        info = info or {"layers": c.n_layers, "width": c.d_model, "heads": c.n_heads, "kv_heads": c.n_kv_heads,
                        "vocab": c.vocab_size}
        row["impl"], row["layers_per_stage"] = model.impl, stage_layers(model)
        row |= _timings(model, row["batch"], runs)
        if model.pipeline is not None:
            row["schedule"] = {pass_: {"microbatches": s.microbatches, "ticks": s.ticks, "bubble": s.bubble}
                               for pass_, s in (("prefill", model.pipeline.schedule(row["batch"], PROMPT_TOKENS)),
                                                ("decode", model.pipeline.schedule(row["batch"], 1)))}
        row["bytes"] = collective_table(model, mesh, row["batch"])
        row["seconds"] = time.perf_counter() - t0
        if log:
            log(f"{name}: {row['seconds']:.1f} s")
        del model
    return rows, info


# --- report ---------------------------------------------------------------------------------------
def _ratio(b: dict) -> str:
    if b["measured"] == b["minimum"]:
        return "1 (= min)"
    return "inf (min 0)" if b["minimum"] == 0 else f"{b['measured'] / b['minimum']:.3g}"


def _mesh_text(mesh: dict[str, int]) -> str:
    return "x".join(str(mesh[a]) for a in ("data", "stage", "model"))


def markdown(rows: list[dict], meta: dict) -> str:
    shape = ", ".join(f"{k} {v}" for k, v in meta["config"].items())
    lines = [f"{meta['model']} ({shape}), policy {meta['policy']}; "
             f"{meta['devices']} {meta['platform']} devices ({meta['device_kind']}); jax {meta['jax']}; "
             f"commit {meta['commit']}; {meta['date']}; `{meta['command']}`"]
    if meta.get("note"):
        lines.append(f"\nNote: {meta['note']}")
    lines += ["", f"Speed: prefill {PROMPT_TOKENS}-token prompts, decode {DECODE_TOKENS} tokens, batch = data "
              f"degree, median of {meta['runs']}.", "",
              "| strategy | data x stage x model | batch | prefill tok/s | decode tok/s | warm-up s | "
              "schedule prefill (M, ticks, bubble) | schedule decode |",
              "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {_mesh_text(r['mesh'])} | {r['batch']} | refused: {r['error']} |"
                         " | | | |")
            continue
        sched = {p: (f"{s['microbatches']}, {s['ticks']}, {s['bubble']:.2f}" if (s := r.get("schedule", {}).get(p))
                     else "-") for p in ("prefill", "decode")}
        lines.append(f"| {r['name']} | {_mesh_text(r['mesh'])} | {r['batch']} | {r['prefill_tps']:.0f} | "
                     f"{r['decode_tps']:.1f} | {r['warmup_s']:.1f} | {sched['prefill']} | {sched['decode']} |")
    lines += ["", "Bytes moved by collectives per device (compiled HLO), against the minimum of the strategy "
              "(formulas: benchmarks/distributed.py):", "",
              "| strategy | kind | decode / step | min | ratio | decode / call, once (min 0) | prefill | min | ratio |",
              "|---|---|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            continue
        b = r["bytes"]
        kinds = sorted({k for sec in SECTIONS for k in b[sec]})
        if not kinds:
            lines.append(f"| {r['name']} | (none) | 0 | 0 | 1 (= min) | 0 | 0 | 0 | 1 (= min) |")
        zero = {"measured": 0, "minimum": 0}
        for k in kinds:
            d, c, p = b["decode_step"].get(k, zero), b["decode_per_call"].get(k, zero), b["prefill"].get(k, zero)
            lines.append(f"| {r['name']} | {k} | {d['measured']:,} | {d['minimum']:,} | {_ratio(d)} | "
                         f"{c['measured']:,} | {p['measured']:,} | {p['minimum']:,} | {_ratio(p)} |")
    return "\n".join(lines) + "\n"



def resolve_model(spec: str) -> pathlib.Path:
    if pathlib.Path(spec).exists():
        return pathlib.Path(spec)
    from realm_jax import assets

    return assets.model_path(ALIASES.get(spec, spec))


def _reexec_with_cpu_devices(n: int, argv: list[str]) -> None:
    """Give the CPU platform n devices: the count is read once, when JAX starts, so the process restarts
    with it in XLA_FLAGS (unless a count is already set there)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if n and DEVICE_FLAG not in flags and "jax" not in sys.modules:
        env = dict(os.environ, XLA_FLAGS=f"{flags} {DEVICE_FLAG}={n}".strip())
        os.execve(sys.executable, [sys.executable, str(pathlib.Path(__file__).resolve()), *argv], env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(SYNTHETIC), help="a GGUF path or a known model name (gemma3, smollm2)")
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES, metavar="NAME")
    ap.add_argument("--policy", default="f32")
    ap.add_argument("--impl", default="auto", choices=("auto", "pallas", "xla"))
    ap.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up (the median is reported)")
    ap.add_argument("--cpu-devices", type=int, default=8, help="simulated CPU devices (0: the environment's)")
    ap.add_argument("--json", type=pathlib.Path, help="write the rows and the run's metadata here")
    ap.add_argument("--markdown", type=pathlib.Path, help="write the tables here")
    args = ap.parse_args(argv)
    for name in args.strategies:
        try:
            parse_strategy(name)
        except ValueError as e:
            ap.error(str(e))
    _reexec_with_cpu_devices(args.cpu_devices, argv)

    import jax  # only now: XLA_FLAGS is read when JAX starts

    from realm_jax.bench import git_revision, write_report

    path = resolve_model(args.model)
    devices = jax.devices()
    meta = {"model": path.name, "policy": args.policy, "platform": devices[0].platform,
            "device_kind": devices[0].device_kind, "devices": len(devices), "cpu_cores": os.cpu_count(),
            "jax": jax.__version__, "commit": git_revision(ROOT), "date": datetime.date.today().isoformat(),
            "host": platform.node(), "runs": args.runs, "prompt_tokens": PROMPT_TOKENS,
            "decode_tokens": DECODE_TOKENS, "command": "python benchmarks/distributed.py " + " ".join(argv)}
    if meta["platform"] == "cpu" and len(devices) > 1:
        meta["note"] = CPU_NOTE.format(n=len(devices), cores=os.cpu_count())
        print(meta["note"], file=sys.stderr)
    rows, meta["config"] = measure(path, args.strategies, policy=args.policy, impl=args.impl, runs=args.runs,
                                   devices=devices, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    table = markdown(rows, meta)
    write_report(table, meta, rows, args.json, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
