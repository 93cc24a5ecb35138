"""`lmstack serve`: an OpenAI-compatible server with continuous batching (see `serving.app`, `serving.scheduler`).

This module only holds the verb, so `lmstack --help` imports neither torch nor FastAPI.
"""

import os
import socket
import sys
from pathlib import Path
from typing import Literal

from lmstack.checkpoints.registry import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL
from lmstack.errors import LmstackError


def read_api_keys(api_key: str | None, api_key_file: str | None) -> list[str]:
    """The accepted keys: --api-key, plus one key per non-empty line of --api-key-file ('#' starts a comment).
    An empty --api-key or a file without keys is an error: either would otherwise turn authentication off."""
    keys: list[str] = []
    if api_key is not None:
        if not api_key.strip():
            raise LmstackError("--api-key is empty; give a key, or leave the option out to serve without one")
        if any(c.isspace() for c in api_key):
            raise LmstackError("--api-key cannot contain spaces")
        keys.append(api_key)
    if api_key_file:
        path = Path(api_key_file)
        if not path.is_file():
            raise LmstackError(f"--api-key-file not found: {path}")
        in_file = 0
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if any(c.isspace() for c in line):
                raise LmstackError(f"{path}:{number}: an API key cannot contain spaces")
            keys.append(line)
            in_file += 1
        if not in_file:
            raise LmstackError(f"{path}: no API keys in the file")
    return keys


def check_writable(path: Path, option: str) -> None:
    """Fail now, not on the first POST, when `path` cannot be appended to (a folder, an unwritable place).
    Opens it for appending the way `FeedbackLog` does; a file created here only for the check is removed."""
    if path.is_dir():
        raise LmstackError(f"{option} {path} is a folder; give a file")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
    except OSError as e:
        raise LmstackError(f"{option} {path} is not writable: {e.strerror}") from None
    if not existed:
        path.unlink()


def serve(*, model: str = DEFAULT_MODEL, adapter: list[str] | None = None,
          embedding_model: str | None = DEFAULT_EMBEDDING_MODEL, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, api_key_file: str | None = None, max_batch: int = 8,
          max_tokens: int = 1024, max_prompt_tokens: int | None = None, context: int = 2048,
          max_body_bytes: int = 1 << 20, rate_limit: float = 0.0, max_concurrent: int = 0,
          timeout: float = 600.0, feedback: str = "feedback.jsonl",
          dtype: Literal["auto", "float32", "bfloat16"] = "auto", rag_index: list[str] | None = None,
          access_log: bool = False) -> None:
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
        max_prompt_tokens: The longest prompt accepted, in tokens (default: --context - 1, one slot for the reply).
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
        access_log: Print one line per request (client, method, path, status) on stdout.
    """
    try:
        import uvicorn

        from lmstack.serving.app import ReadyServer, Settings, create_app
        from lmstack.serving.engine import Engine, parse_adapters
    except ImportError as e:
        raise LmstackError(f"serve needs FastAPI and uvicorn: pip install 'lmstack[serve]' ({e.name} missing)") from None
    from lmstack.checkpoints import resolve

    if max_prompt_tokens is None:
        max_prompt_tokens = context - 1
    for name, value in (("max_batch", max_batch), ("max_tokens", max_tokens), ("max_prompt_tokens", max_prompt_tokens),
                        ("context", context), ("max_body_bytes", max_body_bytes), ("timeout", timeout)):
        if not value > 0:
            raise LmstackError(f"--{name.replace('_', '-')} must be > 0, not {value}")
    if max_prompt_tokens >= context:
        raise LmstackError(f"--max-prompt-tokens ({max_prompt_tokens}) must be below --context ({context}): "
                           "the prompt and the reply share the context")
    if rate_limit < 0 or max_concurrent < 0:
        raise LmstackError("--rate-limit and --max-concurrent must be >= 0")
    if not 0 < port < 65536:
        raise LmstackError(f"--port must be in 1..65535, not {port}")
    api_keys = read_api_keys(api_key, api_key_file)
    check_writable(Path(feedback), "--feedback")
    resolve(model)  # fail now, before the slow load, when the model does not exist
    if embedding_model:
        resolve(embedding_model)
    settings = Settings(api_keys=api_keys, max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens,
                        max_body_bytes=max_body_bytes, rate_limit=rate_limit, max_concurrent=max_concurrent,
                        request_timeout_s=timeout, feedback_path=Path(feedback))
    engine = Engine(model, parse_adapters(adapter or []), embedding_model or None, max_batch=max_batch,
                    context=context, dtype=dtype)
    from lmstack.serving.rag_model import RagModel
    rag = [RagModel(index, model) for index in rag_index or []]  # a bad index: one line, before listening
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))  # before the slow load, so a taken port is one clear error line at once
    except OSError as e:
        sock.close()
        raise LmstackError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    if not api_keys:
        print(f"warning: no API key (--api-key or --api-key-file): anyone who can reach {url} can use this "
              "server", file=sys.stderr)
    # The model loads here, in the foreground, and the socket only listens once it is loaded: a model that
    # cannot load ends the process with `error: ...` and exit status 1, which a supervisor (systemd, docker,
    # a test) sees at once, rather than a server answering 503 "failed" forever. While it loads, connections
    # are refused, which health checks read as "not up yet".
    print(f"lmstack serve: loading {model}...", file=sys.stderr, flush=True)
    engine.load()
    try:
        if engine.state != "ok":
            sock.close()
            raise LmstackError(f"cannot serve {model}: {engine.detail}")
        app = create_app(engine, settings, rag=rag)
        config = uvicorn.Config(app, log_level="warning", access_log=access_log, timeout_graceful_shutdown=5)
        if access_log:  # uvicorn's access lines are INFO records; the rest of its logging stays at warnings
            import logging
            logging.getLogger("uvicorn.access").setLevel(logging.INFO)
        ReadyServer(config, f"lmstack serve: ready at {url}/ (web chat), {url}/v1 (OpenAI API)").run(sockets=[sock])
    finally:
        engine.shutdown()

