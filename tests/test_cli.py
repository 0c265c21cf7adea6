"""The realm-jax command: inspect, its JSON, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import os
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


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "realm_jax.cli", *args], capture_output=True, text=True,
                          timeout=600, input=stdin)


def test_generate_streams_a_continuation(smollm2_path):
    proc = _cli("generate", "The capital of France is", "--model", str(smollm2_path), "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The capital of France is Paris")


def test_ctrl_c_is_one_line_and_status_130():
    """SIGINT while generating (after the first text is out): `realm-jax: interrupted`, no traceback, 130."""
    import signal

    from realm_jax.reference import reference_dir

    model = str(reference_dir().parent / "synthetic" / "llama-k-q4_k_m.gguf")
    proc = subprocess.Popen([sys.executable, "-m", "realm_jax.cli", "generate", "Once upon a time", "--model", model,
                             "--max-new-tokens", "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.read(4)  # generating
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.decode() == "realm-jax: interrupted\n", err.decode()[-2000:]


def test_generate_with_the_fused_kernels(capsys):
    """--impl pallas keeps the weights quantized and runs the kernels (interpret mode on CPU): same text."""
    from realm_jax.reference import reference_dir

    model = str(reference_dir().parent / "synthetic" / "llama-k-q4_k_m.gguf")
    texts = []
    for impl in ("pallas", "xla"):  # in this process: a subprocess each cost ~9 s more
        assert main(["generate", "Once upon a time", "--model", model, "--max-new-tokens", "4", "--precision", "f32",
                     "--impl", impl]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0]) > len("Once upon a time")


def test_mosaic_gpu_interpreter_without_the_threads_it_needs_is_one_line(capsys):
    """--impl mosaic_gpu on a CPU whose XLA pool cannot run the interpreter's warpgroups (two cores, one
    device; `pallas_kernels.mosaic_gpu._interpreter_fits`): one error line naming the flag that gives it
    them, status 2, at the first prompt past the decode rows; where the pool can, the text."""
    from pallas_kernels import mosaic_gpu
    from realm_jax.reference import reference_dir

    model = str(reference_dir().parent / "synthetic" / "llama-k-q4_k_m.gguf")
    prompt = " ".join(["Once upon a time"] * 6)  # more tokens than the decode kernels' rows: the GEMM
    code = main(["generate", prompt, "--model", model, "--max-new-tokens", "1", "--precision", "bf16",
                 "--impl", "mosaic_gpu"])
    out, err = capsys.readouterr()
    if mosaic_gpu._interpreter_fits():
        assert code == 0 and out.startswith(prompt), err[-2000:]
    else:
        assert code == 2 and err.count("\n") == 1, err[-2000:]
        assert err.startswith("realm-jax: error: gemm_lanes: ")
        assert "XLA_FLAGS=--xla_force_host_platform_device_count=3" in err


def test_a_mesh_of_one_device_runs_as_one_device(capsys):
    """--strategy none (and a 1x1x1 --mesh) split nothing: the model runs on the one device, the native
    kernels included, and writes what it writes without them."""
    from realm_jax.reference import reference_dir

    model = str(reference_dir().parent / "synthetic" / "llama-s-q2_k.gguf")
    texts = []
    for extra in ((), ("--strategy", "none"), ("--mesh", "data=1,stage=1,model=1")):  # in this process (one device)
        assert main(["generate", "Once upon a time", "--model", model, "--max-new-tokens", "4", *extra]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] == texts[2] and len(texts[0]) > len("Once upon a time")


def test_bench_reports_tokens_per_second():
    from realm_jax import native
    from realm_jax.reference import reference_dir

    model = str(reference_dir().parent / "synthetic" / "llama-k-q4_k_m.gguf")
    proc = _cli("bench", "--model", model, "--prompt-tokens", "32", "--decode-tokens", "8", "--runs", "1", "--json",
                "--memory")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["prefill_tps"] > 0 and report["decode_tps"] > 0 and report["impl"] == ("native" if native.available() else "xla")
    assert (report["batch"], report["prompt_tokens"], report["decode_tokens"], report["mesh"]) == (1, 32, 8, None)
    # --memory: the peak and its parts; the KV cache sized to the 64 + 9 tokens asked for (one bucket of 256),
    # not the model's context.
    m = report["memory_mib"]
    parts = ("jax_floor", "weights", "tokenizer_metadata_and_load", "kv_cache", "compiled_programs_and_buffers")
    assert m["kv_cache_tokens"] == 256 and m["weights"] > 0
    assert abs(sum(m[p] for p in parts) - m["peak_rss"]) < 1e-6 and m["peak_rss"] >= m["rss_now"] > m["jax_floor"]
    bad = _cli("bench", "--model", model, "--decode-tokens", "0")
    assert bad.returncode == 2 and bad.stderr.strip() == "realm-jax: error: decode_tokens=0 must be an int >= 1"
    long = _cli("bench", "--model", model, "--prompt-tokens", "24", "--decode-tokens", "1000")
    assert long.returncode == 2 and long.stderr.strip() == (
        f"realm-jax: error: {model}: --prompt-tokens 24, the prefill's token and --decode-tokens 1000 (1025 tokens) "
        "exceed the model's context of 1024 tokens")


def test_a_cache_that_cannot_be_made_is_one_error_line(tmp_path):
    """$REALM_JAX_CACHE on a file: the model cache and the native build's folder cannot be made there."""
    from realm_jax.reference import reference_dir

    afile = tmp_path / "afile"
    afile.write_text("x")
    env = {**os.environ, "REALM_JAX_CACHE": str(afile), "REALM_JAX_COMPILE_CACHE": "0"}
    for model in ((), ("--model", str(reference_dir().parent / "synthetic" / "llama-s-q2_k.gguf"))):
        proc = subprocess.run([sys.executable, "-m", "realm_jax.cli", "generate", "Hi", "--max-new-tokens", "2",
                               *model], capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 2 and proc.stderr.startswith(f"realm-jax: error: REALM_JAX_CACHE={afile}: cannot "
                                                               f"make the folder {afile}/"), proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr


def test_version_and_warnings_are_one_line(tmp_path):
    from realm_jax.reference import reference_dir

    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("realm-jax 0.") and version.stdout.count("\n") == 1
    afile = tmp_path / "afile"
    afile.write_text("x")
    env = {**os.environ, "REALM_JAX_COMPILE_CACHE": str(afile / "xla")}  # a cache that cannot be: a warning
    model = str(reference_dir().parent / "synthetic" / "llama-s-q2_k.gguf")
    proc = subprocess.run([sys.executable, "-m", "realm_jax.cli", "generate", "Hi", "--max-new-tokens", "2",
                           "--model", model], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (f"realm-jax: warning: the compilation cache {afile / 'xla'} cannot be used (NotADirectoryError: Not a "
            "directory); compiling without it (set REALM_JAX_COMPILE_CACHE to another directory, or to 0 to turn it "
            "off)") in proc.stderr.splitlines(), proc.stderr
    assert "Warning:" not in proc.stderr, proc.stderr  # Python's form: "file.py:N: RuntimeWarning: ..." and its line


def test_chat_reads_stdin(smollm2_path):
    proc = _cli("chat", "--model", str(smollm2_path), "--max-new-tokens", "16",
                stdin="What is the capital of France?\n")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "--temperature=-1.0 must be"),
    (["--top-p", "2"], "--top-p=2.0 must be"),
    (["--repetition-penalty", "0"], "--repetition-penalty=0.0 must be"),
    (["--top-k", "abc"], "--top-k"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--model", "/nonexistent/model.gguf"], "no such file"),
    (["--precision", "f64"], "f64"),
])
def test_generate_errors_are_one_line(args, message):
    proc = _cli("generate", "Hello", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("realm-jax: error:") and message in lines[0], proc.stderr


def test_chat_needs_a_template(gemma3_path):
    proc = _cli("chat", "--model", str(gemma3_path), stdin="hi\n")
    assert proc.returncode == 2 and "chat template" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("policy", ["f32", "bf16", "params=f16,compute=f16,kv=f32"])
def test_inspect_precision_bytes_equal_allocated(capsys, smollm2_path, policy):
    import jax

    import realm_jax
    from realm_jax.models.transformer import init_cache

    assert main(["inspect", "--json", "--precision", policy, str(smollm2_path)]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    model = realm_jax.load(smollm2_path, policy=policy, progress=False)
    allocated = {id(leaf): leaf.nbytes for leaf in jax.tree.leaves(model.params)}  # a shared array once
    assert memory["params_bytes"] == sum(allocated.values())
    cache = init_cache(model.config, 1, 100, model.policy.kv)
    assert memory["kv_bytes_per_token"] * 100 == sum(leaf.nbytes for leaf in jax.tree.leaves(cache))
    assert main(["inspect", "--precision", policy, str(smollm2_path)]) == 0
    assert "KV cache per token" in capsys.readouterr().out
