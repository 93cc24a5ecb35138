"""Sentence embeddings for RAG: `embed_file` (the `embed` verb) over the one embedder, `lmstack.embedding`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.checkpoints.registry import DEFAULT_EMBEDDING_MODEL
from lmstack.embedding import Embedder, get_embedder  # noqa: F401  (rag's modules import them from here)
from lmstack.errors import LmstackError
from lmstack.io import atomic_write, read_text, require_file


def read_texts(path: Path, field: str | None) -> list[str]:
    """One text per line, or with `field` (or a .jsonl suffix) the string `field` of each JSON line."""
    lines = read_text(path).splitlines()
    if field is None and path.suffix.lower() != ".jsonl":
        return lines
    from lmstack.rag.extract import json_lines, string_field

    field = field or "text"
    texts = [string_field(record, field, f"{path}:{number}") for number, record in json_lines(path, "\n".join(lines))]
    return texts


def embed_file(input: str, out: str, model: str = DEFAULT_EMBEDDING_MODEL, batch_size: int = 32,
               field: str | None = None) -> dict[str, Any]:
    """Embed the texts of `input` and write them to `out` (.npy, or .safetensors under the key "embeddings")."""
    src, dst = require_file(input), Path(out)
    if dst.suffix not in (".npy", ".safetensors"):
        raise LmstackError(f"{out}: the output must end in .npy or .safetensors")
    if batch_size < 1:
        raise LmstackError(f"batch_size must be >= 1, not {batch_size}")
    texts = read_texts(src, field)
    if not texts:
        raise LmstackError(f"{input}: no texts to embed")
    embedder = get_embedder(model, batch_size)
    start = time.perf_counter()
    vectors = embedder.encode(texts)  # [N, D]
    seconds = time.perf_counter() - start
    if dst.suffix == ".npy":
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, vectors)
    else:
        from safetensors.numpy import save_file

        def write(tmp: str) -> None:
            save_file({"embeddings": vectors}, tmp, metadata={"model": model, "source": str(src)})
    atomic_write(dst, write)
    return {"out": str(dst), "n": len(texts), "dim": embedder.dim, "model": model, "seconds": round(seconds, 3),
            "sentences_per_s": round(len(texts) / seconds, 1) if seconds > 0 else None}
