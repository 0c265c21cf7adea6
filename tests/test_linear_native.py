"""The native CPU backend (`realm_jax.linear.native`): the shared cases, and what only it does: a
second path for prefill past MAX_ROWS rows (the bf16 gemm on the same planes, or XLA's dot on a dense copy),
the gated activation in the gemm's epilogue, attention's prefill products, the tied output projection on
the embedding table's own planes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax
from realm_jax import linear, native
from realm_jax.errors import ArgumentError
from realm_jax.linear.native import NativeWeight, decode_weight_dtype
from realm_jax.precision import Policy
from realm_jax.quant import dequantize, to_dense
from helpers import assert_matmul_close, random_qtensor
from linear_base import BF16, F32, LinearTests

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.reason()}")
needs_gemm = pytest.mark.skipif(not native.available() or not native.gemm_available(),
                                reason="this CPU has no AVX512_BF16: load() keeps a dense copy for prefill")
MAX = native.MAX_ROWS


class TestNative(LinearTests):
    BACKEND = "native"
    ROWS = (1, 3, MAX, MAX + 1, 40)  # the kernel up to MAX_ROWS rows (decode), the gemm or XLA's dot past it
    N = 37  # not a multiple of the 16-row chunks the threads take nor of the 64-row panels


@pytest.mark.parametrize("params,layout", [("bf16", "gemm"), ("f32", "gemm"), ("f16", "dense")])
def test_prefill_layout_follows_the_policy(params, layout, rng):
    """bf16 params and compute: the bf16 gemm on the planes as stored (where the CPU has AVX512_BF16), no
    second copy; f32: the f32 gemm on the planes (any CPU); else a dense copy in the params dtype. The output
    projection keeps the planes only."""
    qt = random_qtensor("Q4_K", 100, 256, rng)
    w = linear.prepare(qt, Policy.of(params), impl="native")
    if params == "bf16" and not native.gemm_available():
        layout = "dense"
    assert w.packed is qt
    assert (w.gemm, w.dense is not None) == (layout == "gemm", layout == "dense")
    out = linear.prepare(qt, Policy.of(params), impl="native", many_rows=False)
    assert out.packed is qt and out.dense is None and not out.gemm
    x = jnp.asarray(rng.standard_normal((MAX + 1, 256)), jnp.float32)
    text = jax.jit(lambda x, w: linear.matmul(x, w, compute_dtype=Policy.of(params).compute)).lower(x, w).as_text()
    assert ("realm_gemm_q" in text) == (layout == "gemm")
    assert ("realm_gemm_q_f32" in text) == (layout == "gemm" and params == "f32")
    assert "realm_qmatmul" not in text
    assert "realm_qmatmul" in jax.jit(linear.matmul).lower(x[:MAX], w).as_text()


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_XS", "MXFP4"])
def test_bf16_decode_is_exact(fmt, rng):
    """Under the bf16 policy a quantized weight decodes with its exact values against the bf16 x
    (`decode_weight_dtype`; the small codes on vdpbf16ps as they are where the CPU has AVX512_BF16, the
    others in f32): the f32 product of the dequantized weights within f32's tolerance, where many rows
    (XLA's dot on the bf16 copy) are within bf16's of it."""
    qt = random_qtensor(fmt, 37, 512, rng)
    w = NativeWeight(qt, to_dense(qt, jnp.bfloat16), dtype="bfloat16")
    assert decode_weight_dtype(w) == "float32" and decode_weight_dtype(NativeWeight(qt, dtype="float32")) == "float32"
    x = jnp.asarray(rng.standard_normal((3, 512)), jnp.bfloat16)
    f = jax.jit(lambda x, w: linear.matmul(x, w, compute_dtype=jnp.bfloat16, out_dtype=jnp.float32))
    assert_matmul_close(f(x, w), x, dequantize(qt), compute_dtype=F32, out_dtype=F32)
    many = f(jnp.tile(x, (MAX, 1)), w)[:3]
    assert_matmul_close(many, x, dequantize(qt), compute_dtype=jnp.bfloat16, out_dtype=F32)


def test_a_dense_weight_decodes_in_its_own_dtype(rng):
    """A weight stored dense is held in the policy's dtype already: decode multiplies its values as they are."""
    dense = to_dense(random_qtensor("Q8_0", 37, 512, rng), jnp.bfloat16)
    w = NativeWeight(dense, dtype="bfloat16")
    assert decode_weight_dtype(w) == "bfloat16"
    x = jnp.asarray(rng.standard_normal((3, 512)), jnp.bfloat16)
    out = jax.jit(lambda x, w: linear.matmul(x, w, compute_dtype=jnp.bfloat16, out_dtype=jnp.float32))(x, w)
    assert_matmul_close(out, x, dequantize(dense), compute_dtype=F32, out_dtype=F32)


@needs_gemm
@pytest.mark.parametrize("sizes", [(128, 64, 64), (100, 30, 70)], ids=["whole-panels", "partial-panels"])
def test_fused_gemm(sizes, rng):
    """Fused q|k|v: one weight of the parts' planes, whose gemm gives each part's own product, whether or
    not the parts fill whole panels of 64 rows."""
    qts = [random_qtensor("Q8_0", n, 64, rng) for n in sizes]
    parts = [linear.prepare(q, Policy.of("bf16"), impl="native") for q in qts]
    fused = linear.concat(parts)
    assert fused.gemm and fused.dense is None and fused.shape == (sum(sizes), 64)
    x = jnp.asarray(rng.standard_normal((MAX + 3, 64)), jnp.bfloat16)
    f = jax.jit(lambda x, w: linear.matmul(x, w, out_dtype=jnp.float32))
    want = jnp.concatenate([f(x, w) for w in parts], axis=-1)
    np.testing.assert_array_equal(np.asarray(f(x, fused)), np.asarray(want))


@needs_gemm
def test_int8_prefill_choice_is_made_at_load(rng, monkeypatch):
    """REALM_JAX_NATIVE_PREFILL is read when the weight is prepared (at load): a bad value is an
    ArgumentError then, not at the first prompt, and the choice rides in the weight (static), so a
    prefill compiled for one weight never serves another that chose differently, whatever the environment
    says at trace time."""
    qt = random_qtensor("Q8_0", 64, 64, rng)
    monkeypatch.setenv("REALM_JAX_NATIVE_PREFILL", "int4")
    with pytest.raises(ArgumentError, match="REALM_JAX_NATIVE_PREFILL"):
        linear.prepare(qt, Policy.of("bf16"), impl="native")
    monkeypatch.setenv("REALM_JAX_NATIVE_PREFILL", "int8")
    w8 = linear.prepare(qt, Policy.of("bf16"), impl="native")
    monkeypatch.setenv("REALM_JAX_NATIVE_PREFILL", "bf16")
    w16 = linear.prepare(qt, Policy.of("bf16"), impl="native")
    has = "Q8_0" in native.int8_formats()
    assert (w8.int8, w16.int8) == (has, False)
    assert ("native int8 gemm" in linear.describe(w8)) == has and "native bf16 gemm" in linear.describe(w16)
    x = jnp.asarray(rng.standard_normal((MAX + 3, 64)), jnp.bfloat16)
    f = jax.jit(lambda x, w: linear.matmul(x, w, out_dtype=jnp.float32))
    monkeypatch.setenv("REALM_JAX_NATIVE_PREFILL", "int8")  # the environment at trace time changes nothing
    assert ("int8 = 1" in f.lower(x, w8).as_text()) == has
    assert "int8 = 0" in f.lower(x, w16).as_text()
    if has:
        assert not np.array_equal(np.asarray(f(x, w8)), np.asarray(f(x, w16)))


@pytest.mark.parametrize("params,target", [("bf16", "realm_gemm_q"), ("f32", "realm_gemm_q_f32")])
def test_dense_stored_weights_take_the_gemm(params, target, rng):
    """A weight stored dense (F16 here) is held in the params dtype, and prefill runs the policy's gemm on it
    (bf16: where the CPU has AVX512_BF16)."""
    qt = realm_jax.quantize(rng.standard_normal((70, 64)).astype(np.float32), "F16")
    w = linear.prepare(qt, Policy.of(params), impl="native")
    gemm = params == "f32" or native.gemm_available()
    assert w.gemm == gemm and w.dtype == ("bfloat16" if params == "bf16" and gemm else "float32")
    x = jnp.asarray(rng.standard_normal((MAX + 3, 64)), jnp.float32)
    text = jax.jit(lambda x, w: linear.matmul(x, w, compute_dtype=Policy.of(params).compute)).lower(x, w).as_text()
    assert (target in text) == gemm
    assert ("realm_gemm_q_f32" in text) == (params == "f32")
    assert (f"native {params} gemm" in linear.describe(w)) == gemm


@needs_gemm
@pytest.mark.parametrize("activation", list(native.GLU_ACTS))
def test_glu_in_the_gemm_epilogue(activation, rng):
    """linear.glu past MAX_ROWS rows on the gemm runs the activation in the gemm's epilogue (bf16 out) and
    gives the XLA path's hidden activations to bf16 rounding."""
    qt = random_qtensor("Q4_K", 256, 256, rng)
    w = linear.prepare(qt, Policy.of("bf16"), impl="native")
    x = jnp.asarray(rng.standard_normal((24, 256)), jnp.bfloat16)
    fast = jax.jit(lambda x, w: linear.glu(x, w, activation))
    assert "realm_gemm_q" in fast.lower(x, w).as_text()
    slow = linear.glu(x, to_dense(qt, jnp.bfloat16), activation)
    a, b = np.asarray(fast(x, w), np.float64), np.asarray(slow, np.float64)
    np.testing.assert_allclose(a, b, rtol=2**-7, atol=2**-7 * float(np.max(np.abs(b))) * 0.05)


@needs_gemm
@pytest.mark.parametrize("kv,window", [(1, 0), (2, 5)])
def test_attention_products_on_the_gemm(kv, window, rng):
    """ops.attention with the native backend's products runs prefill's two products on the gemm (keys and
    values packed per batch row and kv head) and agrees with XLA's dots; decode-sized queries stay on XLA."""
    from realm_jax import ops

    b, t, n, h, s = 2, 12, 4, 32, 16
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in
               ((b, t, n, h), (b, s, kv, h), (b, s, kv, h)))
    pos = jnp.asarray(np.tile(np.arange(t), (b, 1)) + np.array([[0], [4]]), jnp.int32)
    f = jax.jit(lambda q, k, v, p, impl: ops.attention(q, k, v, p, scale=0.2, window=window, local=True,
                                                       products=linear.products(impl)), static_argnames="impl")
    assert linear.products("xla") is None
    assert "realm_gemm_bf16" in f.lower(q, k, v, pos, impl="native").as_text()
    assert "realm_gemm_bf16" not in f.lower(q[:, :1], k, v, pos[:, :1], impl="native").as_text()
    many = jnp.tile(q[:, :1], (1, 1, 4, 1))  # one query, 16 heads a kv head: a decode step stays on XLA
    assert "realm_gemm_bf16" not in f.lower(many, k, v, pos[:, :1], impl="native").as_text()
    a = np.asarray(f(q, k, v, pos, impl="native"), np.float32)
    want = np.asarray(f(q, k, v, pos, impl="xla"), np.float32)
    np.testing.assert_allclose(a, want, rtol=0.02, atol=0.02)


def test_load_native_matches_xla(smollm2_path):
    """The real model through the native backend: the weights as stored plus a prefill layout, the tied
    output projection on the embedding table's own planes (one copy on the device); logits and greedy text
    as on the XLA path."""
    a = realm_jax.load(smollm2_path, impl="native")
    b = realm_jax.load(smollm2_path, impl="xla")
    assert a.impl == "native" and b.impl == "xla"
    assert isinstance(a.params["output"], NativeWeight) and a.params["output"].dense is None
    assert a.params["output"].packed.planes["qs"] is a.params["embed"].planes["qs"]
    layer = a.params["layers"][0].params
    assert isinstance(layer["wqkv"], NativeWeight) and layer["wqkv"].fmt == "Q4_1"
    ids = a.tokenizer.encode("The quick brown fox jumps over the lazy dog because")
    la, lb = a.logits(ids), b.logits(ids)
    assert np.max(np.abs(la - lb)) < 0.05 * np.max(np.abs(lb))
    assert (la.argmax(-1) == lb.argmax(-1)).mean() >= 0.9
    decode = a.compiled_text("decode")
    assert "realm_qmatmul" in decode
    if a.policy.compute == a.policy.kv:  # attention over the stacked cache in place, no copy of a layer's
        assert "realm_decode_attention" in decode
    if native.gemm_available() and a.policy.params == a.policy.compute == BF16:
        assert "realm_gemm_q" in a.compiled_text("prefill", prompt_tokens=16)
        assert layer["wqkv"].gemm and layer["wqkv"].dense is None  # one copy of each weight: the planes
    prompt = "The capital of France is"
    assert a.generate(prompt, max_new_tokens=8) == b.generate(prompt, max_new_tokens=8)
