"""The one sentence embedder: an `Embedder` over lmstack's BERT encoder, used by rag, `/v1/embeddings` and (later)
the guardrails.

Texts are embedded in batches of similar length (sorted by token count, as sentence-transformers does), so a
batch pads to little more than its own texts; the result comes back in the input order. Texts longer than the
model's embedding length are truncated as transformers does (see `models.encoder.tokenize_batch`).
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np

from lmstack.errors import LmstackError


class Embedder:
    """A sentence encoder by name (registry name or path): `encode(texts)` -> float32 [N, dim], L2-normalized."""

    def __init__(self, name: str, batch_size: int = 32, dtype: str = "float32") -> None:
        from lmstack.checkpoints import load_model

        loaded = load_model(name, dtype=dtype, inference=True)
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
        self._lock = threading.Lock()  # one batch at a time: server threads share the encoder

    @property
    def backend(self) -> Any:
        """The HF tokenizers.Tokenizer, for token counts and offsets while chunking."""
        return self.tokenizer.backend

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the encoder reads for `texts`, special tokens included, after truncation (API usage)."""
        return sum(min(len(ids), self.max_length) for ids in self.tokenizer.encode_batch(texts))

    def encode(self, texts: list[str]) -> np.ndarray:
        """texts -> [N, dim] float32, unit length rows."""
        import torch

        from lmstack.models.encoder import encode_texts

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        lengths = [len(ids) for ids in self.tokenizer.encode_batch(texts)]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        with self._lock, torch.inference_mode():
            emb = encode_texts(self.model, self.tokenizer, [texts[i] for i in order], self.batch_size,
                               max_length=self.max_length, normalize=True)  # [N, D]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        out[order] = emb.numpy()
        return out


@functools.lru_cache(maxsize=2)
def get_embedder(name: str, batch_size: int = 32) -> Embedder:
    """One loaded encoder per (name, batch size) per process: asking and evaluating reuse it."""
    return Embedder(name, batch_size)
