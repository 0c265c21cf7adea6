"""The `realm-jax` command line.

    realm-jax generate PROMPT [--model FILE] [sampling options]   stream a continuation
    realm-jax chat [--model FILE] [--system TEXT] [--chat-template F]  chat on stdin with an instruct model
    realm-jax inspect [FILE] [--json] [--precision P]               architecture, metadata, tensors per type
    realm-jax bench [--model FILE] [--mesh ...] [--json] [--memory] prefill and decode tokens/s (and memory)
    realm-jax quantize IN.gguf OUT.gguf --type TYPE                 requantize with llama.cpp's mixture of TYPE
    realm-jax serve [--model FILE] [--port 8000] [--slots N] ...    an OpenAI-compatible server (127.0.0.1)
    realm-jax launch --processes N [--cpu-devices K] -- generate PROMPT --mesh model=M,data=D ...
                                                                    one generate (or bench) over N processes
    realm-jax launch --hosts A,B,... [--port P] -- generate ...     print the command for each host of a cluster
    realm-jax launch --process-id I --num-processes N --coordinator HOST:PORT -- generate ...   one worker
    realm-jax launch --cluster -- generate ...                      one worker under Slurm, Open MPI or Kubernetes

`generate --mesh model=2,data=2` (or `--strategy tensor`) splits the model over the devices; under launch
the mesh spans every process, and process 0 prints the text. The default model is the embedded gemma3-270m
Q4_K_M. Sizes are checked against the model's header and the machine's free memory before the model loads.
Errors end in a one-line message on stderr and exit status 2; a launch that loses a process stops
all of them and names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from realm_jax.errors import ArgumentError, ContextLengthError, CoordinatorError, PeerError, RealmError
from realm_jax.inputs import check_text, decode_line, shown

__all__ = ["main"]

_MAX_TEMPLATE_BYTES = 1 << 20  # real chat templates have a few KB
# A process's RSS beyond its arrays: JAX's runtime and a compilation. Measured: gemma3 in one process 1,257 MiB
# after load against 700 MiB of params and file; SmolLM2 over 3 processes 1,286 MiB each against 665.
_PROCESS_BYTES = 512 << 20
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


def _tensor_roles(metadata: dict[str, Any], infos: dict[str, Any], path: str) -> dict[str, str]:
    """What the model does with each tensor (`models.tensor_roles`); for a file realm-jax cannot run, each
    2-D tensor but the embedding table counts as a linear layer."""
    from realm_jax.errors import RealmError
    from realm_jax.models import config_from_gguf, tensor_roles
    from realm_jax.quant import FORMATS, QTensor

    known = {name: QTensor(info.type_name, info.shape, {}) for name, info in infos.items()
             if info.type_name in FORMATS}
    try:
        return tensor_roles(config_from_gguf(metadata, known, path))
    except (RealmError, KeyError, TypeError, ValueError):
        return {name: "embed" if name == "token_embd.weight" else "linear" if len(info.shape) == 2 else "vector"
                for name, info in infos.items()}


def _linear_layers(metadata: dict[str, Any], infos: dict[str, Any], path: str, impl: str,
                   precision: str | None) -> dict[str, Any]:
    """Which linear-layer backend serves each weight of the file on this machine under `impl` and the
    precision policy (the device's automatic one by default), and why where it is not the preferred one."""
    import jax

    from realm_jax import linear
    from realm_jax.precision import resolve_policy
    from realm_jax.quant import FORMATS

    platform = jax.default_backend()
    preferred, policy = linear.resolve(impl, platform), resolve_policy(precision)
    roles = _tensor_roles(metadata, infos, path)
    tensors, plans = [], {}
    for name, info in infos.items():
        role = roles.get(name, "unused")
        row = {"name": name, "type": info.type_name, "shape": list(info.shape), "role": role}
        if role in ("linear", "output"):
            if info.type_name not in FORMATS:
                row |= {"backend": None, "serves": None, "reason": f"type {info.type_name} is not supported"}
            else:
                key = (info.type_name, info.shape, role)
                if key not in plans:
                    plans[key] = linear.plan(info.type_name, info.shape, policy, impl=preferred,
                                             many_rows=role == "linear")
                choice, serves = plans[key]
                row |= {"backend": choice.backend, "serves": serves, "reason": choice.reason}
        tensors.append(row)
    return {"platform": platform, "impl": impl, "preferred": preferred, "policy": str(policy), "tensors": tensors}


def inspect_report(path: str, *, impl: str = "auto", precision: str | None = None) -> dict[str, Any]:
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
            "linear_layers": _linear_layers(dict(f.metadata), f.tensors, str(f.path), impl, precision),
        }


def _print_linear_layers(layers: dict[str, Any], every_tensor: bool) -> None:
    print(f"\nlinear layers on {layers['platform']} (impl {layers['impl']}: {layers['preferred']} preferred; "
          f"policy {layers['policy']})")
    served = [t for t in layers["tensors"] if t["role"] in ("linear", "output")]
    if every_tensor:
        for t in served:
            why = f"  ({t['reason']})" if t["reason"] else ""
            print(f"  {t['name']:<32}{t['type']:<8}{str(t['shape']):<16}{t['serves'] or '-'}{why}")
        return
    groups: dict[tuple, int] = {}
    for t in served:
        key = (t["role"], t["type"], t["serves"] or "-", t["reason"] or "")
        groups[key] = groups.get(key, 0) + 1
    print(f"  {'count':>5}  {'role':<7}{'type':<8}served by")
    for (role, fmt, serves, reason), count in groups.items():
        print(f"  {count:>5}  {role:<7}{fmt:<8}{serves}" + (f"  ({reason})" if reason else ""))


def _print_inspect(report: dict[str, Any], every_tensor: bool = False) -> None:
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
    print(f"  {'type':<8}{'count':>7}{'weights':>14}{'MiB':>10}{'bits/w':>9}  supported")
    for r in report["tensor_types"]:
        print(f"  {r['type']:<8}{r['count']:>7}{r['elements']:>14,}{r['bytes'] / 2**20:>10.2f}"
              f"{r['bits_per_weight']:>9.3f}  {'yes' if r['supported'] else 'no'}")
    _print_linear_layers(report["linear_layers"], every_tensor)
    if "memory" in report:
        m = report["memory"]
        print(f"\nmemory under precision {m['policy']}")
        print(f"  params (as loaded)          {m['params_bytes']:>14,} bytes  ({m['params_bytes'] / 2**20:.1f} MiB)")
        print(f"  KV cache per token          {m['kv_bytes_per_token']:>14,} bytes")
        print(f"  KV cache at {m['context_length']:>6} tokens   {m['kv_bytes_full_context']:>14,} bytes  "
              f"({m['kv_bytes_full_context'] / 2**20:.1f} MiB)")


def _cmd_inspect(args: argparse.Namespace) -> int:
    _check_path(args.file, "FILE")
    if args.file is None:
        from realm_jax.assets import default_model_path

        args.file = str(default_model_path())
    report = inspect_report(args.file, impl=args.impl, precision=args.precision)
    if args.precision is not None:
        from realm_jax.runtime import memory_plan

        report["memory"] = memory_plan(args.file, args.precision, args.impl)
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
    else:
        _print_inspect(report, args.tensors)
    return 0


def _cmd_serve(args) -> int:
    """realm-jax serve: the options checked, then the model loaded here, then `realm_jax.serve.cli.run`."""
    from realm_jax.serve import cli as serve_cli

    serve_cli.check(args)
    template = None if args.chat_template is None else _read_template(args.chat_template)
    args.strategy = None
    _check_path(args.model)
    sock = serve_cli.listen(args)  # a port in use fails here, before the load
    try:
        model = _load_on_mesh(args, progress=True)
    except BaseException:
        sock.close()
        raise
    return serve_cli.run(args, model, template, sock)


def _cmd_quantize(args: argparse.Namespace) -> int:
    import os

    from realm_jax.requantize import quantize_gguf

    for name, path in (("IN", args.input), ("OUT", args.output)):
        if not path.strip():
            raise ArgumentError(f"{name} is empty: give a GGUF file")
    if os.path.realpath(args.input) == os.path.realpath(args.output):
        raise ArgumentError(f"OUT {shown(args.output)} is IN: write the quantized file under another name")
    report = quantize_gguf(args.input, args.output, args.type, progress=sys.stderr.isatty())  # piped: no bar
    types = ", ".join(f"{t} x{n}" for t, n in sorted(report["types"].items(), key=lambda kv: -kv[1]))
    print(f"{report['file']}: {report['file_type']}, {report['bytes_in'] / 2**20:.1f} MiB -> "
          f"{report['bytes_out'] / 2**20:.1f} MiB of tensors ({types})")
    return 0


def _check_sampling(args: argparse.Namespace) -> None:
    """The sampling options and the texts of generate and chat, before anything loads."""
    from realm_jax.errors import SamplingError
    from realm_jax.sampling import SamplingConfig

    try:
        SamplingConfig(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    except SamplingError as e:  # its message names the parameter ("top_p=2.0 must be ..."): name the flag
        message = str(e)
        for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
            if message.startswith(f"{name}="):
                message = "--" + name.replace("_", "-") + message[len(name):]
        raise SamplingError(message) from None
    if args.max_new_tokens < 1:
        raise SamplingError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if not 0 <= args.seed < 2**32:
        raise SamplingError(f"--seed={args.seed} must be in [0, 2**32)")
    texts = [("PROMPT", getattr(args, "prompt", None)), ("--system", getattr(args, "system", None))]
    for name, text in [*texts, *(("--stop", s) for s in args.stop)]:
        if text is not None:
            check_text(text, name)
    if any(not s for s in args.stop):
        raise SamplingError("--stop must not be empty")


def _check_bench(args: argparse.Namespace) -> None:
    from realm_jax.bench import check_sizes

    check_sizes(prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, runs=args.runs,
                **({} if args.batch is None else {"batch": args.batch}))


def _check_path(path: str | None, name: str = "--model") -> None:
    if path is not None and not path.strip():
        raise ArgumentError(f"{name} is empty: give a GGUF file, or leave it out for the default model")


def _preflight(args: argparse.Namespace, *, batch: int, prompt_tokens: int, new_tokens: int, asked: str | None = None,
               processes: int = 1, devices: int | None = None, mesh=None) -> None:
    """The sizes a command asks for against the model's header and the machine, before the model loads:
    ContextLengthError when they do not fit the context, SamplingError for a top-k past the vocabulary,
    MemoryBudgetError when the params, KV cache and activations need more memory than is free. `devices`:
    how many the params spread over (default: the command's mesh, if any)."""
    import jax

    from realm_jax import linear
    from realm_jax.assets import default_model_path
    from realm_jax.errors import ContextLengthError, SamplingError
    from realm_jax.preflight import check_fits, step_bytes
    from realm_jax.runtime import memory_plan

    path = args.model or default_model_path()
    if devices is None:
        on_mesh = getattr(args, "mesh", None) is not None or getattr(args, "strategy", None) is not None
        devices = jax.device_count() if on_mesh else 1
    # The backend a mesh gets (the XLA path on CPU) decides the params' bytes: dense where it converts them.
    plan = memory_plan(path, args.precision, linear.resolve(args.impl, jax.default_backend(), devices=devices))
    context = plan["context_length"]
    if prompt_tokens + new_tokens > context:
        asked = asked or f"{prompt_tokens} prompt token(s) and {new_tokens} new ones"
        raise ContextLengthError(f"{path}: {asked} exceed the model's context of {context} tokens")
    top_k = getattr(args, "top_k", None)
    if top_k is not None and top_k > plan["vocab_size"]:
        raise SamplingError(f"--top-k={top_k} exceeds the model's vocabulary of {plan['vocab_size']} tokens")
    need = step_bytes(plan, batch=batch, prompt_tokens=prompt_tokens, cache_tokens=prompt_tokens + new_tokens)
    # Each process holds a JAX runtime and a compilation, reads every tensor of the file and holds the params;
    # on a mesh it builds all of them before its share is placed on its devices.
    params = plan["params_bytes"] * (2 if devices > 1 else 1)
    held = processes * (params + os.path.getsize(path) + _PROCESS_BYTES)
    check_fits(f"{path}: {shown(processes)} process(es) with {shown(batch)} x ({prompt_tokens} + {new_tokens}) tokens",
               held + need)
    if mesh is not None:  # (a launch's, before its workers start: they would each find it after a load)
        from realm_jax.distributed.rules import check_model_axis

        check_model_axis(plan["n_heads"], plan["ffn_dim"], mesh.model, str(path), dataclasses.asdict(mesh))


def _command_sizes(args: argparse.Namespace) -> dict[str, int]:
    """The batch and token counts a generate or bench command asks for (`_preflight`'s sizes)."""
    if args.command == "bench":
        return dict(batch=args.batch or 1, prompt_tokens=args.prompt_tokens, new_tokens=args.decode_tokens + 1)
    return dict(batch=1, prompt_tokens=1, new_tokens=args.max_new_tokens)


def _load(args: argparse.Namespace, mesh=None, progress: bool = True):
    from realm_jax.assets import default_model_path
    from realm_jax.distributed.guard import stderr_is_terminal
    from realm_jax.runtime import load

    _check_path(args.model)
    # A progress bar only on a terminal: piped, stderr holds the one-line error and nothing else.
    return load(args.model or default_model_path(), policy=args.precision, mesh=mesh, impl=args.impl,
                progress=progress and stderr_is_terminal())


def _distributed_config(args: argparse.Namespace, **processes):
    """The DistributedConfig of `generate --mesh/--strategy` (None for neither), with the process fields."""
    from realm_jax.distributed.config import DistributedConfig, parse_mesh

    if args.mesh is None and args.strategy is None:
        return DistributedConfig(**processes) if processes else None
    return DistributedConfig(strategy=args.strategy, mesh=None if args.mesh is None else parse_mesh(args.mesh),
                             **processes)


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)


def _load_on_mesh(args: argparse.Namespace, progress: bool):
    """The model of `generate`/`bench`, on the mesh --mesh/--strategy name (over every process's devices
    under launch), or on one device."""
    config = _distributed_config(args)
    mesh = None
    if config is not None:
        from realm_jax.distributed.coordinator import global_mesh

        mesh = global_mesh(config)
    return _load(args, mesh, progress)


def _cmd_generate(args: argparse.Namespace, *, progress: bool = True, after_first_piece=None) -> int:
    _check_sampling(args)
    _check_path(args.model)
    # The prompt's tokens are known once it is tokenized (Model.generate checks them then): one stands in.
    _preflight(args, batch=1, prompt_tokens=1, new_tokens=args.max_new_tokens)
    model = _load_on_mesh(args, progress)
    pieces = model.generate(args.prompt, stream=True, **_sampling_kwargs(args))
    sys.stdout.write(args.prompt)
    for i, piece in enumerate(pieces):
        sys.stdout.write(piece)
        sys.stdout.flush()
        if i == 0 and after_first_piece is not None:
            after_first_piece()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def _cmd_bench(args: argparse.Namespace, *, progress: bool = True, after_first_piece=None) -> int:
    del after_first_piece  # a launch's fault hook fires in generate only
    from realm_jax.bench import measure

    # Before the model loads: the sizes, then against the model's context and the machine's memory.
    _check_bench(args)
    _check_path(args.model)
    # the prefill makes the first new token, then --decode-tokens more
    _preflight(args, batch=args.batch or 1, prompt_tokens=args.prompt_tokens, new_tokens=args.decode_tokens + 1,
               asked=f"--prompt-tokens {args.prompt_tokens}, the prefill's token and --decode-tokens "
                     f"{args.decode_tokens} ({args.prompt_tokens + args.decode_tokens + 1} tokens)")
    if args.memory:
        import jax
        import jax.numpy as jnp

        from realm_jax.bench import rss_mib

        jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.ones(4)))  # JAX's own floor, before the model
        floor = rss_mib()[0]
    model = _load_on_mesh(args, progress)
    loaded = rss_mib()[0] if args.memory else None
    batch = args.batch or model.batch_multiple
    speed = measure(model, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, batch=batch,
                    runs=args.runs)
    if args.memory:
        from realm_jax.bench import memory_parts

        speed["memory_mib"] = memory_parts(model, floor_mib=floor, loaded_mib=loaded, prompt_tokens=args.prompt_tokens,
                                           decode_tokens=args.decode_tokens, batch=batch)
    speed |= {"model": str(model.path), "policy": str(model.policy), "impl": model.impl,
              "mesh": None if model.mesh is None else dict(model.mesh.shape), "devices": 1 if model.mesh is None else model.mesh.devices.size}
    if args.json:
        print(json.dumps(speed))
    else:
        print(f"{model.path.name}: prefill {speed['prefill_tps']:.1f} tok/s ({batch} x {args.prompt_tokens} tokens), "
              f"decode {speed['decode_tps']:.1f} tok/s ({batch} x {args.decode_tokens} tokens); policy {speed['policy']}, "
              f"impl {speed['impl']}, mesh {speed['mesh'] or 'none'}, median of {args.runs}")
        if args.memory:
            m = speed["memory_mib"]
            print(f"peak RSS {m['peak_rss']:.0f} MiB: JAX floor {m['jax_floor']:.0f}, weights {m['weights']:.0f}, "
                  f"tokenizer/metadata/load {m['tokenizer_metadata_and_load']:.0f}, KV cache {m['kv_cache']:.1f} "
                  f"({m['kv_cache_tokens']} token slots), compiled programs and buffers "
                  f"{m['compiled_programs_and_buffers']:.0f}")
    return 0


def _launch_command(args: argparse.Namespace) -> tuple[list[str], argparse.Namespace]:
    """The command after `launch ... --`, checked here so that bad arguments fail before any process starts."""
    command = args.command[1:] if args.command[:1] == ["--"] else list(args.command)
    if not command:
        raise CoordinatorError('launch needs a command after --, e.g. -- generate "Once upon a time" --mesh model=2')
    if command[0] not in ("generate", "bench"):
        raise CoordinatorError(f"launch runs generate or bench on every process; got {command[0]!r}")
    gen = _parser().parse_args(command)
    _known_models(gen)  # a known model's name, as the commands take it alone
    if command[0] == "generate":
        _check_sampling(gen)
    else:
        _check_bench(gen)
    _check_path(gen.model)
    if _distributed_config(gen) is None:
        raise CoordinatorError(f"launch needs {command[0]} --mesh (e.g. model=4) or --strategy: the mesh that spans "
                               "the processes")
    return command, gen


def _cmd_launch(args: argparse.Namespace) -> int:
    from realm_jax.distributed import coordinator, launch

    command, gen = _launch_command(args)
    options = launch.WorkerOptions(args.cpu_devices, args.init_timeout, args.heartbeat_timeout)
    worker = (args.process_id, args.num_processes, args.coordinator) != (None, None, None)
    modes = [flag for flag, on in (("--processes", args.processes is not None), ("--hosts", args.hosts is not None),
                                   ("--process-id/--num-processes/--coordinator", worker), ("--cluster", args.cluster))
             if on]
    if len(modes) != 1:
        raise CoordinatorError("launch takes one of --processes N (on this host), --hosts A,B,... (print each host's "
                               "command), --process-id/--num-processes/--coordinator (one worker) or --cluster (one "
                               f"worker under Slurm, Open MPI or Kubernetes); got {' and '.join(modes) or 'none'}")
    if args.port is not None and args.hosts is None:
        raise CoordinatorError("--port goes with --hosts (the other modes choose the port or are given it)")
    if args.port is not None and not 0 < args.port < 65536:
        raise CoordinatorError(f"--port={args.port} must be in 1..65535")
    if args.processes is not None:
        options = dataclasses.replace(options, cpu_devices=options.cpu_devices or 1)  # one host: CPU devices
        if args.processes < 1:
            raise CoordinatorError(f"--processes={args.processes} must be >= 1")
        shape = coordinator.plan_mesh(_distributed_config(gen), args.processes, options.cpu_devices)
        _preflight(gen, processes=args.processes, devices=args.processes * options.cpu_devices, mesh=shape,
                   **_command_sizes(gen))
        launch.run_local(args.processes, command, options)
        return 0
    if args.hosts is not None:
        hosts = [h.strip() for h in args.hosts.split(",")]
        if options.cpu_devices is not None:
            coordinator.plan_mesh(_distributed_config(gen), len(hosts), options.cpu_devices)
        for host, line in zip(hosts, launch.cluster_commands(hosts, args.port or 1234, command, options)):
            print(f"# on {host}\n{line}")
        return 0
    return _run_worker(args, gen, options, command)


def _model_identity(path) -> dict[str, Any]:
    """What tells two copies of a model file apart, cheaply: its size and a hash of its first and last MiB
    (the header, and tensor data); a MissingFileError or UnreadableFileError where it cannot be read."""
    import hashlib

    from realm_jax.errors import MissingFileError, UnreadableFileError
    from realm_jax.inputs import as_path

    path = as_path(path, "--model")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest = hashlib.sha256(f.read(1 << 20))
            f.seek(max(size - (1 << 20), 0))
            digest.update(f.read(1 << 20))
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no such file") from None
    except OSError as e:
        raise UnreadableFileError(f"{path}: cannot be read: {e.strerror or e}") from None
    return {"bytes": size, "sha256 of its first and last MiB": digest.hexdigest()[:16]}


def _run_worker(args: argparse.Namespace, gen: argparse.Namespace, options, command: list[str]) -> int:
    """One process of a launch: check its model, join the others (which must have been given the same
    command, CPU devices and model file), generate over the global mesh, leave together."""
    import contextlib
    import os

    import jax

    from realm_jax.distributed import coordinator, guard, launch

    config = _distributed_config(gen, num_processes=args.num_processes, process_id=args.process_id,
                                 coordinator_address=args.coordinator)
    if not guard.guarded():  # the process launched: the worker runs as its child (`guard`), then ends as it did
        code = guard.run([sys.executable, "-m", "realm_jax.cli", *args.argv])
        if code < 0:
            guard.exit_like(code)
        return code
    rank = config.process_id
    if options.cpu_devices is not None:
        launch.use_cpu_devices(options.cpu_devices)
    with launch.text_stdout():
        if rank is not None:
            launch.fault_point("join", rank)
        coord = None
        try:
            from realm_jax.assets import default_model_path

            # before the join: a file missing here fails at once, not in a collective the others wait in
            agreement = {"command": command, "cpu devices": options.cpu_devices,
                         "model file": _model_identity(gen.model or default_model_path())}
            coord = coordinator.join(config, init_timeout=options.init_timeout,
                                     heartbeat_timeout=options.heartbeat_timeout, agreement=agreement)
            guard.tell(_who(coord, config), {p.rank: str(p) for p in coord.peers})
            with contextlib.ExitStack() as stack:
                if not coord.is_main:  # process 0 prints the text
                    stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
                gen.func(gen, progress=coord.is_main,
                         after_first_piece=lambda: launch.fault_point("generate", coord.rank))
            coord.shutdown()
        except (CoordinatorError, PeerError) as e:  # they name the process already
            print(f"realm-jax: error: {e}", file=sys.stderr, flush=True)
            return coordinator.EXIT_PEER_LOST if isinstance(e, PeerError) else 2
        except RealmError as e:
            print(f"realm-jax: error: {_who(coord, config)}: {e}", file=sys.stderr, flush=True)
            return 2
        except jax.errors.JaxRuntimeError as e:
            if coord is not None:
                coord.await_watchdog()  # a lost peer ends this process there, named
            print(f"realm-jax: error: {_who(coord, config)}: a collective failed (a peer may be lost): "
                  f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr,
                  flush=True)
            return coordinator.EXIT_PEER_LOST
    return 0


def _who(coord, config) -> str:
    from realm_jax.distributed.coordinator import process_name

    if coord is None:
        return process_name(config.process_id, config.num_processes)
    return process_name(coord.rank, coord.world_size)


def _read_template(path: str) -> str:
    """The text of a --chat-template file (at most `_MAX_TEMPLATE_BYTES`)."""
    from realm_jax.errors import MissingFileError, UnreadableFileError

    _check_path(path, "--chat-template")
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_TEMPLATE_BYTES + 1)
    except FileNotFoundError:
        raise MissingFileError(f"--chat-template {path}: no such file") from None
    except OSError as e:
        raise UnreadableFileError(f"--chat-template {path}: cannot be read: {e.strerror or e}") from None
    if len(raw) > _MAX_TEMPLATE_BYTES:
        raise ArgumentError(f"--chat-template {path} is larger than {_MAX_TEMPLATE_BYTES} bytes")
    return decode_line(raw, f"--chat-template {path}")


def _cmd_chat(args: argparse.Namespace) -> int:
    _check_sampling(args)  # bad arguments fail before the model loads
    template = None if args.chat_template is None else _read_template(args.chat_template)
    _check_path(args.model)
    _preflight(args, batch=1, prompt_tokens=1, new_tokens=args.max_new_tokens)
    model = _load(args)
    if model.tokenizer.chat_template is None and template is None:
        from realm_jax.errors import MetadataError

        raise MetadataError(f"{model.path}: the file has no chat template (tokenizer.chat_template); "
                            "chat needs an instruct model such as SmolLM2-135M-Instruct, or --chat-template FILE")
    source = f"--chat-template {args.chat_template}"
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    # A line longer than this cannot fit in the context (`Model.max_prompt_chars`, 4 bytes a character at
    # most): it is refused without reading the rest of it into memory.
    limit = 4 * model.max_prompt_chars + 1
    for number in itertools.count(1):
        if interactive:
            print("you> ", end="", flush=True)
        raw = sys.stdin.buffer.readline(limit)
        if not raw:
            return 0
        if len(raw) == limit and not raw.endswith(b"\n"):
            raise ContextLengthError(f"stdin line {number} is longer than {limit - 1} bytes: it cannot fit in the "
                                     f"model's context of {model.config.context_length} tokens")
        line = decode_line(raw, f"stdin line {number}").rstrip("\n")
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, template=template,
                                                     template_source=source)
        reply = []
        if interactive:
            print("assistant> ", end="", flush=True)
        # A template that writes its BOS must not get a second one from the tokenizer.
        bos = model.tokenizer.bos_id
        has_bos = bos is not None and prompt.startswith(model.tokenizer.token_text(bos))
        try:
            pieces = model.generate(prompt, stream=True, add_bos=False if has_bos else None, **_sampling_kwargs(args))
        except ContextLengthError as e:  # the conversation outgrew the context: say where in the input
            raise ContextLengthError(f"stdin line {number}: the conversation so far does not fit: {e}") from None
        for piece in pieces:
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"realm-jax: error: {message} (see --help)\n")


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a GGUF file, or a known model's name (gemma3-270m-q4_k_m, "
                   "smollm2-135m-instruct-q4_1: fetched once); default: the embedded gemma3-270m Q4_K_M")
    p.add_argument("--precision", default=None, help="precision policy: f32, bf16, f16, auto, or "
                   "params=..,compute=..,kv=.. (default: auto for the device)")
    _add_impl_option(p)


def _add_impl_option(p: argparse.ArgumentParser) -> None:
    from realm_jax.linear import IMPLS

    p.add_argument("--impl", choices=IMPLS, default="auto",
                   help="the linear layers' backend: xla (the reference: weights converted at load), native (the "
                        "CPU kernels on the weights as stored), the Pallas kernels on quantized weights (pallas: "
                        "the platform's; triton, triton_blocks, mosaic_gpu, mosaic_tpu) (default auto: pallas on "
                        "GPU/TPU; on CPU native where it builds, else xla); a weight the backend cannot take runs "
                        "on xla (inspect says which)")


def _add_model_options(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    _add_load_options(p)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="a string that ends the generation (repeatable)")


def _add_mesh_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default=None, help="split the model over a data/stage/model mesh of all devices, "
                   "e.g. model=2,data=2 (under launch: the devices of every process)")
    p.add_argument("--strategy", default=None, help="none, tensor, pipeline, data or hybrid; "
                   "without --mesh, all devices go on the strategy's axis")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="realm-jax", description="GGUF-quantized language models on JAX.")
    parser.add_argument("--version", action="version", version=f"realm-jax {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("generate", help="stream a continuation of a prompt")
    p.add_argument("prompt")
    _add_model_options(p, max_new_tokens=128)
    _add_mesh_options(p)
    p.set_defaults(func=_cmd_generate)
    p = sub.add_parser("bench", help="prefill and decode tokens/s of a model on these devices (or a mesh)")
    _add_load_options(p)
    _add_mesh_options(p)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=None, help="prompts per run (default: 1, or the data axis)")
    p.add_argument("--runs", type=int, default=3, help="timed runs after a warm-up (the median is reported)")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.add_argument("--memory", action="store_true", help="also report the peak resident memory and its parts "
                   "(JAX's floor, weights, tokenizer and metadata, KV cache, compiled programs and buffers)")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("chat", help="chat with an instruct model, one user message per stdin line")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template to use instead "
                   "of the file's (rendered in the same sandbox, under the same budget)")
    _add_model_options(p, max_new_tokens=256)
    p.set_defaults(func=_cmd_chat)
    p = sub.add_parser("inspect", help="show a GGUF file's architecture, metadata and tensor types")
    p.add_argument("file", nargs="?", help="the GGUF file (default: the embedded gemma3-270m Q4_K_M)")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.add_argument("--precision", default=None, help="also report the bytes loading with this precision "
                   "policy allocates (params, KV cache): f32, bf16, f16, auto, or params=..,compute=..,kv=..")
    _add_impl_option(p)
    p.add_argument("--tensors", action="store_true", help="list the backend of every linear layer, not a summary")
    p.set_defaults(func=_cmd_inspect)
    p = sub.add_parser("quantize", help="requantize a GGUF file with llama.cpp's per-tensor mixture of a file type")
    p.add_argument("input", help="the GGUF file to read (F32, F16, BF16 or quantized tensors)")
    p.add_argument("output", help="the GGUF file to write")
    p.add_argument("--type", required=True, help="a llama.cpp file type (Q4_K_M, Q5_K_S, Q6_K, Q8_0, Q3_K_M, Q2_K, "
                   "IQ4_XS, ...) or a single tensor type (Q4_K, ...) for every quantizable tensor")
    p.set_defaults(func=_cmd_quantize)
    from realm_jax.serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub, _add_load_options, _add_mesh_options, _cmd_serve)
    p = sub.add_parser("launch", help="run generate over several processes (hosts) with one mesh spanning them",
                       usage="realm-jax launch (--processes N | --hosts A,B,... | --process-id I --num-processes N "
                             "--coordinator HOST:PORT | --cluster) [options] -- generate PROMPT [generate options]")
    p.add_argument("--processes", type=int, default=None, help="start N processes on this host (127.0.0.1) "
                   "and supervise them")
    p.add_argument("--hosts", default=None, help="print the command for each of these hosts (comma-separated; "
                   "the first runs process 0 and the coordinator)")
    p.add_argument("--port", type=int, default=None, help="the coordinator's port with --hosts (default 1234)")
    p.add_argument("--process-id", type=int, default=None, help="this worker's rank (with --num-processes and "
                   "--coordinator)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    p.add_argument("--cluster", action="store_true", help="join through JAX's detection of Slurm, Open MPI or "
                   "Kubernetes")
    p.add_argument("--cpu-devices", type=int, default=None, help="simulate K CPU devices per process (default "
                   "with --processes: 1; otherwise the host's own devices)")
    p.add_argument("--init-timeout", type=float, default=60.0, help="seconds for all processes to join (60)")
    p.add_argument("--heartbeat-timeout", type=float, default=15.0, help="seconds of silence after which a "
                   "process counts as lost (15)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- generate PROMPT [options]")
    p.set_defaults(func=_cmd_launch)
    return parser


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("realm-jax")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "(not installed)"


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as the errors are: one line on stderr, not a source location and the line it points to."""
    text = str(message).removeprefix("realm-jax: ")
    print(f"realm-jax: warning: {text}", file=sys.stderr if file is None else file)


def _known_models(args: argparse.Namespace) -> None:
    """--model (or inspect's FILE) naming one of `realm_jax.assets.KNOWN_MODELS` where no such file exists:
    that model's file, fetched into the cache on first use (``--model smollm2-135m-instruct-q4_1``)."""
    from realm_jax.assets import KNOWN_MODELS, model_path

    for name in ("model", "file"):
        value = getattr(args, name, None)
        if value in KNOWN_MODELS and not os.path.exists(value):
            setattr(args, name, str(model_path(value)))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv  # (a launched worker starts itself again under its guard)
    try:
        with warnings.catch_warnings():  # restored on return: main may run inside a longer-lived process
            warnings.showwarning = _one_line_warning
            _known_models(args)
            return args.func(args)
    except RealmError as e:
        print(f"realm-jax: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `realm-jax inspect | head`
        return 0
    except KeyboardInterrupt:  # Ctrl-C: one line (the commands leave no partial file behind), the shell's status
        print("realm-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
