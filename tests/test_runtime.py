"""The model runtime: loading, generation, batching, sampling, streaming, stop strings and its errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import realm_jax
from realm_jax.errors import (
    ArgumentError,
    ContextLengthError,
    TokenIdError,
    MissingFileError,
    NotGGUFError,
    SamplingError,
    UnsupportedArchitectureError,
)
from realm_jax.runtime import memory_plan
from realm_jax.sampling import SamplingConfig


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return realm_jax.load(smollm2_path, policy="f32", progress=False)


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    return realm_jax.load(gemma3_path, policy="f32", progress=False)


# Golden strings: greedy continuations of "Once upon a time" (realm-jax f32; llama.cpp's greedy
# continuations are compared token by token in test_llama_reference.py).
GOLDEN = {
    "gemma3": ", there was a little girl named Lily. She was a very smart girl, and she loved to play with her",
    "smollm2": ", the city of Nova Haven was a thriving metropolis, with towering skyscrapers and bustling",
}


@pytest.mark.parametrize("name", ["gemma3", "smollm2"])
def test_golden_greedy_generation(name, request):
    model = request.getfixturevalue(name)
    text = model.generate("Once upon a time", max_new_tokens=24)
    assert text.startswith(GOLDEN[name][: len(text)]) and len(text) >= 60, text


def test_layers_of_two_structures_scan_as_one_run(gemma3, gemma3_path):
    """gemma3-270m Q4_K_M mixes formats across layers (attn_v Q8_0 or Q5_0, ffn_down Q6_K or Q4_K): its 18
    layers run as one scan whose step picks its layer's structure, not as 12 runs (11, and the last layer
    apart); the structures' stacks are views of the file's buffers, as the runs' are (no copy at load);
    and a prefill's logits are bit for bit those of the runs."""
    import jax

    from realm_jax.checkpoint import read_gguf
    from realm_jax.models.transformer import Variants
    from realm_jax.runtime import _prefill, build_params

    m = gemma3
    [only] = m.params["layers"]
    assert isinstance(only.params, Variants) and (only.first, only.count) == (0, 18)
    assert len(only.params.stacks) == 2 and sorted(np.bincount(np.asarray(only.params.which))) == [9, 9]
    tensors = read_gguf(gemma3_path)[1]
    merged, runs = (build_params(m.config, tensors, str(gemma3_path), m.policy, impl=m.impl, last_apart=not v,
                                 variants=v) for v in (True, False))
    assert len(runs["layers"]) == 12

    def copied(tree):  # bytes of the stacked leaves that are new arrays rather than views of the file's
        return sum(a.nbytes for a in jax.tree.leaves(tree) if not isinstance(a, np.ndarray))

    assert copied([r.params for r in merged["layers"]]) == copied([r.params for r in runs["layers"]])
    ids = np.asarray([m.tokenizer.encode("Once upon a time, in a small village")], np.int32)
    logits = [np.asarray(_prefill(jax.device_put(p), ids, np.array([ids.shape[1]], np.int32),
                                  m._new_cache(1, ids.shape[1]), config=m.config, policy=m.policy, all_logits=True,
                                  impl=m.impl)[0]) for p in (merged, runs)]
    np.testing.assert_array_equal(*logits)


def test_batch_of_different_lengths_matches_one_by_one(smollm2):
    prompts = ["The capital of France is", "1, 2, 3,", "def fibonacci(n):\n    "]
    together = smollm2.generate(prompts, max_new_tokens=12)
    alone = [smollm2.generate(p, max_new_tokens=12) for p in prompts]
    assert together == alone


def test_stream_pieces_add_up_to_the_text(smollm2):
    pieces = list(smollm2.generate("Here is a list of fruits:", max_new_tokens=20, stream=True))
    assert len(pieces) > 5
    assert "".join(pieces) == smollm2.generate("Here is a list of fruits:", max_new_tokens=20)


def test_stop_string_ends_and_is_excluded(smollm2):
    full = smollm2.generate("Count: one, two, three,", max_new_tokens=40)
    assert " six" in full
    cut = smollm2.generate("Count: one, two, three,", max_new_tokens=40, stop=["six"])
    assert cut == full[: full.index("six")]
    streamed = "".join(smollm2.generate("Count: one, two, three,", max_new_tokens=40, stop=["six"], stream=True))
    assert streamed == cut


def test_eos_ends_generation(smollm2):
    chat = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}])
    ids = smollm2.generate_ids([smollm2.tokenizer.encode(chat)], max_new_tokens=200)[0]
    assert ids[-1] in smollm2.tokenizer.stop_ids and len(ids) < 200


def test_sampling_is_seeded_and_top_k_1_is_greedy(smollm2):
    ids = [smollm2.tokenizer.encode("The weather today is")]
    hot = SamplingConfig(temperature=1.0, top_k=40, top_p=0.95, repetition_penalty=1.1)
    a = smollm2.generate_ids(ids, max_new_tokens=16, sampling=hot, seed=7)
    b = smollm2.generate_ids(ids, max_new_tokens=16, sampling=hot, seed=7)
    c = smollm2.generate_ids(ids, max_new_tokens=16, sampling=hot, seed=8)
    assert a == b and a != c
    k1 = SamplingConfig(temperature=0.7, top_k=1)
    greedy = smollm2.generate_ids(ids, max_new_tokens=8)
    assert smollm2.generate_ids(ids, max_new_tokens=8, sampling=k1, seed=3) == greedy
    for t in (1e-38, 1e-50):  # logits / t would pass float32's range (ties of +inf drawn at random)
        assert smollm2.generate_ids(ids, max_new_tokens=8, sampling=SamplingConfig(temperature=t), seed=3) == greedy


def test_logits_are_teacher_forced_prefill(smollm2):
    ids = smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    logits = smollm2.logits(ids)
    assert logits.dtype == np.float32 and logits.shape == (len(ids), smollm2.config.vocab_size)
    greedy = smollm2.generate_ids([ids[:5]], max_new_tokens=1)[0][0]
    assert greedy == int(np.argmax(logits[4]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=1e300), r"temperature=1e\+300 must be a number in \[0, 3.4e\+38\]"),
        (dict(repetition_penalty=10**400), "repetition_penalty"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(stop="abc"), "stop"),
    ],
)
def test_invalid_sampling_arguments(smollm2, kwargs, match):
    with pytest.raises(SamplingError, match=match):
        smollm2.generate("Hello", **({"max_new_tokens": 4} | kwargs))


def test_prompt_longer_than_context(smollm2):
    too_long = [1] * (smollm2.config.context_length - 3)
    with pytest.raises(ContextLengthError, match="context of 8192"):
        smollm2.generate_ids([too_long], max_new_tokens=10)
    with pytest.raises(ContextLengthError):
        smollm2.logits([1] * (smollm2.config.context_length + 1))
    n, most = smollm2.max_prompt_chars + 1, smollm2.tokenizer.max_token_chars  # refused before it is tokenized
    with pytest.raises(ContextLengthError, match=rf"{smollm2.path.name}: prompt has {n} characters, so at least "
                                                 rf"{smollm2.config.context_length + 1} tokens \(no token is longer "
                                                 rf"than {most} characters\)"):
        smollm2.generate("x" * n)


@pytest.mark.parametrize("call, error", [
    (lambda m: m.generate(5), SamplingError),
    (lambda m: m.generate(["ok", 3]), SamplingError),
    (lambda m: m.generate("hi", stop=[""]), SamplingError),
    (lambda m: m.generate("hi", seed=2**70), SamplingError),
    (lambda m: m.generate("hi", seed="a"), SamplingError),
    (lambda m: m.generate("hi", max_new_tokens=0, stream=True), SamplingError),  # at the call, not at next()
    (lambda m: m.logits("hello"), TokenIdError),
    (lambda m: m.logits([1.7, 2.2]), TokenIdError),
    (lambda m: m.logits([10**9]), TokenIdError),
    (lambda m: m.generate_ids([1, 2, 3], max_new_tokens=2), SamplingError),
    (lambda m: m.generate_ids([[1, 2]], max_new_tokens=2, stop_ids=[10**12]), TokenIdError),
    (lambda m: m.tokenizer.decode([10**9]), TokenIdError),
    (lambda m: SamplingConfig(repetition_penalty=1.1, penalty_last_n=10**9), SamplingError),
])
def test_bad_arguments_raise_realm_errors(smollm2, call, error):
    with pytest.raises(error):
        call(smollm2)


def test_stop_none_means_no_stop_strings(smollm2):
    assert smollm2.generate("Hi", max_new_tokens=4, stop=None) == smollm2.generate("Hi", max_new_tokens=4)


def test_bad_files(tmp_path):
    with pytest.raises(MissingFileError, match="nope.gguf"):
        realm_jax.load(tmp_path / "nope.gguf")
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(NotGGUFError, match="notes.gguf"):
        realm_jax.load(text)
    q = realm_jax.quantize(np.zeros((4, 32), np.float32), "Q8_0")
    other = realm_jax.write_gguf(tmp_path / "gpt2.gguf", {"w": q}, arch="gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*supported: llama"):
        realm_jax.load(other)


def test_sampled_batch_rows_match_their_own_seeds(smollm2):
    prompts = ["The weather today is", "My favourite food is"]
    batch = smollm2.generate(prompts, max_new_tokens=10, temperature=1.0, top_k=50, seed=5)
    alone = [smollm2.generate(p, max_new_tokens=10, temperature=1.0, top_k=50, seed=5 + i)
             for i, p in enumerate(prompts)]
    assert batch == alone


@pytest.mark.parametrize("row", [[1.0, 3.0, 3.0, 2.0], [np.nan, 1.0, 5.0], [1.0, np.nan, np.nan], [-np.inf, -np.inf],
                                 [2.0, np.inf, np.inf], [0.0] * 5])
def test_greedy_pick_is_argmax(row):
    """Greedy sampling's max-then-min form picks what jnp.argmax picks: the first maximum, the first NaN."""
    import jax.numpy as jnp

    from realm_jax.sampling import first_argmax

    logits = jnp.asarray([row, row[::-1]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(first_argmax(logits)), np.asarray(jnp.argmax(logits, axis=-1)))
    assert first_argmax(logits).dtype == jnp.int32


# --- logits of the rows asked for, projected in chunks ------------------------------------------------------
def _synthetic_path():
    from realm_jax.reference import reference_dir

    return reference_dir().parent / "synthetic" / "llama-k-q8_0.gguf"


@pytest.fixture(scope="module")
def synthetic():
    return realm_jax.load(_synthetic_path(), policy="f32", progress=False)


def test_a_large_batch_writes_the_cache_with_one_scatter(synthetic, monkeypatch):
    """Past _UNROLLED_WRITES sequences a decode step writes the cache with one scatter, not an update each
    (which made the program grow with the batch: minutes to compile 3000 rows): the same tokens."""
    from realm_jax.models import transformer

    prompts = [" ".join(["Once upon a time"] * (1 + i % 3)) + f" {i}" for i in range(transformer._UNROLLED_WRITES + 8)]
    scattered = synthetic.generate(prompts, max_new_tokens=3)
    monkeypatch.setattr(transformer, "_UNROLLED_WRITES", len(prompts))
    jax.clear_caches()
    assert synthetic.generate(prompts, max_new_tokens=3) == scattered


def test_free_memory_heeds_ulimit_v():
    """What `ulimit -v` (RLIMIT_AS) leaves bounds the memory the preflight calls free: a run past it is a
    MemoryBudgetError before anything is allocated, not a bad_alloc minutes later."""
    import subprocess
    import sys

    code = ("import resource\n"
            "from realm_jax import preflight\n"
            "size = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:'))\n"
            "resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))\n"
            "print(preflight.host_free())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 0 < int(out.stdout) <= 2**30


def test_logits_in_chunks_are_one_prefills_rows(synthetic):
    """Every row of 700 tokens (projected 128 rows at a time, the last chunk padded), and any rows asked for
    in any order, are bit for bit those of one prefill of the whole prompt."""
    from realm_jax.runtime import _PROMPT_BUCKET, _prefill, _round_up

    m = synthetic
    ids = np.random.default_rng(3).integers(1, m.config.vocab_size, 700).tolist()
    t = _round_up(len(ids), _PROMPT_BUCKET)
    tokens = np.zeros((1, t), np.int32)
    tokens[0, : len(ids)] = ids
    whole, _ = _prefill(m.params, tokens, np.array([len(ids)], np.int32), m._new_cache(1, t), config=m.config,
                        policy=m.policy, all_logits=True, impl=m.impl)
    whole = np.asarray(whole[0, : len(ids)])
    np.testing.assert_array_equal(m.logits(ids), whole)
    rows = [699, 600, -1, 600]
    got = m.logits(ids, positions=rows)
    assert got.dtype == np.float32 and got.shape == (4, m.config.vocab_size)
    np.testing.assert_array_equal(got, whole[rows])
    with pytest.raises(TokenIdError, match=r"positions \[700\]"):
        m.logits(ids, positions=[700])


# --- non-finite logits stop a generation, naming the step ---------------------------------------------------
PROMPT = "Once upon a time"


def test_non_finite_logits_stop_the_generation(synthetic, tmp_path):
    """A NaN row in the embedding of the token the model generates first after PROMPT: the decode step that
    feeds it has NaN logits, and the loop stops there with an error naming the step (tests/test_hostile.py
    has NaN logits at the prompt, step 0)."""
    from realm_jax.errors import NonFiniteLogitsError

    metadata, tensors = realm_jax.read_gguf(_synthetic_path())
    metadata = {k: v for k, v in metadata.items() if k != "general.architecture"}
    first = synthetic.generate_ids([synthetic.tokenizer.encode(PROMPT)], max_new_tokens=1)[0][0]
    w = np.array(realm_jax.dequantize(tensors["token_embd.weight"]), np.float32)
    w[first] = np.nan
    path = realm_jax.write_gguf(tmp_path / "embd.gguf", {**tensors, "token_embd.weight": realm_jax.quantize(w, "F32")},
                                arch="llama", metadata=metadata)
    model = realm_jax.load(path, policy="f32", progress=False)
    with pytest.raises(NonFiniteLogitsError, match=r"embd\.gguf: the logits of generation step 1 \(new token 2\) "
                                                   r"of prompt 0"):
        model.generate(PROMPT, max_new_tokens=8)


# --- arguments of the wrong kind: one RealmError naming the argument -----------------------------------------
@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda m: m.logits({1: 2}), TokenIdError,  # not its keys
     r"^the prompt must be a sequence of token ids \(a list, tuple or 1-D integer array\), got dict$"),
    (lambda m: m.logits(b"\x01\x02"), TokenIdError, r"^the prompt must be a sequence of token ids .*got bytes$"),
    (lambda m: m.logits({1, 2}), TokenIdError, r"got set$"),
    (lambda m: m.logits(np.array(3)), TokenIdError, r"^the prompt must be a 1-D array of token ids, got an array "
                                                     r"of shape \(\)$"),
    (lambda m: m.logits([1, 2], positions={0: 1}), TokenIdError, r"^positions must be a sequence of ints .*got dict$"),
    (lambda m: m.generate_ids([[1, 2]], max_new_tokens=2, stop_ids={3: 4}), TokenIdError,
     r"^stop_ids must be a sequence of token ids .*got dict$"),
    (lambda m: m.generate_ids([[1, 2]], max_new_tokens=3, sampling=None), SamplingError,
     r"^sampling=None must be a realm_jax\.sampling\.SamplingConfig \(SamplingConfig\(\) is greedy\), got NoneType$"),
    (lambda m: m.generate_ids([[1, 2]], max_new_tokens=3, sampling={}), SamplingError, r"^sampling=\{\} must be a "),
    (lambda m: m.generate("hi", max_new_tokens=2, add_bos="yes"), SamplingError,
     r"^add_bos='yes' must be None, True or False$"),
    (lambda m: m.generate("hi", max_new_tokens=2, add_bos=0), SamplingError, r"^add_bos=0 must be None, True or "),
    (lambda m: m.generate("hi", max_new_tokens=2, stream="yes"), SamplingError, r"^stream='yes' must be True or "),
    (lambda m: m.generate("hi", max_new_tokens=2, stream=None), SamplingError, r"^stream=None must be True or False$"),
    (lambda m: realm_jax.load(None), ArgumentError,
     r"^load: path must be a str, bytes or os\.PathLike, got NoneType None$"),
    (lambda m: realm_jax.load(5), ArgumentError, r"^load: path must be a str, bytes or os\.PathLike, got int 5$"),
    (lambda m: realm_jax.load(b""), ArgumentError, r"^load: path is empty$"),  # bytes name a file, as open() takes
    (lambda m: memory_plan(None), ArgumentError,
     r"^memory_plan: path must be a str, bytes or os\.PathLike, got NoneType None$"),
])
def test_arguments_of_the_wrong_kind_are_named(synthetic, call, error, match):
    with pytest.raises(error, match=match):
        call(synthetic)


def test_numpy_ints_count_as_ints_bools_and_floats_do_not(synthetic):
    """max_new_tokens and seed take what `operator.index` takes (numpy ints, as seed did alone), never a bool
    or a float."""
    ids = [1, 2, 3]
    want = synthetic.generate_ids([ids], max_new_tokens=3, seed=3)
    assert synthetic.generate_ids([ids], max_new_tokens=np.int64(3), seed=np.int64(3)) == want
    assert synthetic.generate_ids([ids], max_new_tokens=np.uint8(3), seed=np.uint32(3)) == want
    for bad in (True, np.True_, 3.0, np.float64(3)):
        with pytest.raises(SamplingError, match=r"^max_new_tokens=.* must be an int >= 1$"):
            synthetic.generate_ids([ids], max_new_tokens=bad)
        with pytest.raises(SamplingError, match=r"^seed=.* must be an int in \[0, 2\*\*32\)$"):
            synthetic.generate_ids([ids], max_new_tokens=3, seed=bad)


def test_token_ids_in_a_1d_integer_array_are_a_list_of_them(synthetic):
    import jax.numpy as jnp

    ids = [1, 5, 9, 2]
    want = synthetic.logits(ids)
    np.testing.assert_array_equal(synthetic.logits(jnp.asarray(ids)), want)
    np.testing.assert_array_equal(synthetic.logits(np.array(ids, np.uint16), positions=jnp.asarray([3])), want[3:])


def test_top_p_draws_follow_the_kept_distribution():
    """`sample` with top_p alone draws from the first 64 candidates, the first 1024 or the sorted vocabulary,
    whichever holds the step's kept sets: rows whose kept set ends in each, in one batch, follow their own
    distribution over 1000 keys (every token within 5 standard deviations, nothing outside the kept set),
    and a row draws the same tokens alone as beside the others. With no limit at all (in id order), too."""
    import jax.numpy as jnp

    from helpers import expected_distribution
    from realm_jax.sampling import CANDIDATES, WIDE, sample

    rng, vocab, n = np.random.default_rng(1), 1500, 1000
    flat = rng.standard_normal(vocab).astype(np.float32)
    rows = [flat * 3, flat * 1.5, flat * 0.5]
    cfg = SamplingConfig(temperature=0.8, top_p=0.9)
    kept = [np.count_nonzero(expected_distribution(x, 0.8, 0, 0.9)) for x in rows]
    assert kept[0] <= CANDIDATES < kept[1] <= WIDE < kept[2]
    keys = jax.random.split(jax.random.PRNGKey(3), n)
    step = jax.jit(lambda x, k, s: sample(x, k, None, cfg.static, s))

    def draws(chosen):
        logits = np.concatenate([np.repeat(rows[i][None], n, 0) for i in chosen])
        return np.asarray(step(logits, jnp.tile(keys, (len(chosen), 1)), cfg.scalars)).reshape(len(chosen), n)

    together = draws([0, 1, 2])
    for i, x in enumerate(rows):
        want = expected_distribution(x, 0.8, 0, 0.9)
        got = np.bincount(together[i], minlength=vocab)
        assert not got[want == 0].any(), i
        assert (np.abs(got - n * want) <= 5 * np.sqrt(n * want * (1 - want)) + 1).all(), i
    assert (draws([0])[0] == together[0]).all() and (draws([1])[0] == together[1]).all()
    every = SamplingConfig(temperature=0.8)  # no limit: drawn in id order, one uniform a row
    step = jax.jit(lambda x, k: sample(x, k, None, every.static, every.scalars))
    got = np.asarray(step(np.repeat(rows[1][None], n, 0), keys))
    want = expected_distribution(rows[1], 0.8, 0, 1.0)
    got = np.bincount(got, minlength=vocab)
    assert (np.abs(got - n * want) <= 5 * np.sqrt(n * want * (1 - want)) + 1).all()
