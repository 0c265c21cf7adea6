"""The `triton_blocks` backend (`realm_jax.linear.blocks`): the block-dot decode GEMM of
`pallas_kernels.blockdot` on its block planes, in interpret mode on CPU against the reference (the shared
cases); lowering for CUDA (an abstract H100) at an 8B llama's shapes; the layout's round trip; the kernel's
arithmetic exactly where x is exact in f16; x of any magnitude; its tiling; its planes split along K for a
mesh; SmolLM2 (Q4_1) and a synthetic Q4_K_M model decoding on it against llama.cpp (on a mesh:
tests/test_sharded_kernels.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_kernels import blockdot
from realm_jax import linear
from realm_jax.errors import ShapeMismatchError, UnsupportedFormatError
from realm_jax.precision import Policy
from realm_jax.quant import dequantize, quantize
from decode_agreement import assert_decode_agrees
from helpers import random_qtensor
from linear_base import LinearTests, LoweringTests

H100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                                                     platform="gpu"))
SHAPES_8B = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))


class TestTritonBlocks(LinearTests):
    BACKEND = "triton_blocks"
    ROWS = (1, 8, 9, blockdot.MAX_ROWS, blockdot.MAX_ROWS + 1)  # x_rows 8 and 16, the reference past them
    # On a device: the kernel's two mma widths, nine formats (past 16 rows it is the XLA path, which the
    # `triton` backend's device cases run): fewer compiles, as device_checks.sh's time asks.
    DEVICE_ROWS = (1, blockdot.MAX_ROWS)


class TestTritonBlocksLowering(LoweringTests):
    BACKEND = "triton_blocks"
    CUSTOM_CALLS = ("__gpu$xla.gpu.triton",)

    def lower(self, fn, x, w) -> str:
        with use_abstract_mesh(H100):
            return jax.jit(fn).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("fmt,n,k", [("Q4_0", 200, 576), ("Q4_1", 130, 4096), ("Q4_0", 128, 32), ("Q4_K", 70, 768),
                                     ("Q8_0", 130, 576), ("Q6_K", 70, 768), ("Q5_0", 200, 576), ("Q5_1", 130, 4096),
                                     ("Q5_K", 70, 768), ("Q8_K", 130, 512)])
def test_layout_round_trip(fmt, n, k, rng):
    """to_blocks keeps every bit of the planes (rows padded to 128, K to whole steps of 256, with zeros; Q4_K's
    codes in the order of its sub-blocks): from_blocks gives the QTensor back (Q8_K's bsums, which the
    kernel does not read, recomputed from its codes)."""
    w = (random_qtensor(fmt, n, k, rng) if fmt != "Q8_K"
         else quantize(jnp.asarray(rng.standard_normal((n, k))), "Q8_K"))
    planes = jax.jit(blockdot.to_blocks)(w)  # one program, not one an op
    k_pad = -(-k // blockdot.STEP) * blockdot.STEP
    per_word = 2 if fmt in ("Q8_0", "Q8_K") else 4  # codes a uint16
    assert planes["q"].shape == (-(-n // 128) * 128, k_pad // per_word) and planes["q"].dtype == jnp.uint16
    # Q4_K, Q4_1: eight scales, eight mins a step; Q6_K: sixteen scales a step, and its codes' high bits, eight
    # to a uint16; the others: eight scales a step, and eight more at the end (a step's offset dots read
    # sixteen from its first)
    # Q5_*: those of Q4_*, and the fifth bits, eight to a uint8
    scales, width, tail = {"Q4_K": ("scm", 16, 0), "Q4_1": ("dm", 16, 0), "Q6_K": ("sc", 16, 0), "Q5_K": ("scm", 16, 0),
                           "Q5_1": ("dm", 16, 0), "Q8_K": ("d", 1, 0)}.get(fmt, ("d", 8, 8))
    assert planes[scales].shape == (planes["q"].shape[0], k_pad // 256 * width + tail)
    if fmt in ("Q5_0", "Q5_1", "Q5_K", "Q6_K"):
        assert planes["qh"].shape == (planes["q"].shape[0], k_pad // 8)
        assert planes["qh"].dtype == (jnp.uint16 if fmt == "Q6_K" else jnp.uint8)
    back = jax.jit(blockdot.from_blocks, static_argnums=(0, 1))(fmt, w.shape, planes).check()
    for name, plane in w.planes.items():
        np.testing.assert_array_equal(np.asarray(back.planes[name]), np.asarray(plane), err_msg=f"{fmt} {name}")


def test_layout_puts_nibble_j_of_a_tile_on_block_4t_plus_j(rng):
    """Element (n, 64 s + 32 t + w) holds in nibble j the code of element w of block 8 s + 4 t + j."""
    w = random_qtensor("Q4_0", 128, 512, rng)
    q = np.asarray(blockdot.to_blocks(w)["q"])
    qs = np.asarray(w.planes["qs"]).reshape(128, 16, 16)
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # [n, block, element]
    for s, t, j, e in [(0, 0, 0, 0), (0, 1, 3, 31), (1, 0, 2, 17), (1, 1, 1, 5)]:
        assert (q[:, 64 * s + 32 * t + e] >> (4 * j)) & 0xF == pytest.approx(codes[:, 8 * s + 4 * t + j, e])


def test_layout_puts_byte_j_of_a_q8_0_tile_on_block_2t_plus_j(rng):
    """Q8_0: element (n, 128 s + 32 t + w) holds in byte j q + 128 of element w of block 8 s + 2 t + j."""
    w = random_qtensor("Q8_0", 128, 512, rng)
    q = np.asarray(blockdot.to_blocks(w)["q"])
    codes = np.asarray(w.planes["qs"]).astype(np.int32).reshape(128, 16, 32) + 128  # [n, block, element]
    assert codes.min() < 64 and codes.max() > 192  # both signs
    for s, t, j, e in [(0, 0, 0, 0), (0, 3, 1, 31), (1, 2, 0, 17), (1, 1, 1, 5)]:
        np.testing.assert_array_equal((q[:, 128 * s + 32 * t + e] >> (8 * j)) & 0xFF, codes[:, 8 * s + 2 * t + j, e])


def test_layout_puts_q6_k_high_bits_beside_their_nibbles(rng):
    """Q6_K: "q" element (n, 64 s + 16 t + w) holds in nibble j the low four bits of element w of sub-block
    16 s + 4 t + j, and "qh" element (n, 32 s + 16 h + w) at bits 2 slot(i) the high two of element w of
    sub-block 16 s + 8 h + i, the slots (0, 2, 1, 3, 4, 6, 5, 7): one shift of the word takes the codes of
    an even and an odd nibble to bits 4-5 and 8-9."""
    w = random_qtensor("Q6_K", 128, 512, rng)
    planes = blockdot.to_blocks(w)
    q, qh = np.asarray(planes["q"]), np.asarray(planes["qh"])
    codes = np.rint(np.asarray(dequantize(w), np.float64).reshape(128, 32, 16)
                    / np.repeat(np.asarray(w.planes["d"], np.float64), 16, axis=1)[..., None]
                    / np.where(np.asarray(w.planes["scales"]) == 0, 1, np.asarray(w.planes["scales"]))[..., None]
                    ).astype(np.int64) + 32  # [n, sub-block, element], where the scale is not 0
    ok = np.asarray(w.planes["scales"]) != 0
    for s, t, j, e in [(0, 0, 0, 0), (0, 3, 3, 15), (1, 2, 1, 7), (1, 1, 2, 5)]:
        b = 16 * s + 4 * t + j
        got = (q[:, 64 * s + 16 * t + e] >> (4 * j)) & 0xF
        np.testing.assert_array_equal(got[ok[:, b]], (codes[:, b, e] & 0xF)[ok[:, b]])
    for s, h, i, e in [(0, 0, 0, 0), (0, 1, 7, 15), (1, 0, 1, 3), (1, 1, 6, 9)]:
        b = 16 * s + 8 * h + i
        got = (qh[:, 32 * s + 16 * h + e] >> (2 * (0, 2, 1, 3, 4, 6, 5, 7)[i])) & 3
        np.testing.assert_array_equal(got[ok[:, b]], (codes[:, b, e] >> 4)[ok[:, b]])


@pytest.mark.parametrize("fmt", blockdot.FORMATS)
def test_arithmetic_is_exact_where_x_is(fmt, rng):
    """x exact in f16 after each row's power-of-two scale (integers below 2^11 times a power of two from
    2^-40 to 2^40 a row): the product is the float64 one up to the f32 accumulators, whatever each row's
    magnitude. The offsets cancel ~8 of their 24 bits, and a step's eight blocks' offsets reach the
    accumulator at once (the offset dots): 1.3e-5 to 2.1e-5 measured, against 5-7e-6 where each block's
    offset came off its own dot (`f16-nosub`, one FADD an output a block more)."""
    m, n, k = 7, 130, 768
    w = random_qtensor(fmt, n, k, rng)
    x = rng.integers(-2047, 2048, (m, k)).astype(np.float64) * 2.0 ** rng.integers(-40, 40, (m, 1))
    y = np.asarray(blockdot.gemm(jnp.asarray(x, jnp.float32), jax.jit(blockdot.to_blocks)(w), fmt=fmt, interpret=True))
    want = x @ np.asarray(dequantize(w), np.float64).T
    assert y.shape == (m, 256)
    np.testing.assert_array_equal(y[:, n:], 0.0)
    err = np.abs(y[:, :n] - want).max(axis=1) / np.abs(want).max(axis=1)
    assert err.max() <= 4e-5, err


def test_rows_of_zeros_and_huge_rows(rng):
    """A row of zeros gives zeros; rows past f16's range (1e30) and of tiny values (1e-30; 1e-36, below
    2^-111, where the scale is at its largest, 2^126) are scaled into it and come back at their own
    magnitude; an inf makes its row NaN; no rows of x give no rows."""
    n, k = 128, 256
    w = random_qtensor("Q4_1", n, k, rng)
    x = rng.standard_normal((5, k))
    x[0] = 0.0
    x[1] *= 1e30
    x[2] *= 1e-30
    x[3] *= 1e-36
    x[4, 7] = np.inf
    y = np.asarray(blockdot.gemm(jnp.asarray(x, jnp.float32), blockdot.to_blocks(w), fmt="Q4_1", interpret=True))
    want = x[:4] @ np.asarray(dequantize(w), np.float64).T
    assert np.all(np.isfinite(y[:4])) and np.all(y[0] == 0.0) and np.all(np.isnan(y[4]))
    for r in (1, 2, 3):
        assert np.abs(y[r, :n] - want[r]).max() <= 2e-3 * np.abs(want[r]).max()
    empty = linear.matmul(jnp.zeros((0, k)), linear.prepare(w, Policy.of("bf16"), impl="triton_blocks"))
    assert empty.shape == (0, n)


def test_tiling_fills_the_gpu_at_the_8b_shapes():
    """At least two programs an SM at an 8B llama's shapes where the K steps allow (the k/v projection's
    K = 4096 is 16 steps: 16 row tiles of 64, 256 programs); the splits divide the steps; two warps a program
    (`mma.sync`); 128 weight rows a program, 256 for Q8_K where they give the programs, 64 for Q6_K and for
    Q4_K and Q5_K at 16 rows of x (at 128 they spill), and 64 at the k/v projection."""
    for fmt in blockdot.FORMATS:
        for m in (1, 8, 16):
            for n, k in SHAPES_8B:
                t = blockdot.tiling_for(fmt, n, k, m)
                steps = k // blockdot.STEP
                assert n % t.rows == 0 and steps % t.splits == 0 and t.x_rows == (8 if m <= 8 else 16), t
                assert t.num_warps == 2, t
                programs = n // t.rows * t.splits
                assert programs >= 2 * 132 or (n, t.rows, t.splits) == (1024, 64, steps), (m, n, k, t)
                narrow = fmt == "Q6_K" or fmt in ("Q4_K", "Q5_K") and m > 8
                wide = fmt == "Q8_K" and max(n, k) == 14336  # at 4096 x 4096, 256 rows give 256 programs
                want = 64 if narrow or n == 1024 else 256 if wide else 128
                assert t.rows == want, (fmt, m, n, k, t)


def test_bad_arguments(rng):
    w = random_qtensor("Q4_0", 128, 256, rng)
    planes = blockdot.to_blocks(w)
    with pytest.raises(ShapeMismatchError, match="1 to 16 rows"):
        blockdot.gemm(jnp.ones((17, 256)), planes, fmt="Q4_0", interpret=True)
    with pytest.raises(ShapeMismatchError, match="K 512 padded"):
        blockdot.gemm(jnp.ones((1, 512)), planes, fmt="Q4_0", interpret=True)
    with pytest.raises(ShapeMismatchError, match=r"lack \['dm'\]"):
        blockdot.gemm(jnp.ones((1, 256)), planes, fmt="Q4_1", interpret=True)
    with pytest.raises(ShapeMismatchError, match="a stack"):
        blockdot.gemm(jnp.ones((1, 256)), planes, fmt="Q4_0", layer=0, interpret=True)
    with pytest.raises(ShapeMismatchError, match=r"lack \['qh', 'sc'\]"):
        blockdot.gemm(jnp.ones((1, 256)), planes, fmt="Q6_K", interpret=True)
    with pytest.raises(UnsupportedFormatError, match="Q3_K has no kernel"):
        blockdot.gemm(jnp.ones((1, 256)), planes, fmt="Q3_K", interpret=True)


def test_split_columns_gives_each_k_range_its_own_planes(rng):
    """Planes laid out for K split in two (or three): each part of every plane's columns is exactly the block
    planes of that range of the weight, padded to whole steps where the range is not (Q8_0's 2 x 128, Q4_0's
    3 x 96); a stack of layers splits the same way; a range of part of a block is refused. (Jitted: op by op,
    the layouts took ~15 s here.)"""
    to_blocks = jax.jit(blockdot.to_blocks)
    split_columns = jax.jit(blockdot.split_columns, static_argnums=(0, 1, 3))
    for fmt, k, shards, lead in (("Q4_0", 1024, 2, ()), ("Q4_K", 1024, 2, (2,)), ("Q8_0", 256, 2, ()),
                                 ("Q4_0", 288, 3, ()), ("Q6_K", 768, 3, (2,)), ("Q5_0", 512, 2, ()),
                                 ("Q5_1", 288, 3, ()), ("Q5_K", 512, 2, ()), ("Q8_K", 512, 2, ())):
        ws = [random_qtensor(fmt, 128, k, rng) for _ in range(lead[0] if lead else 1)]
        planes = to_blocks(ws[0]) if not lead else {
            name: jnp.stack([to_blocks(w)[name] for w in ws]) for name in to_blocks(ws[0])}
        split = split_columns(fmt, (128, k), planes, shards)
        for i, w in enumerate(ws):
            f, per = w.format, k // shards
            for part in range(shards):
                cols = {name: v.reshape(128, k // f.block_size, -1)[:, part * per // f.block_size:][
                    :, : per // f.block_size].reshape(128, -1) for name, v in w.planes.items()}
                want = to_blocks(type(w)(fmt, (128, per), cols))
                for name, a in split.items():
                    a = a[i] if lead else a
                    width = a.shape[-1] // shards
                    np.testing.assert_array_equal(np.asarray(a[:, part * width:(part + 1) * width]),
                                                  np.asarray(want[name]), err_msg=f"{fmt} {name} part {part}")
    with pytest.raises(ShapeMismatchError, match="whole 32-element blocks"):
        blockdot.split_columns("Q4_0", (128, 256), blockdot.to_blocks(random_qtensor("Q4_0", 128, 256, rng)), 16)


def test_other_formats_go_to_the_reference():
    choice = linear.choose("Q3_K", (256, 256), "triton_blocks")
    assert choice.backend == "xla" and "Q3_K" in choice.reason


ON_CPU = jax.default_backend() == "cpu"


def _served(model) -> dict[str, set[str]]:
    """Backend -> the formats of the model's weights it serves."""
    out: dict[str, set[str]] = {}
    for w in jax.tree.leaves(model.params, is_leaf=lambda v: isinstance(v, linear.Prepared)):
        if isinstance(w, linear.Prepared):
            out.setdefault(w.backend, set()).add(w.fmt)
    return out


@pytest.mark.parametrize("name", ["smollm2-135m-instruct-q4_1", "llama-k-q4_k_m", "llama-k-q5_k_m"])
def test_models_decode_on_it_in_agreement_with_llama_cpp(name):
    """The real Q4_1 model (its Q8_0 embedding and output on the kernel too) and the synthetic Q4_K_M and Q5_K_M
    ones (their Q6_K layers on the kernel too) decoding on the block-dot GEMM under the bf16 policy, one token
    at a time, against llama.cpp's recorded logits with the model tests' thresholds: 16, 150 and 60 positions
    on a CPU (interpreted: SmolLM2's 30 layers and 49k-row output cost ~0.3 s a position), every one on a GPU.
    Measured on SmolLM2: top-1 1.0 at all of its first 60 (43 confident), mean KL 0.0035 (the reference path
    0.0036, triton 0.0035)."""
    import realm_jax
    from realm_jax import assets
    from realm_jax.reference import reference_dir

    path = (assets.model_path(name) if name.startswith("smollm2")
            else reference_dir().parent / "synthetic" / f"{name}.gguf")
    model = realm_jax.load(path, impl="triton_blocks", policy="bf16", progress=False)
    assert model.impl == "triton_blocks"
    served = {"smollm2-135m-instruct-q4_1": ({"Q4_1", "Q8_0"}, 16), "llama-k-q4_k_m": ({"Q4_K", "Q6_K"}, 150),
              "llama-k-q5_k_m": ({"Q5_K", "Q6_K"}, 60)}
    assert _served(model)["triton_blocks"] == served[name][0]
    assert_decode_agrees(model, name, served[name][1] if ON_CPU else None)
