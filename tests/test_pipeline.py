"""Pipeline parallelism: the balanced partition of the layers (unit tests), and on 8 simulated CPU devices in
a subprocess (as in test_distributed.py) logits under pipeline 2 and 4 and hybrid data x stage x model that
match the single-device run within the f32 tolerance, identical greedy generations, each stage holding only
its layers, the schedule and its bubble, and clear errors for impossible splits."""

from __future__ import annotations

import itertools
import json
import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax
from realm_jax import assets
from realm_jax.checkpoint import read_gguf
from realm_jax.distributed import make_mesh
from realm_jax.distributed.pipeline import (
    Schedule,
    bubble_fraction,
    create_model_shards,
    schedule,
    stage_layers,
)
from realm_jax.errors import ShardingError
from realm_jax.models import config_from_gguf, params_from_tensors
from realm_jax.models.transformer import LayerRun, stack_layers
from realm_jax.reference import reference_dir
import background

SYNTHETIC = reference_dir().parent / "synthetic" / "llama-k-q4_k_m.gguf"
F32_TOL = 1e-5 * 8  # of the logits' scale: f32 reassociation across shards and microbatches

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, realm_jax
    from realm_jax.distributed import make_mesh, shard_params
    from realm_jax.distributed.pipeline import create_model_shards, stage_layers
    from realm_jax.checkpoint import read_gguf
    from realm_jax.models.transformer import LayerRun, stack_layers
    from realm_jax.runtime import _prefill, build_params

    def mesh(data=1, stage=1, model=1):
        return make_mesh(data=data, stage=stage, model=model, devices=jax.devices()[: data * stage * model])

    def compare(m, ids, want, greedy):
        return {"max_diff": float(np.abs(m.logits(ids) - want).max()), "scale": float(np.abs(want).max()),
                "greedy_same": m.generate_ids([ids], max_new_tokens=12) == greedy}

    out = {}
    for path in sys.argv[1:]:
        ref = realm_jax.load(path, policy="f32", progress=False)
        ids = ref.tokenizer.encode("The history of computing is a story of people trying to make machines")
        want, greedy = ref.logits(ids), ref.generate_ids([ids], max_new_tokens=12)
        rows = {}
        for data, stage, model in ((1, 2, 1), (1, 4, 1), (2, 2, 2)):
            m = realm_jax.load(path, policy="f32", mesh=mesh(data, stage, model), progress=False)
            row = compare(m, ids, want, greedy)
            runs = m.params["layers"]
            wq = runs[0].params["wq"].qt.planes["w"]
            row["layer_ids"] = [run.layer_ids for run in runs]
            row["wq_global_slots"], row["wq_shard_slots"] = wq.shape[0], wq.addressable_shards[0].data.shape[0]
            row["output_shard_rows"] = m.params["output"].qt.planes["w"].addressable_shards[0].data.shape[0]
            cache = m._new_cache(m.batch_multiple, 64)
            row["cache_global_slots"] = cache.k.shape[0]
            row["cache_shard_slots"] = cache.k.addressable_shards[0].data.shape[0]
            pre, dec = m.pipeline.schedule(m.batch_multiple, 64), m.pipeline.schedule(m.batch_multiple, 1)
            row["prefill"] = [pre.microbatches, pre.ticks, pre.bubble]
            row["decode"] = [dec.microbatches, dec.ticks, dec.bubble]
            hlo = _prefill.lower(m.params, np.zeros((m.batch_multiple, 64), np.int32),
                                 np.ones((m.batch_multiple,), np.int32), cache, config=m.config, policy=m.policy,
                                 all_logits=False, pipeline=m.pipeline).as_text()
            row["collective_permutes"] = hlo.count("stablehlo.collective_permute")
            rows[f"{data}x{stage}x{model}"] = row
        out[path] = rows

    # a batch of 3 prompts (padded to the data axis) through data x stage x model meshes
    path = sys.argv[1]
    prompts = ["The history of computing", "Once upon a time, in a small village", "def fibonacci(n):"]
    ref = realm_jax.load(path, policy="f32", progress=False)
    texts = ref.generate(prompts, max_new_tokens=8)
    batch = {}
    for data, stage, model in ((2, 2, 2), (2, 4, 1)):
        m = realm_jax.load(path, policy="f32", mesh=mesh(data, stage, model), progress=False)
        batch[f"{data}x{stage}x{model}"] = m.generate(prompts, max_new_tokens=8) == texts
    out["batch"] = batch

    # two layer runs that straddle the stage boundary: padded slots on both stages
    ids = ref.tokenizer.encode("Once upon a time, in a small village")
    want, greedy = ref.logits(ids), ref.generate_ids([ids], max_new_tokens=12)
    m = realm_jax.load(path, policy="f32", mesh=mesh(stage=2), progress=False)
    params = build_params(m.config, read_gguf(path)[1], path, m.policy, fuse=False)
    (run,) = params["layers"]
    params["layers"] = [LayerRun(0, 1, jax.tree.map(lambda a: a[:1], run.params)),
                        LayerRun(1, 3, jax.tree.map(lambda a: a[1:], run.params))]
    params["layers"] = stage_layers(params["layers"], create_model_shards(params, 2))
    m.params = shard_params(params, m.config, m.mesh)
    out["two_runs"] = compare(m, ids, want, greedy) | {"layer_ids": [r.layer_ids for r in m.params["layers"]]}

    errors = {}
    try:
        realm_jax.load(path, policy="f32", mesh=mesh(stage=8), progress=False)
    except realm_jax.RealmError as e:
        errors["stage8"] = type(e).__name__ + ": " + str(e)
    try:
        unlaid = build_params(m.config, read_gguf(path)[1], path, m.policy, fuse=False)
        shard_params(unlaid, m.config, mesh(stage=2))
    except realm_jax.RealmError as e:
        errors["unlaid"] = type(e).__name__ + ": " + str(e)
    out["errors"] = errors
    print(json.dumps(out))
""")


@background.job(__file__, "results")  # runs in the background while the in-process tests run
def _job():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return [sys.executable, "-c", SCRIPT, str(SYNTHETIC), str(assets.model_path("gemma3-270m-q4_k_m"))], env, 900


@pytest.fixture(scope="module")
def results(gemma3_path):
    proc = background.result(__file__, "results")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), str(SYNTHETIC), str(gemma3_path)


# --- on 8 devices ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mesh", ["1x2x1", "1x4x1", "2x2x2"])  # data x stage x model
@pytest.mark.parametrize("model", [1, 2])
def test_pipeline_matches_single_device(results, model, mesh):
    row = results[0][results[model]][mesh]
    assert row["max_diff"] <= F32_TOL * row["scale"], row
    assert row["greedy_same"]


def test_each_stage_holds_only_its_layers(results):
    rows = results[0][results[2]]  # gemma3: 18 layers
    assert rows["1x2x1"]["layer_ids"] == [[list(range(0, 9)), list(range(9, 18))]]
    # 4 stages: 4, 4, 5, 5 layers (all f32 layers weigh the same), each stage padded to 5 slots
    assert rows["1x4x1"]["layer_ids"] == [[[0, 1, 2, 3, -1], [4, 5, 6, 7, -1], [8, 9, 10, 11, 12],
                                           [13, 14, 15, 16, 17]]]
    for mesh, stages in (("1x2x1", 2), ("1x4x1", 4), ("2x2x2", 2)):
        row = rows[mesh]
        assert row["wq_shard_slots"] * stages == row["wq_global_slots"], row
        assert row["cache_shard_slots"] * stages == row["cache_global_slots"], row
        assert row["output_shard_rows"] * stages == 262144  # the stages share the output projection
        assert row["collective_permutes"] > 0  # microbatches move between stages by ppermute


def test_schedule_and_bubble_reported(results):
    rows = results[0][results[1]]
    # prefill of 64 tokens: 4 chunks of 16; decode of one row: a sequential pass through the stages
    assert rows["1x2x1"]["prefill"] == [4, 5, pytest.approx(1 / 5)]
    assert rows["1x4x1"]["prefill"] == [4, 7, pytest.approx(3 / 7)]
    assert rows["1x2x1"]["decode"] == [1, 2, pytest.approx(1 / 2)]
    assert rows["1x4x1"]["decode"] == [1, 4, pytest.approx(3 / 4)]


@pytest.mark.parametrize("mesh", ["2x2x2", "2x4x1"])
def test_batches_through_the_pipeline(results, mesh):
    assert results[0]["batch"][mesh]


def test_layer_runs_across_stage_boundaries(results):
    row = results[0]["two_runs"]
    assert row["layer_ids"] == [[[0], [-1]], [[1, -1], [2, 3]]]
    assert row["max_diff"] <= F32_TOL * row["scale"], row
    assert row["greedy_same"]


def test_impossible_pipelines_are_refused(results):
    errors = results[0]["errors"]
    assert errors["stage8"].startswith("ShardingError") and "4 layers cannot be split over 8 pipeline stages" in \
        errors["stage8"] and "llama-k-q4_k_m.gguf" in errors["stage8"]
    assert errors["unlaid"].startswith("ShardingError") and "stage_layers" in errors["unlaid"]


# --- partition, layout and schedule (one device) --------------------------------------------------
def _brute_force_max(weights, n):
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(weights)), n - 1):
        bounds = list(zip((0, *cuts), (*cuts, len(weights))))
        best = min(best, max(sum(weights[a:b]) for a, b in bounds))
    return best


@pytest.mark.parametrize("n_layers,n_stages", [(4, 1), (4, 4), (18, 4), (30, 8), (7, 3)])
def test_shards_by_layers_are_balanced(n_layers, n_stages):
    shards = create_model_shards([1000] * n_layers, n_stages, by="layers")
    assert shards.n_stages == n_stages and shards.bounds[0][0] == 0 and shards.bounds[-1][1] == n_layers
    assert all(a < b and b == c for (a, b), (c, _) in zip(shards.bounds, shards.bounds[1:] + ((n_layers, 0),)))
    assert max(shards.layers) - min(shards.layers) <= 1 and shards.weights == shards.layers


def test_shards_by_bytes_are_optimal(rng):
    for _ in range(20):
        weights = [int(w) for w in rng.integers(1, 100, size=int(rng.integers(2, 10)))]
        n = int(rng.integers(1, len(weights) + 1))
        shards = create_model_shards(weights, n, by="bytes")
        assert max(shards.weights) == _brute_force_max(weights, n), (weights, shards)
        assert sum(shards.weights) == sum(weights) and all(a < b for a, b in shards.bounds)
    # one heavy layer: by bytes isolates it, by layers does not
    weights = [4, 4, 1, 1, 1, 1]
    assert create_model_shards(weights, 2, by="bytes").bounds == ((0, 1), (1, 6))
    assert create_model_shards(weights, 2, by="layers").bounds == ((0, 3), (3, 6))


def test_shards_by_bytes_of_a_quantized_file():
    """The synthetic file's last two layers are heavier (Q6_K where Q4_K_M spends more bits)."""
    metadata, tensors = read_gguf(SYNTHETIC)
    config = config_from_gguf(metadata, tensors, str(SYNTHETIC))
    params = params_from_tensors(config, tensors, str(SYNTHETIC))  # weights as stored
    shards = create_model_shards(params, 3, by="bytes")
    assert shards.bounds == ((0, 2), (2, 3), (3, 4)) and shards.weights[1] == shards.weights[2] > shards.weights[0] / 2
    assert create_model_shards(config, 3).bounds == ((0, 1), (1, 2), (2, 4))
    stacked = {"layers": stack_layers(params["layers"])}  # runs of one format each
    assert len(stacked["layers"]) == 2 and create_model_shards(stacked, 3, by="bytes") == shards


def test_impossible_splits_are_clear_errors():
    with pytest.raises(ShardingError, match="4 layers cannot be split over 5 pipeline stages"):
        create_model_shards([1, 1, 1, 1], 5)
    with pytest.raises(ShardingError, match="n_stages=0"):
        create_model_shards([1, 1], 0)
    with pytest.raises(ShardingError, match="by='flops'"):
        create_model_shards([1, 1], 2, by="flops")
    metadata, tensors = read_gguf(SYNTHETIC)
    with pytest.raises(ShardingError, match="needs the params"):
        create_model_shards(config_from_gguf(metadata, tensors, "m"), 2, by="bytes")
    with pytest.raises(ShardingError, match="split_by='flops'"):
        realm_jax.load(SYNTHETIC, mesh=make_mesh(devices=jax.devices()[:1]), split_by="flops", progress=False)


def test_stage_layout_pads_and_keeps_order():
    leaf = jnp.arange(5.0)[:, None] * jnp.ones((5, 3))  # layer i's leaf is all i
    runs = [LayerRun(0, 2, {"w": leaf[:2]}), LayerRun(2, 3, {"w": leaf[2:]})]
    staged = stage_layers(runs, create_model_shards([1] * 5, 2))  # stages hold layers [0, 2), [2, 5)
    assert [r.layer_ids for r in staged] == [((0, 1), (-1, -1)), ((-1, -1, -1), (2, 3, 4))]
    np.testing.assert_array_equal(staged[0].params["w"][:, 0], [0, 1, 0, 0])
    np.testing.assert_array_equal(staged[1].params["w"][:, 0], [0, 0, 0, 2, 3, 4])
    with pytest.raises(ShardingError, match="cover 4 layers"):
        stage_layers(runs, create_model_shards([1] * 4, 2))


def test_bubble_fraction():
    assert bubble_fraction(1, 1) == 0.0 and bubble_fraction(4, 1) == 0.75
    assert bubble_fraction(4, 16) == pytest.approx(3 / 19)
    # unbalanced stages idle while the heaviest finishes its tick
    assert bubble_fraction(2, 4, [1.0, 1.0]) == pytest.approx(1 / 5)
    assert bubble_fraction(2, 4, [1.0, 3.0]) == pytest.approx(1 - 4 * 4 / (5 * 2 * 3))
    with pytest.raises(ShardingError):
        bubble_fraction(2, 0)


@pytest.mark.parametrize("stages,batch,tokens,want", [
    (1, 8, 64, (1, 1)),  # no pipeline: one pass
    (2, 1, 1, (1, 1)),  # decode of one row: a sequential pass
    (2, 8, 1, (1, 1)),  # 8 rows: too thin to split
    (2, 64, 1, (4, 1)),  # 64 rows: 4 microbatches of 16
    (2, 1, 64, (1, 4)),  # prefill of one prompt: 4 chunks of 16 tokens
    (4, 2, 64, (2, 4)),  # rows first, then chunks, up to 4 per stage
    (4, 4, 512, (4, 4)),
])  # fmt: skip
def test_schedule_heuristic(stages, batch, tokens, want):
    sched = schedule(stages, batch, tokens)
    assert (sched.batch_splits, sched.token_splits) == want
    assert sched == Schedule(stages, *want) and sched.ticks == sched.microbatches + stages - 1
