"""The Pallas Triton backend (`realm_jax.linear.triton`): the decode GEMV of `pallas_kernels.decode` on the
lane layout (`pallas_kernels.decode_layout`) with int16 activations, in interpret mode on CPU against the
reference (the shared cases); lowering for CUDA (an abstract H100) at an 8B llama's shapes; the layout's
round trip; the kernel's integer arithmetic exactly; its tiling; the synthetic models decoding on it
against llama.cpp."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_kernels import decode, mma
from pallas_kernels.decode_layout import GEMV_FORMATS, LAYOUTS, from_lanes, quantize_x, to_lanes
from realm_jax import linear
from realm_jax.errors import RoutesError, ShapeMismatchError
from realm_jax.linear import routes
from realm_jax.linear.triton import DECODE_ROWS, DOT_FROM, GEMV_ROWS, TRITON
from realm_jax.precision import Policy
from realm_jax.quant import dequantize, quantize
from decode_agreement import assert_decode_agrees
from helpers import assert_matmul_close, random_qtensor
from linear_base import LinearTests, LoweringTests

H100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                                                     platform="gpu"))


class TestTriton(LinearTests):
    BACKEND = "triton"
    # the GEMV up to GEMV_ROWS (Q4_K, Q5_K, Q6_K: the block-dot GEMM from DOT_FROM to 16), the tensor-core GEMM
    # up to DECODE_ROWS (64), the reference past them
    ROWS = (1, DOT_FROM, GEMV_ROWS + 1, DECODE_ROWS, DECODE_ROWS + 1)


class TestTritonLowering(LoweringTests):
    BACKEND = "triton"
    CUSTOM_CALLS = ("__gpu$xla.gpu.triton",)

    def lower(self, fn, x, w) -> str:
        with use_abstract_mesh(H100):
            return jax.jit(fn).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("fmt", sorted(LAYOUTS))
def test_layout_round_trip(fmt, rng):
    """to_lanes keeps every bit of the planes (rows padded to 128, nothing else added): from_lanes gives
    the QTensor back (Q8_K's bsums, which the kernel does not read, recomputed from its quants)."""
    w = (random_qtensor(fmt, 200, 512, rng) if fmt != "Q8_K"
         else quantize(jnp.asarray(rng.standard_normal((200, 512))), "Q8_K"))
    lanes = jax.jit(to_lanes)(w)  # one program, not one an op
    assert all(a.shape[-1] == 256 for a in lanes.values())
    assert sum(a.size * a.dtype.itemsize for a in lanes.values()) * 200 == w.nbytes * 256 - (
        w.planes["bsums"].nbytes * 256 if fmt == "Q8_K" else 0)
    back = jax.jit(from_lanes, static_argnums=(0, 1))(fmt, w.shape, lanes).check()
    for name, plane in w.planes.items():
        np.testing.assert_array_equal(np.asarray(back.planes[name]), np.asarray(plane), err_msg=f"{fmt} {name}")


@pytest.mark.parametrize("fmt", GEMV_FORMATS)
def test_integer_arithmetic_is_exact(fmt, rng):
    """Activations that int16 holds exactly (every 32-block's largest value 32767, so its scale is 1): the
    kernel's result is the float64 product up to f32 accumulation, for every format."""
    m, k = 3, 512
    w = random_qtensor(fmt, 130, k, rng)
    x = rng.integers(-32767, 32768, (m, k)).astype(np.float32)
    x.reshape(m, -1, 32)[:, :, 0] = 32767.0
    part = decode.gemv(*quantize_x(jnp.asarray(x), fmt), to_lanes(w), fmt=fmt, interpret=True)
    y = np.asarray(part.sum(0))[:m, :130]
    want = x.astype(np.float64) @ np.asarray(dequantize(w), np.float64).T
    assert np.abs(y - want).max() <= 1e-6 * np.abs(want).max()


def test_tiling_fills_the_gpu_at_the_8b_shapes():
    """Every SM gets at least two programs at an 8B llama's shapes, for every format and rows of x; the
    K splits and the parts of a unit divide the units evenly."""
    for fmt in GEMV_FORMATS:
        lay = LAYOUTS[fmt]
        for m in (1, 2, 8, 16):
            for n, k in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
                t = decode.tiling_for(fmt, m, n, k)
                units = k // lay.unit
                allowed = (1, 2, 4, 8) if fmt == "Q6_K" else (1, 2, 4) if lay.unit == 256 else (1,)
                assert n % t.rows == 0 and units % (t.splits * t.units) == 0 and t.parts in allowed, t
                chunks = max(1, (1 << (m - 1).bit_length()) // decode.chunk_rows(fmt))
                assert chunks * n // t.rows * t.splits * t.parts >= 2 * 132, (fmt, m, n, k, t)


def test_mma_tiling_fills_the_gpu_at_the_8b_shapes():
    """The tensor-core GEMM gives every SM at least two programs for decode and a wave with at most an
    eighth of the SMs idle for prefill, at an 8B llama's shapes; its K splits divide the chunks, and prefill
    splits K only where the tiles alone leave SMs idle."""
    for fmt in LAYOUTS:
        for n, k in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
            for m in (16, 64, 128, 512, 2048):
                t = mma.tiling_for(fmt, n, k, m)
                chunks = k // mma.chunk_size(fmt, k)
                tiles = -(-m // t.x_rows)
                assert n % t.rows == 0 and chunks % t.splits == 0 and t.x_rows >= min(m, mma.PREFILL_ROWS), t
                programs = tiles * n // t.rows * t.splits
                assert programs >= (2 * 132 if m <= DECODE_ROWS else 132 - 132 // 8), (fmt, n, k, m, t)
                if m > DECODE_ROWS and t.splits > 1:
                    assert programs // 2 < 132 - 132 // 8, (fmt, n, k, m, t)


# Every format with lanes, rows of x around the prefill tile's edges and ragged N (one row count and one N
# per format, rotating: 14 of the 15 pairs of the two).
_PREFILL_M = (65, 128, 129, 255, 257)
_PREFILL_N = (130, 256, 300)
PREFILL_CASES = [(fmt, _PREFILL_M[i % len(_PREFILL_M)], _PREFILL_N[i % len(_PREFILL_N)])
                 for i, fmt in enumerate(sorted(LAYOUTS))]


@pytest.mark.parametrize("fmt,m,n", PREFILL_CASES)
def test_mma_prefill_tiles(fmt, m, n, rng):
    """Past DECODE_ROWS the GEMM tiles x by PREFILL_ROWS (the last tile padded): every row matches the
    float64 product of bf16 x and the dequantized weight rounded to bf16, for every format, at rows of x
    around the tile's edges and N not a multiple of the weight tile; it lowers for CUDA."""
    w = (random_qtensor(fmt, n, 512, rng) if fmt != "Q8_K"
         else quantize(jnp.asarray(rng.standard_normal((n, 512))), "Q8_K"))
    x = jnp.asarray(rng.standard_normal((m, 512)), jnp.float32)
    lanes = to_lanes(w)
    part = mma.gemm(x, lanes, fmt=fmt, interpret=True)
    assert part.shape[1] == -(-m // mma.PREFILL_ROWS) * mma.PREFILL_ROWS
    y = part.sum(0)[:m, :n]
    assert_matmul_close(y, x.astype(jnp.bfloat16), dequantize(w).astype(jnp.bfloat16), compute_dtype=jnp.bfloat16,
                        out_dtype=jnp.float32)
    with use_abstract_mesh(H100):
        text = jax.jit(lambda x, lanes: mma.gemm(x, lanes, fmt=fmt)).trace(x, lanes).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("fmt", ["Q4_K", "Q8_0"])
def test_mma_prefill_writes_out_dtype_rounded_once(fmt, rng):
    """Where K is not split, the GEMM writes the product in out_dtype: the f32 sums rounded once (the same
    bits as the f32 product cast), no f32 [M, N] in between; split K keeps f32 partial sums."""
    w, x = random_qtensor(fmt, 128, 512, rng), jnp.asarray(rng.standard_normal((40, 512)), jnp.float32)
    lanes = to_lanes(w)
    t = mma.tiling_for(fmt, 128, 512, 40)
    one, split = dataclasses.replace(t, splits=1), dataclasses.replace(t, splits=2)
    f32 = mma.gemm(x, lanes, fmt=fmt, tiling=one, interpret=True)
    bf16 = mma.gemm(x, lanes, fmt=fmt, tiling=one, out_dtype=jnp.bfloat16, interpret=True)
    assert f32.dtype == jnp.float32 and bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf16), np.asarray(f32.astype(jnp.bfloat16)))
    assert mma.gemm(x, lanes, fmt=fmt, tiling=split, out_dtype=jnp.bfloat16, interpret=True).dtype == jnp.float32


def _routes(kind: str, table: dict) -> dict:
    return {kind: {"measured": {"commit": "test"}, "backends": {"triton": table}}}


def test_routes_pick_the_measured_path(monkeypatch, rng):
    """Where the table has the device kind, the backend takes the path measured fastest at the nearest
    measured rows of x (on a log scale), unless that path does not take them (the GEMV past 16 rows);
    elsewhere the heuristic: GEMV up to GEMV_ROWS (the block-dot GEMM from DOT_FROM where the format has it:
    tests/test_lanesdot.py), GEMM up to DECODE_ROWS, XLA past them. A measured GEMM at prefill rows serves
    them (the model's matmul matches the reference)."""
    kind = jax.devices()[0].device_kind
    assert [TRITON.path("Q8_0", m, jnp.bfloat16) for m in (1, GEMV_ROWS, GEMV_ROWS + 1, DECODE_ROWS, 65)] == [
        "gemv", "gemv", "mma", "mma", "xla"]
    assert TRITON.path("Q2_K", 1, jnp.bfloat16) == "mma" and TRITON.path("Q4_K", 1, jnp.float32) == "xla"
    table = _routes(kind, {"Q4_K": [[1, "gemv"], [16, "mma"], [512, "mma"], [2048, "xla"]]})
    monkeypatch.setattr(routes, "table", lambda: table)
    assert [TRITON.path("Q4_K", m, jnp.bfloat16) for m in (1, 3, 4, 5, 130, 1024, 1025, 4096)] == [
        "gemv", "gemv", "gemv", "mma", "mma", "mma", "xla", "xla"]  # 4 and 1024: ties take the smaller
    assert TRITON.path("Q6_K", 130, jnp.bfloat16) == "xla"  # no entry: the heuristic
    monkeypatch.setattr(routes, "table", lambda: _routes(kind, {"Q4_K": [[1, "gemv"], [16, "gemv"]]}))
    # past twice the rows measured, the heuristic: a decode route does not serve prefill; nor does the GEMV
    # take more than 16 rows where the table's nearest entry is its
    assert [TRITON.path("Q4_K", m, jnp.bfloat16) for m in (16, 17, 32, 33, 2048)] == ["gemv", "mma", "mma", "mma",
                                                                                      "xla"]
    monkeypatch.setattr(routes, "table", lambda: table)
    assert TRITON.path("Q4_K", 130, jnp.float32) == "xla"
    w = random_qtensor("Q4_K", 130, 256, rng)
    x = jnp.asarray(rng.standard_normal((130, 256)), jnp.bfloat16)
    y = linear.matmul(x, linear.prepare(w, Policy.of("bf16"), impl="triton"), compute_dtype=jnp.bfloat16,
                      out_dtype=jnp.float32)
    assert_matmul_close(y, x, dequantize(w).astype(jnp.bfloat16), compute_dtype=jnp.bfloat16, out_dtype=jnp.float32)
    monkeypatch.setattr(routes, "table", lambda: _routes(kind, {"Q2_K": [[1, "gemv"]]}))
    with pytest.raises(RoutesError, match="Q2_K.*does not have"):
        TRITON.path("Q2_K", 1, jnp.bfloat16)
    monkeypatch.setattr(routes, "table", lambda: _routes(kind, {"Q8_0": [[8, "dot"]]}))
    with pytest.raises(RoutesError, match="Q8_0: routes 8 rows of x to the dot path, which Q8_0 does not have"):
        TRITON.path("Q8_0", 8, jnp.bfloat16)
    monkeypatch.setattr(routes, "table", lambda: _routes(kind, {"Q4_K": [[1, "fast"]]}))
    with pytest.raises(RoutesError, match="'fast' is not one of gemv, dot, mma, xla"):
        TRITON.path("Q4_K", 1, jnp.bfloat16)


@pytest.mark.parametrize("bad,match", [
    ([], "JSON object"),
    ({"H": {"measured": {}}}, "'backends'"),
    ({"H": {"backends": {"cuda": {}}}}, "'cuda' is not a backend"),
    ({"H": {"backends": {"triton": {"Q4_K": [[0, "mma"]]}}}}, "Q4_K"),
    ({"H": {"backends": {"triton": {"Q4_K": [[1, "fast"]]}}}}, "gemv, dot, mma, xla"),
    ({"H": {"backends": {"triton": {"Q4_K": [[1, "mma"], [1, "xla"]]}}}}, "distinct"),
    ({"H": {"backends": {"triton": {"Q4_K": []}}}}, "Q4_K"),
])
def test_routes_table_is_checked(bad, match):
    """A malformed routes table is one RoutesError naming the key; the committed one is well formed."""
    with pytest.raises(RoutesError, match=match):
        routes.validate(bad, {"triton": TRITON.paths}, "routes.json")
    routes.table.cache_clear()
    assert isinstance(routes.table(), dict)


@pytest.mark.parametrize("fmt,m", [("Q5_K", 5), ("Q4_0", 33)])
def test_mma_reads_a_layer_of_a_stack_in_place(fmt, m, rng):
    """With `layer`, the tensor-core GEMM multiplies that layer of stacked lanes, as it multiplies the
    layer's own lanes (the same program on the same bytes: equal results); K of an odd number of blocks
    takes 32-element chunks."""
    k = 256 if fmt == "Q5_K" else 96
    ws = [random_qtensor(fmt, 130, k, rng) for _ in range(3)]
    stack = jax.tree.map(lambda *a: jnp.stack(a), *[to_lanes(w) for w in ws])
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    for i, w in enumerate(ws):
        one = mma.gemm(x, to_lanes(w), fmt=fmt, interpret=True)
        both = mma.gemm(x, stack, fmt=fmt, layer=jnp.int32(i), interpret=True)
        np.testing.assert_array_equal(np.asarray(both), np.asarray(one))
        y = np.asarray(one.sum(0))[:m, :130]
        want = np.asarray(x, np.float64) @ np.asarray(dequantize(w), np.float64).T
        np.testing.assert_allclose(y, want, rtol=0, atol=2e-2 * np.abs(want).max())  # bf16 weights and x


def test_q6_k_halves_of_a_group(rng):
    """Q6_K's unit split over 2, 4 and 8 programs (eight: half a group of activation blocks each, its
    tiling at the k/v projection, eight rows a thread) sums to the exact product of integer activations,
    as the whole unit does; a part count that does not split the unit is an error."""
    m, k = 2, 512
    w = random_qtensor("Q6_K", 200, k, rng)
    x = rng.integers(-32767, 32768, (m, k)).astype(np.float32)
    x.reshape(m, -1, 32)[:, :, 0] = 32767.0  # every block's scale 1: int16 holds x exactly
    want = x.astype(np.float64) @ np.asarray(dequantize(w), np.float64).T
    lanes, xq = to_lanes(w), quantize_x(jnp.asarray(x), "Q6_K")
    assert decode.tiling_for("Q6_K", 1, 1024, 4096) == decode.DecodeTiling(rows=256, per_thread=8, units=1,
                                                                           splits=16, parts=8)
    for parts in (1, 2, 4, 8):
        t = decode.DecodeTiling(rows=256, per_thread=8, units=1, splits=2, parts=parts)
        part = decode.gemv(*xq, lanes, fmt="Q6_K", tiling=t, interpret=True)
        assert part.shape[0] == 2 * parts
        y = np.asarray(part.sum(0))[:m, :200]
        assert np.abs(y - want).max() <= 1e-6 * np.abs(want).max(), parts
    with pytest.raises(ShapeMismatchError, match="does not divide"):
        decode.gemv(*xq, lanes, fmt="Q6_K", tiling=dataclasses.replace(t, parts=3), interpret=True)


@pytest.mark.parametrize("n", [300, 500])
def test_eight_rows_a_thread(n, rng):
    """Programs of 256 rows (eight a thread, Q5_K's and Q6_K's tiling at the 8B shapes) where they divide
    the padded rows (500 -> 512: two programs), an error where they do not (300 -> 384); the heuristic
    takes four a thread there."""
    w = random_qtensor("Q6_K", n, 512, rng)
    x = jnp.asarray(rng.standard_normal((1, 512)), jnp.float32)
    lanes = to_lanes(w)
    n_pad = lanes["q"].shape[-1]
    assert decode.tiling_for("Q6_K", 1, 4096, 4096).per_thread == 8
    assert decode.tiling_for("Q6_K", 1, 4224, 4096).per_thread == 4  # 33 tiles of 128 rows
    eight = decode.DecodeTiling(rows=256, per_thread=8, units=1, splits=2)
    if n_pad % 256:
        with pytest.raises(ShapeMismatchError, match="does not divide"):
            decode.gemv(*quantize_x(x, "Q6_K"), lanes, fmt="Q6_K", interpret=True, tiling=eight)
        return
    y = np.asarray(decode.gemv(*quantize_x(x, "Q6_K"), lanes, fmt="Q6_K", interpret=True, tiling=eight).sum(0))
    want = np.asarray(x, np.float64) @ np.asarray(dequantize(w), np.float64).T
    np.testing.assert_allclose(y[:1, :n], want, rtol=0, atol=2e-3 * np.abs(want).max())


# On a CPU the kernel runs interpreted: one file, its first 150 positions (the compile of the interpreted
# step costs far more than the steps, so the positions cost little once it is shared). On a GPU (the device
# script), both files, every position.
ON_CPU = jax.default_backend() == "cpu"


@pytest.mark.parametrize("name", ["llama-k-q4_k_m"] + ([] if ON_CPU else ["llama-k-q5_k_m"]))
def test_decode_agrees_with_llama_cpp(name):
    """The synthetic llama.cpp-quantized models decoding on the GEMV (the bf16 policy), teacher-forced one
    token at a time, against llama.cpp's recorded logits, with the model tests' thresholds
    (tests/test_llama_reference.py). Q4_K_M has Q4_K and Q6_K layers, Q5_K_M Q5_K and Q6_K."""
    import realm_jax
    from realm_jax.reference import reference_dir

    model = realm_jax.load(reference_dir().parent / "synthetic" / f"{name}.gguf", impl="triton", policy="bf16",
                           progress=False)
    assert model.impl == "triton"
    assert_decode_agrees(model, name, 150 if ON_CPU else None)


def test_benchmark_writes_the_routes(tmp_path):
    """benchmarks/kernels.py --write-routes: per format and M the path with the least time summed over the
    shapes timed (a path missing at a shape does not compete), merged into the table for the device kind,
    which the registry then reads."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kernels_bench", pathlib.Path(__file__).parents[1] / "benchmarks"
                                                  / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    times = {("gemv", 1): (5, 5), ("mma", 1): (6, 6), ("xla", 1): (9, 9), ("gemv", 512): (1, None),
             ("mma", 512): (30, 50), ("xla", 512): (35, 40)}
    rows = [{"impl": f"triton/{p}", "format": "Q4_K", "m": m, "n": n, "k": 4096, "us": us}
            for (p, m), pair in times.items() for n, us in zip((4096, 14336), pair) if us is not None]
    rows.append({"impl": "xla", "format": "Q4_K", "m": 1, "n": 4096, "k": 4096, "us": 0.1})  # a peer: no path
    assert bench.measured_routes(rows) == {"triton": {"Q4_K": [[1, "gemv"], [512, "xla"]]}}
    out = tmp_path / "routes.json"
    out.write_text(json.dumps(_routes("Other GPU", {"Q8_0": [[1, "mma"]]})))
    meta = {"device": "Test GPU", "commit": "abc", "date": "2026-12-05", "jax": jax.__version__, "command": "x"}
    bench.write_routes(out, rows, meta)
    table = json.loads(out.read_text())
    assert set(table) == {"Other GPU", "Test GPU"} and table["Test GPU"]["measured"]["commit"] == "abc"
    assert routes.measured("triton", "Test GPU", "Q4_K", 300, table) == "xla"
    assert routes.measured("triton", "Test GPU", "Q4_K", 2, table) == "gemv"
