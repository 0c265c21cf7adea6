"""Architecture configs from metadata, and the shared forward against a float64 numpy reference on tiny
random models covering the variants no real test file has: qwen2 biases with NeoX RoPE, linear RoPE
scaling, rope_freqs factors, partial rotary dims, untied output, GQA."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import realm_jax
from realm_jax.errors import MetadataError, MissingTensorError, TensorShapeError, UnsupportedArchitectureError
from realm_jax.models import config_from_gguf
from realm_jax.precision import Policy
from realm_jax.runtime import _prefill, build_params, prepare_params
from realm_jax.models.transformer import forward, init_cache
from float64_forward import float64_forward

D, F, V, LAYERS, HEADS, KV, HEAD = 64, 96, 80, 2, 4, 2, 16


def tiny_model(arch="llama", rng=None, *, bias=False, fmt="F32", tied=False, layers=LAYERS, **meta):
    rng = rng or np.random.default_rng(0)
    metadata = {"general.architecture": arch, f"{arch}.block_count": layers, f"{arch}.embedding_length": D,
                f"{arch}.feed_forward_length": F, f"{arch}.attention.head_count": HEADS,
                f"{arch}.attention.head_count_kv": KV, f"{arch}.context_length": 128,
                f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, f"{arch}.rope.freq_base": 10000.0} | meta

    def mat(rows, cols, scale=0.3):
        return realm_jax.quantize((rng.standard_normal((rows, cols)) * scale).astype(np.float32), fmt)

    def vec(n, center=1.0):
        return realm_jax.quantize((center + 0.1 * rng.standard_normal(n)).astype(np.float32), "F32")

    tensors = {"token_embd.weight": mat(V, D, 1.0), "output_norm.weight": vec(D)}
    if not tied:
        tensors["output.weight"] = mat(V, D)
    for i in range(layers):
        b = f"blk.{i}."
        tensors |= {b + "attn_norm.weight": vec(D), b + "attn_q.weight": mat(HEADS * HEAD, D),
                    b + "attn_k.weight": mat(KV * HEAD, D), b + "attn_v.weight": mat(KV * HEAD, D),
                    b + "attn_output.weight": mat(D, HEADS * HEAD), b + "ffn_norm.weight": vec(D),
                    b + "ffn_gate.weight": mat(F, D), b + "ffn_up.weight": mat(F, D), b + "ffn_down.weight": mat(D, F)}
        if bias:
            tensors |= {b + "attn_q.bias": vec(HEADS * HEAD, 0), b + "attn_k.bias": vec(KV * HEAD, 0),
                        b + "attn_v.bias": vec(KV * HEAD, 0)}
        if arch == "gemma3":
            tensors |= {b + "attn_q_norm.weight": vec(HEAD), b + "attn_k_norm.weight": vec(HEAD),
                        b + "post_attention_norm.weight": vec(D), b + "post_ffw_norm.weight": vec(D)}
    return metadata, tensors


def ours(metadata, tensors, ids):
    config = config_from_gguf(metadata, tensors, "tiny")
    params = prepare_params(config, tensors, "tiny", Policy.full(), jax.devices()[0])
    cache = init_cache(config, 1, len(ids), np.float32)
    logits, _ = _prefill(params, np.array([ids], np.int32), np.array([len(ids)], np.int32), cache, config=config,
                         policy=Policy.full(), all_logits=True)
    return np.asarray(logits[0])


VARIANTS = {
    "llama": dict(),
    "llama-tied-q8_0": dict(tied=True, fmt="Q8_0"),
    "qwen2-bias-neox": dict(arch="qwen2", bias=True),
    "llama-linear-rope": {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0},
    "llama-partial-rope": {"llama.rope.dimension_count": 8},
    "mistral": dict(arch="mistral"),
    # 7 layers: 0-4 and 6 local (window 5), 5 global; 24 tokens cross the window many times.
    "gemma3-sliding-window": {"arch": "gemma3", "tied": True, "layers": 7, "gemma3.attention.sliding_window": 5,
                              "gemma3.attention.key_length": HEAD, "gemma3.rope.freq_base": 1e6},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_float64(variant):
    metadata, tensors = tiny_model(**VARIANTS[variant])
    ids = list(np.random.default_rng(1).integers(0, V, 24))
    got, want = ours(metadata, tensors, ids), float64_forward(metadata, tensors, ids)
    assert got.shape == (24, V) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_rope_freq_factors_are_applied():
    metadata, tensors = tiny_model()
    tensors["rope_freqs.weight"] = realm_jax.quantize(np.linspace(1, 8, HEAD // 2).astype(np.float32), "F32")
    config = config_from_gguf(metadata, tensors, "tiny")
    assert config.rope_freq_factors[-1] == 8.0
    ids = list(range(20))
    np.testing.assert_allclose(ours(metadata, tensors, ids), float64_forward(metadata, tensors, ids),
                               atol=1e-4 * np.abs(float64_forward(metadata, tensors, ids)).max())


@pytest.mark.parametrize("factors, error, match", [
    (np.ones(HEAD // 2 - 1), TensorShapeError, r" has shape \(7,\), expected \(8,\)"),
    (np.ones(1), TensorShapeError, r" has shape \(1,\)"),  # not broadcast over the frequencies
    (np.r_[1.0, np.nan, np.ones(HEAD // 2 - 2)], MetadataError, ": factor 1 is nan"),
    (np.r_[np.ones(HEAD // 2 - 1), -2.0], MetadataError, ": factor 7 is -2.0"),
    (np.zeros(HEAD // 2), MetadataError, ": factor 0 is 0.0"),
])
def test_rope_freq_factors_are_checked(factors, error, match):
    metadata, tensors = tiny_model()
    tensors["rope_freqs.weight"] = realm_jax.quantize(factors.astype(np.float32), "F32")
    with pytest.raises(error, match=r"m\.gguf: tensor 'rope_freqs\.weight'" + match):
        config_from_gguf(metadata, tensors, "m.gguf")


def test_memory_plan_reads_the_rope_factors(tmp_path):
    """`memory_plan` (the CLI's preflight) builds the params from the header's shapes; the factors' values
    are read from the file, as `load` reads them (a Llama 3.1 file has them)."""
    metadata, tensors = tiny_model()
    tensors["rope_freqs.weight"] = realm_jax.quantize(np.linspace(1, 8, HEAD // 2).astype(np.float32), "F32")
    path = realm_jax.write_gguf(tmp_path / "m.gguf", tensors, arch="llama", metadata=metadata)
    plan = realm_jax.runtime.memory_plan(path, "f32", "xla")
    assert plan["params_bytes"] > 0 and plan["context_length"] == 128


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_block_count_past_the_tensors_is_refused_at_once(arch):
    metadata, tensors = tiny_model(arch, tied=arch == "gemma3")
    with pytest.raises(MetadataError, match=rf"m\.gguf: metadata key '{arch}\.block_count' is 1099511627776, more "
                                            rf"layers than the file has tensors \({len(tensors)}\)"):
        config_from_gguf(metadata | {f"{arch}.block_count": 2**40}, tensors, "m.gguf")


@pytest.mark.parametrize("value", [1e300, 1e-300, 4e38])
def test_float_metadata_float32_cannot_hold_is_refused(value):
    """The forward pass computes in float32: an epsilon of 1e300 would give constant logits, not an error."""
    metadata, tensors = tiny_model()
    with pytest.raises(MetadataError, match="layer_norm_rms_epsilon' must be a positive number float32 can hold"):
        config_from_gguf(metadata | {"llama.attention.layer_norm_rms_epsilon": value}, tensors, "m.gguf")


def test_config_errors_name_the_key():
    metadata, tensors = tiny_model()
    with pytest.raises(UnsupportedArchitectureError, match="rope scaling type 'yarn'"):
        config_from_gguf(metadata | {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0},
                         tensors, "m.gguf")
    broken = dict(metadata)
    del broken["llama.embedding_length"]
    with pytest.raises(MetadataError, match=r"m\.gguf.*llama\.embedding_length"):
        config_from_gguf(broken, tensors, "m.gguf")
    with pytest.raises(MetadataError, match="head_count"):
        config_from_gguf(metadata | {"llama.attention.head_count": "four"}, tensors, "m.gguf")
    with pytest.raises(MetadataError, match="multiple of n_kv_heads"):
        config_from_gguf(metadata | {"llama.attention.head_count_kv": 3}, tensors, "m.gguf")


def test_params_errors_name_the_tensor():
    metadata, tensors = tiny_model()
    config = config_from_gguf(metadata, tensors, "m.gguf")
    missing = {k: v for k, v in tensors.items() if k != "blk.1.ffn_up.weight"}
    with pytest.raises(MissingTensorError, match=r"blk\.1\.ffn_up\.weight"):
        prepare_params(config, missing, "m.gguf", Policy.full(), jax.devices()[0])
    wrong = tensors | {"blk.0.attn_k.weight": realm_jax.quantize(np.zeros((HEAD, D), np.float32), "F32")}
    with pytest.raises(TensorShapeError, match=r"blk\.0\.attn_k\.weight.*\(16, 64\).*\(32, 64\)"):
        prepare_params(config, wrong, "m.gguf", Policy.full(), jax.devices()[0])


def test_sliding_window_matters_in_the_tiny_gemma3():
    """The reference itself must see the window: without it the logits differ (so the match above tests it)."""
    metadata, tensors = tiny_model(**VARIANTS["gemma3-sliding-window"])
    ids = list(np.random.default_rng(1).integers(0, V, 24))
    wide = metadata | {"gemma3.attention.sliding_window": 64}
    assert np.abs(float64_forward(metadata, tensors, ids) - float64_forward(wide, tensors, ids)).max() > 1e-2


def test_decode_steps_match_the_prefill_across_the_window():
    """Token-by-token decoding (cache writes at each position, window masks on the cache) gives the logits
    of one batched prefill."""
    metadata, tensors = tiny_model(**VARIANTS["gemma3-sliding-window"])
    ids = [int(i) for i in np.random.default_rng(2).integers(0, V, 20)]
    want = float64_forward(metadata, tensors, ids)
    config = config_from_gguf(metadata, tensors, "tiny")
    params = prepare_params(config, tensors, "tiny", Policy.full(), jax.devices()[0])
    cache = init_cache(config, 1, 32, np.float32)
    got = []
    for pos, tok in enumerate(ids):
        logits, cache = jax.jit(forward, static_argnames=("config", "policy"))(
            config, params, np.array([[tok]], np.int32), np.array([[pos]], np.int32), cache, policy=Policy.full())
        got.append(np.asarray(logits[0, 0]))
    np.testing.assert_allclose(np.stack(got), want, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("change, match", [
    ({"llama.attention.layer_norm_rms_epsilon": -1.0}, "layer_norm_rms_epsilon"),
    ({"llama.rope.freq_base": 0.0}, "freq_base"),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": -2.0}, "scaling.factor"),
    ({"llama.block_count": 1}, "not part of llama with block_count=1"),
])
def test_lying_metadata_is_refused(change, match):
    metadata, tensors = tiny_model()
    with pytest.raises(MetadataError, match=match):
        config = config_from_gguf(metadata | change, tensors, "m.gguf")
        prepare_params(config, tensors, "m.gguf", Policy.full(), jax.devices()[0])


def test_chunked_prefill_attention_equals_one_block():
    """Long prefills attend in query blocks (bounded memory); the result is the same."""
    from realm_jax import ops

    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, s, h, 16)).astype(np.float32) for s, h in ((37, 4), (40, 2), (40, 2)))
    pos = np.tile(np.arange(37), (2, 1)) + np.array([[0], [3]])
    for window, local in ((0, None), (5, True), (5, False)):
        whole = ops.attention(q, k, v, pos, scale=0.25, window=window, local=local, chunk=64)
        blocks = ops.attention(q, k, v, pos, scale=0.25, window=window, local=local, chunk=8)
        np.testing.assert_allclose(np.asarray(blocks), np.asarray(whole), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["llama", "gemma3-sliding-window"])
def test_last_layer_pruned_prefill_gives_the_same_rows(variant):
    """With the last layer a run of its own (as load() builds it on an accelerator), a prefill that needs
    only each row's last position computes that layer's attention output and FFN for it alone; its logits
    are those rows of the full prefill's (prompts of different lengths in one batch, padded), and the cache
    is the same. (On one CPU, load() keeps the last layer in the scan: `prepare_params`.)"""
    kw = dict(VARIANTS[variant])
    metadata, tensors = tiny_model(**kw)
    config = config_from_gguf(metadata, tensors, "tiny")
    params = jax.device_put(build_params(config, tensors, "tiny", Policy.full(), last_apart=True))
    assert params["layers"][-1].count == 1 and params["layers"][-1].first == config.n_layers - 1
    on_cpu = prepare_params(config, tensors, "tiny", Policy.full(), jax.devices("cpu")[0])
    assert [(r.first, r.count) for r in on_cpu["layers"]] == [(0, config.n_layers)]
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, V, (3, 24)).astype(np.int32)
    lengths = np.array([24, 9, 17], np.int32)
    full, cache_full = _prefill(params, tokens, lengths, init_cache(config, 3, 32, np.float32), config=config,
                                policy=Policy.full(), all_logits=True)
    last, cache_last = _prefill(params, tokens, lengths, init_cache(config, 3, 32, np.float32), config=config,
                                policy=Policy.full(), all_logits=False)
    assert last.shape == (3, V)
    np.testing.assert_allclose(np.asarray(last), np.asarray(full)[np.arange(3), lengths - 1], rtol=1e-5, atol=1e-5)
    for a, b in ((cache_last.k, cache_full.k), (cache_last.v, cache_full.v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
