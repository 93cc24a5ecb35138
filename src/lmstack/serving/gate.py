"""The server's gate: ASGI middleware that runs before any route (API key on every route but /health, body
size, per-key rate and concurrency, request metrics), the server's `Settings`, and OpenAI's error shape, which
every error leaves in: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import hmac
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from fastapi.responses import HTMLResponse, JSONResponse, Response

from lmstack.errors import LmstackError
from lmstack.serving import schema as S
from lmstack.serving.metrics import Metrics

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

    def __post_init__(self) -> None:
        if any(not key.strip() for key in self.api_keys):  # "" would let an empty bearer token in
            raise LmstackError("an API key cannot be empty")


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
                    refused = REFUSED if key is not None else ""  # a key was given (the form's cookie): say so
                    await reply(HTMLResponse(LOGIN_PAGE.replace("<!--refused-->", refused), status_code=401))
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


LOGIN_PAGE = """<!doctype html><meta charset="utf-8"><title>lmstack: API key</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<form onsubmit="document.cookie='lmstack_key='+encodeURIComponent(this.k.value)+';path=/;SameSite=Strict';
location.reload();return false" style="font:16px sans-serif;margin:4em auto;max-width:24em;padding:0 12px">
<p>This server needs an API key.</p><!--refused--><input name="k" type="password" autofocus style="width:100%">
<button>Open the chat</button></form>"""
REFUSED = '<p id="refused" role="alert" style="color:#b91c1c">That key was not accepted. Check it and try again.</p>'

