"""realm_jax.native.decode_attention (attention.cc): a decode step's attention over layer i of the stacked KV
cache, read in place, against `ops.attention` (XLA's dots) on that layer's slice, in the AVX-512 build and
the portable one; and the decode step that uses it writes the cache in place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax import linear, native, ops
from realm_jax.errors import ShapeMismatchError

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.reason()}")

BUILDS = [pytest.param(False, id="vector"), pytest.param(True, id="portable")]
# bf16: the same roundings (q, cache) as XLA's path; the probabilities rounded before they are normalized
# (per key range), sums in another order.
TOL = {jnp.bfloat16: 2e-2, jnp.float32: 1e-5}


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("t,h,window,local",
                         [(1, 32, 0, False), (3, 24, 4, True), (1, 64, 4, False), (2, 256, 0, False)],
                         ids=["one-query", "window-ragged-head", "window-global-layer", "widest-register-head"])
def test_matches_xla_attention(t, h, window, local, dtype, portable, rng):
    layers, b, s, kv, n, kv_len = 3, 2, 20, 2, 6, 16
    cache_k, cache_v = (jnp.asarray(rng.standard_normal((layers, b, s, kv, h)), dtype) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
    pos = jnp.asarray(np.array([[5], [11]]) + np.arange(t), jnp.int32)  # each row its own positions
    f = jax.jit(lambda q, k, v, layer, pos: native.decode_attention(
        q, k, v, layer, pos, local, scale=0.3, window=window, kv_len=kv_len, portable=portable))
    for layer in (0, 2):
        got = f(q, cache_k, cache_v, jnp.int32(layer), pos)
        want = ops.attention(q, cache_k[layer, :, :kv_len], cache_v[layer, :, :kv_len], pos, scale=0.3,
                             window=window, local=local)
        assert got.dtype == dtype and got.shape == (b, t, n, h)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=TOL[dtype],
                                   atol=TOL[dtype])


@pytest.mark.parametrize("portable,dtype", [(False, jnp.bfloat16), (False, jnp.float32), (True, jnp.bfloat16)],
                         ids=["vector-bf16", "vector-f32", "portable-bf16"])
@pytest.mark.parametrize("window,local", [(0, False), (100, True)], ids=["global", "window"])
def test_long_rows_in_key_ranges_match_xla(window, local, portable, dtype, rng):
    """Rows long enough to be cut into key ranges whose softmaxes are merged (each kv head's range for all
    its query heads), an odd number of keys among them; with the window, sequence 1 sees no key (XLA's path
    weighs every key equally), over ranges too."""
    b, t, n, kv, h, s, kv_len = 2, 2, 8, 2, 64, 1400, 1100
    cache_k, cache_v = (jnp.asarray(rng.standard_normal((1, b, s, kv, h)), dtype) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
    pos = jnp.asarray([[1050, 1051], [1300, 1301]], jnp.int32)
    got = jax.jit(lambda q, k, v: native.decode_attention(q, k, v, 0, pos, local, scale=0.125, window=window,
                                                          kv_len=kv_len, portable=portable))(q, cache_k, cache_v)
    want = ops.attention(q, cache_k[0, :, :kv_len], cache_v[0, :, :kv_len], pos, scale=0.125, window=window,
                         local=local)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=TOL[dtype],
                               atol=TOL[dtype])


def test_queries_wider_than_bf16_keep_their_precision(rng):
    """f32 queries that are not bf16 values against a bf16 cache: the dots take them as they are, not rounded
    to bf16 for the bf16 pairs' products (which moves the result ~8x further from float64's here)."""
    k, v = (jnp.asarray(rng.standard_normal((1, 1, 600, 1, 64)), jnp.bfloat16) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((1, 1, 2, 64)) * 8, jnp.float32) * (1 + 2.0**-12)
    pos = jnp.asarray([[599]], jnp.int32)
    got = np.asarray(native.decode_attention(q, k, v, 0, pos, False, scale=0.125)[0, 0], np.float64)

    def exact(queries):
        qf, kf, vf = (np.asarray(a, np.float64) for a in (queries[0, 0], k[0, 0, :, 0], v[0, 0, :, 0]))
        scores = qf @ kf.T * 0.125
        p = np.exp(scores - scores.max(-1, keepdims=True))
        return (p / p.sum(-1, keepdims=True)) @ vf

    want = exact(q)
    rounded_q = np.abs(exact(q.astype(jnp.bfloat16).astype(jnp.float32)) - want).max()
    assert np.abs(got - want).max() < rounded_q / 3


def test_bad_operands_are_clear_errors(rng):
    k = jnp.zeros((2, 1, 8, 2, 16), jnp.bfloat16)
    q = jnp.zeros((1, 1, 4, 16), jnp.bfloat16)
    with pytest.raises(ShapeMismatchError):
        native.decode_attention(q, k, k.astype(jnp.float32), 0, jnp.zeros((1, 1), jnp.int32), False, scale=1.0)
    with pytest.raises(Exception, match="layer index is outside"):
        jax.block_until_ready(native.decode_attention(q, k, k, 2, jnp.zeros((1, 1), jnp.int32), False, scale=1.0))
    with pytest.raises(Exception, match="query position is outside"):
        jax.block_until_ready(native.decode_attention(q, k, k, 0, jnp.full((1, 1), 8, jnp.int32), False, scale=1.0))


def test_only_decode_steps_of_matching_dtypes_take_it():
    """The native backend offers it for a few queries with f32 scores and a cache in the queries' dtype
    (XLA's path would round a wider cache to it); the XLA backend never."""
    pick = linear.decode_attention("native")
    assert linear.decode_attention("xla") is None
    cache = jnp.zeros((2, 1, 8, 2, 16), jnp.bfloat16)
    q = jnp.zeros((1, 1, 4, 16), jnp.bfloat16)
    assert pick(q, cache, cache, jnp.float32) is native.decode_attention
    assert pick(q, cache, cache, jnp.bfloat16) is None
    assert pick(jnp.zeros((1, native.MAX_ROWS + 1, 4, 16), jnp.bfloat16), cache, cache, jnp.float32) is None
    assert pick(q.astype(jnp.float32), cache, cache, jnp.float32) is None
