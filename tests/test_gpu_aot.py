"""XLA's GPU compile for an H100 without a GPU (`scripts/gpu_aot.py`): the decode kernels compile through XLA's
own Triton, as a device compiles them, and what a matmul and a decode step launch is counted. Needs JAX's
CUDA plugin, kept out of the project's venv: `make gpu-aot`, then
`.venv-gpu-aot/bin/python -m pytest tests/test_gpu_aot.py`."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _has_plugin() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


pytestmark = pytest.mark.skipif(not _has_plugin(),
                                reason="needs JAX's CUDA plugin for XLA's deviceless GPU compile: make gpu-aot, then "
                                       ".venv-gpu-aot/bin/python -m pytest tests/test_gpu_aot.py")


def _aot(tmp_path, *args: str) -> list[dict]:
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_aot.py"), *args, "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_decode_gemv_compiles_through_xla_without_spills(tmp_path):
    """Q4_K's GEMV at one row of x and an 8B llama's q projection: one Pallas kernel giving every SM two
    programs, no spills, and the activations' preparation and the K splits' sum in at most four XLA kernels."""
    (c,) = _aot(tmp_path, "--matmul", "triton:Q4_K:1:4096x4096")
    pallas = [k for k in c["kernels"] if k["kind"] == "pallas"]
    assert [k["name"] for k in pallas] == ["decode_q4_k"], c["kernels"]
    assert pallas[0]["programs"] >= 2 * 132 and pallas[0]["spill_bytes"] == 0 and pallas[0]["registers"] <= 255
    assert len(c["kernels"]) <= 5, c["kernels"]


def test_a_decode_step_is_counted_in_launches(tmp_path):
    """The synthetic Q4_K_M model's decode step on the GEMV: its matmuls and attention are Pallas kernels, none
    spills, and the step's launches stay within what they were when this test was written (105, 4 layers)."""
    (c,) = _aot(tmp_path, "--step", str(ROOT / "tests" / "data" / "synthetic" / "llama-k-q4_k_m.gguf"), "--impl",
                "triton")
    pallas = [k for k in c["kernels"] if k["kind"] == "pallas"]
    assert {k["name"].split("__")[0] for k in pallas} == {"decode_q4_k", "decode_q6_k", "decode_attention"}
    assert all(k["spill_bytes"] == 0 for k in pallas), pallas
    assert len(c["kernels"]) <= 105, [k["name"] for k in c["kernels"]]


def test_the_kernel_report_reads_the_kernels_xla_compiles(tmp_path):
    """`kernel_report.py --compiler xla`: the same report, its Triton rows from XLA's own compile (the
    device's compiler), Q4_K's GEMV at one row of x: every SM two programs, no spill, under 2.5 instructions
    a weight in the K loop (1.4-1.6 when this was written)."""
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_report.py"), "--compiler", "xla", "--formats",
                           "Q4_K", "--rows", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gemv = [r for r in json.loads(out.read_text()) if r["kernel"] == "triton"]
    assert len(gemv) == 4 and all(r["programs"] >= 2 * 132 and r["spill_bytes"] == 0 for r in gemv), gemv
    assert all(0.5 < r["instructions_per_weight"] < 2.5 for r in gemv if r["instructions_per_weight"]), gemv


def test_the_scales_are_ffmas_as_xla_compiles_the_kernels(tmp_path):
    """The block-dot GEMMs' and the GEMV's K loops under XLA's own Triton (the device's compiler): a scale
    times a dot is one FFMA (`pallas_kernels.ptx.fma`; XLA's Triton made it an FMUL and an FADD: the block-dot
    GEMM at 16 rows of x, 14336x4096, Q4_0 2.54, Q6_K 5.80; 2.04 and 4.84 when this was written)."""
    code = f"""
import pathlib, sys, tempfile
sys.path.insert(0, {str(ROOT / "scripts")!r})
import kernel_report as kr
kr.COMPILER = "xla"
for fmt, bound in (("Q4_0", 2.15), ("Q6_K", 5.0)):
    r = kr.blocks_row(fmt, 16, 14336, 4096, pathlib.Path(tempfile.mkdtemp()))
    assert r["instructions_per_weight"] <= bound, (fmt, r)
    assert r["programs"] >= 2 * 132, (fmt, r)
# the GEMV at the k/v shape, its scales' FFMAs written out too (2.04 and 2.16 without; Q6_K 2.09 with them
# at four rows a thread, 1.87 at eight in halves of a group)
for fmt, bound in (("Q5_K", 2.0), ("Q6_K", 1.95)):
    r = kr.triton_row(fmt, 1, 1024, 4096, pathlib.Path(tempfile.mkdtemp()))
    assert r["instructions_per_weight"] <= bound and r["spill_bytes"] == 0, (fmt, r)
# the block-dot GEMM on the lanes (Q4_K 2.81 and 3.67, Q6_K 6.96 at 16 rows when written; the lanes GEMM it
# replaced at 9-16 rows: 21.75 and 20.41)
for fmt, m, bound in (("Q4_K", 8, 3.0), ("Q4_K", 16, 3.9), ("Q6_K", 16, 7.3)):
    r = kr.lanesdot_row(fmt, m, 14336, 4096, pathlib.Path(tempfile.mkdtemp()))
    assert r["instructions_per_weight"] <= bound and r["spill_bytes"] == 0 and r["programs"] >= 2 * 132, (fmt, m, r)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
