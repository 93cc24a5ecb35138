"""`lmstack serve --rag-index`: a RAG index served as the chat model "rag:<index>", asked with the official
`openai` client on a loopback server; the grounded answer and its citations come back, streamed or not."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from lmstack.errors import LmstackError  # noqa: E402
from lmstack.rag.ingest import ingest  # noqa: E402
from lmstack.serving.app import create_app  # noqa: E402
from lmstack.serving.engine import Engine  # noqa: E402
from lmstack.serving.testing import ServerThread  # noqa: E402
from lmstack.serving.rag_model import RagModel, rag_model_name  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parents[1]
NOTES = ROOT.parent / "shared" / "data" / "course-notes"
QUESTION = "How many bytes does one 32-bit float parameter take?"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    if not NOTES.is_dir():
        pytest.skip(f"course notes not found at {NOTES}")
    db = tmp_path_factory.mktemp("notes") / "notes.sqlite"
    ingest([str(NOTES / "003_342bd825bd5048d9.txt")], str(db), progress=False)
    engine = Engine(MODEL, {}, None, max_batch=1, context=256)
    engine.load()
    assert engine.state == "ok", engine.detail
    rag = RagModel(str(db), MODEL)
    with ServerThread(create_app(engine, rag=[rag])) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    engine.shutdown()


def test_rag_model_names() -> None:
    assert rag_model_name("notes.sqlite") == "rag:notes"
    assert rag_model_name("milvus-lite:///data/course.db") == "rag:course"
    assert rag_model_name("milvus://h:19530/lectures?meta=x.sqlite") == "rag:lectures"
    with pytest.raises(LmstackError, match="index not found"):
        RagModel("/nonexistent/notes.sqlite", MODEL)


def test_the_index_answers_with_citations_through_openai(client) -> None:
    assert "rag:notes" in [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(model="rag:notes", messages=[{"role": "user", "content": QUESTION}])
    message = reply.choices[0].message
    citations = message.model_extra["citations"]
    assert reply.model == "rag:notes" and "4" in message.content and not message.model_extra["refused"]
    assert citations and all(f"[{c['n']}]" in message.content for c in citations)
    assert all(c["source"].endswith("003_342bd825bd5048d9.txt") and c["location"] for c in citations)

    stream = client.chat.completions.create(model="rag:notes", stream=True,
                                            messages=[{"role": "user", "content": QUESTION}])
    text, streamed_citations = "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        text += delta.content or ""
        if (delta.model_extra or {}).get("citations") is not None:
            streamed_citations = delta.model_extra["citations"]
    assert text == message.content and streamed_citations == citations  # greedy: the same answer

    off_topic = client.chat.completions.create(
        model="rag:notes", messages=[{"role": "user", "content": "Who won the 2018 FIFA World Cup?"}])
    assert off_topic.choices[0].message.content == "I don't know."
    assert off_topic.choices[0].message.model_extra == {"citations": [], "refused": True}
