"""The linear layer's registry (`realm_jax.linear.api`): the user's impl resolved per platform, each weight
routed to a backend that supports it (or to the reference, with the reason `inspect` shows), a format
registered in the table alone, and the structure the registry exists for: the model never names a
backend, the kernels import only the format math, and no module imports its way back to itself."""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import tokenize

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax
from realm_jax import linear, native
from realm_jax.checkpoint import read_gguf, write_gguf
from realm_jax.cli import main
from realm_jax.errors import ArgumentError, NativeBuildError, ShardingError
from realm_jax.quant import table
from realm_jax.quant.block import Field, Format
from helpers import random_qtensor

ROOT = pathlib.Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "tests" / "data" / "synthetic" / "llama-k-q8_0.gguf"


# --- the user's impl, per platform ------------------------------------------------------------------
def test_resolve():
    assert linear.resolve("auto", "cpu") == ("native" if native.available() else "xla")
    assert linear.resolve("auto", "cpu", devices=8) == "xla"  # a custom call cannot be split over a mesh
    assert linear.resolve("auto", "gpu") == linear.resolve("pallas", "gpu") == "triton"
    assert linear.resolve("auto", "tpu") == linear.resolve("pallas", "tpu") == "mosaic_tpu"
    assert linear.resolve("pallas", "cpu") == "mosaic_tpu"  # the TPU kernels in interpret mode
    assert linear.resolve("mosaic_gpu", "cpu") == "mosaic_gpu"  # interpret mode
    with pytest.raises(ArgumentError, match="impl=.mosaic_tpu. runs on tpu, not on gpu"):
        linear.resolve("mosaic_tpu", "gpu")
    with pytest.raises(NativeBuildError, match="one CPU device, not on gpu"):
        linear.resolve("native", "gpu")
    with pytest.raises(ShardingError, match="not on a mesh of 2"):
        linear.resolve("native", "cpu", devices=2)
    with pytest.raises(ArgumentError, match="impl=.cuda. must be one of auto, pallas, xla"):
        linear.resolve("cuda")


def test_load_checks_impl_before_reading(tmp_path):
    with pytest.raises(ValueError, match="impl='cuda' must be one of"):
        realm_jax.load(tmp_path / "missing.gguf", impl="cuda")


# --- each weight to a backend that supports it --------------------------------------------------------
def test_every_format_is_served_or_routed_with_a_reason():
    """For every format of the table and every backend: the backend itself, or the reference with a
    reason that names the backend."""
    for fmt in table.FORMATS:
        for name in linear.BACKENDS:
            choice = linear.choose(fmt, (64, 4096), name)
            assert (choice.backend, choice.reason is None) in ((name, True), (linear.REFERENCE, False))
            if choice.reason:
                assert choice.reason.startswith(f"{name}: ") and fmt in choice.reason


def test_dense_and_odd_weights_go_to_the_reference(rng):
    assert linear.choose("F16", (64, 256), "triton") == linear.Choice("xla", "triton: F16 is stored dense "
                                                                             "(XLA's dot multiplies it)")
    assert linear.choose("Q8_0", (64, 40 * 32 + 16), "native").backend == "xla"  # K not a multiple of 32
    x = jnp.asarray(rng.standard_normal((2, 3, 512)), jnp.bfloat16)
    dense = random_qtensor("BF16", 30, 512, rng)
    assert jnp.array_equal(realm_jax.qmatmul(x, dense, impl="pallas"), realm_jax.qmatmul(x, dense, impl="xla"))


def test_a_split_weight_needs_its_mesh(rng):
    w = linear.prepare(random_qtensor("Q4_K", 40, 512, rng), realm_jax.Policy(), impl="mosaic_tpu")
    w = dataclasses.replace(w, qt=dataclasses.replace(w.qt, axes=("model", None)))
    with pytest.raises(ShardingError, match="lacks: call it under jax.set_mesh"):
        linear.matmul(jnp.ones((1, 512), jnp.float32), w)


def test_an_interpreted_backends_first_call_is_not_compiled_again():
    """A weight prepared for a Pallas backend on a CPU imports Pallas's interpreters then, not at the first
    interpreted lowering, where one of them adds a config to JAX's tracing context and the function that
    lowered it would be traced and compiled again at its next call (a fresh process: the import is once)."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax._src import monitoring
        from realm_jax import linear
        from realm_jax.precision import Policy
        from realm_jax.quant import quantize
        compiles = []
        monitoring.register_event_duration_secs_listener(lambda event, secs, **kw: compiles.append(event)
                                                         if event == "/jax/core/compile/backend_compile_duration"
                                                         else None)
        w = linear.prepare(quantize(np.random.default_rng(0).standard_normal((128, 256)).astype(np.float32), "Q4_0"),
                           Policy.of("bf16"), impl="triton_blocks")
        x = jax.device_put(jnp.ones((2, 256), jnp.bfloat16))
        f = jax.jit(lambda x, w: linear.matmul(x, w))
        f(x, w).block_until_ready()
        first = len(compiles)
        f(x, w).block_until_ready()
        print("compiles at the second call:", len(compiles) - first)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "REALM_JAX_COMPILE_CACHE": "0"})
    assert "compiles at the second call: 0" in out.stdout, out.stdout + out.stderr[-3000:]


# --- a format registered in the table alone -----------------------------------------------------------
def _toy_tile(p, *, exact=False):
    qs = jnp.asarray(p["qs"]).astype(jnp.float32)
    d = jnp.asarray(p["d"]).astype(jnp.float32)
    return (qs.reshape(*qs.shape[:-1], -1, 32) * d[..., None]).reshape(qs.shape)


# Q8_1 as gguf-py sizes it (an activation format of llama.cpp's, never a weight type in its files): f32 d,
# f32 s = d * sum(qs), 32 int8 quants. Defined here only, as a new format's module would.
TOY = Format("Q8_1", 9, 32, 40, (Field("d", np.dtype(np.float32), 1), Field("s", np.dtype(np.float32), 1),
                                  Field("qs", np.dtype(np.int8), 32)), _toy_tile)


@pytest.fixture
def toy_format(monkeypatch):
    assert "Q8_1" not in table.FORMATS, "Q8_1 is a real format now: pick another toy"
    monkeypatch.setitem(table.FORMATS, TOY.name, TOY)
    monkeypatch.setitem(table._BY_GGML_TYPE, TOY.ggml_type, TOY)
    return TOY


def _to_toy(qt: realm_jax.QTensor) -> realm_jax.QTensor:
    """A Q8_0 weight as the toy format: the same values."""
    d, qs = np.asarray(qt.planes["d"]).astype(np.float32), np.asarray(qt.planes["qs"])
    s = (d * qs.reshape(*d.shape, 32).sum(-1)).astype(np.float32)
    return realm_jax.QTensor(TOY.name, qt.shape, {"d": d, "s": s, "qs": qs})


def test_a_format_in_the_table_only(toy_format, tmp_path, capsys):
    """Registered in the table and nowhere else: each backend serves it by its declaration or routes it
    to the reference with the reason; a model file of it loads, runs and says so in `inspect`."""
    for name in linear.BACKENDS:
        choice = linear.choose("Q8_1", (64, 256), name)
        if name == "xla":
            assert choice == linear.Choice("xla")
        else:
            assert choice.backend == "xla" and choice.reason.startswith(f"{name}: no kernel for Q8_1")
    metadata, tensors = read_gguf(SYNTHETIC)
    toy = {name: _to_toy(qt) if qt.fmt == "Q8_0" and qt.ndim == 2 else qt for name, qt in tensors.items()}
    assert sum(qt.fmt == "Q8_1" for qt in toy.values()) > 10
    for qt, was in zip(toy.values(), tensors.values()):
        np.testing.assert_array_equal(np.asarray(realm_jax.dequantize(qt)), np.asarray(realm_jax.dequantize(was)))
    path = write_gguf(tmp_path / "toy.gguf", toy, arch=metadata["general.architecture"],
                      metadata={k: v for k, v in metadata.items() if not k.startswith("general.architecture")})
    assert main(["inspect", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    served = {t["name"]: t for t in report["linear_layers"]["tensors"] if t["role"] in ("linear", "output")}
    preferred = report["linear_layers"]["preferred"]
    assert served["blk.0.attn_q.weight"]["type"] == "Q8_1" and served["blk.0.attn_q.weight"]["backend"] == "xla"
    if preferred != "xla":
        assert served["blk.0.attn_q.weight"]["reason"] == f"{preferred}: no kernel for Q8_1 " \
            f"(it has {', '.join(sorted(linear.BACKENDS[preferred].formats))})"
    assert main(["inspect", str(path)]) == 0
    assert "no kernel for Q8_1" in capsys.readouterr().out or preferred == "xla"
    ids = [1, 5, 9, 13, 2, 7]
    a, b = realm_jax.load(path, progress=False), realm_jax.load(SYNTHETIC, progress=False)
    la, lb = a.logits(ids), b.logits(ids)
    assert np.max(np.abs(la - lb)) <= 0.02 * np.max(np.abs(lb))


# --- structure ----------------------------------------------------------------------------------------
_PACKAGES = ("realm_jax", "pallas_kernels")


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for pkg in _PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(mods: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """Module -> the modules of the two packages it imports, at any depth of its code (lazy imports in a
    function count: they close a cycle as surely)."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        here = here.rpartition(".")[0]
                    base = f"{here}.{base}" if base else here
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else resolve(base) for a in node.names}
        graph[mod] = deps - {None, mod}
    return graph


def test_no_import_cycles():
    graph = _imports(_modules())
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_kernels_import_only_the_format_math():
    graph = _imports(_modules())
    for mod, deps in graph.items():
        if mod.startswith("pallas_kernels"):
            outside = {d for d in deps if d.startswith("realm_jax")
                       and not (d == "realm_jax.errors" or d.startswith("realm_jax.quant"))}
            assert not outside, f"{mod} imports {outside}"


def test_the_model_never_names_a_backend():
    """models/ and runtime.py import the linear layer's API only, and name no backend: no identifier of a
    backend's (NativeWeight, pallas_kernels, ...) and no backend name as a string."""
    mods = _modules()
    graph = _imports(mods)
    backend_modules = {m for m in mods if m.startswith(("realm_jax.linear.", "realm_jax.native", "pallas_kernels"))}
    words = ("native", "pallas", "triton", "mosaic")
    names = set(linear.BACKENDS) | {"pallas"}
    for mod in [m for m in mods if m.startswith("realm_jax.models") or m == "realm_jax.runtime"]:
        assert not graph[mod] & backend_modules, f"{mod} imports {graph[mod] & backend_modules}"
        source = mods[mod].read_text()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NAME:
                assert not any(w in tok.string.lower() for w in words), f"{mod}:{tok.start[0]} names {tok.string}"
            elif tok.type == tokenize.STRING and not tok.string.startswith(('"""', "'''")):
                value = ast.literal_eval(tok.string) if not tok.string.startswith(("f", "F")) else tok.string
                assert value not in names, f"{mod}:{tok.start[0]} names the backend {value!r}"


@pytest.mark.parametrize("impl", ["xla", "native"])
def test_a_tied_output_shares_the_tables_planes_on_the_device(impl, smollm2_path):
    """load(): an array the params hold twice goes on the device once; memory_plan counts it once."""
    if impl == "native" and not native.available():
        pytest.skip(native.reason())
    model = realm_jax.load(smollm2_path, impl=impl, progress=False)
    leaves = jax.tree.leaves(model.params)
    placed = sum(leaf.nbytes for leaf in {id(leaf): leaf for leaf in leaves}.values())
    plan = realm_jax.runtime.memory_plan(smollm2_path, model.policy, impl)
    assert plan["params_bytes"] == placed
    shared = impl == "native"  # the xla backend's output is a dense copy, not the table's planes
    assert (len({id(leaf) for leaf in leaves}) < len(leaves)) == shared
