"""The Mosaic GPU backend (`realm_jax.linear.mosaic_gpu`, its prefill GEMM in `pallas_kernels.mosaic_gpu`;
up to 16 rows and f32 compute, the XLA reference): lowering for CUDA (an abstract H100) at real shapes, its
tilings, and its cases in the Mosaic GPU interpreter on CPU: test_linear_mosaic_gpu_interpret.py, run here
in a process of four CPU devices where this one's XLA thread pool is too small for the interpreter (two
cores), and the kernel's two compute warpgroups likewise.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys

import background
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_kernels import DECODE_ROWS, mosaic_gpu
from pallas_kernels.mosaic_gpu import MosaicGpuTiling, gemm, tiling_for
from realm_jax.errors import ArgumentError, DTypeError, UnsupportedFormatError
from realm_jax.linear.pallas import KERNEL_FORMATS
from realm_jax.quant import quantize
from helpers import random_qtensor
from linear_base import BF16, LoweringTests

_H100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3",
                                                                   num_cores=132, platform="gpu"))


class TestMosaicGpuLowering(LoweringTests):
    BACKEND = "mosaic_gpu"
    CUSTOM_CALLS = ("mosaic_gpu_v2",)
    ROWS = (1, DECODE_ROWS + 1, 512)  # the reference, then the GEMM (1-3 s a lowering)
    SHAPES = ((4096, 4096), (4096, 14336))

    def lower(self, fn, x, w) -> str:
        with use_abstract_mesh(_H100):
            return jax.jit(fn).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()


# Two compute warpgroups (and the TMA one) in a process with four CPU devices: Q4_K and Q8_0 (rows of the
# lanes in 256s: the default tiling's two warpgroups), four tiles over three CTAs, each tile eight steps
# with the inputs released a step late, bf16 out through the shared-memory epilogue; the race detector
# on; Q6_K with one dequantized tile a warpgroup.
_TWO_WARPGROUPS = """
import dataclasses, json, sys
sys.path[:0] = sys.argv[1:]
import jax.numpy as jnp, numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu
from pallas_kernels.mosaic_gpu import gemm, tiling_for
from realm_jax.quant import dequantize
from helpers import assert_matmul_close, random_qtensor
rng, out = np.random.default_rng(5), []
for fmt, n, m, bufs in (("Q4_K", 500, 200, 2), ("Q8_0", 256, 130, 2), ("Q6_K", 384, 70, 1)):
    w, x = random_qtensor(fmt, n, 512, rng), jnp.asarray(rng.standard_normal((m, 512)), jnp.float32)
    t = dataclasses.replace(tiling_for(fmt, m, 512, 512), compute_wgs=2, w_buffers=bufs, block_m=64 + 64 * (m > 180),
                            max_concurrent_steps=3)
    y = gemm(x, w, compute_dtype=jnp.bfloat16, out_dtype=jnp.bfloat16, tiling=t, ctas=3,
             interpret=plgpu.InterpretGPUParams(detect_races=True))
    assert y.dtype == jnp.bfloat16
    assert_matmul_close(y, x, dequantize(w), compute_dtype=jnp.bfloat16, out_dtype=jnp.bfloat16)
    out.append([fmt, t.compute_wgs, t.w_buffers])
print(json.dumps(out))
"""


@background.job(__file__, "two_warpgroups")
def _two_warpgroups_job():
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    return [sys.executable, "-c", _TWO_WARPGROUPS, os.path.dirname(here), here], env, 600


@pytest.fixture(scope="module")
def two_warpgroups():
    proc = background.result(__file__, "two_warpgroups")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_compute_warpgroups_in_a_persistent_loop(two_warpgroups):
    assert two_warpgroups == [["Q4_K", 2, 2], ["Q8_0", 2, 2], ["Q6_K", 2, 1]]


# The interpreter's cases where this process cannot run them (test_linear_mosaic_gpu_interpret.py skips itself).
_INTERPRET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_linear_mosaic_gpu_interpret.py")
_IN_PROCESS = mosaic_gpu._interpreter_fits()


@background.job(__file__, "interpreter_process",
                wants=lambda item: not _IN_PROCESS and "interpreter_process" in getattr(item, "fixturenames", ()))
def _interpreter_job():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", _INTERPRET], env, 1200


@pytest.fixture(scope="module")
def interpreter_process():
    return background.result(__file__, "interpreter_process")


@pytest.mark.skipif(_IN_PROCESS, reason="this process runs test_linear_mosaic_gpu_interpret.py itself")
def test_interpreter_cases_in_a_process_of_four_devices(interpreter_process):
    """test_linear_mosaic_gpu_interpret.py passes there, its 40-odd cases run (pytest's summary line; the
    device cases are skipped on a CPU, as in every backend's module)."""
    proc = interpreter_process
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}
    assert counts.get("passed", 0) >= 40, tail


def test_two_compute_warpgroups_need_as_many_interpreter_devices(rng):
    """In this one-device process (XLA's pool: a thread a core), the default tiling takes one compute
    warpgroup unless the pool has the four threads two need with their caller; a tiling the pool cannot run
    raises instead of risking a wait forever (two cores: even one compute warpgroup), an ArgumentError that
    the command line reports in one line."""
    w, x = random_qtensor("Q4_0", 256, 256, rng), jnp.ones((64, 256), jnp.float32)
    threads = mosaic_gpu._interpreter_threads()
    t = tiling_for("Q4_0", 2048, 4096, 4096)
    assert t.compute_wgs == 2
    default = functools.partial(mosaic_gpu._default_tiling, "Q4_0", 2048, 4096, 4096, jnp.float32)
    assert default(plgpu.InterpretGPUParams()).compute_wgs == (2 if threads >= 4 else 1)
    assert default(None) == t  # compiled: as chosen
    for wgs in (1, 2):
        t = dataclasses.replace(tiling_for("Q4_0", 64, 256, 256), compute_wgs=wgs)
        if wgs + 2 > threads:
            with pytest.raises(ArgumentError, match=f"XLA_FLAGS=--xla_force_host_platform_device_count={wgs + 2}"):
                gemm(x, w, compute_dtype=BF16, tiling=t, interpret=True)


@pytest.mark.parametrize("fmt", sorted(KERNEL_FORMATS))
def test_heuristic_tilings_are_valid(fmt):
    for m, n, k in ((17, 4096, 4096), (512, 4096, 14336), (64, 100, 256)):
        t = tiling_for(fmt, m, n, k)
        t.check(fmt)
        assert mosaic_gpu._gemm_smem_bytes(fmt, t, BF16) <= mosaic_gpu._SMEM_BYTES


def test_bad_tilings_raise():
    with pytest.raises(ValueError, match="block_k"):
        MosaicGpuTiling(block_k=100).check("Q4_0")
    with pytest.raises(ValueError, match="divide"):
        MosaicGpuTiling(block_k=192).check("Q4_K")  # neither whole units nor a part of one
    with pytest.raises(ValueError, match="units"):
        MosaicGpuTiling(block_k=128).check("Q3_K")  # its bit fields need the whole unit
    MosaicGpuTiling(block_k=128).check("Q4_K")  # half a unit a step
    with pytest.raises(ValueError, match="TMA"):
        MosaicGpuTiling(block_k=32 * 512).check("Q8_0")  # 512 units of the lanes in one copy
    with pytest.raises(ValueError, match="block_n"):
        MosaicGpuTiling(block_n=64).check("Q4_0")
    with pytest.raises(ValueError, match="compute_wgs"):
        MosaicGpuTiling(compute_wgs=3).check("Q4_0")
    with pytest.raises(ValueError, match="w_buffers"):
        MosaicGpuTiling(w_buffers=0).check("Q4_0")
    with pytest.raises(ValueError, match="TMA"):
        MosaicGpuTiling(block_n=256, compute_wgs=2).check("Q4_0")  # 512 rows in one copy
    with pytest.raises(ValueError, match="registers"):
        MosaicGpuTiling(block_m=128, block_n=256).check("Q4_0")  # 256 accumulator registers a thread
    with pytest.raises(TypeError):
        MosaicGpuTiling(128)  # keyword-only
    w = random_qtensor("Q8_0", 128, 512, np.random.default_rng(0))
    with pytest.raises(ValueError, match="shared memory"):
        gemm(jnp.ones((128, 512), jnp.bfloat16), w, tiling=MosaicGpuTiling(block_m=128, max_concurrent_steps=4,
                                                                            w_buffers=2))


def test_unsupported_inputs_raise():
    dense = quantize(jnp.ones((128, 256)), "F16")
    with pytest.raises(UnsupportedFormatError, match="F16"):
        gemm(jnp.ones((64, 256)), dense)
    w = random_qtensor("Q4_0", 128, 256, np.random.default_rng(0))
    with pytest.raises(DTypeError, match="compute_dtype"):
        gemm(jnp.ones((64, 256)), w, compute_dtype=jnp.int8)
    with pytest.raises(DTypeError, match="wgmma"):
        gemm(jnp.ones((64, 256)), w, compute_dtype=jnp.float32)


def test_tiling_is_hashable_and_frozen():
    t = MosaicGpuTiling()
    hash(t)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.block_n = 256
