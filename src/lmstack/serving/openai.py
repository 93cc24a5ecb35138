"""The OpenAI mapping: a validated request -> scheduler `Job`s, and the scheduler's events -> OpenAI responses
(JSON bodies, or server-sent event chunks), for chat completions, completions and embeddings.

`Service` holds the routes' logic over an `Engine`, independent of FastAPI's routing (see `serving.app`). The
scheduler thread hands its events to the event loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lmstack.errors import LmstackError
from lmstack.serving import schema as S
from lmstack.serving.engine import Engine
from lmstack.serving.feedback import FeedbackLog
from lmstack.serving.gate import STATUS_TYPES, ApiError, Settings

def _now() -> int:
    return int(time.time())


def _request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


@dataclass
class Choice:
    """One choice as it accumulates from the scheduler's events."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[Any] = field(default_factory=list)  # scheduler.TokenLogprob


class Service:
    """The routes' logic over an Engine, independent of FastAPI's routing."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine, self.settings = engine, settings
        self.feedback = FeedbackLog(settings.feedback_path)

    # ----------------------------------------------------------------------------------- checks

    def ready(self) -> None:
        if self.engine.state != "ok":
            raise ApiError(503, f"the model is {self.engine.state}" + (f": {self.engine.detail}"
                                                                        if self.engine.detail else ""))

    def adapter_for(self, model: str) -> int:
        index = self.engine.adapter_index(model)
        if index is None:
            if model == self.engine.embedding_name:
                raise ApiError(400, f"{model!r} is an embedding model; use /v1/embeddings", "model")
            raise ApiError(404, f"the model {model!r} does not exist; GET /v1/models lists the served models",
                           "model", "model_not_found")
        return index

    def make_jobs(self, body: S.SamplingRequest, prompts: list[list[int]], max_tokens: int | None,
                  logprobs: int | None, field: str) -> list[Any]:
        """One Job per prompt; `field` is the request field the prompts came from ("messages" or "prompt"),
        which errors about them name."""
        from lmstack.generation import GenerationConfig
        from lmstack.serving.scheduler import Job
        unsupported = body.unsupported()
        if unsupported in ("tools", "tool_choice"):
            raise ApiError(400, f"{unsupported}: tool calling is not supported by this server yet (send no tools, "
                                "or tool_choice \"none\")", unsupported, "unsupported")
        if unsupported:
            raise ApiError(400, f"{unsupported} is not supported by this server", unsupported, "unsupported")
        adapter = self.adapter_for(body.model)
        self.ready()
        sched = self.engine.scheduler
        if body.n > sched.max_batch:
            raise ApiError(400, f"n={body.n} is more than this server's batch ({sched.max_batch})", "n")
        limit = self.settings.max_tokens
        if max_tokens is not None and max_tokens > limit:
            name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise ApiError(400, f"{name}={max_tokens} is more than this server allows ({limit})", name)
        for ids in prompts:
            if not ids:
                raise ApiError(400, f"{field}: the prompt is empty", field)
            if len(ids) > self.settings.max_prompt_tokens:
                raise ApiError(400, f"{field}: the prompt is {len(ids)} tokens; this server allows at most "
                                    f"{self.settings.max_prompt_tokens}", field, "context_length_exceeded")
            if len(ids) >= sched.context:
                raise ApiError(400, f"{field}: the prompt is {len(ids)} tokens; the context is {sched.context} "
                                    "(prompt and reply together)", field, "context_length_exceeded")
            bad = [i for i in ids if i >= sched.vocab_size]
            if bad:
                raise ApiError(400, f"{field}: token id {bad[0]} is outside the vocabulary ({sched.vocab_size})",
                               field)
        config = GenerationConfig(
            max_new_tokens=max_tokens or limit, temperature=1.0 if body.temperature is None else body.temperature,
            top_k=body.top_k, top_p=body.top_p, repetition_penalty=body.repetition_penalty or 1.0,
            stop=body.stop_list(), seed=body.seed)
        try:
            config.validate()
        except LmstackError as e:
            raise ApiError(400, str(e)) from None
        json_mode = body.response_format is not None and body.response_format.type == "json_object"
        return [Job(ids, config, emit=lambda ev: None, n=body.n, adapter=adapter, logprobs=logprobs,
                    json_mode=json_mode) for ids in prompts]

    # ----------------------------------------------------------------------------------- events

    async def events(self, jobs: list[Any], request: Request) -> AsyncIterator[tuple[int, Any]]:
        """(job number, event) as the scheduler makes them, until every choice finished. Stops early with an
        ApiError on a scheduler error or the timeout, and cancels the jobs on any exit (client gone, too)."""
        from lmstack.serving.scheduler import Error, Finish
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        for j, job in enumerate(jobs):
            job.emit = lambda ev, j=j: loop.call_soon_threadsafe(queue.put_nowait, (j, ev))
        pending = sum(job.n for job in jobs)
        deadline = loop.time() + self.settings.request_timeout_s
        try:
            for job in jobs:
                try:
                    self.engine.scheduler.submit(job)
                except LmstackError as e:  # the queue is full
                    raise ApiError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from None
            checked = loop.time()
            while pending:
                try:
                    j, event = await asyncio.wait_for(queue.get(), timeout=min(0.5, max(0.0, deadline - loop.time())))
                except TimeoutError:
                    event = None
                now = loop.time()
                if now >= deadline:
                    raise ApiError(408, f"the request took longer than {self.settings.request_timeout_s:g} s",
                                   code="timeout")
                if now - checked >= 0.5:  # twice a second, even while tokens keep coming
                    checked = now
                    if await request.is_disconnected():
                        return
                if event is None:
                    continue
                if isinstance(event, Error):
                    raise ApiError(503, event.message)
                if isinstance(event, Finish):
                    pending -= 1
                yield j, event
        finally:
            for job in jobs:
                job.cancel()  # a no-op for finished jobs; frees the rows of the others

    async def collect(self, jobs: list[Any], request: Request) -> list[list[Choice]]:
        from lmstack.serving.scheduler import Delta, Finish
        choices = [[Choice() for _ in range(job.n)] for job in jobs]
        async for j, event in self.events(jobs, request):
            choice = choices[j][event.index]
            if isinstance(event, Delta):
                choice.logprobs += event.logprobs
            elif isinstance(event, Finish):
                choice.text, choice.finish_reason = event.text, event.reason
                choice.completion_tokens = event.completion_tokens
        if any(c.finish_reason is None for cs in choices for c in cs):
            raise ApiError(400, "the client disconnected")  # nobody reads this; keeps the types honest
        return choices

    # -------------------------------------------------------------------------------------- chat

    def chat_prompt(self, body: S.ChatCompletionRequest) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            return self.engine.scheduler.chat_prompt(messages)
        except Exception as e:  # the template refused the messages (raise_exception, or a jinja2 error)
            raise ApiError(400, f"the chat template cannot render these messages: {e}", "messages") from None

    async def chat(self, body: S.ChatCompletionRequest, request: Request) -> Response:
        self.ready()
        self.adapter_for(body.model)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prompt = self.chat_prompt(body)
        jobs = self.make_jobs(body, [prompt], body.max_completion_tokens or body.max_tokens, logprobs, "messages")
        rid, created = _request_id("chatcmpl"), _now()
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return self.sse(self.chat_chunks(jobs, request, rid, created, body.model, usage), request)
        [choices] = await self.collect(jobs, request)
        out = S.ChatCompletion(
            id=rid, created=created, model=body.model,
            choices=[S.ChatChoice(index=i, message=S.AssistantMessage(content=c.text),
                                  logprobs=_chat_logprobs(c.logprobs) if logprobs is not None else None,
                                  finish_reason=c.finish_reason) for i, c in enumerate(choices)],
            usage=_usage(len(prompt), sum(c.completion_tokens for c in choices)))
        return JSONResponse(out.model_dump())

    async def chat_chunks(self, jobs: list[Any], request: Request, rid: str, created: int, model: str,
                          include_usage: bool) -> AsyncIterator[str]:
        from lmstack.serving.scheduler import Delta

        def chunk(choices: list[S.ChunkChoice], usage: S.Usage | None = None) -> str:
            return S.ChatCompletionChunk(id=rid, created=created, model=model, choices=choices,
                                         usage=usage).model_dump_json(exclude_none=usage is None)

        job, tokens = jobs[0], 0
        for i in range(job.n):  # the first chunk of each choice carries the role
            yield chunk([S.ChunkChoice(index=i, delta=S.ChunkDelta(role="assistant", content=""))])
        async for _, event in self.events(jobs, request):
            if isinstance(event, Delta):
                if event.text or event.logprobs:
                    lp = _chat_logprobs(event.logprobs) if job.logprobs is not None else None
                    yield chunk([S.ChunkChoice(index=event.index, delta=S.ChunkDelta(content=event.text),
                                               logprobs=lp)])
            else:
                tokens += event.completion_tokens
                yield chunk([S.ChunkChoice(index=event.index, delta=S.ChunkDelta(),
                                           finish_reason=event.reason)])
        if include_usage:
            yield chunk([], _usage(len(job.prompt_ids), tokens))

    # ------------------------------------------------------------------------------- completions

    def completion_prompts(self, body: S.CompletionRequest) -> list[list[int]]:
        prompt = body.prompt
        items = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
        tokenizer = self.engine.tokenizer
        return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in items]

    async def completions(self, body: S.CompletionRequest, request: Request) -> Response:
        self.ready()
        self.adapter_for(body.model)
        prompts = self.completion_prompts(body)
        jobs = self.make_jobs(body, prompts, body.max_tokens, body.logprobs, "prompt")
        rid, created = _request_id("cmpl"), _now()
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return self.sse(self.completion_chunks(jobs, request, rid, created, body.model, usage), request)
        results = await self.collect(jobs, request)
        choices = [S.CompletionChoice(index=j * body.n + i, text=c.text, finish_reason=c.finish_reason,
                                      logprobs=_completion_logprobs(c.logprobs) if body.logprobs is not None
                                      else None)
                   for j, cs in enumerate(results) for i, c in enumerate(cs)]
        out = S.Completion(id=rid, created=created, model=body.model, choices=choices,
                           usage=_usage(sum(map(len, prompts)),
                                        sum(c.completion_tokens for cs in results for c in cs)))
        return JSONResponse(out.model_dump())

    async def completion_chunks(self, jobs: list[Any], request: Request, rid: str, created: int, model: str,
                                include_usage: bool) -> AsyncIterator[str]:
        from lmstack.serving.scheduler import Delta
        n, tokens = jobs[0].n, 0

        def chunk(choices: list[S.CompletionChoice], usage: S.Usage | None = None) -> str:
            return S.Completion(id=rid, created=created, model=model, choices=choices,
                                usage=usage).model_dump_json(exclude_none=usage is None)

        async for j, event in self.events(jobs, request):
            index = j * n + event.index
            if isinstance(event, Delta):
                lp = _completion_logprobs(event.logprobs) if jobs[j].logprobs is not None else None
                yield chunk([S.CompletionChoice(index=index, text=event.text, logprobs=lp)])
            else:
                tokens += event.completion_tokens
                yield chunk([S.CompletionChoice(index=index, text="", finish_reason=event.reason)])
        if include_usage:
            yield chunk([], _usage(sum(len(job.prompt_ids) for job in jobs), tokens))

    # ------------------------------------------------------------------------------------- SSE

    def sse(self, chunks: AsyncIterator[str], request: Request) -> StreamingResponse:
        """Server-sent events; an error after the stream began goes out as an `error` event, then [DONE]."""

        async def body() -> AsyncIterator[str]:
            try:
                async for data in chunks:
                    yield f"data: {data}\n\n"
            except ApiError as e:
                error = S.ErrorResponse(error=S.ErrorBody(message=e.message, type=STATUS_TYPES.get(e.status, "error"),
                                                          code=e.code))
                yield f"data: {error.model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------------------ embeddings

    def embed(self, body: S.EmbeddingRequest) -> S.EmbeddingList:
        engine = self.engine
        self.ready()
        if body.model != engine.embedding_name:
            if engine.adapter_index(body.model) is not None:
                raise ApiError(400, f"{body.model!r} is a generation model; embeddings come from "
                                    f"{engine.embedding_name!r}", "model")
            raise ApiError(404, f"the embedding model {body.model!r} does not exist", "model", "model_not_found")
        embedder = engine.embedder
        if body.dimensions is not None and body.dimensions != embedder.dim:
            raise ApiError(400, f"dimensions={body.dimensions}: this model makes {embedder.dim}-dimensional "
                                "vectors", "dimensions", "unsupported")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts or not all(texts):
            raise ApiError(400, "input: the input is empty (give one non-empty string, or a list of them)", "input")
        vectors = embedder.encode(texts)  # [N, C] float32, unit rows
        tokens = embedder.count_tokens(texts)
        data = []
        for i, v in enumerate(vectors):
            emb: list[float] | str = (base64.b64encode(v.astype("<f4").tobytes()).decode()
                                      if body.encoding_format == "base64" else v.tolist())
            data.append(S.EmbeddingData(index=i, embedding=emb))
        return S.EmbeddingList(data=data, model=body.model,
                               usage=S.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

    # -------------------------------------------------------------------------------- feedback

    def save_feedback(self, body: S.FeedbackRequest) -> S.FeedbackSaved:
        """Append one preference record (a JSON line) to the feedback file, fsynced before the reply."""
        prompt = body.prompt if isinstance(body.prompt, str) else [m.model_dump(exclude_none=True)
                                                                  for m in body.prompt]
        record = {"id": _request_id("fb"), "created": _now(), "model": body.model,
                  "kind": "rating" if body.rating is not None else "pairwise", "prompt": prompt,
                  "chosen": body.chosen, "rejected": body.rejected, "rating": body.rating}
        try:
            self.feedback.append(record)
        except OSError as e:  # checked at start-up; this is the disk filling up or the file removed under us
            raise ApiError(503, f"the feedback could not be saved: {e.strerror}", code="feedback_unwritable") from None
        return S.FeedbackSaved(id=record["id"], saved=True)


def _usage(prompt: int, completion: int) -> S.Usage:
    return S.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _chat_logprobs(items: list[Any]) -> S.ChoiceLogprobs:
    return S.ChoiceLogprobs(content=[
        S.TokenLogprobOut(token=t.token, logprob=t.logprob, bytes=_token_bytes(t.token),
                          top_logprobs=[S.TopLogprob(token=a, logprob=p, bytes=_token_bytes(a)) for a, p in t.top])
        for t in items])


def _completion_logprobs(items: list[Any]) -> S.CompletionLogprobs:
    offsets, at = [], 0
    for t in items:
        offsets.append(at)
        at += len(t.token)
    return S.CompletionLogprobs(tokens=[t.token for t in items], token_logprobs=[t.logprob for t in items],
                                top_logprobs=[dict(t.top) for t in items], text_offset=offsets)
