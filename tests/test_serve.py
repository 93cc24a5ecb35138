"""lmstack serve against the official `openai` client on a live loopback server (real SmolLM2 and MiniLM).

Every answer is checked against an oracle: greedy and seeded text against `Generator` on a separate copy of
the model (alone, one prompt at a time), usage against the tokenizer, logprobs against a plain forward,
embeddings against sentence-transformers, adapters against the adapter loaded by `peft.methods.load_adapter`.
Generations are a few tokens long to keep the file to a few minutes on 2 cores.
"""

from __future__ import annotations

import base64
import copy
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
import torch  # noqa: E402

from lmstack.checkpoints import load_model, resolve  # noqa: E402
from lmstack.generation import GenerationConfig, Generator  # noqa: E402
from lmstack.serving.app import Settings, create_app  # noqa: E402
from lmstack.serving.engine import Engine  # noqa: E402
from lmstack.serving.testing import ServerThread  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"
KEY = "test-key"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference():
    """A separate copy of SmolLM2 (and one with a random LoRA adapter) for the oracle generations."""
    try:
        loaded = load_model(MODEL, dtype="float32")
    except Exception as e:  # the model package is not installed
        pytest.skip(f"SmolLM2 unavailable: {e}")
    return loaded


@pytest.fixture(scope="module")
def adapter(reference, tmp_path_factory):
    """A LoRA adapter with non-zero random B (so it changes the output), saved in lmstack's format."""
    from lmstack.peft.lora import apply_lora, lora_layers
    from lmstack.peft.methods import PeftSpec, save_adapter
    torch.manual_seed(0)
    model = apply_lora(copy.deepcopy(reference.model), rank=4, alpha=8.0, targets=["q", "v"])
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_b, std=0.5)
    path = save_adapter(model, PeftSpec(method="lora", rank=4, alpha=8.0, targets=["q", "v"]),
                        tmp_path_factory.mktemp("adapter") / "ad", base_model=MODEL)
    return path, model.eval()


@pytest.fixture(scope="module")
def engine(adapter):
    engine = Engine(MODEL, {"ad": adapter[0]}, "minilm-l6", max_batch=8, context=512)
    engine.load()
    assert engine.state == "ok", engine.detail
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def feedback_path(tmp_path_factory):
    return tmp_path_factory.mktemp("feedback") / "feedback.jsonl"


@pytest.fixture(scope="module")
def server(engine, feedback_path):
    settings = Settings(api_keys=[KEY, "second-key"], max_tokens=64, max_prompt_tokens=300,
                        max_body_bytes=32_000, feedback_path=feedback_path)
    with ServerThread(create_app(engine, settings)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def alone(reference, prompt, model=None, **kw) -> object:
    """The oracle: Generator on its own copy of the model, this prompt alone."""
    gen = Generator(model or reference.model, reference.tokenizer)
    ids = gen.chat_prompt(prompt) if isinstance(prompt[0], dict) else prompt
    return gen.generate(ids, GenerationConfig(**kw))


def ask(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


# ------------------------------------------------------------------------------------- chat


def test_chat_matches_generator_and_counts_usage(client, reference):
    messages = [{"role": "system", "content": "You are terse."}, *ask("Name a colour.")]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    want = alone(reference, messages, max_new_tokens=10)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    template = reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(reference.tokenizer.encode(template, add_special_tokens=False))
    assert r.usage.completion_tokens == want.new_tokens  # the tokens generated, EOS included
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat_equals_non_streaming(client, server, reference):
    messages = ask("Count to five.")
    want = alone(reference, messages, max_new_tokens=12)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.new_tokens
    # The wire format: SSE `data:` lines, ending with [DONE].
    body = {"model": MODEL, "messages": messages, "max_tokens": 3, "temperature": 0, "stream": True}
    raw = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                     timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_completions_several_prompts_and_stop(client, reference):
    prompts = ["The capital of France is", "1, 2, 3,"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0)
    wants = [alone(reference, reference.tokenizer.encode(p), max_new_tokens=8) for p in prompts]
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [w.text for w in wants]
    assert r.usage.prompt_tokens == sum(len(reference.tokenizer.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == sum(w.new_tokens for w in wants)
    # A stop string from the middle of the greedy text cuts it there (not included) with finish "stop".
    text = wants[1].text  # " 4, 5, 6, 7,"
    stop = text[3:5]
    r = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=8, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"


def test_n_and_seed_reproducible(client, reference):
    kw = dict(model=MODEL, messages=ask("Tell me a word."), max_tokens=6, temperature=1.0, seed=1234)
    a = client.chat.completions.create(n=3, **kw)
    b = client.chat.completions.create(n=3, **kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]  # same seed, same choices
    assert len(set(texts)) > 1  # choice i samples with seed + i: they differ
    # Choice 0 samples exactly as Generator does with the same seed.
    assert texts[0] == alone(reference, kw["messages"], max_new_tokens=6, temperature=1.0, seed=1234).text
    assert a.usage.completion_tokens == sum(
        alone(reference, kw["messages"], max_new_tokens=6, temperature=1.0, seed=1234 + i).new_tokens
        for i in range(3))


def test_logprobs_match_the_model(client, reference):
    messages = ask("Hi")
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    gen = Generator(reference.model, reference.tokenizer)
    ids = gen.chat_prompt(messages)
    with torch.inference_mode():
        for item in content:
            logp = torch.log_softmax(reference.model(torch.tensor([ids]))[0, -1].float(), -1)  # no cache
            token = int(logp.argmax())
            assert item.token == reference.tokenizer.decode([token])
            assert item.logprob == pytest.approx(float(logp[token]), abs=1e-3)
            assert [t.logprob for t in item.top_logprobs] == pytest.approx(logp.topk(3).values.tolist(), abs=1e-3)
            assert item.top_logprobs[0].token == item.token
            ids.append(token)
    c = client.completions.create(model=MODEL, prompt="1, 2,", max_tokens=2, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 2
    assert "".join(lp.tokens) == c.choices[0].text and lp.text_offset[0] == 0


def test_json_mode_gives_parseable_json(client):
    for max_tokens in (40, 9):  # 9: the budget runs out and the object is closed in time
        r = client.chat.completions.create(
            model=MODEL, messages=ask("Describe a cat as a JSON object with name and age."),
            max_tokens=max_tokens, temperature=0, response_format={"type": "json_object"})
        assert isinstance(json.loads(r.choices[0].message.content), dict)
        assert r.usage.completion_tokens <= max_tokens


def test_embeddings_match_sentence_transformers(client):
    st = pytest.importorskip("sentence_transformers")
    texts = ["A cat sits on the mat.", "Quantum chromodynamics", "a"]
    r = client.embeddings.create(model="minilm-l6", input=texts)
    got = torch.tensor([d.embedding for d in r.data])  # [3, 384]
    want = st.SentenceTransformer(str(resolve("minilm-l6")), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(got, torch.nn.functional.normalize(want, dim=-1), atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)
    b64 = client.embeddings.create(model="minilm-l6", input=texts[0], encoding_format="base64")
    raw = b64.data[0].embedding
    if isinstance(raw, str):  # the client hands base64 through as is, or decodes it
        raw = list(struct.unpack(f"<{len(base64.b64decode(raw)) // 4}f", base64.b64decode(raw)))
    assert torch.allclose(torch.tensor(raw), got[0], atol=1e-6)


def test_models_lists_base_adapter_and_encoder(client):
    ids = {m.id for m in client.models.list().data}
    assert ids == {MODEL, f"{MODEL}:ad", "minilm-l6"}


# ---------------------------------------------------------------------------------- concurrency


def test_parallel_greedy_requests_equal_each_alone(client, reference, adapter):
    """8 requests at once (7 base, 1 adapter; different lengths) return what each returns alone."""
    prompts = ["The sky is", "def add(a, b):", "My favourite food is", "Paris is the capital of",
               "Once upon a time, in a small village,", "2 + 2 =", "The quick brown fox", "Roses are red,"]
    models = [MODEL] * 7 + [f"{MODEL}:ad"]
    wants = [alone(reference, reference.tokenizer.encode(p), model=adapter[1] if m.endswith(":ad") else None,
                   max_new_tokens=10).text for p, m in zip(prompts, models)]
    assert wants[7] != alone(reference, reference.tokenizer.encode(prompts[7]), max_new_tokens=10).text

    def one(i: int) -> str:
        return client.completions.create(model=models[i], prompt=prompts[i], max_tokens=10, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(8)))
    assert got == wants


def test_continuous_batching_admits_and_retires_mid_batch(engine, reference):
    """12 jobs of different lengths through 8 rows, half submitted while the others decode: rows are retired
    (the last row moves into the hole) and refilled at every step, and each result still equals Generator's."""
    from lmstack.serving.scheduler import Finish, Job
    tok = reference.tokenizer
    words = ["red", "blue", "green", "the sea", "a robot", "music", "rain", "Python", "tea", "a cat", "snow", "1 2 3"]
    lengths = [3, 12, 5, 9, 2, 11, 4, 8, 6, 10, 7, 3]
    prompts = [tok.encode(f"A sentence about {w}:") for w in words]
    finished: dict[int, Finish] = {}
    done = threading.Event()

    def emit_for(i: int):
        def emit(event):
            if isinstance(event, Finish):
                finished[i] = event
                if len(finished) == len(prompts):
                    done.set()
        return emit

    jobs = [Job(p, GenerationConfig(max_new_tokens=n), emit_for(i)) for i, (p, n) in enumerate(zip(prompts, lengths))]
    for job in jobs[:6]:
        engine.scheduler.submit(job)
    time.sleep(1.0)  # the first six are decoding
    for job in jobs[6:]:
        engine.scheduler.submit(job)
    assert done.wait(300)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        want = alone(reference, p, max_new_tokens=n)
        assert (finished[i].text, finished[i].completion_tokens) == (want.text, want.new_tokens), i


# --------------------------------------------------------------------------------- auth, limits


def _post(server, path, body, key=KEY, timeout=60.0):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=timeout)


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_api_key_on_every_route_but_health(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    for path in ("/v1/models", "/metrics", "/openapi.json", "/docs", "/no/such/route"):
        _error(httpx.get(server.url + path), 401)
        _error(httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(server.url + "/", timeout=10).status_code == 401  # the key form, no chat page
    assert "API key" in httpx.get(server.url + "/").text
    page = httpx.get(server.url + "/", cookies={"lmstack_key": KEY})
    assert page.status_code == 200 and "lmstack chat" in page.text
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer second-key"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_bad_requests_get_openai_errors(server, client):
    chat = {"model": MODEL, "messages": ask("hi"), "max_tokens": 2, "temperature": 0}
    assert _error(_post(server, "/v1/chat/completions", {**chat, "model": "gpt-4"}), 404)["code"] == "model_not_found"
    _error(httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404)
    assert _error(_post(server, "/v1/chat/completions", {**chat, "temperature": 5}), 422)["param"] == "temperature"
    _error(_post(server, "/v1/chat/completions", {**chat, "messages": []}), 422)
    _error(_post(server, "/v1/chat/completions", {**chat, "surprise": 1}), 422)
    bad_json = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": ', timeout=10,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    _error(bad_json, 400)
    assert _error(_post(server, "/v1/chat/completions", {**chat, "max_tokens": 65}), 400)["param"] == "max_tokens"
    _error(_post(server, "/v1/chat/completions", {**chat, "n": 9}), 400)  # more choices than batch rows
    _error(_post(server, "/v1/chat/completions", {**chat, "presence_penalty": 0.5}), 400)
    long_prompt = {**chat, "messages": ask("word " * 400)}  # > max_prompt_tokens=300
    assert _error(_post(server, "/v1/chat/completions", long_prompt), 400)["code"] == "context_length_exceeded"
    _error(_post(server, "/v1/completions", {"model": MODEL, "prompt": [99999999]}), 400)  # outside the vocab
    _error(_post(server, "/v1/embeddings", {"model": MODEL, "input": "x"}), 400)
    _error(_post(server, "/v1/chat/completions", {**chat, "messages": ask("x" * 40_000)}), 413)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=ask("hi"), max_tokens=2)


def test_openai_client_fields_are_accepted_and_tools_refused(server, client, reference):
    """Issue 13: fields the official client and frameworks send (store, metadata, service_tier,
    parallel_tool_calls, an empty tools list, tool_choice none/auto) are accepted; real tools are a clear 400."""
    expected = alone(reference, ask("hi"), max_new_tokens=2, temperature=0.0).text
    for extra in ({"store": False, "metadata": {"run": "a"}, "service_tier": "auto", "parallel_tool_calls": False},
                  {"tools": [], "tool_choice": "none"}, {"tool_choice": "auto"}):
        r = client.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=2, temperature=0, **extra)
        assert r.choices[0].message.content == expected, extra
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
    for extra, param in (({"tools": [tool]}, "tools"), ({"tool_choice": "required"}, "tool_choice")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=2, **extra)
        assert e.value.body["param"] == param and "tool calling is not supported" in e.value.body["message"]


def test_validation_errors_name_the_field_and_the_limit(server, client):
    """Issue 13: messages in plain words with the field and the limit, never pydantic's union-member names."""
    chat = {"model": MODEL, "messages": ask("hi"), "max_tokens": 2}
    for body, param, words in (({**chat, "stop": "x" * 300}, "stop", "at most 256 characters"),
                               ({**chat, "stop": ["a"] * 5}, "stop", "at most 4 items"),
                               ({**chat, "stop": 5}, "stop", "should be a string or a list"),
                               ({**chat, "temperature": 5}, "temperature", "less than or equal to 2"),
                               ({**chat, "messages": [{"role": "user", "content": 5}]}, "messages.0.content",
                                "should be a string or a list"),
                               ({**chat, "surprise": 1}, "surprise", "unknown field")):
        error = _error(_post(server, "/v1/chat/completions", body), 422)
        assert error["param"] == param and error["message"].startswith(f"{param}: ") and words in error["message"]
        assert not any(internal in error["message"] for internal in ("constrained", "list[", "function-", "str."))
    error = _error(_post(server, "/v1/completions", {"model": MODEL, "prompt": "word " * 400}), 400)
    assert error["param"] == "prompt" and "prompt" in error["message"] and "messages" not in error["message"]
    assert _error(_post(server, "/v1/completions", {"model": MODEL, "prompt": [[]]}), 422)["param"] == "prompt.0"
    over = {**chat, "max_tokens": None, "max_completion_tokens": 65}
    error = _error(_post(server, "/v1/chat/completions", over), 400)
    assert error["param"] == "max_completion_tokens" and "(64)" in error["message"]
    long_chat = _error(_post(server, "/v1/chat/completions", {**chat, "messages": ask("word " * 400)}), 400)
    assert long_chat["param"] == "messages" and "at most 300" in long_chat["message"]
    for empty in ("", [], ["a", ""]):  # as OpenAI: a 400
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model="minilm-l6", input=empty)
        assert e.value.body["param"] == "input"


def test_rate_limit_and_concurrency_cap_answer_429(engine, tmp_path):
    settings = Settings(api_keys=[KEY, "other"], rate_limit=2, max_tokens=64, feedback_path=tmp_path / "f.jsonl")
    body = {"model": MODEL, "prompt": "a", "max_tokens": 1, "temperature": 0}
    with ServerThread(create_app(engine, settings)) as srv:
        assert [_post(srv, "/v1/completions", body).status_code for _ in range(2)] == [200, 200]
        r = _post(srv, "/v1/completions", body)
        _error(r, 429)
        assert int(r.headers["Retry-After"]) >= 1
        assert _post(srv, "/v1/completions", body, key="other").status_code == 200  # per key
    settings = Settings(api_keys=[KEY], max_concurrent=1, max_tokens=300, feedback_path=tmp_path / "f.jsonl")
    with ServerThread(create_app(engine, settings)) as srv:
        long = {**body, "prompt": "Write a long story about a dragon:", "max_tokens": 300, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=long, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as first:
            lines = first.iter_lines()  # (a dropped iterator would close the stream)
            assert next(lines).startswith("data: {")  # the first request is in flight
            r = _post(srv, "/v1/completions", body)
            _error(r, 429)
            assert r.headers["Retry-After"] == "1"
        for _ in range(100):  # the closed stream releases its place
            r = _post(srv, "/v1/completions", body)
            if r.status_code == 200:
                break
            time.sleep(0.1)
        assert r.status_code == 200


def test_timeout_and_disconnect_free_the_slot(engine, tmp_path):
    settings = Settings(api_keys=[KEY], max_tokens=400, request_timeout_s=1.0, feedback_path=tmp_path / "f.jsonl")
    sched = engine.scheduler
    with ServerThread(create_app(engine, settings)) as srv:
        body = {"model": MODEL, "prompt": "Write a long story:", "max_tokens": 400, "temperature": 0}
        assert _error(_post(srv, "/v1/completions", body), 408)["code"] == "timeout"
        _wait_idle(sched)
    settings = Settings(api_keys=[KEY], max_tokens=400, feedback_path=tmp_path / "f.jsonl")
    with ServerThread(create_app(engine, settings)) as srv:
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            _post(srv, "/v1/completions", body, timeout=1.5)
        _wait_idle(sched)
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            lines = r.iter_lines()
            next(lines)
            assert sched.load[1] == 1  # generating
        _wait_idle(sched)  # the client went away: the row is free again


def _wait_idle(sched) -> None:
    for _ in range(100):
        if sched.load == (0, 0):
            return
        time.sleep(0.05)
    raise AssertionError(f"the scheduler still holds {sched.load} (waiting, active)")


def test_only_lora_adapters_are_served_side_by_side(tmp_path):
    from lmstack.errors import LmstackError
    from lmstack.serving.lora import attach_adapters
    for method in ("qlora", "prefix", "prompt"):
        folder = tmp_path / method
        folder.mkdir()
        (folder / "adapter.json").write_text(json.dumps({"format": "lmstack-adapter-v1", "peft": {"method": method}}))
        with pytest.raises(LmstackError, match=f"is a {method} adapter"):
            attach_adapters(torch.nn.Linear(2, 2), {method: folder}, None)


def test_health_is_503_while_loading(tmp_path):
    from fastapi.testclient import TestClient
    loading = Engine(MODEL, {}, None)
    app = create_app(loading, Settings(api_keys=[KEY], feedback_path=tmp_path / "f.jsonl"))
    with TestClient(app) as tc:
        r = tc.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = tc.post("/v1/chat/completions", json={"model": MODEL, "messages": ask("hi")},
                    headers={"Authorization": f"Bearer {KEY}"})
        _error(r, 503)


# ----------------------------------------------------------------------------- metrics, feedback


def test_metrics_and_feedback(server, client, feedback_path):
    client.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=2, temperature=0)
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ('lmstack_requests_total{route="/v1/chat/completions",status="200"}', "lmstack_prompt_tokens_total",
                 "lmstack_completion_tokens_total", "lmstack_queue_depth", "lmstack_time_to_first_token_seconds_count",
                 "lmstack_decode_tokens_per_second"):
        assert name in text
    pair = {"model": MODEL, "prompt": ask("hi"), "chosen": "Hello!", "rejected": "Go away."}
    assert _post(server, "/v1/feedback", pair).json()["saved"] is True
    assert _post(server, "/v1/feedback", {"model": MODEL, "prompt": "hi", "rating": -1, "rejected": "no"}).status_code == 200
    _error(_post(server, "/v1/feedback", {"model": MODEL, "prompt": "hi", "rating": 1}), 422)
    records = [json.loads(line) for line in feedback_path.read_text().splitlines()]
    assert records[-2]["chosen"] == "Hello!" and records[-2]["rejected"] == "Go away."
    assert records[-2]["prompt"] == ask("hi") and records[-2]["kind"] == "pairwise"
    assert records[-1]["rating"] == -1 and records[-1]["kind"] == "rating"


def test_feedback_that_cannot_be_written_is_503_not_500(engine, tmp_path):
    """Issue 13: serve checks --feedback at start-up; should the file become unwritable later (here: a folder
    in its place), the route says so with a 503 in one line, never a 500."""
    settings = Settings(api_keys=[KEY], feedback_path=tmp_path / "feedback.jsonl")
    (tmp_path / "feedback.jsonl").mkdir()
    with ServerThread(create_app(engine, settings)) as srv:
        error = _error(_post(srv, "/v1/feedback", {"model": MODEL, "prompt": "hi", "rating": 1, "chosen": "x"}), 503)
        assert error["code"] == "feedback_unwritable" and "could not be saved" in error["message"]


# ------------------------------------------------------------------------------------------ CLI


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmstack", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})


def test_cli_bad_input_is_one_line():
    from typer.testing import CliRunner

    from lmstack.cli import app
    for args, needle in ((["--model", "no-such-model"], "model not found"),
                         (["--adapter", "x"], "NAME=PATH"),
                         (["--adapter", "x=/no/such/dir"], "adapter folder not found"),
                         (["--api-key-file", "/no/such/file"], "--api-key-file not found"),
                         (["--max-batch", "0"], "--max-batch must be > 0")):
        r = CliRunner().invoke(app, ["serve", *args])
        assert r.exit_code == 1 and needle in r.stderr, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = _cli("--port", str(taken.getsockname()[1]), "--embedding-model", "")
        assert r.returncode == 1 and "cannot listen on 127.0.0.1" in r.stderr


def _external_address() -> str | None:
    """A non-loopback IPv4 address of this machine, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; this only picks the outgoing interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_cli_serves_with_a_key_file(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# keys\nk1\n\nk2  # the second\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lmstack", "serve", "--port", str(port), "--api-key-file",
                             str(keys), "--embedding-model", "", "--max-batch", "2", "--context", "256",
                             "--access-log", "--feedback", str(tmp_path / "feedback.jsonl")],
                            env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        c = openai.OpenAI(base_url=url + "/v1", api_key="k2", max_retries=0)
        r = c.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k3"}).status_code == 401
        with pytest.raises(openai.BadRequestError, match="at most 255"):  # the default: --context - 1
            c.completions.create(model=MODEL, prompt=[1] * 300, max_tokens=1)
        external = _external_address()
        if external is not None:  # bound to 127.0.0.1 only: another interface of this machine refuses
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{external}:{port}/health", timeout=5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log, access = proc.stderr.read(), proc.stdout.read()
    assert f"ready at http://127.0.0.1:{port}/" in log  # once it accepts connections
    assert "warning" not in log and "Traceback" not in log
    assert '"GET /v1/models HTTP/1.1" 401' in access and '"POST /v1/chat/completions HTTP/1.1" 200' in access


# ------------------------------------------------------------------- start-up failures (issue 13)


@pytest.fixture(scope="module")
def tiny_chat(reference, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer (loads in a blink), and a LoRA adapter trained on a
    different base (another width), for the start-up checks."""
    from lmstack.checkpoints import save_native
    from lmstack.config import from_name
    from lmstack.models import build_model
    from lmstack.peft.lora import apply_lora
    from lmstack.peft.methods import PeftSpec, save_adapter
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    vocab = reference.tokenizer.vocab_size
    path = save_native(build_model(from_name("tiny-llama", vocab_size=vocab, max_seq_len=256)).eval(),
                       reference.tokenizer, folder / "tiny-chat")
    other = apply_lora(build_model(from_name("tiny-llama", vocab_size=vocab, d_model=96, max_seq_len=256)),
                       rank=2, alpha=4.0, targets=["q", "v"])
    wrong = save_adapter(other, PeftSpec(method="lora", rank=2, alpha=4.0, targets=["q", "v"]), folder / "wrong",
                         base_model="tiny-llama-96")
    return path, wrong


def _invoke(*args: str):
    from typer.testing import CliRunner

    from lmstack.cli import app
    return CliRunner().invoke(app, ["serve", *args])


def test_a_failed_load_is_an_error_and_exit_1(tiny_chat, tmp_path):
    """Issue 13: serve used to stay up answering 503 "failed" forever; now the load runs before listening and a
    failure ends the process with one `error:` line."""
    model, wrong_base = tiny_chat
    gguf = tmp_path / "truncated.gguf"
    with open(resolve(MODEL), "rb") as f:
        gguf.write_bytes(f.read(1 << 20))
    qlora = tmp_path / "qlora"
    qlora.mkdir()
    (qlora / "adapter.json").write_text(json.dumps({"format": "lmstack-adapter-v1", "peft": {"method": "qlora"}}))
    common = ("--port", "1", "--feedback", str(tmp_path / "f.jsonl"))  # port 1: never reached, the load fails first
    for args, needle in (((str(gguf), "--embedding-model", ""), "truncated"),
                         ((str(model), "--embedding-model", "", "--adapter", f"w={wrong_base}"),
                          "does not match the base model"),
                         ((str(model), "--embedding-model", "", "--adapter", f"q={qlora}"), "is a qlora adapter"),
                         ((str(model), "--embedding-model", str(model)), "not a sentence encoder")):
        r = _invoke("--model", *args, *common)
        assert r.exit_code == 1, (args, r.stderr)
        assert r.stderr.splitlines()[-1].startswith("error: cannot serve") and needle in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and "ready" not in r.stderr
        assert "warning: no API key" in r.stderr  # no keys at all: a warning, even on 127.0.0.1
    assert not (tmp_path / "f.jsonl").exists()  # the writability check leaves nothing behind


def test_empty_keys_and_an_unwritable_feedback_file_are_refused(tmp_path):
    """Issue 13: `--api-key ""` served without authentication; an unwritable --feedback gave a 500 per POST."""
    empty = tmp_path / "keys.txt"
    empty.write_text("# only a comment\n\n")
    (tmp_path / "readonly").mkdir()
    for args, needle in ((["--api-key", ""], "--api-key is empty"),
                         (["--api-key", "  "], "--api-key is empty"),
                         (["--api-key", "k", "--api-key-file", str(empty)], "no API keys in the file"),
                         (["--feedback", str(tmp_path)], "is a folder"),
                         (["--feedback", str(empty / "f.jsonl")], "--feedback"),  # under a file
                         (["--context", "256", "--max-prompt-tokens", "300"], "must be below --context")):
        r = _invoke(*args, "--port", "1")
        assert r.exit_code == 1 and needle in r.stderr, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    from lmstack.errors import LmstackError
    with pytest.raises(LmstackError, match="cannot be empty"):  # the library's way in is guarded too
        Settings(api_keys=["k", ""])
