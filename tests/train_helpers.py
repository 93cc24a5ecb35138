"""A small in-memory batch source for trainer tests: deterministic in (step, index), like the real ones."""

from __future__ import annotations

import torch
from torch import Tensor


class RandomTokens:
    """Sequences from a fixed random 'corpus' with a repeated pattern, so a tiny model can learn something."""

    def __init__(self, vocab: int = 256, seq_len: int = 16, n_tokens: int = 20_000, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        pattern = torch.randint(0, vocab, (64,), generator=g)
        noise = torch.randint(0, vocab, (n_tokens,), generator=g)
        keep = torch.rand(n_tokens, generator=g) < 0.8
        self.tokens = torch.where(keep, pattern.repeat(n_tokens // 64 + 1)[:n_tokens], noise)
        self.seq_len, self.seed = seq_len, seed
        self.split = int(n_tokens * 0.9)

    def _batch(self, lo: int, hi: int, key: int, index: int, batch_size: int) -> dict[str, Tensor]:
        # Rows are numbered within the step, so 4 micro-batches of 8 see the same rows as 1 of 32.
        g = torch.Generator().manual_seed(key)
        starts = torch.randint(lo, hi - self.seq_len - 1, ((index + 1) * batch_size,), generator=g)[-batch_size:]
        rows = torch.stack([self.tokens[s: s + self.seq_len + 1] for s in starts.tolist()])
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}

    def train_batch(self, step: int, index: int, batch_size: int) -> dict[str, Tensor]:
        return self._batch(0, self.split, self.seed * 1_000_003 + step, index, batch_size)

    def val_batch(self, index: int, batch_size: int) -> dict[str, Tensor]:
        return self._batch(self.split, len(self.tokens), 7_777, index, batch_size)
