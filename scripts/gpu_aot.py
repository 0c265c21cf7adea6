"""Compile for an NVIDIA H100 on a machine without a GPU: XLA's own GPU compile, deviceless, and what it makes.

JAX's CUDA plugin builds a compile-only topology from a GPU target description (`get_topology_desc(platform=
"cuda", target_config=..., topology="1x1x1")`; the H100 SXM's description is taken from the plugin, which
embeds XLA's GPU specs). Compiling against its device runs the whole GPU pipeline (HLO passes, fusion, the
Pallas Triton kernels through XLA's Triton, LLVM to PTX, ptxas to a cubin) with no device and no CUDA driver.
So this reports, per compiled program, what a device would launch:

- every kernel of XLA's thunk sequence (its name, grid, threads, shared memory), a Pallas kernel or an XLA
  fusion, with the registers and spills ptxas gives its PTX, and the CPU seconds of the lowering and compile;
- `--matmul BACKEND:FORMAT:M:NxK`: a linear backend's matmul (`realm_jax.linear`) on a prepared weight of that
  format and shape, as a model calls it;
- `--step MODEL.gguf --impl IMPL`: a decode step of the model (`forward` on one new token a row, weights as
  `load` prepares them for IMPL on a GPU): the launches a token costs, split into Pallas kernels and XLA's.

What it cannot tell: times (no device), autotuned XLA GEMM tiles (XLA takes its defaults without a device).

Set-up (a venv of its own: the plugin in the project's .venv would make every JAX start look for a GPU):
`make gpu-aot`, then `.venv-gpu-aot/bin/python scripts/gpu_aot.py --matmul triton:Q4_K:1:14336x4096`.
The plugin must be the installed jaxlib's version; ptxas comes from pip's `nvidia-cuda-nvcc-cu12`.

As the GPU machine compiles (jax 0.11.2 with the CUDA 13 plugin): a venv with jax and jaxlib 0.11.2,
`jax-cuda13-plugin` and `jax-cuda13-pjrt` 0.11.2 (`--no-deps`), `nvidia-cuda-nvcc==13.0.*` and the project's
dependencies, the project on PYTHONPATH, and the H100's description in REALM_JAX_GPU_TARGET_CONFIG (0.11.2's
plugin embeds none: `--write-target-config FILE` writes it from 0.12's).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

# The plugin checks the CUDA libraries (cuDNN, cuBLAS, ...) at start and stops where they are missing; the
# compile needs none of them.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "scripts"))  # kernel_report: how the report traces a matmul and a decode step

H100 = "NVIDIA H100 80GB HBM3"
# The names pallas_kernels gives its Triton kernels (their pallas_call's `name`; XLA's own kernels are its
# fusions: loop_*, input_*, wrapped_*, gemm_fusion_*, triton_*)
PALLAS_NAMES = ("decode_", "mma_", "blockdot_", "lanesdot_")
_THUNK = re.compile(r"^\s*\d+: (k\w+)\s+\[[^\]]*\]\s*(.*)$")
_KERNEL = re.compile(r"^(\S+) grid: \[(\d+), (\d+), (\d+)\] threads: \[(\d+), (\d+), (\d+)\]\s+shared_memory: (\d+)")


def _plugin():
    """JAX's CUDA plugin package: CUDA 12's or 13's (the GPU machine's jax 0.11.2 has 13's)."""
    import importlib

    for name in ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise RuntimeError("no JAX CUDA plugin installed (jax-cuda12-plugin or jax-cuda13-plugin): make gpu-aot")


TARGET_ENV = "REALM_JAX_GPU_TARGET_CONFIG"  # a GpuTargetConfigProto text file, where the plugin embeds none


def target_config(device: str = H100) -> str:
    """The GPU target description (a GpuTargetConfigProto as text) of `device`: the file TARGET_ENV names, else
    XLA's GPU specs that the CUDA plugin embeds (jaxlib 0.12's do; 0.11.2's do not: give it the file this
    function wrote from a newer one, `python scripts/gpu_aot.py --write-target-config FILE`)."""
    if os.environ.get(TARGET_ENV):
        return pathlib.Path(os.environ[TARGET_ENV]).read_text()
    plugin = _plugin()
    data = b"".join(p.read_bytes() for p in pathlib.Path(plugin.__file__).parent.glob("*.so"))
    for m in re.finditer(rb"gpu_device_info \{", data):
        start = data.rfind(b"\0", 0, m.start()) + 1
        text = data[start:data.find(b"\0", m.start())].decode(errors="replace")
        if f'device_description_str: "{device}"' in text:
            return text
    raise RuntimeError(f"no GPU spec for {device!r} in {plugin.__file__}: give one in {TARGET_ENV}")


def device(name: str = H100):
    """A compile-only device of that GPU (no GPU needed)."""
    from jax.experimental import topologies

    return topologies.get_topology_desc("", platform="cuda", target_config=target_config(name),
                                        topology="1x1x1").devices[0]


def _cuda_dir() -> str | None:
    """The CUDA directory of pip's ptxas: nvidia-cuda-nvcc-cu12's nvidia/cuda_nvcc, or nvidia-cuda-nvcc's
    (CUDA 13) nvidia/cu13; None: XLA's own search (PATH, /usr/local/cuda)."""
    try:
        import nvidia
    except ImportError:
        return None
    for base in nvidia.__path__:
        for sub in ("cuda_nvcc", "cu13"):
            if pathlib.Path(base, sub, "bin", "ptxas").exists():
                return str(pathlib.Path(base, sub))
    return None


@dataclasses.dataclass
class Kernel:
    name: str
    kind: str  # "pallas" (a Pallas kernel), "xla" (a fusion), or the thunk's kind (kCopy, kWhile, ...)
    programs: int = 0
    threads: int = 0
    shared_bytes: int = 0
    registers: int | None = None
    spill_bytes: int | None = None
    in_loop: bool = False  # in a while loop's body (a scan over layers): launched once an iteration


@dataclasses.dataclass
class Compiled:
    name: str
    lower_s: float
    compile_s: float
    kernels: list[Kernel]
    graphs: int = 0  # command buffers (CUDA graphs) XLA records the launches into
    ungraphed: int = 0  # kernels launched outside any command buffer

    def count(self, kind: str | None = None, loop: bool | None = None) -> int:
        return sum(1 for k in self.kernels if (kind is None or k.kind == kind) and (loop is None or k.in_loop == loop))


def _ptxas(ptx: pathlib.Path) -> dict[str, tuple[int, int]]:
    """kernel -> (registers, spill bytes) from ptxas -v on XLA's PTX (the flags XLA passes)."""
    out = subprocess.run([ptxas(), "-arch=sm_90a", "-v", "--warn-on-spills", str(ptx), "-o", os.devnull],
                         capture_output=True, text=True)
    found, name = {}, None
    for line in (out.stdout + out.stderr).splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            name = m.group(1)
        elif (m := re.search(r"(\d+) bytes spill stores", line)) and name:
            found[name] = (0, int(m.group(1)))
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            found[name] = (int(m.group(1)), found.get(name, (0, 0))[1])
    return found


def compile_for(name: str, fn, *args, dev=None, dump_to: pathlib.Path | None = None) -> Compiled:
    """Lower and compile `fn(*args)` (args: ShapeDtypeStructs, placed by this on `dev`) for the GPU of `dev`
    (default: an H100), and read what it launches from XLA's dumps (kept in `dump_to` where given: the
    kernels' PTX, `ptx_of`)."""
    dev = dev or device()
    sharding = jax.sharding.SingleDeviceSharding(dev)
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
    cuda_dir = _cuda_dir()
    with tempfile.TemporaryDirectory() as scratch:
        dump = str(dump_to or scratch)
        options = {"xla_dump_to": dump, "xla_dump_hlo_as_text": True, "xla_dump_emitter_re": "ptx"}
        if cuda_dir:
            options["xla_gpu_cuda_data_dir"] = cuda_dir
        start = time.perf_counter()
        with jax.default_device(dev):  # (the Pallas Triton lowering asks the default device what GPU it is)
            lowered = jax.jit(fn).trace(*args).lower()
        lowered_at = time.perf_counter()
        lowered.compile(compiler_options=options)
        compiled_at = time.perf_counter()
        regs = {}
        for ptx in sorted(pathlib.Path(dump).glob("*.ptx")):
            regs.update(_ptxas(ptx))
        kernels, depth = [], 0
        for path in sorted(glob.glob(f"{dump}/*thunk_sequence.txt")):
            for line in pathlib.Path(path).read_text().splitlines():
                if line.strip() == "body:":
                    depth = 1
                elif line.strip() == "condition:" or not line.startswith(" "):
                    depth = 0 if not line.startswith(" ") else depth
                m = _THUNK.match(line)
                if not m:
                    continue
                kind, rest = m.groups()
                k = _KERNEL.match(rest)
                if k:
                    kname = k.group(1)
                    r = regs.get(kname, (None, None))
                    kernels.append(Kernel(kname, "pallas" if kname.startswith(PALLAS_NAMES) else "xla",
                                          int(k.group(2)) * int(k.group(3)) * int(k.group(4)),
                                          int(k.group(5)) * int(k.group(6)) * int(k.group(7)), int(k.group(8)),
                                          r[0], r[1], depth > 0 and line.startswith("    ")))
                elif kind not in ("kWhile", "kAsyncStart", "kAsyncDone"):
                    kernels.append(Kernel(kind, kind, in_loop=depth > 0 and line.startswith("    ")))
        graphs, ungraphed = _graphs(dump)
    return Compiled(name, lowered_at - start, compiled_at - lowered_at, kernels, graphs, ungraphed)


def ptx_of(dump: pathlib.Path, kernel: str) -> pathlib.Path:
    """The PTX file of `kernel` (its entry's name) in a dump of `compile_for`."""
    for ptx in sorted(pathlib.Path(dump).glob("*.ptx")):
        if re.search(rf"\.entry {re.escape(kernel)}\(", ptx.read_text()):
            return ptx
    raise RuntimeError(f"no PTX of {kernel!r} in {dump}")


def ptxas() -> str:
    """The ptxas XLA compiles with here (pip's nvidia-cuda-nvcc-cu12, else one on PATH)."""
    cuda_dir = _cuda_dir()
    return os.path.join(cuda_dir, "bin", "ptxas") if cuda_dir else "ptxas"


def cuobjdump() -> str:
    """A cuobjdump: pip triton's, or `make gpu-aot`'s (its tools/), or one on PATH."""
    try:
        import triton

        found = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if found.exists():
            return str(found)
    except ImportError:
        pass
    tools = sorted(pathlib.Path(sys.prefix, "tools", "nvidia").glob("*/bin/cuobjdump"))
    if not tools:
        return "cuobjdump"
    os.environ["PATH"] = f"{tools[-1].parent}{os.pathsep}{os.environ.get('PATH', '')}"  # its nvdisasm, beside it
    return str(tools[-1])


def _graphs(dump: str) -> tuple[int, int]:
    """From the thunk sequence after XLA's thunk passes: the command buffers, and the kernels outside them."""
    graphs = ungraphed = 0
    inside: list[int] = []  # the indents of the command buffers the current line is in
    for path in glob.glob(f"{dump}/*thunk_sequence_after_thunk_passes.txt"):
        for line in pathlib.Path(path).read_text().splitlines():
            indent = len(line) - len(line.lstrip())
            while inside and indent <= inside[-1]:
                inside.pop()
            if "kCommandBuffer" in line:
                graphs += 1
                inside.append(indent)
            elif "kCustomKernel" in line and not inside:
                ungraphed += 1
    return graphs, ungraphed


def matmul(spec: str, dev=None) -> Compiled:
    """`BACKEND:FORMAT:M:NxK`: that backend's matmul of x [M, K] bf16 with a prepared (N, K) weight, as
    `kernel_report` traces it."""
    import kernel_report

    backend, fmt, m, shape = spec.split(":")
    n, k = (int(v) for v in shape.split("x"))
    with kernel_report.as_gpu():
        w = kernel_report.abstract_weight(backend, fmt, n, k)
        return compile_for(spec, kernel_report._matmul(backend), jax.ShapeDtypeStruct((int(m), k), jnp.bfloat16), w,
                           dev=dev)


def step(path: str, impl: str, batch: int = 1, dev=None) -> tuple[Compiled, int]:
    """A decode step of the model at `path` on `impl` (`kernel_report.decode_step`: a token a row of `batch`,
    a 256-token cache); and the model's layers."""
    import kernel_report

    with kernel_report.as_gpu():
        fn, args, config = kernel_report.decode_step(pathlib.Path(path), impl, "bf16", batch)
        compiled = compile_for(f"step {pathlib.Path(path).name} {impl} batch {batch}", fn, *args, dev=dev)
    return compiled, config.n_layers


def markdown(c: Compiled) -> str:
    lines = [f"**{c.name}**: lower {c.lower_s:.2f} s, compile {c.compile_s:.2f} s (CPU); {len(c.kernels)} launches "
             f"({c.count('pallas')} Pallas, {c.count('xla')} XLA fusions, "
             f"{len(c.kernels) - c.count('pallas') - c.count('xla')} other); {c.graphs} command buffer(s), "
             f"{c.ungraphed} kernel(s) outside them", "",
             "| kernel | kind | in loop | programs | threads | shared bytes | registers | spill bytes |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for k in c.kernels:
        lines.append(f"| {k.name} | {k.kind} | {'yes' if k.in_loop else ''} | {k.programs} | {k.threads} | "
                     f"{k.shared_bytes} | {'' if k.registers is None else k.registers} | "
                     f"{'' if k.spill_bytes is None else k.spill_bytes} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--matmul", action="append", default=[], metavar="BACKEND:FORMAT:M:NxK")
    p.add_argument("--step", metavar="MODEL.gguf")
    p.add_argument("--impl", default="triton", help="the --step's backend (default triton)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--write-target-config", metavar="FILE", help=f"write the H100's description (for {TARGET_ENV}) "
                   "and stop")
    args = p.parse_args(argv)
    try:
        if args.write_target_config:
            pathlib.Path(args.write_target_config).write_text(target_config())
            return 0
        dev = device()
    except (RuntimeError, OSError) as e:  # no plugin, no description: say so, not a traceback
        p.error(str(e).splitlines()[0])
    from realm_jax import linear
    from realm_jax.quant import FORMATS

    for spec in args.matmul:
        parts = spec.split(":")
        if (len(parts) != 4 or parts[0] not in linear.BACKENDS or parts[1] not in FORMATS or not parts[2].isdigit()
                or not re.fullmatch(r"\d+x\d+", parts[3])):
            p.error(f"--matmul {spec!r}: expected BACKEND:FORMAT:M:NxK, a backend of {sorted(linear.BACKENDS)} "
                    "and a format name (e.g. triton:Q4_K:1:4096x4096)")
    results = [matmul(spec, dev) for spec in args.matmul]
    layers = None
    if args.step:
        compiled, layers = step(args.step, args.impl, args.batch, dev)
        results.append(compiled)
    for c in results:
        print(markdown(c) + "\n")
    if layers is not None:
        c = results[-1]
        print(f"decode step: {len(c.kernels)} launches, {c.count(loop=True)} of them in the scan's body, over "
              f"{layers} layers")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps([dataclasses.asdict(c) for c in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
