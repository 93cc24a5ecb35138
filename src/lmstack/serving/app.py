"""The OpenAI-compatible HTTP server (FastAPI): chat and text completions, embeddings, models, health, metrics,
preference feedback, and the web chat page at /.

Requests are validated by `serving.schema`, turned into `scheduler.Job`s and answered from the scheduler's
events, which the scheduler thread hands to the event loop with `call_soon_threadsafe`. The ASGI middleware
`Gate` runs before any route: API key (every route but /health), body size, per-key rate and concurrency, and
the request metrics. Every error - ours, FastAPI's validation, unknown routes - leaves as OpenAI's
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmstack.errors import LmstackError
from lmstack.serving import schema as S
from lmstack.serving.engine import Engine
from lmstack.serving.metrics import CONTENT_TYPE, Metrics

STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
                503: "service_unavailable"}
KNOWN_ROUTES = ("/", "/health", "/metrics", "/openapi.json", "/v1/models", "/v1/chat/completions",
                "/v1/completions", "/v1/embeddings", "/v1/feedback")
KEY_COOKIE = "lmstack_key"


@dataclass
class Settings:
    """Limits and security of one server."""

    api_keys: list[str] = field(default_factory=list)  # empty = no authentication
    max_tokens: int = 1024  # the largest max_tokens a request may ask for (also the default)
    max_prompt_tokens: int = 4096
    max_body_bytes: int = 1 << 20
    rate_limit: float = 0.0  # requests per minute per key (0 = off)
    max_concurrent: int = 0  # requests in flight per key (0 = off)
    request_timeout_s: float = 600.0
    feedback_path: Path = Path("feedback.jsonl")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = S.ErrorResponse(error=S.ErrorBody(message=message, type=STATUS_TYPES.get(status, "error"),
                                             param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# ------------------------------------------------------------------------------- gate (middleware)


class KeyLimits:
    """Per-key token bucket (rate per minute) and in-flight count."""

    def __init__(self, rate_per_min: float, max_concurrent: int) -> None:
        self.rate, self.max_concurrent = rate_per_min / 60.0, max_concurrent
        self.capacity = max(1.0, rate_per_min)
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)
        self.in_flight: dict[str, int] = {}
        self.lock = threading.Lock()

    def acquire(self, key: str) -> int | None:
        """Take one request for `key`; None when admitted, else the seconds to wait (Retry-After)."""
        with self.lock:
            if self.max_concurrent and self.in_flight.get(key, 0) >= self.max_concurrent:
                return 1
            if self.rate > 0:
                now = time.monotonic()
                tokens, last = self.buckets.get(key, (self.capacity, now))
                tokens = min(self.capacity, tokens + (now - last) * self.rate)
                if tokens < 1.0:
                    self.buckets[key] = (tokens, now)
                    return max(1, math.ceil((1.0 - tokens) / self.rate))
                self.buckets[key] = (tokens - 1.0, now)
            self.in_flight[key] = self.in_flight.get(key, 0) + 1
            return None

    def release(self, key: str) -> None:
        with self.lock:
            self.in_flight[key] -= 1
            if not self.in_flight[key]:
                del self.in_flight[key]


class Gate:
    """ASGI middleware: authentication, body size, rate limits and request metrics, before any route runs."""

    def __init__(self, app: Any, settings: Settings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.limits = KeyLimits(settings.rate_limit, settings.max_concurrent)

    def _key(self, scope: dict) -> str | None:
        """The API key the request presents (Bearer header, or the web page's cookie)."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == KEY_COOKIE:
                return unquote(value)
        return None

    def _authorized(self, key: str | None) -> bool:
        return key is not None and any(hmac.compare_digest(key.encode(), k.encode()) for k in self.settings.api_keys)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"]
        route = path if path in KNOWN_ROUTES else "other"
        status_seen = [500]

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_seen[0] = message["status"]
            await send(message)

        async def reply(response: Response) -> None:
            await response(scope, receive, send_counted)

        key = self._key(scope)
        try:
            if path != "/health" and self.settings.api_keys and not self._authorized(key):
                if path == "/" and scope["method"] == "GET":
                    await reply(HTMLResponse(LOGIN_PAGE, status_code=401))
                else:
                    await reply(error_response(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                                               code="invalid_api_key"))
                return
            receive = await self._buffer_body(scope, receive)
            if receive is None:
                await reply(error_response(413, f"request body is larger than {self.settings.max_body_bytes} "
                                                "bytes", code="request_too_large"))
                return
            limited = scope["method"] == "POST" and path.startswith("/v1/")
            who = key or (scope.get("client") or ("anonymous",))[0]
            if limited:
                wait = self.limits.acquire(who)
                if wait is not None:
                    await reply(error_response(429, f"rate limit for this key exceeded; retry in {wait} s",
                                               code="rate_limit_exceeded", headers={"Retry-After": str(wait)}))
                    return
            try:
                await self.app(scope, receive, send_counted)
            finally:
                if limited:
                    self.limits.release(who)
        finally:
            self.metrics.requests.inc(1.0, route, str(status_seen[0]))
            if route.startswith("/v1/"):
                self.metrics.latency.observe(time.perf_counter() - started)

    async def _buffer_body(self, scope: dict, receive: Callable) -> Callable | None:
        """Read the whole body (at most max_body_bytes) and return a `receive` that replays it; None if too big."""
        limit = self.settings.max_body_bytes
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length" and value.isdigit() and int(value) > limit:
                return None
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return receive
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client left; the route sees the disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


# ------------------------------------------------------------------------------------- generation


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
        self.feedback_lock = threading.Lock()

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
                  logprobs: int | None) -> list[Any]:
        from lmstack.generation import GenerationConfig
        from lmstack.serving.scheduler import Job
        unsupported = body.unsupported()
        if unsupported:
            raise ApiError(400, f"{unsupported} is not supported by this server", unsupported, "unsupported")
        adapter = self.adapter_for(body.model)
        self.ready()
        sched = self.engine.scheduler
        if body.n > sched.max_batch:
            raise ApiError(400, f"n={body.n} is more than this server's batch ({sched.max_batch})", "n")
        limit = self.settings.max_tokens
        if max_tokens is not None and max_tokens > limit:
            raise ApiError(400, f"max_tokens={max_tokens} is more than this server allows ({limit})", "max_tokens")
        for ids in prompts:
            if not ids:
                raise ApiError(400, "the prompt is empty", "prompt")
            if len(ids) > self.settings.max_prompt_tokens:
                raise ApiError(400, f"the prompt is {len(ids)} tokens; this server allows "
                                    f"{self.settings.max_prompt_tokens}", "messages", "context_length_exceeded")
            if len(ids) >= sched.context:
                raise ApiError(400, f"the prompt is {len(ids)} tokens; the context is {sched.context}", "messages",
                               "context_length_exceeded")
            bad = [i for i in ids if i >= sched.vocab_size]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary ({sched.vocab_size})", "prompt")
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
        jobs = self.make_jobs(body, [prompt], body.max_completion_tokens or body.max_tokens, logprobs)
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
        jobs = self.make_jobs(body, prompts, body.max_tokens, body.logprobs)
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
        import torch

        from lmstack.models.encoder import encode_texts, tokenize_batch
        engine = self.engine
        self.ready()
        if body.model != engine.embedding_name:
            if engine.adapter_index(body.model) is not None:
                raise ApiError(400, f"{body.model!r} is a generation model; embeddings come from "
                                    f"{engine.embedding_name!r}", "model")
            raise ApiError(404, f"the embedding model {body.model!r} does not exist", "model", "model_not_found")
        encoder, tokenizer = engine.encoder, engine.encoder_tokenizer
        width = encoder.config.d_model
        if body.dimensions is not None and body.dimensions != width:
            raise ApiError(400, f"dimensions={body.dimensions}: this model makes {width}-dimensional vectors",
                           "dimensions", "unsupported")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        cfg = encoder.config
        max_length = cfg.embed_max_len or cfg.max_seq_len
        with engine.encoder_lock:
            vectors = encode_texts(encoder, tokenizer, texts, max_length=max_length, normalize=True)  # [N, C]
            _, mask = tokenize_batch(tokenizer, texts, max_length, cfg.pad_token_id)  # counts as truncated
        tokens = int(mask.sum())
        data = []
        for i, v in enumerate(vectors):
            if body.encoding_format == "base64":
                emb: list[float] | str = base64.b64encode(v.to(torch.float32).numpy().astype("<f4").tobytes()).decode()
            else:
                emb = v.tolist()
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
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        path = self.settings.feedback_path
        with self.feedback_lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line)  # one write of one line in append mode: records never interleave
                os.fsync(fd)
            finally:
                os.close(fd)
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


# -------------------------------------------------------------------------------------------- app


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": S.ErrorResponse, "description": text}
    for status, text in ((400, "Bad request"), (401, "Missing or invalid API key"), (404, "Unknown model"),
                         (408, "Timed out"), (413, "Body too large"), (422, "Invalid request"),
                         (429, "Rate limited"), (503, "Not ready"))}
STREAMED = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str | None]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return 400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    return 422, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param


async def rag_chat(rag: Any, body: S.ChatCompletionRequest) -> Response:
    """A chat completion from a served RAG index (serving/rag_model.py); its errors are 400s in one line."""
    from starlette.concurrency import run_in_threadpool
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    if body.stream:
        return StreamingResponse(rag.chunks(messages), media_type="text/event-stream")
    try:
        return JSONResponse(await run_in_threadpool(rag.completion, messages))
    except LmstackError as e:
        raise ApiError(400, str(e), "messages") from None


def create_app(engine: Engine, settings: Settings | None = None, *, load: bool = True,
               rag: list[Any] | None = None) -> FastAPI:
    """The FastAPI app over `engine`; with `load`, the engine loads on a background thread at startup (an
    engine that is already loaded - as in tests that share one model across servers - is used as it is).
    `rag`: serving.rag_model.RagModel indexes, served as chat models named "rag:<index>"."""
    from contextlib import asynccontextmanager
    settings = settings or Settings()
    service = Service(engine, settings)
    rag_models = {r.name: r for r in rag or []}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if load and engine.state == "loading":
            threading.Thread(target=engine.load, name="lmstack-load", daemon=True).start()
        yield

    # No /docs or /redoc: their pages load Swagger UI from a CDN, and this server may have no network.
    app = FastAPI(title="lmstack", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API over lmstack models, with continuous batching.")
    metrics = engine.metrics
    app.add_middleware(Gate, settings=settings, metrics=metrics)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, plus this server's limits on max_tokens and n (so clients and fuzzers see them)."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            caps = {"max_tokens": settings.max_tokens, "max_completion_tokens": settings.max_tokens,
                    "n": engine.max_batch}
            for name in ("ChatCompletionRequest", "CompletionRequest"):
                props = schema["components"]["schemas"][name]["properties"]
                for field, maximum in caps.items():
                    if field in props:
                        for option in props[field].get("anyOf", [props[field]]):
                            if option.get("type") == "integer":
                                option["maximum"] = maximum
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message, param = _validation_message(exc)
        return error_response(status, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:  # never a traceback to the client
        return error_response(500, f"internal error ({type(exc).__name__})")

    @app.post("/v1/chat/completions", response_model=S.ChatCompletion, responses={**ERRORS, **STREAMED})
    async def chat_completions(body: S.ChatCompletionRequest, request: Request) -> Response:
        if body.model in rag_models:
            return await rag_chat(rag_models[body.model], body)
        return await service.chat(body, request)

    @app.post("/v1/completions", response_model=S.Completion, responses={**ERRORS, **STREAMED})
    async def completions(body: S.CompletionRequest, request: Request) -> Response:
        return await service.completions(body, request)

    @app.post("/v1/embeddings", response_model=S.EmbeddingList, responses=ERRORS)
    def embeddings(body: S.EmbeddingRequest) -> S.EmbeddingList:  # sync: FastAPI runs it on a worker thread
        return service.embed(body)

    @app.get("/v1/models", response_model=S.ModelList, responses=ERRORS)
    async def models() -> S.ModelList:
        return S.ModelList(data=[S.ModelCard(id=i, created=engine.created, owned_by="lmstack", kind=k)
                                 for i, k in engine.model_ids() + [(r, "rag") for r in rag_models]])

    @app.post("/v1/feedback", response_model=S.FeedbackSaved, responses=ERRORS)
    def feedback(body: S.FeedbackRequest) -> S.FeedbackSaved:
        return service.save_feedback(body)

    @app.get("/health", response_model=S.Health, responses={503: {"model": S.Health}})
    async def health() -> JSONResponse:
        body = S.Health(status=engine.state if engine.state in ("ok", "loading") else "failed",
                        detail=engine.detail)
        return JSONResponse(body.model_dump(), status_code=200 if engine.state == "ok" else 503)

    @app.get("/metrics", response_class=PlainTextResponse, responses=ERRORS)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse, responses=ERRORS)
    async def page() -> HTMLResponse:
        return HTMLResponse(CHAT_PAGE)

    return app


CHAT_PAGE = resources.files("lmstack.serving").joinpath("chat.html").read_text(encoding="utf-8")
LOGIN_PAGE = """<!doctype html><meta charset="utf-8"><title>lmstack: API key</title>
<form onsubmit="document.cookie='lmstack_key='+encodeURIComponent(this.k.value)+';path=/;SameSite=Strict';
location.reload();return false" style="font:16px sans-serif;margin:4em auto;max-width:24em">
<p>This server needs an API key.</p><input name="k" type="password" autofocus style="width:100%">
<button>Open the chat</button></form>"""


class ServerThread:
    """uvicorn serving `app` from a background thread on a free loopback port (tests, benchmarks, the demo).

        with ServerThread(app) as server:
            OpenAI(base_url=server.url + "/v1", api_key=...)
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        import uvicorn
        self.sock = socket.socket(socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
