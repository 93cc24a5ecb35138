"""Fast checks of the serving pieces without a model: JSON mode's automaton against `json.loads`, the Prometheus
text format, and the per-key limits."""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lmstack.generation.constraints import JsonPrefix  # noqa: E402
from lmstack.serving.metrics import Metrics  # noqa: E402

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(doc=st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=5), indent=st.sampled_from([None, 1]),
       ascii_only=st.booleans())
def test_every_prefix_of_a_json_object_is_accepted_and_closes(doc, indent, ascii_only):
    text = json.dumps(doc, indent=indent, ensure_ascii=ascii_only)
    state = JsonPrefix()
    for i, char in enumerate(text):
        assert state.feed(char), (text, i)
        if i < len(text) - 1:
            assert not state.complete
            closed = text[:i + 1] + state.completion()
            assert isinstance(json.loads(closed), dict), closed  # the forced ending always parses
    assert state.complete and state.completion() == ""
    assert not state.copy().feed("x")  # nothing but whitespace after the object


@pytest.mark.parametrize("text", ['[1]', '"a"', '1', '{"a":}', '{"a":01}', '{"a":1,}', '{a:1}', '{"a" 1}',
                                  '{"a":tru}', '{"a":"\x01"}', '{"a":"\\x"}', '{"a":1}}', '{"a":-}', '{"a":1.}',
                                  '{"a":1e}', '{"a":[1,]}'])
def test_invalid_json_is_refused(text):
    try:
        assert not isinstance(json.loads(text), dict)  # valid JSON, but not an object
    except json.JSONDecodeError:
        pass
    state = JsonPrefix()
    assert not (state.feed(text) and state.complete)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet='{}[]":,0123456789.-eE truefalsn\\a', max_size=24))
def test_complete_means_json_loads_gives_an_object(text):
    state = JsonPrefix()
    ok = state.feed(text) and state.complete
    try:
        parsed = json.loads(text)
        valid = isinstance(parsed, dict)
    except json.JSONDecodeError:
        valid = False
    assert ok == valid, text


def test_prometheus_text_format():
    m = Metrics()
    m.requests.inc(1.0, "/v1/completions", "200")
    m.requests.inc(2.0, "/v1/completions", "429")
    m.ttft.observe(0.2)
    m.ttft.observe(3.0)
    m.observe_step(4, 0.1)
    lines = m.render().splitlines()
    assert 'lmstack_requests_total{route="/v1/completions",status="429"} 2.0' in lines
    assert "# TYPE lmstack_time_to_first_token_seconds histogram" in lines
    assert 'lmstack_time_to_first_token_seconds_bucket{le="0.25"} 1' in lines
    assert 'lmstack_time_to_first_token_seconds_bucket{le="+Inf"} 2' in lines
    assert "lmstack_time_to_first_token_seconds_count 2" in lines
    assert all(line.startswith("#") or len(line.split()) == 2 for line in lines)


def test_key_limits_bucket_and_in_flight(monkeypatch):
    pytest.importorskip("fastapi")
    import lmstack.serving.gate as gate
    now = [1000.0]
    monkeypatch.setattr(gate.time, "monotonic", lambda: now[0])
    limits = gate.KeyLimits(rate_per_min=6, max_concurrent=2)  # 1 request per 10 s, burst 6
    assert [limits.acquire("a") for _ in range(2)] == [None, None]
    assert limits.acquire("a") == 1  # two in flight: the concurrency cap
    limits.release("a")
    limits.release("a")
    for _ in range(4):
        assert limits.acquire("a") is None
        limits.release("a")
    assert limits.acquire("a") == 10  # the burst of 6 is spent; the next token comes in 10 s
    now[0] += 10
    assert limits.acquire("a") is None
    assert limits.acquire("b") is None  # another key has its own bucket


def test_multi_lora_rows_match_each_adapter(tmp_path):
    """One forward over rows for the base model, an lmstack-format LoRA and a peft-format LoRA equals each model
    run alone (the adapters loaded by the library's own load_adapter / import path)."""
    import copy

    import torch

    from lmstack.config import from_name
    from lmstack.models import build_model
    from lmstack.peft.export import export_peft_adapter
    from lmstack.peft.lora import apply_lora, lora_layers
    from lmstack.peft.methods import PeftSpec, save_adapter
    from lmstack.serving.lora import attach_adapters

    torch.manual_seed(0)
    base = build_model(from_name("tiny-llama")).eval()
    a = apply_lora(copy.deepcopy(base), rank=4, alpha=8.0, targets=["q", "v"])
    b = apply_lora(copy.deepcopy(base), rank=2, alpha=4.0, targets=["q", "k", "v", "o"])
    for model in (a, b):
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_b, std=0.5)
    save_adapter(a, PeftSpec(method="lora", rank=4, alpha=8.0, targets=["q", "v"]), tmp_path / "a", base_model="tiny")
    export_peft_adapter(b, tmp_path / "b", None)
    served = copy.deepcopy(base)
    router = attach_adapters(served, {"a": tmp_path / "a", "b": tmp_path / "b"}, None)
    x = torch.randint(0, 256, (4, 10))  # [B, T]
    with torch.inference_mode():
        router.set_rows([0, 1, 2, 1], x.device)
        got = served(x)  # [4, T, V]
        want = torch.cat([base(x[0:1]), a(x[1:2]), b(x[2:3]), a(x[3:4])])
        assert torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(want[1], base(x[1:2])[0], atol=1e-3)  # the adapter does change the output
        router.set_rows([2, 2, 2, 2], x.device)  # one adapter for the whole batch: the no-gather path
        assert torch.allclose(served(x), b(x), atol=1e-5)


def test_generator_and_scheduler_share_one_sequence_and_give_the_same_text(monkeypatch):
    """One Sequence class serves both decode loops: a sampled run with a stop string streams the same pieces
    and ends with the same text through `Generator.stream` and through the serving scheduler."""
    import threading

    import torch

    import lmstack.generation.sampling as sampling
    from lmstack.config import from_name
    from lmstack.generation import GenerationConfig, Generator
    from lmstack.models import build_model
    from lmstack.serving.scheduler import Delta, Finish, Job, Scheduler
    from test_generation import byte_tokenizer

    torch.manual_seed(0)
    model = build_model(from_name("tiny-llama", vocab_size=257, max_seq_len=128)).eval()
    model.config.eos_token_id = 256
    tok = byte_tokenizer()
    users: set[str] = set()
    push = sampling.Sequence.push

    def counting_push(self, token):
        users.add(threading.current_thread().name)
        return push(self, token)

    monkeypatch.setattr(sampling.Sequence, "push", counting_push)
    free = Generator(model, tok).generate("Once upon", GenerationConfig(max_new_tokens=40, temperature=1.0, seed=4))
    stop = free.text[10:13] if len(free.text) > 14 else free.text[2:4]
    cfg = GenerationConfig(max_new_tokens=40, temperature=1.0, seed=4, stop=[stop])
    pieces = list(Generator(model, tok).stream("Once upon", cfg))

    sched = Scheduler(model, tok, max_batch=2, context=128)
    events: list[object] = []
    finished = threading.Event()

    def emit(event: object) -> None:
        events.append(event)
        if isinstance(event, Finish):
            finished.set()

    sched.start()
    try:
        sched.submit(Job(tok.encode("Once upon"), cfg, emit=emit))
        assert finished.wait(60)
    finally:
        sched.shutdown()
    served = [e.text for e in events if isinstance(e, Delta) and e.text]
    final = [e for e in events if isinstance(e, Finish)][0]
    assert served == pieces and final.text == "".join(pieces)
    assert final.reason == "stop" and stop not in final.text
    assert users == {threading.current_thread().name, "lmstack-scheduler"}  # the same class, in both loops
