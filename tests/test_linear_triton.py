"""The Pallas Triton backend (`realm_jax.linear.triton`): the decode GEMV of `pallas_kernels.decode` on the
lane layout (`pallas_kernels.decode_layout`) with int16 activations, in interpret mode on CPU against the
reference (the shared cases); lowering for CUDA (an abstract H100) at an 8B llama's shapes; the layout's
round trip; the kernel's integer arithmetic exactly; its tiling; the synthetic models decoding on it
against llama.cpp."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_kernels import decode, decode_mma
from pallas_kernels.decode_layout import GEMV_FORMATS, LAYOUTS, from_lanes, quantize_x, to_lanes
from realm_jax.errors import ShapeMismatchError
from realm_jax.linear.triton import DECODE_ROWS, GEMV_ROWS
from realm_jax.quant import dequantize, quantize
from helpers import random_qtensor
from linear_base import LinearTests, LoweringTests

H100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                                                     platform="gpu"))


class TestTriton(LinearTests):
    BACKEND = "triton"
    # the GEMV up to GEMV_ROWS, the tensor-core GEMM up to DECODE_ROWS (64), the reference past them
    ROWS = (1, GEMV_ROWS, GEMV_ROWS + 1, DECODE_ROWS, DECODE_ROWS + 1)


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
    lanes = to_lanes(w)
    assert all(a.shape[-1] == 256 for a in lanes.values())
    assert sum(a.size * a.dtype.itemsize for a in lanes.values()) * 200 == w.nbytes * 256 - (
        w.planes["bsums"].nbytes * 256 if fmt == "Q8_K" else 0)
    back = from_lanes(fmt, w.shape, lanes).check()
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
                assert n % t.rows == 0 and units % (t.splits * t.units) == 0 and 4 % t.parts == 0, t
                chunks = max(1, (1 << (m - 1).bit_length()) // decode.chunk_rows(fmt))
                assert chunks * n // t.rows * t.splits * t.parts >= 2 * 132, (fmt, m, n, k, t)


def test_mma_tiling_fills_the_gpu_at_the_8b_shapes():
    """The tensor-core decode GEMM gives every SM at least two programs at an 8B llama's shapes, and its K
    splits divide the chunks."""
    for fmt in LAYOUTS:
        for n, k in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
            t = decode_mma.tiling_for(fmt, n, k)
            chunks = k // decode_mma.chunk_size(fmt, k)
            assert n % t.rows == 0 and chunks % t.splits == 0, (fmt, n, k, t)
            assert n // t.rows * t.splits >= 2 * 132, (fmt, n, k, t)


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
        one = decode_mma.gemm(x, to_lanes(w), fmt=fmt, interpret=True)
        both = decode_mma.gemm(x, stack, fmt=fmt, layer=jnp.int32(i), interpret=True)
        np.testing.assert_array_equal(np.asarray(both), np.asarray(one))
        y = np.asarray(one.sum(0))[:m, :130]
        want = np.asarray(x, np.float64) @ np.asarray(dequantize(w), np.float64).T
        np.testing.assert_allclose(y, want, rtol=0, atol=2e-2 * np.abs(want).max())  # bf16 weights and x


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


def decode_step(model):
    """One decode step of `model` (one token over the KV cache), jitted once per model: every prompt of a
    model reuses the compiled step (the cache's length is a multiple of 256, so the shapes repeat)."""
    from realm_jax.models.transformer import forward

    if "_decode_step" not in model.__dict__:
        model._decode_step = jax.jit(
            lambda params, tok, pos, cache: forward(model.config, params, tok, pos, cache, policy=model.policy,
                                                    last=jnp.zeros((1,), jnp.int32), impl=model.impl),
            donate_argnums=(3,))
    return model._decode_step


def decode_logits(model, ids: list[int]) -> np.ndarray:
    """Teacher-forced logits of every position of `ids` computed the way decoding computes them: one token
    at a time over the KV cache (one row of x for every linear layer: the decode GEMV)."""
    step = decode_step(model)
    cache = model._new_cache(1, -(-(len(ids) + 1) // 256) * 256)
    rows = []
    for p, tok in enumerate(ids):
        logits, cache = step(model.params, jnp.array([[tok]], jnp.int32), jnp.array([[p]], jnp.int32), cache)
        rows.append(np.asarray(logits[0], np.float32))
    return np.stack(rows)


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
    from realm_jax.reference import CONFIDENT_MARGIN, compare_logits, load_reference, reference_dir

    model = realm_jax.load(reference_dir().parent / "synthetic" / f"{name}.gguf", impl="triton", policy="bf16",
                           progress=False)
    assert model.impl == "triton"
    hits, confident, kl, seen = [], [], [], 0
    for ref in load_reference(name):
        if ON_CPU and seen >= 150:
            break
        if ON_CPU and seen + len(ref.ids) > 150:  # a prefix of a prompt: its positions are teacher-forced too
            n = 150 - seen
            ref = dataclasses.replace(ref, ids=ref.ids[:n], topk_ids=ref.topk_ids[:n], topk_logits=ref.topk_logits[:n],
                                      lse=ref.lse[:n], token_by_token=None)
        ours = decode_logits(model, list(ref.ids))
        stats = compare_logits(ours, ref)
        hit = ours.argmax(axis=1) == ref.topk_ids[:, 0]
        hits.append(hit)
        confident.append(hit[ref.margin >= CONFIDENT_MARGIN])
        kl.append(stats["kl_mean"] * stats["n_positions"])
        seen += len(hit)
    hits, confident = np.concatenate(hits), np.concatenate(confident)
    assert confident.mean() >= 0.99, f"{name}: top-1 at confident positions {confident.mean():.4f}"
    assert hits.mean() >= 0.95, f"{name}: top-1 over all positions {hits.mean():.4f}"
    assert sum(kl) / len(hits) <= 0.01, f"{name}: mean KL {sum(kl) / len(hits):.5f}"
