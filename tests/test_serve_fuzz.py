"""Schemathesis against the server's own OpenAPI spec, in process through ASGI: no 500s, and every response
(errors included) conforms to the documented status codes, content types and schemas.

The model is a tiny random Llama with SmolLM2's tokenizer and chat template (the same code paths as SmolLM2,
at a fraction of the cost), and max_tokens is capped at 3, so each example is cheap.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from collections import Counter  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from lmstack.checkpoints import load_model, save_native  # noqa: E402
from lmstack.config import from_name  # noqa: E402
from lmstack.models import build_model  # noqa: E402
from lmstack.serving.app import Settings, create_app  # noqa: E402
from lmstack.serving.engine import Engine  # noqa: E402

KEY = "fuzz-key"


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    import torch
    try:
        tokenizer = load_model("smollm2-135m-instruct").tokenizer
    except Exception as e:
        pytest.skip(f"SmolLM2 unavailable: {e}")
    torch.manual_seed(0)
    model = build_model(from_name("tiny-llama", vocab_size=tokenizer.vocab_size, max_seq_len=256)).eval()
    path = save_native(model, tokenizer, tmp_path_factory.mktemp("tiny") / "tiny-chat")
    engine = Engine(str(path), {}, "minilm-l6", max_batch=4, context=256)
    engine.load()
    assert engine.state == "ok", engine.detail
    app = create_app(engine, Settings(api_keys=[KEY], max_tokens=3, max_prompt_tokens=200, max_body_bytes=20_000,
                                      request_timeout_s=60,
                                      feedback_path=tmp_path_factory.mktemp("fb") / "feedback.jsonl"))
    yield app
    engine.shutdown()


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app, headers={"Authorization": f"Bearer {KEY}"})


def test_openapi_fuzz(api_schema):
    """Every operation, positive and negative examples, with schemathesis' default checks (not_a_server_error,
    status_code_conformance, content_type_conformance, response_schema_conformance, negative_data_rejection,
    ...) except positive_data_acceptance: a schema-valid request can still be refused with a documented 400
    for what JSON Schema cannot say (a prompt over the token limit, n above the batch rows, an unsupported
    parameter value). Schemathesis' pytest plugin is not used: it does not support this pytest's fixtures."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                              "/v1/models", "/v1/feedback", "/health", "/metrics"}
    statuses: dict[str, Counter] = {}
    for operation in operations:
        served = "minilm-l6" if operation.path == "/v1/embeddings" else "tiny-chat"

        @given(case=operation.as_strategy(), real_model=st.integers(0, 3))
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case, real_model):
            # Most examples name a served model, so generation and embedding run, not only the 404 path.
            if real_model and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = served
            response = case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"},
                                              excluded_checks=[positive_data_acceptance])
            statuses.setdefault(operation.path, Counter())[response.status_code] += 1

        check()
    print(statuses)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/feedback"):
        assert statuses[path][200] > 0, (path, statuses[path])  # the fuzzer got through, too
