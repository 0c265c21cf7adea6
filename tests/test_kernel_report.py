"""scripts/kernel_report.py's checks of the GPU kernels' shape, without a GPU: every decode GEMV's grid
fills an H100/H200 and its wrapper copies no weight (from the lowering alone); the Triton GEMV's K loop
compiles to at most ~2 instructions a weight with no spills, and both tensor-core GEMMs (the lanes GEMM and
the block-dot GEMM) stay at today's figures (needs pip's triton, the `kernel-report` extra); the Mosaic GPU
GEMM's MLIR ops per K step stay at or below the committed baseline; and a model's whole decode step on the
GPU decode backends copies no weight outside the kernels (from its jaxpr alone)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from pallas_kernels.decode_layout import LAYOUTS

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("kernel_report", ROOT / "scripts" / "kernel_report.py")
kernel_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_report)

# Each format once, the 8B shapes in turn (one lowering each, ~1 s); two formats at 16 rows of x.
CASES = [(fmt, 1, kernel_report.SHAPES[i % len(kernel_report.SHAPES)]) for i, fmt in enumerate(sorted(LAYOUTS))]
CASES += [("Q4_K", 16, (1024, 4096)), ("Q6_K", 16, (14336, 4096))]


@pytest.mark.parametrize("fmt,m,shape", CASES, ids=[f"{f}-m{m}-{n}x{k}" for f, m, (n, k) in CASES])
def test_decode_grid_fills_the_gpu_and_copies_no_weight(fmt, m, shape):
    import jax

    n, k = shape
    w = kernel_report.abstract_weight("triton", fmt, n, k)
    (kernel,) = kernel_report.capture_triton(kernel_report._matmul("triton"),
                                             jax.ShapeDtypeStruct((m, k), kernel_report.BF16), w)
    programs = int(np.prod(kernel["grid"]))
    assert programs >= 2 * kernel_report.SMS, (fmt, m, shape, kernel["grid"])
    assert kernel_report.weight_copies("triton", fmt, m, n, k) == []


# The bound is 2 instructions a weight (BENCHMARKS.md); the closest is Q5_K at the k/v shape (1024x4096:
# four weight rows a thread). There pip's triton reads 2.01 since the scales' FFMAs are written out (session
# 45: XLA's Triton, the device's compiler, made them an FMUL and an FADD); the device's compiler reads 1.98,
# guarded in tests/test_gpu_aot.py. Q6_K there takes eight rows a thread in halves of a group: 1.87 on both.
@pytest.mark.parametrize("fmt,shape,bound", [("Q4_K", (4096, 4096), 2.0), ("Q8_0", (4096, 4096), 2.0),
                                             ("Q6_K", (4096, 4096), 2.0), ("Q5_0", (4096, 4096), 2.0),
                                             ("Q5_K", (1024, 4096), 2.05), ("Q6_K", (1024, 4096), 2.0)])
def test_decode_loop_instructions_and_spills(fmt, shape, bound, tmp_path):
    pytest.importorskip("triton", reason="needs pip's triton (the kernel-report extra) to compile the Triton IR")
    row = kernel_report.triton_row(fmt, 1, *shape, tmp_path)
    assert row["instructions_per_weight"] is not None and row["instructions_per_weight"] <= bound, row
    assert row["spill_bytes"] == 0 and row["loop_spill_bytes"] == 0, row


# The tensor-core GEMMs' K loops. The lanes GEMM (`triton`'s "mma" path, 5-64 rows of x) at 4096x4096: Q4_K 6.67
# / Q5_0 6.94 at 16 rows, Q6_K 7.64 at 64 (the codes placed where they lie, `mma._placed`, and the fifth and
# sixth bits joined four codes at a time, `mma._code_words`, took them from 7.25 / 8.88 / 10.09). The
# block-dot GEMM (`triton_blocks`, 1-16 rows; two warps a program, `mma.sync`) at 14336x4096 (4096x4096 makes
# one step a program; 128 weight rows a program, 256 for Q8_K, 64 for Q6_K and for Q4_K and Q5_K at 16 rows of
# x): Q4_0 / Q4_1 / Q4_K / Q8_0 / Q5_0 / Q5_K / Q6_K / Q8_K 1.61 / 1.61 / 1.97 / 1.65 / 2.82 / 3.23 / 3.39 /
# 1.08 up to 8 rows, 2.04 / 2.02 / 2.72 / 2.08 / 3.50 / 4.18 / 4.34 / 1.23 at 16 (BENCHMARKS.md, session 39;
# with four warps, `wgmma`: 1.81 / 2.18 / 2.88 / 1.86 / 3.24 / 3.95 / 3.91 / 1.39 and 2.50 / 2.49 / 3.26 /
# 2.58 / 3.56 / 4.95 / 4.72 / 1.44). Guarded with a little room; no spills. Q6_K at 16 rows of x is guarded
# where the device compiles it (tests/test_gpu_aot.py): a block's scale is an explicit FFMA since session 45
# (`pallas_kernels.ptx.fma`: XLA's Triton did not contract it, 5.68 -> 4.68 instructions a weight there), and pip's
# triton then spills 192 bytes there (4.34 -> 4.92); at 8 rows 3.41 either way. The block-dot GEMM on the lanes
# (`triton`'s "dot" path, Q4_K, Q5_K, Q6_K at 3-16 rows of x): Q4_K 2.61 at 8 rows, 3.21-3.46 at 16 (64 weight
# rows a program: at 128 pip's triton spilled 88 bytes at 14336x4096); Q6_K 6.13 at 8 rows, 6.62 at 16; XLA's
# Triton 2.81 / 3.67-3.72 and 6.27 / 6.90-6.96 (tests/test_gpu_aot.py).
@pytest.mark.parametrize("kernel,fmt,m,shape,bound", [
    ("mma", "Q4_K", 16, (4096, 4096), 7.0), ("mma", "Q5_0", 16, (4096, 4096), 7.3),
    ("mma", "Q6_K", 64, (4096, 4096), 8.0), ("blocks", "Q4_0", 8, (14336, 4096), 1.7),
    ("blocks", "Q4_1", 8, (14336, 4096), 1.7), ("blocks", "Q4_1", 16, (14336, 4096), 2.1),
    ("blocks", "Q4_K", 8, (14336, 4096), 2.0), ("blocks", "Q4_K", 16, (14336, 4096), 2.8),
    ("blocks", "Q8_0", 8, (14336, 4096), 1.75),
    ("blocks", "Q6_K", 8, (4096, 14336), 3.5), ("blocks", "Q5_0", 8, (14336, 4096), 2.9),
    ("blocks", "Q5_K", 16, (4096, 14336), 4.3), ("blocks", "Q8_K", 16, (14336, 4096), 1.3),
    ("dot", "Q4_K", 8, (4096, 4096), 2.8), ("dot", "Q4_K", 16, (14336, 4096), 3.7),
    ("dot", "Q6_K", 8, (14336, 4096), 6.5)])
def test_gemm_loop_instructions_and_spills(kernel, fmt, m, shape, bound, tmp_path):
    pytest.importorskip("triton", reason="needs pip's triton (the kernel-report extra) to compile the Triton IR")
    row = {"mma": kernel_report.mma_row, "blocks": kernel_report.blocks_row,
           "dot": kernel_report.lanesdot_row}[kernel](fmt, m, *shape, tmp_path)
    assert row["programs"] >= 2 * kernel_report.SMS, row
    assert row["instructions_per_weight"] <= bound, row
    assert row["spill_bytes"] == 0 and row["loop_spill_bytes"] == 0, row
    assert row["weight_copies"] == [], row


def test_blocks_wrapper_copies_no_weight():
    for m in (1, 16):
        assert kernel_report.weight_copies("triton_blocks", "Q4_1", m, 4096, 4096) == []


def test_mosaic_baseline_is_per_jax_version(tmp_path, monkeypatch):
    """A jax version's own record, exactly; one without a record against the newest record not newer than it
    (the oldest where every one is), with a 1% slack for its lowering; the committed records pass their own."""
    path = tmp_path / "base.json"
    path.write_text(json.dumps({"0.12.0.1": {"Q4_K x": 100}, "0.12.1": {"Q4_K x": 112}}))
    monkeypatch.setattr(kernel_report, "BASELINE", path)
    assert kernel_report.baseline("0.12.1") == ({"Q4_K x": 112}, 1.0, "0.12.1")
    assert kernel_report.baseline("0.12.3") == ({"Q4_K x": 112}, kernel_report.BASELINE_SLACK, "0.12.1")
    assert kernel_report.baseline("0.12.0.2") == ({"Q4_K x": 100}, kernel_report.BASELINE_SLACK, "0.12.0.1")
    assert kernel_report.baseline("0.11.2") == ({"Q4_K x": 100}, kernel_report.BASELINE_SLACK, "0.12.0.1")


@pytest.mark.parametrize("fmt", ["Q4_K", "Q6_K"])
def test_mosaic_gemm_ops_per_k_step_do_not_grow_and_it_copies_no_weight(fmt):
    """The Mosaic GPU GEMM reads the lanes as laid out at load (no transpose of the planes per call)."""
    base, slack, recorded = kernel_report.baseline()
    row = kernel_report.mosaic_row(fmt, kernel_report.PREFILL_ROWS, 4096, 4096)
    key = f"{fmt} {row['m']}x{row['n']}x{row['k']}"
    assert 0 < row["mlir_ops_per_k_step"] <= base[key] * slack, (row, base[key], f"jax {recorded} x{slack}")
    assert row["weight_copies"] == [], row


def test_weight_copies_finds_a_copy_and_not_a_kernels_result():
    """A transpose of the weight's planes per call is found; the product a kernel makes from it is not."""
    import jax.numpy as jnp

    def transposing(x, w):  # the lanes' words laid out [N', K / 4] again for every call
        q = w.lanes["q"]
        words = jnp.transpose(q, (2, 0, 1)).reshape(q.shape[-1], -1)
        return x[:, : words.shape[1]] @ words[:, : x.shape[1]].astype(x.dtype).T

    found = kernel_report.weight_copies("triton", "Q8_0", 512, 4096, 4096, fn=transposing)
    assert any(f.startswith("transpose") for f in found), found
    assert kernel_report.weight_copies("triton", "Q8_0", 16, 4096, 4096) == []


# The GEMM's prefill tiles (128 rows of x a program, eight warps): the weight dequantized once a tile
# (Q4_K 9.6 instructions a weight a tile at 4096x4096, 128 registers, no spills, one wave of programs),
# and no weight-sized array made outside the kernel (x's layout and the partial products are not).
def test_mma_prefill_tiles_instructions_and_spills(tmp_path):
    pytest.importorskip("triton", reason="needs pip's triton (the kernel-report extra) to compile the Triton IR")
    from pallas_kernels import mma

    row = kernel_report.mma_row("Q4_K", 512, 4096, 4096, tmp_path)
    tiles = 512 // mma.PREFILL_ROWS
    assert row["rows_per_program"] == mma.PREFILL_ROWS and row["programs"] >= kernel_report.SMS - kernel_report.SMS // 8
    assert row["instructions_per_weight"] / tiles <= 10.0, row
    assert row["spill_bytes"] == 0 and row["loop_spill_bytes"] == 0, row
    assert row["weight_copies"] == [], row


def test_ttir_ops_count_the_module_operations():
    text = """module {
  tt.func public @k(%arg0: !tt.ptr<f32>) {
    %c0 = arith.constant 0 : i32
    %0:2 = scf.for %i = %c0 to %c0 step %c0 iter_args(%a = %c0, %b = %c0) -> (i32, i32) {
      %1 = arith.addi %a, %b : i32
      scf.yield %1, %b : i32, i32
    }
    tt.return
  }
}"""
    assert kernel_report.ttir_ops(text) == 6  # func, constant, for, addi, yield, return


@pytest.mark.parametrize("backend", kernel_report.STEP_BACKENDS)
@pytest.mark.parametrize("batch", (1, 16))
def test_decode_step_copies_no_weight(backend, batch):
    """The whole decode step on a GPU decode backend (a Q4_K_M file: Q4_K and Q6_K layers, stacked and scanned),
    for one row and for 16 (the block-dot GEMM's most; past them `triton_blocks` multiplies on the XLA path
    from its planes), makes no array of a layer weight's size from the weights outside the kernels, and its
    scans slice none per layer: the kernels read each layer's planes in place from the stack; nor a copy of
    a layer's KV cache (the attention kernel reads the stacked cache in place)."""
    assert kernel_report.step_copies(kernel_report.STEP_MODELS[0], backend, batch=batch) == []


def test_step_copies_finds_the_reference_path_slicing_its_layers():
    """The check can fail: the XLA reference keeps bf16 weights on a GPU, which its scan slices a layer at a
    time (the copy a kernel's in-place read avoids), and its attention reads a copy of each layer's cache."""
    found = kernel_report.step_copies(kernel_report.STEP_MODELS[0], "xla")
    weights = [f for f in found if f.startswith("scan slices bfloat16")]
    caches = [f for f in found if f.startswith(("cache: dynamic_slice", "cache: slice"))]
    assert weights and caches and len(weights) + len(caches) == len(found), found
