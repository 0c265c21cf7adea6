"""The Pallas Triton decode attention (`pallas_kernels.attention`) over one layer of the stacked KV cache:
in interpret mode (compiled on a GPU) against `ops.attention` on that layer's slice (pairwise over queries a step, heads a kv
head, the sliding window, kv_len, position splits and the 16-bit dtypes), lowering for CUDA, its refusals,
and the Triton backend handing it to the model's decode step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_kernels import attention
from realm_jax import linear, ops
from realm_jax.errors import ShapeMismatchError

H100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                                                     platform="gpu"))
L, S, H = 2, 128, 64
ON_CPU = jax.default_backend() == "cpu"  # interpret mode; compiled on a GPU (scripts/device_checks.sh)

# (T, heads per kv head, kv heads, window, local, kv_len, splits, dtype, positions of the two sequences): one
# query and several, 1-8 heads a kv head over 1-2 kv heads, a local window and a global one, kv_len below
# the cache, one split and more (some empty), both 16-bit dtypes; position 0 and the cache's last.
CASES = [
    (1, 4, 2, 0, False, None, 1, jnp.bfloat16, [[100], [0]]),
    (2, 1, 2, 32, True, None, 3, jnp.bfloat16, [[40, 41], [126, 127]]),
    (4, 8, 1, 8, True, 96, 4, jnp.float16, [[10, 11, 12, 13], [92, 93, 94, 95]]),
]


@pytest.mark.parametrize("case", CASES, ids=[f"t{c[0]}-g{c[1]}-kv{c[2]}-w{c[3]}{'L' if c[4] else ''}-s{c[6]}"
                                             for c in CASES])
def test_matches_attention_on_the_layer(case, rng):
    t, g, kv, window, local, kv_len, splits, dtype, positions = case
    b = 2
    kc = jnp.asarray(rng.standard_normal((L, b + 1, S, kv, H)), dtype)
    vc = jnp.asarray(rng.standard_normal((L, b + 1, S, kv, H)), dtype)
    q = jnp.asarray(rng.standard_normal((b, t, g * kv, H)), dtype)
    pos = jnp.asarray(positions, jnp.int32)
    got = attention.decode_attention(q, kc, vc, jnp.int32(1), pos, local, scale=0.125, window=window, kv_len=kv_len,
                                     interpret=ON_CPU, tiling=attention.AttentionTiling(block=64, splits=splits))
    n = kv_len or S
    want = ops.attention(q, kc[1, :b, :n], vc[1, :b, :n], pos, scale=0.125, window=window, local=local)
    assert got.dtype == dtype and got.shape == want.shape
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * np.abs(want).max())


def test_lowers_for_cuda():
    """An 8B llama's decode step (32 heads over 8 kv heads of 128, 4096 positions): one Triton kernel, the
    cache passed whole (no slice of it made outside the kernel), splits giving every SM a program."""
    q = jax.ShapeDtypeStruct((1, 1, 32, 128), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((32, 1, 4096, 8, 128), jnp.bfloat16)
    pos = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    fn = lambda q, k, v, p: attention.decode_attention(q, k, v, jnp.int32(3), p, False, scale=0.088)  # noqa: E731
    with use_abstract_mesh(H100):
        text = jax.jit(fn).trace(q, cache, cache, pos).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    jaxpr = jax.make_jaxpr(fn)(q, cache, cache, pos)
    readers = [e.primitive.name for e in jaxpr.eqns if any(getattr(v, "aval", None) is not None
                                                           and v.aval.shape == cache.shape for v in e.invars)]
    assert readers == ["pallas_call"], readers
    t = attention.tiling_for(1, 8, 4096)
    assert 8 * t.splits >= 132 and 4096 % (t.splits * t.block) == 0


def test_refusals(rng):
    kc = jnp.zeros((L, 1, S, 2, H), jnp.bfloat16)
    q = jnp.zeros((1, 1, 4, H), jnp.bfloat16)
    pos = jnp.zeros((1, 1), jnp.int32)
    with pytest.raises(ShapeMismatchError, match="at most 64 query rows"):
        attention.decode_attention(jnp.zeros((1, 2, 80, H), jnp.bfloat16), kc, kc, 0, jnp.zeros((1, 2), jnp.int32),
                                   False, scale=1.0, interpret=True)
    with pytest.raises(ShapeMismatchError, match="decode attention"):
        attention.decode_attention(q.astype(jnp.float16), kc, kc, 0, pos, False, scale=1.0, interpret=True)
    odd = jnp.zeros((L, 1, 120, 2, H), jnp.bfloat16)
    with pytest.raises(ShapeMismatchError, match="divides the cache's 120"):
        attention.decode_attention(q, odd, odd, 0, pos, False, scale=1.0, interpret=True)
    # the backend hands the kernel to the decode step only where it applies; else XLA's path (None)
    decoder = linear.decode_attention("triton")
    assert decoder(q, kc, kc, jnp.float32) is not None
    assert decoder(q, kc, kc, jnp.bfloat16) is None  # bf16 scores: XLA's path rounds them so
    assert decoder(q.astype(jnp.float32), kc.astype(jnp.float32), kc.astype(jnp.float32), jnp.float32) is None
    assert decoder(q, odd, odd, jnp.float32) is None
