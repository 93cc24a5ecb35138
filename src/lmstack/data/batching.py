"""Batches for each pretraining objective, drawn from the memory-mapped shards that `data prepare` writes.

Every batch maker is a pure function of (seed, step): `batch_at(step)` seeds a fresh torch.Generator from both,
so a run resumed at step k sees exactly the batches it would have seen, with nothing to save but the step.

- causal LM:        `CausalBatches`       random contiguous blocks; target = input shifted by one
- masked LM (BERT): `MaskedLMBatches`     blocks through `mask_tokens` (15%; 80/10/10)
- span corruption:  `SpanCorruptionBatches` blocks through `span_corrupt` (T5: density 0.15, mean span 3)
- seq2seq pairs:    `PairDataset`         line-aligned source/target files, padded, length-bucketed batches
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmstack.data.prepare import SHARDS_FORMAT
from lmstack.errors import LmstackError
from lmstack.io import read_json
from lmstack.tokenizer import Tokenizer

IGNORE_INDEX = -100  # label value that cross-entropy skips


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator whose state depends only on (seed, step): batches are reproducible after a resume."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


# ------------------------------------------------------------------------------------------ shards


class TokenShards:
    """One split ('train' or 'val') of a prepared data folder: its shards as read-only numpy memmaps."""

    def __init__(self, path: str | Path, split: str = "train") -> None:
        self.path = Path(path)
        manifest_file = self.path / "manifest.json"
        if not manifest_file.exists():
            raise LmstackError(f"no manifest.json in {self.path}; run `lmstack data prepare` first")
        self.manifest: dict[str, Any] = read_json(manifest_file)
        if self.manifest.get("format") != SHARDS_FORMAT:
            raise LmstackError(f"{manifest_file}: unknown format {self.manifest.get('format')!r}")
        if split not in self.manifest["shards"]:
            raise LmstackError(f"{manifest_file}: no split {split!r} (have {', '.join(self.manifest['shards'])})")
        self.split = split
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.vocab_size: int = self.manifest["vocab_size"]
        self.eos_id: int = self.manifest["eos_id"]
        self.shards: list[np.memmap] = []
        for shard in self.manifest["shards"][split]:
            file = self.path / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            if not file.exists() or file.stat().st_size != expected:
                found = f"{file.stat().st_size} bytes" if file.exists() else "no file"
                raise LmstackError(f"{file}: expected {expected} bytes ({shard['tokens']} tokens), found {found}; "
                                   "re-run `lmstack data prepare`")
            self.shards.append(np.memmap(file, dtype=self.dtype, mode="r", shape=(shard["tokens"],)))

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    def __len__(self) -> int:
        return self.num_tokens

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the shards were made with (a copy is kept in the data folder)."""
        return Tokenizer.from_dir(self.path / self.manifest["tokenizer"]["dir"])

    def blocks(self, generator: torch.Generator, count: int, length: int) -> torch.Tensor:
        """`count` random contiguous windows of `length` tokens, uniform over all start positions -> [count, length]."""
        starts = np.array([max(len(s) - length + 1, 0) for s in self.shards], dtype=np.int64)  # per shard
        total = int(starts.sum())
        if total == 0:
            raise LmstackError(f"{self.path}: no {self.split} shard holds {length} tokens "
                               f"({self.num_tokens} in all); use a smaller block size or more data")
        bounds = np.cumsum(starts)
        picks = torch.randint(total, (count,), generator=generator).numpy()
        rows = []
        for pick in picks:
            shard = int(np.searchsorted(bounds, pick, side="right"))
            offset = int(pick - (bounds[shard] - starts[shard]))
            rows.append(np.asarray(self.shards[shard][offset:offset + length], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))

    def sequential_blocks(self, length: int) -> Iterator[torch.Tensor]:
        """Every non-overlapping window of `length` tokens, in order (for evaluation) -> [length] each."""
        for shard in self.shards:
            for start in range(0, len(shard) - length + 1, length):
                yield torch.from_numpy(np.asarray(shard[start:start + length], dtype=np.int64))


# ------------------------------------------------------------------------------------------ causal LM


@dataclass
class CausalBatches:
    """Next-token prediction on random windows of block_size + 1 tokens."""

    shards: TokenShards
    batch_size: int
    block_size: int
    seed: int = 0

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [B, T], targets [B, T]) int64, a pure function of (seed, step)."""
        block = self.shards.blocks(step_generator(self.seed, step), self.batch_size, self.block_size + 1)
        return block[:, :-1], block[:, 1:]  # [B, T], [B, T]

    def eval_batches(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed, non-overlapping blocks from the start of the split, for comparable validation losses."""
        rows: list[torch.Tensor] = []
        produced = 0
        for block in self.shards.sequential_blocks(self.block_size + 1):
            rows.append(block)
            if len(rows) == self.batch_size:
                batch = torch.stack(rows)  # [B, T+1]
                yield batch[:, :-1], batch[:, 1:]
                rows, produced = [], produced + 1
                if max_batches is not None and produced >= max_batches:
                    return
        if rows:
            batch = torch.stack(rows)
            yield batch[:, :-1], batch[:, 1:]


# ------------------------------------------------------------------------------------------ masked LM


def mask_tokens(ids: torch.Tensor, mask_id: int, vocab_size: int, special_ids: Sequence[int],
                generator: torch.Generator, prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick `prob` of the non-special tokens; of those 80% -> mask_id, 10% -> random, 10% kept.

    ids [B, T] int64 -> (inputs [B, T], labels [B, T]); labels are the original ids at picked positions, -100
    elsewhere. Same recipe as transformers' DataCollatorForLanguageModeling.
    """
    special = torch.isin(ids, torch.tensor(list(special_ids), dtype=ids.dtype))  # [B, T]
    chance = torch.full(ids.shape, prob).masked_fill(special, 0.0)
    picked = torch.bernoulli(chance, generator=generator).bool()
    labels = ids.masked_fill(~picked, IGNORE_INDEX)
    to_mask = torch.bernoulli(torch.full(ids.shape, 0.8), generator=generator).bool() & picked
    # Half of the remaining 20% get a random token; the other half stay as they are.
    to_random = torch.bernoulli(torch.full(ids.shape, 0.5), generator=generator).bool() & picked & ~to_mask
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, dtype=ids.dtype)
    inputs = torch.where(to_mask, torch.full_like(ids, mask_id), torch.where(to_random, random_ids, ids))
    return inputs, labels


@dataclass
class MaskedLMBatches:
    """BERT/RoBERTa-style MLM on packed windows of seq_len tokens (document separators stay, never masked)."""

    shards: TokenShards
    batch_size: int
    seq_len: int
    mask_id: int
    special_ids: Sequence[int]
    seed: int = 0
    prob: float = 0.15

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [B, T], labels [B, T]) int64, a pure function of (seed, step)."""
        g = step_generator(self.seed, step)
        ids = self.shards.blocks(g, self.batch_size, self.seq_len)  # [B, T]
        return mask_tokens(ids, self.mask_id, self.shards.vocab_size, self.special_ids, g, self.prob)


# ------------------------------------------------------------------------------------------ span corruption


def _random_segmentation(num_items: int, num_segments: int, generator: torch.Generator) -> torch.Tensor:
    """Split num_items into num_segments random non-empty parts -> lengths [num_segments] (T5's helper)."""
    first_in_segment = torch.zeros(num_items, dtype=torch.long)
    cut_points = torch.randperm(num_items - 1, generator=generator)[:num_segments - 1] + 1
    first_in_segment[cut_points] = 1
    segment_id = torch.cumsum(first_in_segment, 0)  # [num_items]
    return torch.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, generator: torch.Generator, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> torch.Tensor:
    """T5's `random_spans_noise_mask`: bool [length], True on noise; spans alternate, starting with non-noise.

    round(length * density) noise tokens in round(noise / mean_span) spans, each span and each gap non-empty.
    """
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_noise_span_length), 1)
    if num_spans > length - num_noise:
        raise LmstackError(f"cannot place {num_spans} noise spans in {length} tokens; use longer sequences")
    noise_lengths = _random_segmentation(num_noise, num_spans, generator)  # [S]
    keep_lengths = _random_segmentation(length - num_noise, num_spans, generator)  # [S]
    interleaved = torch.stack([keep_lengths, noise_lengths], dim=1).reshape(-1)  # [2S]: keep, noise, keep, ...
    span_starts = torch.cumsum(interleaved, 0)[:-1]
    start_indicator = torch.zeros(length, dtype=torch.long)
    start_indicator[span_starts] = 1
    return torch.cumsum(start_indicator, 0) % 2 == 1


def span_corruption_lengths(length: int, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(input length, target length) that `span_corrupt` produces from `length` tokens; fixed, so no padding."""
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_noise_span_length), 1)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_corrupt(ids: torch.Tensor, sentinel_ids: Sequence[int], eos_id: int, generator: torch.Generator,
                 noise_density: float = 0.15, mean_noise_span_length: float = 3.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 span corruption of each row: ids [B, L] -> (inputs [B, Li], targets [B, Lt]).

    Each noise span in the inputs becomes one sentinel (the i-th span gets sentinel_ids[i]); the targets list
    every sentinel followed by the tokens it replaced. Both end with EOS.
    """
    _, length = ids.shape
    inputs, targets = [], []
    for row in ids:
        noise = random_spans_noise_mask(length, generator, noise_density, mean_noise_span_length)  # [L]
        inputs.append(_replace_spans(row, noise, sentinel_ids, eos_id))
        targets.append(_replace_spans(row, ~noise, sentinel_ids, eos_id))
    return torch.stack(inputs), torch.stack(targets)


def _replace_spans(row: torch.Tensor, drop: torch.Tensor, sentinel_ids: Sequence[int], eos_id: int) -> torch.Tensor:
    """Replace each run of `drop` positions in row [L] by the next sentinel, then append EOS."""
    span_start = drop & ~torch.cat([drop.new_zeros(1), drop[:-1]])  # [L]
    span_index = torch.cumsum(span_start.long(), 0) - 1
    if int(span_start.sum()) > len(sentinel_ids):
        raise LmstackError(f"span corruption needs {int(span_start.sum())} sentinel tokens, the tokenizer has "
                           f"{len(sentinel_ids)}; train it with more sentinels or use shorter sequences")
    sentinels = torch.tensor(list(sentinel_ids), dtype=row.dtype)
    out = torch.where(span_start, sentinels[span_index.clamp(min=0, max=len(sentinels) - 1)], row)
    keep = ~drop | span_start  # a span keeps only its first position, now its sentinel
    return torch.cat([out[keep], row.new_tensor([eos_id])])


def sentinel_token_ids(tokenizer: Tokenizer, count: int = 100) -> list[int]:
    """Ids of <extra_id_0>, <extra_id_1>, ... as long as the tokenizer has them (T5's sentinels)."""
    ids: list[int] = []
    for i in range(count):
        token_id = tokenizer.token_to_id(f"<extra_id_{i}>")
        if token_id is None:
            break
        ids.append(token_id)
    return ids


@dataclass
class SpanCorruptionBatches:
    """T5 pretraining: random windows of `length` tokens, span-corrupted; fixed shapes, no padding."""

    shards: TokenShards
    batch_size: int
    length: int
    sentinel_ids: Sequence[int]
    seed: int = 0
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs [B, Li], targets [B, Lt]) int64, a pure function of (seed, step); see span_corruption_lengths."""
        g = step_generator(self.seed, step)
        ids = self.shards.blocks(g, self.batch_size, self.length)  # [B, L]
        return span_corrupt(ids, self.sentinel_ids, self.shards.eos_id, g, self.noise_density,
                            self.mean_noise_span_length)


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: [start] + labels[:-1], with -100 turned into pad. [B, T] -> [B, T]."""
    shifted = torch.cat([labels.new_full((labels.shape[0], 1), start_id), labels[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_id)


# ------------------------------------------------------------------------------------------ seq2seq pairs


@dataclass
class Seq2SeqBatch:
    src_ids: torch.Tensor  # [B, S] int64, padded with pad_id
    src_mask: torch.Tensor  # [B, S] bool, True on real tokens
    tgt_in: torch.Tensor  # [B, T] int64: [BOS] + target, padded
    tgt_mask: torch.Tensor  # [B, T] bool, True on real tokens
    labels: torch.Tensor  # [B, T] int64: target + [EOS], -100 on padding

    def to(self, device: str | torch.device) -> Seq2SeqBatch:
        return Seq2SeqBatch(*(t.to(device) for t in (self.src_ids, self.src_mask, self.tgt_in, self.tgt_mask,
                                                      self.labels)))


def _read_lines(path: Path, limit: int | None) -> list[str]:
    if not path.exists():
        raise LmstackError(f"file not found: {path}")
    lines: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(lines) >= limit:
                break
            lines.append(line.rstrip("\r\n"))
    return lines


class PairDataset:
    """Translation-style pairs from two line-aligned files (line i of src goes with line i of tgt).

    Sources are truncated to max_len tokens and targets to max_len - 1, so tgt_in and labels fit max_len.
    Pairs with an empty side are skipped. The decoder starts from BOS, or EOS when the tokenizer has no BOS
    (fairseq's convention).
    """

    def __init__(self, src_path: str | Path, tgt_path: str | Path, tokenizer: Tokenizer, max_len: int,
                 tgt_tokenizer: Tokenizer | None = None, limit: int | None = None) -> None:
        src_path, tgt_path = Path(src_path), Path(tgt_path)
        src_lines, tgt_lines = _read_lines(src_path, limit), _read_lines(tgt_path, limit)
        if len(src_lines) != len(tgt_lines):
            raise LmstackError(f"{src_path} has {len(src_lines)} lines but {tgt_path} has {len(tgt_lines)}; "
                               "seq2seq files must be line-aligned")
        if max_len < 2:
            raise LmstackError(f"max_len must be at least 2, got {max_len}")
        tgt_tok = tgt_tokenizer or tokenizer
        eos = tgt_tok.eos_token_id
        if eos is None:
            raise LmstackError("the target tokenizer has no EOS token")
        self.eos_id = eos
        self.bos_id = tgt_tok.bos_token_id if tgt_tok.bos_token_id is not None else eos
        self.src_pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        self.tgt_pad_id = tgt_tok.pad_token_id if tgt_tok.pad_token_id is not None else eos
        src_ids = tokenizer.backend.encode_batch(src_lines, add_special_tokens=False)
        tgt_ids = tgt_tok.backend.encode_batch(tgt_lines, add_special_tokens=False)
        self.pairs: list[tuple[list[int], list[int]]] = [
            (s.ids[:max_len], t.ids[:max_len - 1]) for s, t in zip(src_ids, tgt_ids, strict=True)
            if s.ids and t.ids]
        if not self.pairs:
            raise LmstackError(f"no non-empty line pairs in {src_path} and {tgt_path}")

    def __len__(self) -> int:
        return len(self.pairs)

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self.pairs) // batch_size)

    def batches(self, batch_size: int, seed: int = 0, epoch: int = 0, start: int = 0) -> Iterator[Seq2SeqBatch]:
        """One epoch of batches, deterministic in (seed, epoch); `start` skips that many batches (resume).

        Pairs are shuffled, sorted by length inside pools of 50 batches (little padding), cut into batches, and
        the batches shuffled again, as fairseq and torchtext's BucketIterator do.
        """
        rng = random.Random(f"{seed}:{epoch}")
        order = list(range(len(self.pairs)))
        rng.shuffle(order)
        pool = batch_size * 50
        chunks: list[list[int]] = []
        for i in range(0, len(order), pool):
            by_length = sorted(order[i:i + pool], key=lambda j: (len(self.pairs[j][0]), len(self.pairs[j][1])))
            chunks.extend(by_length[k:k + batch_size] for k in range(0, len(by_length), batch_size))
        rng.shuffle(chunks)
        for chunk in chunks[start:]:
            yield self.collate([self.pairs[j] for j in chunk])

    def collate(self, pairs: list[tuple[list[int], list[int]]]) -> Seq2SeqBatch:
        src_len = max(len(s) for s, _ in pairs)
        tgt_len = max(len(t) for _, t in pairs) + 1
        src = torch.full((len(pairs), src_len), self.src_pad_id, dtype=torch.long)  # [B, S]
        tgt_in = torch.full((len(pairs), tgt_len), self.tgt_pad_id, dtype=torch.long)  # [B, T]
        labels = torch.full((len(pairs), tgt_len), IGNORE_INDEX, dtype=torch.long)  # [B, T]
        src_mask = torch.zeros((len(pairs), src_len), dtype=torch.bool)
        tgt_mask = torch.zeros((len(pairs), tgt_len), dtype=torch.bool)
        for b, (s, t) in enumerate(pairs):
            src[b, :len(s)] = torch.tensor(s)
            src_mask[b, :len(s)] = True
            tgt_in[b, :len(t) + 1] = torch.tensor([self.bos_id, *t])
            labels[b, :len(t) + 1] = torch.tensor([*t, self.eos_id])
            tgt_mask[b, :len(t) + 1] = True
        return Seq2SeqBatch(src, src_mask, tgt_in, tgt_mask, labels)
