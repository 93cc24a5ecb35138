"""The OpenAI-compatible HTTP server (FastAPI): the routes for chat and text completions, embeddings, models,
health, metrics, preference feedback, and the web chat page at /.

The parts: `serving.gate` (the ASGI middleware that runs before any route: keys, body size, rate limits,
metrics; the error shape), `serving.openai` (requests -> scheduler jobs, events -> OpenAI responses),
`serving.feedback` (the preference log), `serving.schema` (request and response models). Every error - ours,
FastAPI's validation, unknown routes - leaves as OpenAI's `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import re
import socket
import sys
from importlib import resources
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmstack.errors import LmstackError
from lmstack.serving import schema as S
from lmstack.serving.engine import Engine
from lmstack.serving.gate import ApiError, Gate, Settings, error_response
from lmstack.serving.metrics import CONTENT_TYPE
from lmstack.serving.openai import Service

__all__ = ["ReadyServer", "Settings", "create_app"]


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": S.ErrorResponse, "description": text}
    for status, text in ((400, "Bad request"), (401, "Missing or invalid API key"), (404, "Unknown model"),
                         (408, "Timed out"), (413, "Body too large"), (422, "Invalid request"),
                         (429, "Rate limited"), (503, "Not ready"))}
# A streamed reply: server-sent events. Before OpenAPI 3.2, `schema` describes one event (its fields), each
# `data` a JSON chunk (ChatCompletionChunk or Completion), an error body, or "[DONE]".
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                            "retry": {"type": "integer"}}}
STREAMED = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}}


_BARE_TYPES = {"str", "int", "float", "bool", "list", "dict", "none"}
_SHAPES = {"string_type": "a string", "int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
           "list_type": "a list", "dict_type": "an object", "model_type": "an object",
           "model_attributes_type": "an object", "none_required": "null", "int_parsing": "an integer",
           "float_parsing": "a number", "bool_parsing": "true or false", "is_instance_of": "an object"}


def _field_path(loc: tuple[Any, ...]) -> str:
    """The field an error is about, without pydantic's names of union members: "stop.constrained-str" -> "stop",
    ("body", "messages", 0, "content", "str") -> "messages.0.content". Field names never hold '-' or '['."""
    steps = [str(x) for x in loc if x != "body"]
    return ".".join(x for x in steps
                    if not ("[" in x or "-" in x or x in _BARE_TYPES or x[:1].isupper()))


def _plain(error: dict[str, Any]) -> str:
    """pydantic's message for one error, in the words a client reads ("should be less than or equal to 2")."""
    kind, message = error.get("type", ""), str(error.get("msg", "invalid value"))
    if kind == "extra_forbidden":
        return "unknown field (this server takes OpenAI's request fields)"
    if kind == "missing":
        return "required"
    if message.startswith(("Value error, ", "Assertion failed, ")):
        message = message.split(", ", 1)[1]
    message = message.replace(" after validation", "").replace("Input should", "should")
    return message[:1].lower() + message[1:]


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str | None]:
    """(status, message, param) for a request that failed validation, naming the field and the limit in plain
    words. A field that takes several shapes (a string or a list, say) fails once per shape; the error that
    matters is the one from a shape the value had but broke a limit of ("stop: string should have at most 256
    characters"), else one about an item of a list ("prompt.1: should be a valid string"), else the shapes
    the field takes ("stop: should be a string or a list")."""
    errors = list(exc.errors())
    if not errors:
        return 422, "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return 400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    param = _field_path(first.get("loc", ()))
    top = param.split(".")[0]
    same = [e for e in errors if _field_path(e.get("loc", ())).split(".")[0] == top]
    limits = [e for e in same if e.get("type") not in _SHAPES]
    deeper = [e for e in same if len(_field_path(e.get("loc", ()))) > len(param)]
    if limits or deeper:
        error = (limits or deeper)[0]
        param, message = _field_path(error.get("loc", ())), _plain(error)
    elif len(same) > 1:
        message = "should be " + " or ".join(dict.fromkeys(_SHAPES[e["type"]] for e in same))
    else:
        message = _plain(first)
    return 422, f"{param or 'body'}: {message}" if param else message, param or None


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


def create_app(engine: Engine, settings: Settings | None = None, *, rag: list[Any] | None = None) -> FastAPI:
    """The FastAPI app over `engine`, which the caller loads (`serve` loads it before listening; tests share
    one loaded engine across servers); until it is loaded, /health and the API answer 503.
    `rag`: serving.rag_model.RagModel indexes, served as chat models named "rag:<index>"."""
    settings = settings or Settings()
    service = Service(engine, settings)
    rag_models = {r.name: r for r in rag or []}

    # No /docs or /redoc: their pages load Swagger UI from a CDN, and this server may have no network.
    app = FastAPI(title="lmstack", version="0.1.0", docs_url=None, redoc_url=None,
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

class ReadyServer(uvicorn.Server):
    """uvicorn's server that prints one line (`ready`) once it accepts connections."""

    def __init__(self, config: uvicorn.Config, ready: str) -> None:
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(self.ready, file=sys.stderr, flush=True)


CHAT_PAGE = resources.files("lmstack.serving").joinpath("chat.html").read_text(encoding="utf-8")
