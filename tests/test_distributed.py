"""Tensor, data and hybrid parallelism on 8 simulated CPU devices, in a subprocess (the device count is fixed
when JAX starts, so it cannot change inside the pytest process): logits match the single-device run within
the f32 tolerance and greedy generations are identical; KV heads fewer than the degree are replicated; query
heads fewer than the degree are refused with a clear error; impossible meshes are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from realm_jax import assets
from realm_jax.distributed import MeshShape, parse_mesh
from realm_jax.reference import reference_dir
import background

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, realm_jax
    from realm_jax.distributed import make_mesh
    from realm_jax.distributed.hlo import collective_bytes
    out = {}
    for path in sys.argv[1:]:
        ref = realm_jax.load(path, policy="f32", progress=False, impl="xla")  # a mesh's path on CPU
        ids = ref.tokenizer.encode("The history of computing is a story of people trying to make machines")
        want, greedy = ref.logits(ids), ref.generate_ids([ids], max_new_tokens=12)
        rows = {}
        for tp in (2, 4, 8):
            try:
                m = realm_jax.load(path, policy="f32", mesh=make_mesh(model=tp, devices=jax.devices()[:tp]),
                                   progress=False)
            except realm_jax.RealmError as e:
                rows[tp] = {"error": type(e).__name__ + ": " + str(e)}
                continue
            wq = m.params["layers"][0].params["wq"].qt.planes["w"]
            rows[tp] = {"max_diff": float(np.abs(m.logits(ids) - want).max()), "scale": float(np.abs(want).max()),
                        "greedy_same": m.generate_ids([ids], max_new_tokens=12) == greedy,
                        "wq_shard_rows": int(wq.addressable_shards[0].data.shape[1]),
                        "layers": ref.config.n_layers, "width": ref.config.d_model}
            if tp == 2:
                rows[tp]["decode_bytes"] = collective_bytes(m.compiled_text("decode"), unknown_trips=1)
        out[path] = rows
    path = sys.argv[1]
    prompts = ["The history of computing", "Once upon a time, in a small village", "def fibonacci(n):"]
    ref = realm_jax.load(path, policy="f32", progress=False, impl="xla")  # a mesh's path on CPU
    want = ref.generate(prompts, max_new_tokens=8)
    ids = ref.tokenizer.encode(prompts[1])
    logits = ref.logits(ids)
    batch = {}
    for data, model in ((2, 1), (4, 1), (8, 1), (2, 2), (4, 2)):
        m = realm_jax.load(path, policy="f32", progress=False,
                           mesh=make_mesh(data=data, model=model, devices=jax.devices()[: data * model]))
        batch[f"{data}x{model}"] = {"same_text": m.generate(prompts, max_new_tokens=8) == want,
                                    "max_diff": float(np.abs(m.logits(ids) - logits).max()),
                                    "scale": float(np.abs(logits).max())}
    out["batch"] = batch
    print(json.dumps(out))
""")


# gemma3 over the data axis alone, in a process of its own (eight replicas). bf16 weights keep them within a
# few GB; each row of a batch runs on one device, so the data axis changes nothing in the math whatever the
# dtype.
DATA_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, realm_jax
    from realm_jax.distributed import make_mesh
    prompts = ["The history of computing", "Once upon a time, in a small village", "def fibonacci(n):"]
    ref = realm_jax.load(sys.argv[1], policy="bf16", progress=False, impl="xla")  # a mesh's path on CPU
    want = ref.generate(prompts, max_new_tokens=8)
    ids = ref.tokenizer.encode(prompts[1])
    logits = ref.logits(ids)
    out = {}
    for data in (2, 4, 8):
        m = realm_jax.load(sys.argv[1], policy="bf16", progress=False,
                           mesh=make_mesh(data=data, devices=jax.devices()[:data]))
        out[f"gemma3-{data}x1"] = {"same_text": m.generate(prompts, max_new_tokens=8) == want,
                                   "max_diff": float(np.abs(m.logits(ids) - logits).max()),
                                   "scale": float(np.abs(logits).max())}
        del m
    print(json.dumps(out))
""")


SYNTHETIC = str(reference_dir().parent / "synthetic" / "llama-k-q4_k_m.gguf")


def _8_devices(script: str, *args: str) -> tuple[list[str], dict[str, str], float]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return [sys.executable, "-c", script, *args], env, 900


def _output(fixture: str) -> dict:
    proc = background.result(__file__, fixture)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Both run in the background while the in-process tests run (tests/background.py).
@background.job(__file__, "gemma3_data_results")
def _gemma3_data_job():
    return _8_devices(DATA_SCRIPT, str(assets.model_path("gemma3-270m-q4_k_m")))


@background.job(__file__, "tp_results")
def _tp_job():
    return _8_devices(SCRIPT, SYNTHETIC, str(assets.model_path("gemma3-270m-q4_k_m")))


@pytest.fixture(scope="module")
def gemma3_data_results(gemma3_path):
    return _output("gemma3_data_results")


@pytest.fixture(scope="module")
def tp_results(gemma3_path):
    return _output("tp_results"), SYNTHETIC, str(gemma3_path)


@pytest.mark.parametrize("tp", ["2", "4"])
@pytest.mark.parametrize("model", [1, 2])
def test_tensor_parallel_matches_single_device(tp_results, model, tp):
    rows = tp_results[0][tp_results[model]]
    row = rows[tp]
    assert "error" not in row, row
    assert row["max_diff"] <= 1e-5 * row["scale"] * 8, row  # f32 reassociation across shards
    assert row["greedy_same"]


@pytest.mark.parametrize("model", [1, 2])
def test_tensor_parallel_decode_moves_the_minimum(tp_results, model):
    """One decode step at model=2 moves two all-reduces of batch 1 x width (f32) per layer and nothing else:
    no weight is gathered, and the replicated output head needs no logits gather."""
    row = tp_results[0][tp_results[model]]["2"]
    assert row["decode_bytes"] == {"all-reduce": row["layers"] * 2 * row["width"] * 4}, row


def test_weights_are_split_not_replicated(tp_results):
    rows = tp_results[0][tp_results[1]]  # synthetic: 4 heads x 64 = 256 rows of wq
    assert rows["2"]["wq_shard_rows"] == 128 and rows["4"]["wq_shard_rows"] == 64


def test_more_shards_than_query_heads_is_refused(tp_results):
    for model in (1, 2):  # both have 4 query heads
        error = tp_results[0][tp_results[model]]["8"]["error"]
        assert error.startswith("ShardingError") and "4 query heads" in error and "model axis of 8" in error


@pytest.mark.parametrize("mesh", ["2x1", "4x1", "8x1", "2x2", "4x2", "gemma3-2x1", "gemma3-4x1", "gemma3-8x1"])
def test_data_and_hybrid_parallel_batches_match(tp_results, gemma3_data_results, mesh):
    """data x model meshes (the synthetic model; gemma3 over data alone): a batch of 3 prompts (padded to
    the data axis) gives the single-device texts."""
    row = (gemma3_data_results if mesh.startswith("gemma3") else tp_results[0]["batch"])[mesh]
    assert row["same_text"], row
    assert row["max_diff"] <= 1e-5 * row["scale"] * 8, row


def test_impossible_meshes():
    import jax

    from realm_jax.distributed import make_mesh
    from realm_jax.errors import MeshError

    with pytest.raises(MeshError, match="does not match the 1 devices"):
        make_mesh(model=2, devices=jax.devices()[:1])
    with pytest.raises(MeshError, match="model=0"):
        make_mesh(model=0)


COLLECTIVES = textwrap.dedent("""
    import json
    import numpy as np
    from realm_jax.distributed import all_reduce, broadcast, gather, make_mesh, scatter
    mesh = make_mesh(data=2, model=4)
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    s = scatter(np.arange(8, dtype=np.float32), mesh, "model")
    print(json.dumps({
        "sum": np.asarray(all_reduce(x, mesh, "model")).tolist(),
        "max": np.asarray(all_reduce(x, mesh, "model", op="max")).tolist(),
        "mean_data": np.asarray(all_reduce(np.array([[1.0], [3.0]], np.float32), mesh, "data", op="mean")).tolist(),
        "broadcast": np.asarray(broadcast(x, mesh, "model", root=2)).tolist(),
        "gather": np.asarray(gather(x, mesh, "model")).tolist(),
        "scatter_shards": sorted({tuple(sh.data.tolist()) for sh in s.addressable_shards}),
    }))
""")


def test_collectives_over_a_named_axis():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", COLLECTIVES], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    x = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert got["sum"] == [18, 22, 26] and got["max"] == [9, 10, 11] and got["mean_data"] == [2.0]
    assert got["broadcast"] == [x[2]] * 4 and got["gather"] == x
    assert got["scatter_shards"] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_collective_argument_errors():
    import jax
    import numpy as np

    from realm_jax.distributed import all_reduce, broadcast, make_mesh, scatter
    from realm_jax.errors import CollectiveError, MeshError, ShapeMismatchError

    mesh = make_mesh(model=1, devices=jax.devices()[:1])
    with pytest.raises(CollectiveError, match="op='prod'"):
        all_reduce(np.ones((1, 2)), mesh, "model", op="prod")
    with pytest.raises(MeshError, match="'tensor' is not an axis"):
        all_reduce(np.ones((1, 2)), mesh, "tensor")
    with pytest.raises(ShapeMismatchError, match="leading dim of 1"):
        all_reduce(np.ones((3, 2)), mesh, "model")
    with pytest.raises(MeshError, match="root=1"):
        broadcast(np.ones((1, 2)), mesh, "model", root=1)
    assert np.asarray(scatter(np.ones((2, 2)), mesh, "model")).shape == (2, 2)


@pytest.mark.parametrize(("call", "match"), [
    (lambda mm, d0: mm(bogus=2), r"^make_mesh: 'bogus' is not a mesh axis; the axes are data, stage, model$"),
    (lambda mm, d0: mm(devices=5), r"^devices must be a list of jax devices .*got int$"),
    (lambda mm, d0: mm(devices="cpu"), r"got str$"),
    (lambda mm, d0: mm(devices={d0}), r"got set$"),  # a set has no order to place the devices in
    (lambda mm, d0: mm(devices=[None]), r"^devices\[0\]=None is a NoneType, not a jax device$"),
    (lambda mm, d0: mm(devices=np.array([[0]])), r"^devices\.flat\[0\]=0 is a int, not a jax device$"),
    (lambda mm, d0: mm("x"), r"^make_mesh: shape='x' must be a MeshShape"),
    (lambda mm, d0: mm((2, 2)), r"^make_mesh: shape=\(2, 2\) must be a MeshShape"),
    (lambda mm, d0: mm(MeshShape(), model=1), r"^make_mesh: give shape=.* or axis sizes \{'model': 1\}, not both$"),
    (lambda mm, d0: mm(devices=[d0, d0], model=2),
     r"^devices: device .* is given twice \(devices\[0\] and \[1\]\); a mesh holds each device once$"),
    (lambda mm, d0: parse_mesh(5), r"^mesh spec=5 must be a str such as 'model=2,data=2', got int$"),
])
def test_make_mesh_argument_errors(call, match):
    import jax

    from realm_jax.distributed import make_mesh
    from realm_jax.errors import MeshError

    with pytest.raises(MeshError, match=match):
        call(make_mesh, jax.devices()[0])


@pytest.mark.parametrize("mesh", ["model=2", {"model": 2}, 5, "raw twice", "raw grid twice"])
def test_load_refuses_a_mesh_that_is_not_one_of_distinct_devices(mesh):
    """Before the file is read: a device twice in a raw jax Mesh otherwise dies in JAX's dispatch (a bare
    AssertionError), and anything but a Mesh on a missing attribute."""
    import re

    import jax
    from jax.sharding import Mesh

    import realm_jax
    from realm_jax.errors import MeshError

    d0 = jax.devices()[0]
    if mesh == "raw twice":
        mesh = Mesh(np.array([d0, d0]), ("model",))
        match = rf"^mesh\.devices: device {re.escape(repr(d0))} is given twice \(mesh\.devices\[0\] and \[1\]\)"
    elif mesh == "raw grid twice":
        mesh, match = Mesh(np.array([[d0, d0]]), ("data", "model")), r"^mesh\.devices\.flat: device .* is given twice"
    else:
        match = rf"^mesh=.* must be a jax\.sharding\.Mesh, e\.g\. .*got {type(mesh).__name__}$"
    with pytest.raises(MeshError, match=match):
        realm_jax.load(SYNTHETIC, mesh=mesh, progress=False)
