"""benchmarks/distributed.py on a small subset of strategies (tensor 2, pipeline 2, and tensor 8, which the
synthetic llama refuses), run as a command in a subprocess that gives itself 8 simulated CPU devices: the
JSON it writes, the table it prints, and under tensor parallelism decode and prefill bytes read from the
compiled HLO equal to the minimum. The minimum formulas themselves are checked in process."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile

import pytest

import background

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "distributed.py"
LAYERS, WIDTH = 4, 256  # the synthetic llama
F32 = 4


def _bench():
    spec = importlib.util.spec_from_file_location("distributed_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@background.job(__file__, "run")  # runs in the background while the in-process tests run
def _job():
    out = pathlib.Path(tempfile.mkdtemp(prefix="realm-bench-")) / "distributed.json"
    # No device count in XLA_FLAGS: the script must set up its 8 devices itself.
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    return [sys.executable, str(SCRIPT), "--strategies", "tensor2", "pipeline2", "tensor8", "--runs", "1", "--json",
            str(out)], env, 300


@pytest.fixture(scope="module")
def run():
    proc = background.result(__file__, "run")
    out = pathlib.Path(proc.args[-1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    shutil.rmtree(out.parent, ignore_errors=True)
    return result["meta"], {row["name"]: row for row in result["rows"]}, proc.stdout


def test_json_fields(run):
    meta, rows, _ = run
    assert meta["devices"] == 8 and meta["platform"] == "cpu"
    assert meta["config"]["layers"] == LAYERS and meta["config"]["width"] == WIDTH
    assert meta["prompt_tokens"] == 128 and meta["decode_tokens"] == 32
    assert "carries over" in meta["note"]  # simulated devices: tokens/s are not a cluster's
    assert list(rows) == ["tensor2", "pipeline2", "tensor8"]
    for name in ("tensor2", "pipeline2"):
        row = rows[name]
        assert row["prefill_tps"] > 0 and row["decode_tps"] > 0 and row["warmup_s"] > 0, row
        assert set(row["bytes"]) == {"decode_step", "decode_per_call", "prefill"}
        for section in row["bytes"].values():
            for kind, b in section.items():
                assert set(b) == {"measured", "minimum"} and b["measured"] >= 0, (kind, b)
    assert rows["tensor2"]["mesh"] == {"data": 1, "stage": 1, "model": 2} and rows["tensor2"]["strategy"] == "tensor"
    assert rows["pipeline2"]["schedule"]["decode"] == {"microbatches": 1, "ticks": 2, "bubble": 0.5}


def test_tensor_parallel_bytes_equal_the_minimum(run):
    b = run[1]["tensor2"]["bytes"]
    step = 2 * LAYERS * 1 * WIDTH * F32  # two all-reduces per layer of batch 1 x width, f32
    assert b["decode_step"] == {"all-reduce": {"measured": step, "minimum": step}}
    assert b["decode_per_call"] == {}
    # the prefill's last layer runs its attention output and FFN on the last token alone
    prefill = 2 * ((LAYERS - 1) * 128 + 1) * WIDTH * F32
    assert b["prefill"] == {"all-reduce": {"measured": prefill, "minimum": prefill}}


def test_pipeline_moves_at_least_the_minimum(run):
    b = run[1]["pipeline2"]["bytes"]
    for section, tokens in (("decode_step", 1), ("prefill", 128)):
        permute = b[section]["collective-permute"]
        assert permute["minimum"] == tokens * WIDTH * F32
        assert permute["measured"] >= permute["minimum"]


def test_refused_mesh_is_reported(run):
    _, rows, stdout = run
    assert rows["tensor8"]["error"].startswith("ShardingError") and "4 query heads" in rows["tensor8"]["error"]
    assert "| tensor8 | 1x1x8 | 1 | refused: ShardingError" in stdout
    assert "| tensor2 | all-reduce | 8,192 | 8,192 | 1 (= min) |" in stdout


def test_strategies_and_minimum_formulas():
    bench = _bench()
    assert bench.parse_strategy("none") == {"data": 1, "stage": 1, "model": 1}
    assert bench.parse_strategy("pipeline4") == {"data": 1, "stage": 4, "model": 1}
    assert bench.parse_strategy("hybrid2x2x2") == {"data": 2, "stage": 2, "model": 2}
    with pytest.raises(ValueError, match="hybridDxSxM"):
        bench.parse_strategy("tensor")
    kw = dict(layers=9, width=640, rows=1, tokens=128)
    assert bench.minimum_bytes(bench.parse_strategy("data8"), **kw) == {}
    # without a pipeline the prefill's last layer carries one token per row
    assert bench.minimum_bytes(bench.parse_strategy("tensor4"), **kw) == {"all-reduce": 2 * (8 * 128 + 1) * 640 * F32}
    assert bench.minimum_bytes(bench.parse_strategy("tensor4"), **(kw | {"tokens": 1})) == {"all-reduce": 2 * 9 * 640 * F32}
    assert bench.minimum_bytes(bench.parse_strategy("hybrid2x2x2"), **kw) == {
        "all-reduce": 2 * 9 * 128 * 640 * F32, "collective-permute": 128 * 640 * F32}
