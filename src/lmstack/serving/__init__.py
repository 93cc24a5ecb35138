"""`lmstack serve`: an OpenAI-compatible server with continuous batching (see `serving.app`, `serving.scheduler`).

This module only holds the verb, so `lmstack --help` imports neither torch nor FastAPI.
"""

import socket
import sys
from pathlib import Path
from typing import Literal

from lmstack.errors import LmstackError


def read_api_keys(api_key: str | None, api_key_file: str | None) -> list[str]:
    """The accepted keys: --api-key, plus one key per non-empty line of --api-key-file ('#' starts a comment)."""
    keys = [api_key] if api_key else []
    if api_key_file:
        path = Path(api_key_file)
        if not path.is_file():
            raise LmstackError(f"--api-key-file not found: {path}")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if any(c.isspace() for c in line):
                raise LmstackError(f"{path}:{number}: an API key cannot contain spaces")
            keys.append(line)
        if not keys:
            raise LmstackError(f"{path}: no API keys in the file")
    return keys


def serve(*, model: str = "smollm2-135m-instruct", adapter: list[str] | None = None,
          embedding_model: str | None = "minilm-l6", host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, api_key_file: str | None = None, max_batch: int = 8,
          max_tokens: int = 1024, max_prompt_tokens: int = 4096, context: int = 2048,
          max_body_bytes: int = 1 << 20, rate_limit: float = 0.0, max_concurrent: int = 0,
          timeout: float = 600.0, feedback: str = "feedback.jsonl", dtype: Literal["auto", "float32", "bfloat16"] = "auto",
          rag_index: list[str] | None = None) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (chat, completions, embeddings) with a web chat at /.

    Args:
        model: The generation model: a registry name or a checkpoint path.
        adapter: A LoRA adapter as NAME=PATH, served as model "BASE:NAME"; repeat for more.
        embedding_model: The encoder behind /v1/embeddings (mean pooling, L2-normalized); "" for none.
        host: The address to bind; 127.0.0.1 keeps the server local (0.0.0.0 exposes it).
        port: The TCP port.
        api_key: Require this key (Authorization: Bearer KEY) on every route except /health.
        api_key_file: A file with one accepted key per line (combined with --api-key).
        max_batch: Sequences decoded together (continuous batching); 1 serves one request at a time.
        max_tokens: The largest max_tokens a request may ask for, and the default.
        max_prompt_tokens: The longest prompt accepted, in tokens.
        context: KV-cache slots per sequence (prompt + completion); capped at the model's context.
        max_body_bytes: The largest request body accepted (413 beyond).
        rate_limit: Requests per minute per API key (0 = unlimited); 429 with Retry-After beyond.
        max_concurrent: Requests in flight per API key (0 = unlimited); 429 with Retry-After beyond.
        timeout: Seconds a request may take before it is cancelled (408).
        feedback: The JSONL file that thumbs and A-vs-B preference records from the web page go to.
        dtype: Compute dtype of the weights: auto (bfloat16 where the CPU has native bf16 or on a GPU, else
            float32), float32 or bfloat16.
        rag_index: A RAG index (see `rag index`) served as the chat model "rag:<index name>", answering with
            citations; repeat for more.
    """
    try:
        import uvicorn

        from lmstack.serving.app import Settings, create_app
        from lmstack.serving.engine import Engine, parse_adapters
    except ImportError as e:
        raise LmstackError(f"serve needs FastAPI and uvicorn: pip install 'lmstack[serve]' ({e.name} missing)") from None
    from lmstack.checkpoints import resolve

    for name, value in (("max_batch", max_batch), ("max_tokens", max_tokens), ("max_prompt_tokens", max_prompt_tokens),
                        ("context", context), ("max_body_bytes", max_body_bytes), ("timeout", timeout)):
        if not value > 0:
            raise LmstackError(f"--{name.replace('_', '-')} must be > 0, not {value}")
    if rate_limit < 0 or max_concurrent < 0:
        raise LmstackError("--rate-limit and --max-concurrent must be >= 0")
    if not 0 < port < 65536:
        raise LmstackError(f"--port must be in 1..65535, not {port}")
    resolve(model)  # fail now, not in the background loader, when the model does not exist
    if embedding_model:
        resolve(embedding_model)
    settings = Settings(api_keys=read_api_keys(api_key, api_key_file), max_tokens=max_tokens,
                        max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes, rate_limit=rate_limit,
                        max_concurrent=max_concurrent, request_timeout_s=timeout, feedback_path=Path(feedback))
    engine = Engine(model, parse_adapters(adapter or []), embedding_model or None, max_batch=max_batch,
                    context=context, dtype=dtype)
    from lmstack.serving.rag_model import RagModel
    rag = [RagModel(index, model) for index in rag_index or []]  # a bad index: one line, before listening
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))  # here, so a taken port is one clear error line
    except OSError as e:
        sock.close()
        raise LmstackError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    if not settings.api_keys and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host} without an API key (--api-key)", file=sys.stderr)
    print(f"lmstack serve: http://{host}:{port}/ (web chat), http://{host}:{port}/v1 (OpenAI API); "
          "loading the model...", file=sys.stderr, flush=True)
    app = create_app(engine, settings, rag=rag)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.shutdown()
