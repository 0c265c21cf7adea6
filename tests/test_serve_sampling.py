"""The serve engine's logits processing and the request fields that reach it, in process (no server): OpenAI's
logit_bias and presence and frequency penalties, exact to the logit and per row (a biased request does not
move its neighbour's tokens); llama.cpp's repetition penalty, as `generate` applies it; chat's logprobs and
top_logprobs; echo's prompt log-probabilities (`Model.prompt_logprobs`, scored on the engine's thread through
`Engine.call`); and the fields asking for what is not served (tools, JSON modes, ...) refused with the field
named, their defaults accepted."""

from __future__ import annotations

import json
import pathlib
import threading

import jax
import numpy as np
import pytest

import realm_jax
from realm_jax.errors import SamplingError, TokenIdError
from realm_jax.serve.engine import MAX_LOGIT_BIAS, Engine, EngineStoppedError, RequestParams, complete
from realm_jax.serve.protocol import ApiError, parse_body
from helpers import expected_distribution

MODEL = pathlib.Path(__file__).parent / "data" / "synthetic" / "llama-k-q4_k_m.gguf"


@pytest.fixture(scope="module")
def engine():
    model = realm_jax.load(MODEL, progress=False)
    e = Engine(model, slots=4, max_context=128).warm_up().start()
    yield e
    e.stop()


@pytest.fixture(scope="module")
def prompt(engine):
    return engine.model.tokenizer.encode("hello world")


def _run(engine, prompt, n=10, **kw):
    return complete(engine, prompt, RequestParams(max_tokens=n, temperature=0, **kw))


def test_logit_bias_forces_and_bans_tokens(engine, prompt):
    greedy = _run(engine, prompt)["tokens"]
    assert _run(engine, prompt, 4, logit_bias=((7, 100.0),))["tokens"] == [7] * 4
    banned = set(greedy)
    got = _run(engine, prompt, logit_bias=tuple((t, -100.0) for t in banned))["tokens"]
    assert not banned & set(got)


def _tokens(engine, prompt, **kw) -> list:
    """The token events of a greedy request (the chosen token's and the top log-probabilities)."""
    events, done = [], threading.Event()

    def sink(event):
        events.append(event)
        if event.kind != "token":
            done.set()

    engine.submit(prompt, RequestParams(temperature=0, **kw), sink)
    assert done.wait(120) and events[-1].kind == "done", events[-1]
    return [e for e in events if e.kind == "token" and e.token >= 0]


def test_penalties_shift_each_logit_by_its_count(engine, prompt):
    """A greedy run with top log-probabilities, then the same with penalties: at each step up to where
    their tokens part, the gap between two tokens in both top lists moves by exactly what their counts in
    the completion so far say (presence once, frequency per occurrence)."""
    presence, frequency = 0.5, 0.25
    plain = _tokens(engine, prompt, max_tokens=12, logprobs=20)
    penalised = _tokens(engine, prompt, max_tokens=12, logprobs=20, presence_penalty=presence,
                        frequency_penalty=frequency)
    counts: dict[int, int] = {}
    shift = lambda t: presence * (counts.get(t, 0) > 0) + frequency * counts.get(t, 0)  # noqa: E731
    checked = 0
    for a, b in zip(plain, penalised):
        if a.token != b.token:
            break
        ta, tb = dict(a.top), dict(b.top)
        first, *common = [t for t in ta if t in tb]
        for t in common:
            want = (ta[t] - ta[first]) - (shift(t) - shift(first))
            assert abs((tb[t] - tb[first]) - want) < 1e-4, (t, first, counts)
            checked += 1
        counts[a.token] = counts.get(a.token, 0) + 1
    assert checked > 20 and max(counts.values()) > 1  # the synthetic model repeats itself: counts past one


def test_repetition_penalty_gives_generates_tokens(engine, prompt):
    """repetition_penalty (llama.cpp's, over the last 64 tokens of prompt and completion) as `generate` applies
    it: the same greedy tokens, and other ones than without it."""
    from realm_jax.sampling import SamplingConfig

    model = engine.model
    plain = _run(engine, prompt, 12)["tokens"]
    for penalty in (3.0, 0.5, 0.2):  # each moves this model's greedy tokens
        want = model.generate_ids([prompt], max_new_tokens=12, stop_ids=[],
                                  sampling=SamplingConfig(repetition_penalty=penalty))[0]
        got = _run(engine, prompt, 12, repetition_penalty=penalty)["tokens"]
        assert got == want != plain


def test_a_biased_request_does_not_move_its_neighbours_tokens(engine, prompt):
    alone = _run(engine, prompt, 8)["tokens"]
    results = {}

    def run(name, **kw):
        results[name] = _run(engine, prompt, 8, **kw)["tokens"]

    threads = [threading.Thread(target=run, args=("plain",)),
               threading.Thread(target=run, args=("biased",), kwargs={"logit_bias": ((3, 100.0),)})]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {"plain": alone, "biased": [3] * 8}


@pytest.mark.parametrize("kw", [
    {"logit_bias": ((5, 101.0),)}, {"logit_bias": ((-1, 1.0),)}, {"logit_bias": ((10**6, 1.0),)},
    {"logit_bias": ((5, 1.0), (5, 2.0))}, {"logit_bias": ((True, 1.0),)}, {"logit_bias": [(5, 1.0)]},
    {"logit_bias": tuple((i, 1.0) for i in range(MAX_LOGIT_BIAS + 1))}, {"presence_penalty": 2.5},
    {"frequency_penalty": float("nan")}, {"presence_penalty": "1"}, {"repetition_penalty": 0.0},
    {"repetition_penalty": float("inf")}, {"repetition_penalty": 1e-38}, {"repetition_penalty": 101.0}])
def test_bad_bias_and_penalties_are_sampling_errors(kw):
    with pytest.raises(SamplingError):
        RequestParams(max_tokens=1, **kw).check(1000)


def _parse(chat=False, **fields):
    base = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    return parse_body(json.dumps({**base, **fields}).encode(), chat=chat, vocab_size=1000)


def test_request_fields_reach_the_params():
    body = _parse(logit_bias={"7": 5, "12": -100}, presence_penalty=0.5, frequency_penalty=-2)
    assert body.logit_bias == ((7, 5.0), (12, -100.0))
    assert (body.presence_penalty, body.frequency_penalty, body.repetition_penalty) == (0.5, -2.0, 1.0)
    assert _parse(repeat_penalty=1.1).repetition_penalty == _parse(repetition_penalty=1.1).repetition_penalty == 1.1
    assert _parse(chat=True, logprobs=True, top_logprobs=20).logprobs == 20
    assert _parse(chat=True, logprobs=True).logprobs == 0
    assert _parse(chat=True, logprobs=False, top_logprobs=0).logprobs is None
    assert _parse(logprobs=5).logprobs == 5
    # the defaults of fields that are not served pass
    ok = _parse(chat=True, tools=[], tool_choice="none", response_format={"type": "text"}, modalities=["text"],
                user="u", parallel_tool_calls=False)
    assert ok.messages == [{"role": "user", "content": "hi"}]
    assert _parse(best_of=1, suffix="").prompts == ["hi"]
    assert _parse(prompt=[[1, 2], "x", [3]], n=2).prompts == [[1, 2], "x", [3]]


@pytest.mark.parametrize("chat,fields,param", [
    (False, {"logit_bias": {"x": 1}}, "logit_bias"), (False, {"logit_bias": {"1000": 1}}, "logit_bias"),
    (False, {"logit_bias": {"9" * 5000: 1}}, "logit_bias"), (False, {"logit_bias": {"7": 100.5}}, "logit_bias"),
    (False, {"logit_bias": {"7": 1, "007": 2}}, "logit_bias"), (False, {"logit_bias": [1]}, "logit_bias"),
    (False, {"logit_bias": {"-1": 1}}, "logit_bias"), (False, {"presence_penalty": 3}, "presence_penalty"),
    (False, {"frequency_penalty": "a"}, "frequency_penalty"), (False, {"logprobs": 6}, "logprobs"),
    (False, {"repetition_penalty": 0}, "repetition_penalty"), (True, {"repeat_penalty": -1}, "repeat_penalty"),
    (False, {"repeat_penalty": 1.1, "repetition_penalty": 1.2}, "repeat_penalty"),
    (False, {"repetition_penalty": 1, "repeat_penalty": True}, "repeat_penalty"),
    (False, {"repetition_penalty": 1e-38}, "repetition_penalty"),
    (True, {"logprobs": 1}, "logprobs"), (True, {"top_logprobs": 3}, "top_logprobs"),
    (True, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (True, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (True, {"tool_choice": "required"}, "tool_choice"), (True, {"response_format": {"type": "json_object"}},
                                                          "response_format"),
    (True, {"modalities": ["text", "audio"]}, "modalities"), (False, {"best_of": 2}, "best_of"),
    (False, {"suffix": "end"}, "suffix"), (True, {"functions": [{"name": "f"}]}, "functions")])
def test_fields_not_served_or_out_of_range_are_400_naming_them(chat, fields, param):
    with pytest.raises(ApiError) as e:
        _parse(chat=chat, **fields)
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_bias_arrays_hold_each_rows_entries():
    from realm_jax.serve.engine import _bias_arrays

    ids, values = _bias_arrays([{4: 1.0, 9: -2.0}, {}, dict.fromkeys(range(20), 0.5)], [0, 2, 3], 4)
    assert ids.shape == values.shape == (4, 32)
    assert list(ids[0, :2]) == [4, 9] and list(values[0, :2]) == [1.0, -2.0] and not values[0, 2:].any()
    assert not values[1].any() and not values[2].any()
    np.testing.assert_array_equal(ids[3, :20], np.arange(20))


def test_prompt_logprobs_are_the_logits_log_softmax(engine):
    """Past one chunk of projected rows (128), against a float64 log-softmax of `Model.logits`."""
    model = engine.model
    ids = model.tokenizer.encode("the prompt's own log-probabilities, teacher-forced; " * 8)
    assert len(ids) > 128
    chosen, values, which = model.prompt_logprobs(ids, 4)
    logits = model.logits(ids).astype(np.float64)[:-1]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    np.testing.assert_allclose(chosen, logp[np.arange(len(ids) - 1), ids[1:]], atol=2e-5)
    np.testing.assert_allclose(values, -np.sort(-logp, axis=-1)[:, :4], atol=2e-5)
    np.testing.assert_array_equal(which[:, 0], logp.argmax(-1))
    assert [a.shape for a in model.prompt_logprobs(ids[:1])] == [(0,), (0, 0), (0, 0)]
    with pytest.raises(SamplingError):
        model.prompt_logprobs(ids, 21)
    with pytest.raises(TokenIdError):
        model.prompt_logprobs([10**9])


def test_engine_call_runs_between_steps_and_fails_after_stop():
    model = realm_jax.load(MODEL, progress=False)
    e = Engine(model, slots=1, max_context=64).start()
    assert e.call(lambda: 41 + 1).result(60) == 42
    with pytest.raises(ZeroDivisionError):
        e.call(lambda: 1 / 0).result(60)
    e.stop()
    with pytest.raises(EngineStoppedError):
        e.call(lambda: 0)


def test_echo_allows_max_tokens_0_and_chat_has_none():
    body = _parse(echo=True, max_tokens=0, logprobs=1)
    assert body.echo and body.max_tokens == 0 and body.logprobs == 1
    with pytest.raises(ApiError) as e:
        _parse(max_tokens=0)
    assert e.value.param == "max_tokens"
    assert not _parse(chat=True, echo=True).echo


def test_text_offsets_index_the_decoded_text():
    """Each token's offset is where its text starts in decode(ids, skip_special=True): pieces with the space
    prefix, a character split over byte tokens (both at its start), and control tokens (none)."""
    from realm_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(MODEL)
    for s in ("hello", "h\u00e9llo  w\u00f6rld\n\n", "\u65e5\u672c\u8a9e"):
        ids = tok.encode(s)
        text, offsets = tok.text_offsets(ids)
        assert text == tok.decode(ids, skip_special=True) and offsets == sorted(offsets)
        for i, t in enumerate(ids):  # a whole-character piece lies at its offset
            piece = tok.token_to_piece(t, special=False).decode("utf-8", errors="replace")
            if piece and "\ufffd" not in piece:  # (a byte of a split character decodes to U+FFFD alone)
                assert text[offsets[i]: offsets[i] + len(piece)] == piece, (s, i, piece)
    text, offsets = tok.text_offsets(tok.encode("h\u00e9"))  # [BOS, " h", 0xC3, 0xA9]: both bytes at the \u00e9
    assert text == " h\u00e9" and offsets == [0, 0, 2, 2]


# --- the draw itself (`sample_rows`), without a model ----------------------------------------------------
def _draws(logits, settings, n, seed=5):
    """n draws from each row of logits [R, V] under its (temperature, top_k, top_p): every row repeated n
    times, with token indices (`counts`) 0..n-1, in one call; a second try from the top 128 candidates (not
    `WIDE`'s 1024: past these 600 tokens). [R, n] tokens."""
    from realm_jax.serve.sampling import sample_rows

    r = len(logits)
    t, k, p = (np.repeat(np.asarray(c, dt), n) for c, dt in zip(zip(*settings), (np.float32, np.int32, np.float32)))
    tokens, finite = sample_rows(np.repeat(logits, n, axis=0), t, k, p, np.full(r * n, seed, np.uint32),
                                 np.tile(np.arange(n, dtype=np.int32), r), sampled=True, top_n=0, wide=128)
    assert np.asarray(finite).all()
    return np.asarray(tokens).reshape(r, n)


def test_each_rows_draws_follow_its_settings():
    """Rows that keep every token (drawn in id order, `draw_in_id_order`: 600 is two blocks and part of a third),
    and rows whose kept set ends in the first 64 candidates, in the first 128 (the second try) and past
    them (the vocabulary sorted), in one call: each row's 2000 draws follow its own distribution (every
    token within 5 standard deviations, nothing outside the kept set), and a row draws the same tokens
    alone as beside the others."""
    from realm_jax.serve.sampling import CANDIDATES

    rng, vocab = np.random.default_rng(0), 600
    flat = rng.standard_normal(vocab).astype(np.float32)
    peaked = (flat * 4).astype(np.float32)
    settings = [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 5, 1.0), (0.7, 0, 0.5), (1.0, 0, 0.9), (2.0, 100, 1.0),
                (1.0, 0, 0.45)]
    logits = np.stack([flat, peaked, flat, peaked, flat, flat, flat])
    kept = [np.count_nonzero(expected_distribution(row, *s)) for row, s in zip(logits, settings)]
    assert kept[:2] == [vocab, vocab] and kept[2] == 5 and kept[3] <= CANDIDATES < kept[5] <= 128 < kept[4]
    assert CANDIDATES < kept[6] <= 128
    n = 2000
    draws = _draws(logits, settings, n)
    for row, (t, k, p) in enumerate(settings):
        want = expected_distribution(logits[row], t, k, p)
        got = np.bincount(draws[row], minlength=vocab)
        assert not got[want == 0].any(), (row, np.flatnonzero(got * (want == 0)))
        sigma = np.sqrt(n * want * (1 - want))
        assert (np.abs(got - n * want) <= 5 * sigma + 1).all(), (row, np.max(np.abs(got - n * want) / (sigma + 1e-9)))
    # Alone: row 0's step tries no candidates, row 3's no second time; row 4's sorts every row at once (beside
    # the others, one row at a time: `_sample_wider`'s each)
    for row in (0, 3, 4):
        assert (_draws(logits[row : row + 1], [settings[row]], n) == draws[row]).all(), row


def test_a_draw_over_every_token_never_gives_one_of_weight_0():
    """`draw_in_id_order` at the ends of the uniform's range: the first and the last token of positive weight,
    across blocks and the padding of the last one."""
    from realm_jax.sampling import draw_in_id_order

    logits = np.full((3, 700), -np.inf, np.float32)
    logits[:, [3, 255, 256, 600]] = [0.0, 1.0, 2.0, 0.5]
    u = np.array([0.0, 0.5, np.nextafter(np.float32(1), np.float32(0))], np.float32)
    drawn = np.asarray(jax.jit(draw_in_id_order)(logits, logits.max(1), np.ones(3, np.float32), u))
    assert drawn[0] == 3 and drawn[2] == 600 and drawn[1] in (255, 256, 600)
