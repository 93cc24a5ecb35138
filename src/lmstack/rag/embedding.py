"""Sentence embeddings for RAG: an `Embedder` over lmstack's BERT encoder, and `embed_file` (the `embed` verb).

Texts are embedded in batches of similar length (sorted by token count, as sentence-transformers does), so a
batch pads to little more than its own texts; the result comes back in the input order.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.checkpoints.registry import DEFAULT_EMBEDDING_MODEL
from lmstack.errors import LmstackError
from lmstack.io import atomic_write, require_path


class Embedder:
    """A sentence encoder by name (registry name or path): `encode(texts)` -> float32 [N, dim], L2-normalized."""

    def __init__(self, name: str, batch_size: int = 32) -> None:
        from lmstack.checkpoints import load_model

        loaded = load_model(name, dtype="float32")
        if getattr(loaded.config, "family", None) != "encoder" or loaded.tokenizer is None:
            raise LmstackError(f"{name}: not a sentence encoder (need an encoder model with a tokenizer, "
                               "e.g. minilm-l6)")
        self.name, self.model, self.tokenizer = name, loaded.model, loaded.tokenizer
        self.batch_size = batch_size
        cfg = loaded.config
        self.dim: int = cfg.d_model
        self.max_length: int = cfg.embed_max_len or cfg.max_seq_len
        # Room for the text itself: the encoder adds [CLS] ... [SEP].
        self.max_text_tokens = self.max_length - len(self.tokenizer.encode(""))

    @property
    def backend(self) -> Any:
        """The HF tokenizers.Tokenizer, for token counts and offsets while chunking."""
        return self.tokenizer.backend

    def encode(self, texts: list[str]) -> np.ndarray:
        """texts -> [N, dim] float32, unit length rows."""
        import torch

        from lmstack.models.encoder import encode_texts

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        lengths = [len(ids) for ids in self.tokenizer.encode_batch(texts)]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        with torch.inference_mode():
            emb = encode_texts(self.model, self.tokenizer, [texts[i] for i in order], self.batch_size)  # [N, D]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        out[order] = emb.numpy()
        return out


@functools.lru_cache(maxsize=2)
def get_embedder(name: str, batch_size: int = 32) -> Embedder:
    """One loaded encoder per (name, batch size) per process: asking and evaluating reuse it."""
    return Embedder(name, batch_size)


def read_texts(path: Path, field: str | None) -> list[str]:
    """One text per line, or with `field` (or a .jsonl suffix) the string `field` of each JSON line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if field is None and path.suffix.lower() != ".jsonl":
        return lines
    from lmstack.rag.extract import json_lines, string_field

    field = field or "text"
    texts = [string_field(record, field, f"{path}:{number}") for number, record in json_lines(path, "\n".join(lines))]
    return texts


def embed_file(input: str, out: str, model: str = DEFAULT_EMBEDDING_MODEL, batch_size: int = 32,
               field: str | None = None) -> dict[str, Any]:
    """Embed the texts of `input` and write them to `out` (.npy, or .safetensors under the key "embeddings")."""
    src, dst = require_path(input), Path(out)
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
