"""`realm-jax serve` end to end: a real server process on 127.0.0.1 (a free port; killed at the end) spoken to
with the official openai client and plain HTTP. One server per model for the whole module.

Checked: completions and chat, streamed and not, on the default model (with a chat template given by
--chat-template: the file has none) and on SmolLM2 (its own template); 16 concurrent greedy requests of
different lengths each get `Model.generate`'s tokens; a request's log-probabilities are bit for bit the
same alone and among 15 others (batch-invariant numerics); seeded sampling is reproducible; stop strings
that span tokens; n choices and lists of prompts; chat's logprobs, logit_bias, echo and fields not served
(400); a prompt longer than a prefill chunk matches generate until a near tie; a cancelled stream frees
its slot (/health), and so does a client gone before a whole answer; a full queue answers 429; malformed
bodies, wrong types, over-long prompts and bad keys are 4xx with OpenAI's error JSON and leave the server
serving. SmolLM2's server runs with --batch-dependent (all slots in one group): it answers many rows at
once. `--mesh data=2` on two simulated CPU devices: a server in a process of its own (in the background,
tests/background.py) gives `generate`'s greedy tokens on the same mesh to concurrent requests.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import background  # noqa: E402
import realm_jax  # noqa: E402
from realm_jax import assets  # noqa: E402
from realm_jax.serve.local import free_port, wait_until_serving  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEY = "test-key-17"
PROMPTS = ["Once upon a time", "The capital of France is", "def fib(n):", "1, 2, 3, 4,", "Water boils at",
           "My favourite colour is", "The quick brown fox", "In 1492,", "Dear Sir or Madam,", "Photosynthesis is",
           "import numpy as np\n", "The three laws of robotics are", "Q: What is 2+2?\nA:", "Paris, London and",
           "She opened the door and", "A haiku about the sea:"]
# A gemma-style chat template for the default model, whose file has none.
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
                  "'user' }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@contextlib.contextmanager
def _started(path, *args):
    """A server process starting on a free port (not waited for: see `_ready`); killed at the end."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = tempfile.TemporaryFile()  # not a pipe: a full pipe would stall the server
    proc = subprocess.Popen([sys.executable, "-m", "realm_jax.cli", "serve", "--model", str(path), "--port", str(port),
                             *args], stdout=subprocess.DEVNULL, stderr=log, env=env)
    proc.log = log
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(30)
        log.close()


def _ready(started, timeout: float = 300.0) -> str:
    proc, base = started
    try:
        wait_until_serving(base, proc, timeout=timeout, poll=0.3)
    except RuntimeError as e:
        proc.log.seek(0)
        raise RuntimeError(f"{e}: {proc.log.read().decode()[-2000:]}") from None
    return base


@pytest.fixture(scope="module")
def servers(gemma3_path, smollm2_path, tmp_path_factory):
    """Both servers, started together (they load and compile while the test process loads its model)."""
    template = tmp_path_factory.mktemp("serve") / "gemma.jinja"
    template.write_text(GEMMA_TEMPLATE)
    with contextlib.ExitStack() as stack:
        yield {"gemma": stack.enter_context(_started(
                   gemma3_path, "--slots", "16", "--queue-size", "2", "--max-context", "512", "--prefill-chunk", "64",
                   "--api-key", KEY, "--chat-template", str(template), "--max-body-bytes", "65536")),
               "smollm": stack.enter_context(_started(smollm2_path, "--slots", "12", "--max-context", "512",
                                                    "--batch-dependent"))}


@pytest.fixture(scope="module")
def model(servers, gemma3_path):
    return realm_jax.load(gemma3_path, progress=False)  # the policy the server picks: the device's own


@pytest.fixture(scope="module")
def gemma(servers, model):
    return _ready(servers["gemma"])


@pytest.fixture(scope="module")
def smollm(servers, model):
    return _ready(servers["smollm"])


def _client(base, key=KEY):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, timeout=300, max_retries=0)


def _health(base):
    return httpx.get(f"{base}/health", timeout=10).json()


def _greedy_ids(client, prompt, n, **kw):
    r = client.completions.create(model="m", prompt=prompt, max_tokens=n, temperature=0, logprobs=0, **kw)
    return r


def test_completions_match_generate_for_16_concurrent_requests(gemma, model):
    client = _client(gemma)
    lengths = [2 + (5 * i) % 7 for i in range(16)]  # 2..8 tokens: rows join and leave mid-batch
    tok = model.tokenizer
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # generate's tokens here while the server works
        futures = [pool.submit(_greedy_ids, client, PROMPTS[i], lengths[i]) for i in range(16)]
        wants = [model.generate_ids([tok.encode(p)], max_new_tokens=max(lengths), stop_ids=[])[0] for p in PROMPTS]
        got = [f.result() for f in futures]
    for i, (r, want) in enumerate(zip(got, wants)):
        n = r.usage.completion_tokens
        assert r.usage.prompt_tokens == len(tok.encode(PROMPTS[i]))
        assert r.choices[0].logprobs.tokens == [tok.token_to_piece(t).decode("utf-8", "replace") for t in want[:n]]
        assert n == lengths[i] or want[n] in tok.stop_ids
        assert r.choices[0].text == tok.decode(want[:n])
        assert r.choices[0].finish_reason == ("length" if n == lengths[i] else "stop")
    assert _health(gemma)["busy"] == 0


def test_a_requests_numbers_do_not_depend_on_who_else_is_served(gemma):
    client = _client(gemma)
    alone = _greedy_ids(client, PROMPTS[0], 10).choices[0].logprobs.token_logprobs
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        crowd = list(pool.map(lambda i: _greedy_ids(client, PROMPTS[i], 10 if i == 0 else 14), range(16)))
    assert crowd[0].choices[0].logprobs.token_logprobs == alone  # float32 values, bit for bit


def test_streaming_completion_and_chat(gemma, smollm):
    client = _client(gemma)
    full = client.completions.create(model="m", prompt="Once upon a time", max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="m", prompt="Once upon a time", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 12
    for base, c in ((gemma, client), (smollm, _client(smollm, "unused"))):
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        reply = c.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0)
        assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
        assert reply.usage.completion_tokens <= 16 and reply.usage.prompt_tokens > 5
        streamed = c.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0, stream=True)
        deltas = [ch.choices[0].delta for ch in streamed]
        assert deltas[0].role == "assistant"
        assert "".join(d.content or "" for d in deltas) == reply.choices[0].message.content
    assert "Paris" in reply.choices[0].message.content  # SmolLM2 knows


def test_chat_logprobs_logit_bias_echo_and_what_is_not_served(gemma, model):
    """Chat's logprobs (streamed and not: the same entries), a token forced by logit_bias, echo's prompt
    log-probabilities (those of `Model.prompt_logprobs` here), and fields asking for what realm-jax does
    not do: a 400 naming the field."""
    client, tok = _client(gemma), model.tokenizer
    kw = dict(model="m", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6, temperature=0,
              logprobs=True, top_logprobs=3)
    reply = client.chat.completions.create(**kw)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token  # greedy: the best one
        assert e.top_logprobs[0].logprob == e.logprob <= 0 and bytes(e.bytes).decode("utf-8", "replace") == e.token
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    assert [e for lp in streamed if lp for e in lp.content] == content
    forced = tok.encode(" blue", add_bos=False)[0]
    r = client.completions.create(model="m", prompt="My favourite colour is", max_tokens=3, temperature=0,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == tok.decode([forced] * 3)
    ids = tok.encode("The capital of France is")
    scored = client.completions.create(model="m", prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
    lp = scored.choices[0].logprobs
    chosen, values, _ = model.prompt_logprobs(ids, 1)  # the same file and policy as the server's
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1 == len(lp.top_logprobs)
    np.testing.assert_allclose(lp.token_logprobs[1:-1], chosen, atol=1e-4)
    np.testing.assert_allclose([max(t.values()) for t in lp.top_logprobs[1:-1]], values[:, 0], atol=1e-4)
    assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # the greedy token
    assert scored.choices[0].text.startswith(tok.decode(ids, skip_special=True))
    alone = client.completions.create(model="m", prompt=ids, echo=True, logprobs=0, max_tokens=0)
    assert alone.usage.completion_tokens == 0 and alone.choices[0].logprobs.token_logprobs == lp.token_logprobs[:-1]
    assert client.models.retrieve("gemma-3-270m-q4_k_m").id == "gemma-3-270m-q4_k_m"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for extra in ({"tools": [tool]}, {"response_format": {"type": "json_object"}}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=kw["messages"], max_tokens=1, **extra)
        assert e.value.body["param"] == next(iter(extra))
    assert _health(gemma)["running"]


def test_n_choices_and_prompt_batches(gemma):
    """n choices a prompt and lists of prompts: choice i n + j is prompt i's j-th, sampled with seed + j, as a
    request of its own with that seed; usage counts each prompt once. Streamed: the same texts by index."""
    client = _client(gemma)
    kw = dict(model="m", max_tokens=8, temperature=1.0, seed=11)
    prompts = [PROMPTS[0], PROMPTS[2]]
    r = client.completions.create(prompt=prompts, n=3, **kw)
    assert [c.index for c in r.choices] == list(range(6))
    alone = [client.completions.create(prompt=p, **{**kw, "seed": 11 + j}) for p in prompts for j in range(3)]
    assert [c.text for c in r.choices] == [a.choices[0].text for a in alone]
    assert len({c.text for c in r.choices}) > 2  # the seeds differ: so do (most of) the samples
    assert r.usage.prompt_tokens == alone[0].usage.prompt_tokens + alone[3].usage.prompt_tokens
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    texts = {}
    for chunk in client.completions.create(prompt=prompts, n=3, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert [texts[i] for i in range(6)] == [c.text for c in r.choices]
    messages = [{"role": "user", "content": "Say something."}]
    chat = client.chat.completions.create(model="m", messages=messages, n=2, max_tokens=6, temperature=0)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message == chat.choices[1].message
    assert _health(gemma)["busy"] == 0


def test_sampling_stop_strings_and_utf8(gemma):
    client = _client(gemma)
    kw = dict(model="m", prompt="Once upon a time", max_tokens=10, temperature=0.9, top_p=0.95, seed=7)
    a = client.completions.create(**kw, extra_body={"top_k": 40}).choices[0].text
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        others = [pool.submit(_greedy_ids, client, p, 6) for p in PROMPTS[1:4]]
        b = client.completions.create(**kw, extra_body={"top_k": 40}).choices[0].text
        [f.result() for f in others]
    assert a == b
    # No top_k, top_p 0.95: a row whose kept set the fast path's 64 candidates may not hold (the full sort).
    wide = {**kw, "max_tokens": 3, "temperature": 1.5}
    assert client.completions.create(**{**wide, "seed": 8}).choices[0].text != \
        client.completions.create(**{**wide, "seed": 9}).choices[0].text
    greedy = client.completions.create(model="m", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert greedy.choices[0].text.startswith(", there was a little girl")
    cut = client.completions.create(model="m", prompt="Once upon a time", max_tokens=12, temperature=0,
                                    stop=["re was a l"])  # spans " there", " was", " a", " little"
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (", the", "stop")
    stream = client.completions.create(model="m", prompt="用中文写一首关于月亮的诗：", max_tokens=24, temperature=0,
                                       stream=True)
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert all("\ufffd" not in p for p in pieces) and any(ord(ch) > 0x2E80 for ch in "".join(pieces))


def test_a_prompt_longer_than_a_chunk_matches_generate_until_a_near_tie(gemma, model):
    prompt = " ".join(PROMPTS)  # ~100 tokens: two prefill chunks of 64
    ids = model.tokenizer.encode(prompt)
    assert len(ids) > 64
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # generate's tokens here while the server works
        reply = pool.submit(_greedy_ids, _client(gemma), prompt, 12)
        want_ids = model.generate_ids([ids], max_new_tokens=12, stop_ids=[])[0]
        got = reply.result().choices[0].logprobs.tokens
    want = [model.tokenizer.token_to_piece(t).decode("utf-8", "replace") for t in want_ids]
    if got != want[: len(got)]:  # allowed from generate's first near tie on: find it
        logits = model.logits(ids + want_ids, positions=range(len(ids) - 1, len(ids) + len(want) - 1))
        top2 = np.sort(logits, axis=-1)[:, -2:]
        near = np.flatnonzero(top2[:, 1] - top2[:, 0] < 0.05)
        n = int(near[0]) if near.size else len(want)
        assert got[:n] == want[:n]


def test_a_dropped_stream_frees_its_slot_and_a_full_queue_is_429(gemma):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{gemma}/v1/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)
            assert _health(gemma)["busy"] == 1
    deadline = time.monotonic() + 20  # 400 tokens take far longer: the disconnect ended it
    while _health(gemma)["busy"]:
        assert time.monotonic() < deadline, _health(gemma)
        time.sleep(0.1)
    # 16 slots and a queue of 2: the 19th waiting request is refused.
    streams = []
    with contextlib.ExitStack() as stack:
        http = stack.enter_context(httpx.Client(timeout=60))
        for _ in range(18):
            s = stack.enter_context(http.stream("POST", f"{gemma}/v1/completions", json=body, headers=headers))
            streams.append(s)
        refused = http.post(f"{gemma}/v1/completions", json={**body, "stream": False}, headers=headers)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
    deadline = time.monotonic() + 30
    while (h := _health(gemma))["busy"] or h["queued"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.1)


def test_a_client_gone_before_its_answer_frees_its_slots(gemma, model):
    """Not streamed, n=2, 480 tokens each (end-of-generation tokens barred): the client gives up after a second;
    its two sequences end within a few steps of that, not 480 (counted in decode steps, not seconds)."""
    never = {str(t): -100 for t in model.tokenizer.stop_ids}
    body = {"prompt": "Once upon a time", "max_tokens": 480, "temperature": 0, "n": 2, "logit_bias": never}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gemma}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(60, read=1.0))
    steps = _health(gemma)["decode_steps"]
    deadline = time.monotonic() + 60
    while (h := _health(gemma))["busy"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert h["decode_steps"] - steps < 150, (steps, h)


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"prompt": "hi", "max_tokens": "ten"}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "hi", "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "hi", "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({"prompt": "hi", "temperature": 10**400}).encode(), 400, "temperature"),  # past float's range
    (json.dumps({"prompt": "hi", "top_p": -10**400}).encode(), 400, "top_p"),
    (json.dumps({"prompt": "hi", "n": 65}).encode(), 400, "n"),
    (json.dumps({"prompt": "hi", "n": 19}).encode(), 400, "n"),  # past the 16 slots and queue of 2
    (json.dumps({"prompt": ["hi"] * 33, "n": 2}).encode(), 400, "prompt"),
    (json.dumps({"prompt": ["hi", [1, 10**9]]}).encode(), 400, "prompt[1]"),
    (json.dumps({"prompt": "hi", "stop": [1]}).encode(), 400, "stop"),
    (json.dumps({"prompt": "hi", "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"prompt": [1, 10**9]}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "hi", "max_tokens": 10**6}).encode(), 400, None),
    (json.dumps({"prompt": "word " * 600, "max_tokens": 1}).encode(), 400, None),
    (json.dumps({"prompt": "x" * 70000}).encode(), 413, None),
    ('{"prompt": "\\ud800"}'.encode(), 400, "prompt"),
])
def test_bad_requests_are_4xx_and_the_server_goes_on(gemma, body, status, param):
    r = httpx.post(f"{gemma}/v1/completions", content=body, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert _health(gemma)["running"]


def test_a_port_in_use_is_an_error_before_the_load():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        model = pathlib.Path(__file__).parent / "data" / "synthetic" / "llama-s-q2_k.gguf"
        proc = subprocess.run([sys.executable, "-m", "realm_jax.cli", "serve", "--model", str(model),
                               "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and time.monotonic() - t0 < 60
    assert proc.stderr.strip() == (f"realm-jax: error: --host 127.0.0.1 --port {port}: cannot listen there: "
                                   "Address already in use"), proc.stderr


def test_api_key_models_unknown_fields_and_routes(gemma):
    ok = httpx.post(f"{gemma}/v1/completions", json={"prompt": "hi", "max_tokens": 1, "unknown_field": [1],
                                                     "presence_penalty": 0.5, "user": "x", "metadata": {}},
                    headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1
    assert httpx.get(f"{gemma}/v1/models", timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        _client(gemma, "wrong").completions.create(model="m", prompt="hi", max_tokens=1)
    models = _client(gemma).models.list()
    assert [m.id for m in models.data] == ["gemma-3-270m-q4_k_m"]
    r = httpx.get(f"{gemma}/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    bad_chat = httpx.post(f"{gemma}/v1/chat/completions", json={"messages": [{"role": "user"}], "max_tokens": 1},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert bad_chat.status_code == 200  # a missing content is empty text
    bad_chat = httpx.post(f"{gemma}/v1/chat/completions", json={"messages": "hi"},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert bad_chat.status_code == 400 and bad_chat.json()["error"]["param"] == "messages"


def test_batch_dependent_serves_every_slot_in_one_group(smollm):
    """--batch-dependent: twelve concurrent requests decode as one group of 12 rows (past the native matmul's
    8, its bf16 gemm) and each gets its answer."""
    health = _health(smollm)
    assert (health["batch_invariant"], health["group"], health["slots"]) == (False, 12, 12)
    client = _client(smollm, "unused")
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda p: client.completions.create(model="m", prompt=p, max_tokens=6, temperature=0),
                            PROMPTS[:12]))
    for r in got:
        assert r.usage.completion_tokens == 6 or r.choices[0].finish_reason == "stop"
        assert r.choices[0].text.strip() or r.choices[0].finish_reason == "stop"
    assert got[1].choices[0].text.startswith(" Paris")  # "The capital of France is"
    assert _health(smollm)["busy"] == 0


# `realm-jax serve --mesh data=2` on two simulated CPU devices, and `generate` on the same mesh, in a process
# of their own (the device count is fixed when JAX starts).
MESH_SCRIPT = textwrap.dedent("""
    import concurrent.futures, json, subprocess, sys, tempfile
    import jax, openai, realm_jax
    from realm_jax.distributed import make_mesh
    from realm_jax.serve.local import free_port, wait_until_serving
    path = sys.argv[1]
    port = free_port()
    log = tempfile.TemporaryFile()
    server = subprocess.Popen([sys.executable, "-m", "realm_jax.cli", "serve", "--model", path, "--port", str(port),
                               "--mesh", "data=2", "--slots", "4", "--max-context", "256"],
                              stdout=subprocess.DEVNULL, stderr=log)
    try:
        m = realm_jax.load(path, progress=False, mesh=make_mesh(data=2, devices=jax.devices()[:2]))
        prompts = ["Once upon a time", "The capital of France is", "def fib(n):", "Water boils at"]
        want = [m.generate_ids([m.tokenizer.encode(p)], max_new_tokens=8, stop_ids=[])[0] for p in prompts]
        try:
            wait_until_serving(f"http://127.0.0.1:{port}", server, timeout=600, poll=0.3)
        except RuntimeError as e:
            log.seek(0)
            raise RuntimeError(f"{e}: {log.read().decode()[-2000:]}") from None
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        ask = lambda p: client.completions.create(model="m", prompt=p, max_tokens=8, temperature=0, logprobs=0)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = [r.choices[0].logprobs.tokens for r in pool.map(ask, prompts)]
        piece = lambda t: m.tokenizer.token_to_piece(t).decode("utf-8", "replace")
        print(json.dumps({"mesh": dict(m.mesh.shape), "got": got, "want": [[piece(t) for t in w] for w in want]}))
    finally:
        server.kill()
        server.wait()
""")


@background.job(__file__, "mesh_results")
def _mesh_job():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return [sys.executable, "-c", MESH_SCRIPT, str(assets.model_path("smollm2-135m-instruct-q4_1"))], env, 900


@pytest.fixture(scope="module")
def mesh_results(smollm2_path):
    proc = background.result(__file__, "mesh_results")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_server_on_a_mesh_answers_as_generate_on_it(mesh_results):
    assert mesh_results["mesh"]["data"] == 2
    assert mesh_results["got"] == mesh_results["want"]
