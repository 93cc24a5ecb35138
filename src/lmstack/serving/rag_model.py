"""A RAG index served as a chat model: `lmstack serve --rag-index notes.sqlite` answers model "rag:notes".

The last user message is the question; the reply is `rag_ask`'s grounded answer (evidence, checked sentences,
[n] citations, "I don't know"), and the cited sources travel in the response as an extra field the OpenAI
clients keep (`message.model_extra["citations"]` in the official Python client):

    {"choices": [{"message": {"role": "assistant", "content": "... [1]",
                              "citations": [{"n": 1, "source": "/notes/002.txt", "location": "...", ...}]}}]}

Streamed, the answer arrives as content deltas, sentence by sentence, and the last chunk's delta carries
`citations`. Answers run one at a time on a worker thread (the answering model and the index connection are
not shared between threads), outside the continuous-batching scheduler.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from lmstack.errors import LmstackError

CITATION_FIELDS = ("n", "source", "location", "score", "similarity")


def rag_model_name(index: str) -> str:
    """"rag:<index name>": the file name without its suffix (the collection for a milvus:// URI)."""
    tail = index.rstrip("/").split("/")[-1].split("?")[0]
    return "rag:" + (Path(tail).stem or tail)


class RagModel:
    """One index behind the chat completions API."""

    def __init__(self, index: str, model: str, dtype: str = "bfloat16", max_tokens: int = 64) -> None:
        from lmstack.rag.store import index_uri, open_index

        self.index, self.model, self.dtype, self.max_tokens = index_uri(index), model, dtype, max_tokens
        with open_index(self.index):  # a missing or unusable index fails at startup, in one line
            pass
        self.name = rag_model_name(index)
        self.lock = threading.Lock()

    def ask(self, question: str, on_text: Any = None) -> dict[str, Any]:
        from lmstack.rag import rag_ask

        with self.lock:
            return rag_ask(question, index=self.index, model=self.model, dtype=self.dtype,  # type: ignore[arg-type]
                           max_new_tokens=self.max_tokens, stream=on_text is not None, on_text=on_text)

    @staticmethod
    def question(messages: list[dict[str, Any]]) -> str:
        questions = [m["content"] for m in messages if m["role"] == "user" and m["content"].strip()]
        if not questions:
            raise LmstackError("a RAG model needs a user message with the question")
        return questions[-1]

    @staticmethod
    def citations(result: dict[str, Any]) -> list[dict[str, Any]]:
        return [{k: c[k] for k in CITATION_FIELDS} for c in result["citations"]]

    def completion(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """A whole chat.completion object for these messages."""
        result = self.ask(self.question(messages))
        return {"id": f"chatcmpl-rag-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
                "created": int(time.time()), "model": self.name,
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": result["answer"],
                                         "citations": self.citations(result), "refused": result["refused"]}}],
                "usage": {"prompt_tokens": result.get("prompt_tokens", 0), "completion_tokens": 0,
                          "total_tokens": result.get("prompt_tokens", 0)}}

    async def chunks(self, messages: list[dict[str, Any]]) -> AsyncIterator[str]:
        """Server-sent events of chat.completion.chunk objects: the answer's pieces, then the citations."""
        question = self.question(messages)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        rid, created = f"chatcmpl-rag-{uuid.uuid4().hex[:24]}", int(time.time())

        def work() -> None:
            try:
                result = self.ask(question, on_text=lambda p: loop.call_soon_threadsafe(queue.put_nowait, ("text", p)))
                loop.call_soon_threadsafe(queue.put_nowait, ("done", result))
            except Exception as e:  # noqa: BLE001 - reported to the client as one line
                loop.call_soon_threadsafe(queue.put_nowait, ("error", e))

        def event(delta: dict[str, Any], finish: str | None = None) -> str:
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(chunk)}\n\n"

        threading.Thread(target=work, name="lmstack-rag", daemon=True).start()
        yield event({"role": "assistant", "content": ""})
        streamed = False
        while True:
            kind, value = await queue.get()
            if kind == "text":
                streamed = True
                yield event({"content": value})
            elif kind == "error":
                detail = str(value).splitlines()[0] if str(value) else type(value).__name__
                yield f"data: {json.dumps({'error': {'message': detail, 'type': 'server_error'}})}\n\n"
                break
            else:
                if not streamed:  # "I don't know" (nothing was generated): the answer in one piece
                    yield event({"content": value["answer"]})
                yield event({"citations": self.citations(value), "refused": value["refused"]}, "stop")
                break
        yield "data: [DONE]\n\n"
