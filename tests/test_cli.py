"""The realm-jax command: inspect, its JSON, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from realm_jax.cli import main


def test_inspect_default_model(capsys, gemma3_path):
    assert main(["inspect"]) == 0
    out = capsys.readouterr().out
    assert "architecture  gemma3" in out and "MOSTLY_Q4_K_M" in out
    for fmt in ("Q8_0", "Q5_0", "Q4_K", "Q6_K", "F32"):
        assert f"  {fmt} " in out


def test_inspect_json(capsys, smollm2_path):
    assert main(["inspect", "--json", str(smollm2_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"] == "llama"
    assert report["model"]["block_count"] == 30
    by_type = {r["type"]: r for r in report["tensor_types"]}
    assert set(by_type) == {"Q4_1", "Q8_0", "F32"}
    assert by_type["Q4_1"]["bits_per_weight"] == 5.0 and by_type["Q8_0"]["bits_per_weight"] == 8.5
    assert report["totals"]["tensors"] == sum(r["count"] for r in report["tensor_types"]) == 272
    assert report["metadata"]["tokenizer.ggml.tokens"] == {"array": "str", "length": 49152}


@pytest.mark.parametrize("content, message", [(None, "no such file"), (b"", "empty"),
                                               (b"not a gguf file at all", "GGUF")])
def test_inspect_bad_file_exits_nonzero_with_one_line(tmp_path, content, message):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "realm_jax.cli", "inspect", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("realm-jax: error:") and message in lines[0]
    assert "model.gguf" in lines[0]


def test_usage_error_exits_nonzero():
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
