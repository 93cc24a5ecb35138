"""Sampling: the generation settings, the pure logit operations, and the one per-sequence state (`Sequence`).

Every caller that turns logits into tokens - `Generator` (greedy, sampling, streaming, batches; beam search
uses the logit operations), the serving scheduler - goes through these, so a sampling or stopping fix is made
here once. Shapes: B rows, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lmstack.errors import LmstackError
from lmstack.runconfig import given, option_group
from lmstack.tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:
    from lmstack.generation.constraints import Constraint


# ------------------------------------------------------------------------------------------- config


@dataclass
class GenerationConfig:
    """How to pick the new tokens and when to stop.

    Args:
        max_new_tokens: The most tokens to generate.
        temperature: Sampling temperature; 0 means greedy decoding.
        top_k: Sample only from the k most likely tokens.
        top_p: Sample from the smallest set of tokens whose probability adds up to p (0 < p <= 1).
        repetition_penalty: Divide the logits of tokens already seen by this (1.0 = off).
        no_repeat_ngram_size: Never repeat an n-gram of the prompt and the output (0 = off; transformers' rule).
        num_beams: Beam search with this many beams (1 = off); the text is known only at the end.
        length_penalty: Beam search scores finished beams by logprob / length**length_penalty.
        stop: Stop when the text contains this string; repeat the option for more strings.
        seed: Random seed for sampling, for reproducible output.
        json_mode: Constrain the output to one JSON object.
        copy_from: Constrain the output to a span copied from one of these texts (extractive answers).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # n > 0: never repeat an n-gram of prompt + output (transformers' rule)
    num_beams: int = 1
    length_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)  # stop strings, not included in the output text
    seed: int | None = None
    json_mode: bool = False  # constrain the output to one JSON object (constraints.JsonConstraint)
    copy_from: list[str] = field(default_factory=list)  # output = a span of one of these (constraints.CopyConstraint)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise LmstackError(f"max_new_tokens must be >= 1, not {self.max_new_tokens}")
        if not self.temperature >= 0 or math.isinf(self.temperature):
            raise LmstackError(f"temperature must be a finite number >= 0, not {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise LmstackError(f"top_k must be >= 1, not {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise LmstackError(f"top_p must be in (0, 1], not {self.top_p}")
        if not self.repetition_penalty > 0 or math.isinf(self.repetition_penalty):
            raise LmstackError(f"repetition_penalty must be a finite number > 0, not {self.repetition_penalty}")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            raise LmstackError(f"no_repeat_ngram_size must be an integer >= 0 (0 = off), "
                               f"not {self.no_repeat_ngram_size}")
        if self.num_beams < 1:
            raise LmstackError(f"num_beams must be >= 1, not {self.num_beams}")
        if self.num_beams > 1 and self.temperature > 0:
            raise LmstackError("beam search is deterministic: use num_beams=1 to sample, or temperature=0")
        if self.num_beams > 1 and (self.json_mode or self.copy_from):
            raise LmstackError("JSON and copy modes work with greedy decoding or sampling, not beam search")
        if self.json_mode and self.copy_from:
            raise LmstackError("choose one of JSON mode and copy mode")
        if any(not isinstance(s, str) for s in self.copy_from) or (self.copy_from and not any(
                s.strip() for s in self.copy_from)):
            raise LmstackError("copy_from must be a list of texts, at least one not empty")
        if not math.isfinite(self.length_penalty):
            raise LmstackError(f"length_penalty must be a finite number, not {self.length_penalty}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise LmstackError("stop strings must be non-empty strings")


# ------------------------------------------------------------------------- logit operations (pure)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty, as transformers' RepetitionPenaltyLogitsProcessor: logits [B, V], seen [B, V] bool.

    Seen tokens get score / penalty when positive and score * penalty when negative, so penalty > 1 always
    makes them less likely.
    """
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def banned_ngram_tokens(ids: list[int], n: int) -> list[int]:
    """The tokens that would repeat an n-gram of `ids`: those that followed an earlier occurrence of the last
    n - 1 tokens (transformers' NoRepeatNGramLogitsProcessor). [] while ids is shorter than n - 1."""
    if n < 1 or len(ids) + 1 < n:
        return []
    if n == 1:
        return sorted(set(ids))
    tail = tuple(ids[len(ids) - n + 1:])
    return sorted({ids[i + n - 1] for i in range(len(ids) - n + 1) if tuple(ids[i:i + n - 1]) == tail})


def apply_no_repeat_ngram(logits: Tensor, banned: list[list[int]]) -> Tensor:
    """logits [B, V]; banned[b] the tokens row b must not take -> those set to -inf."""
    if not any(banned):
        return logits
    logits = logits.clone()
    for row, tokens in enumerate(banned):
        if tokens:
            logits[row, tokens] = float("-inf")
    return logits


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k highest logits per row (ties with the k-th are kept, as in TopKLogitsWarper); [B, V]."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering exactly as transformers' TopPLogitsWarper: keep the smallest set of tokens whose
    probability sums to >= p, and always the most likely one. logits [B, V]."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - p)  # ascending: drop the low tail whose mass is <= 1 - p
    remove[..., -1:] = False
    remove = remove.scatter(-1, sorted_idx, remove)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: Tensor, config: GenerationConfig, seen: Tensor | None,
                   banned: list[list[int]] | None = None) -> Tensor:
    """Repetition penalty, n-gram ban, then (when sampling) temperature, top-k, top-p - transformers' order.
    logits [B, V] float32; seen [B, V] bool; banned[b] the tokens row b must not repeat."""
    if seen is not None and config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if banned is not None:
        logits = apply_no_repeat_ngram(logits, banned)
    if config.temperature > 0:
        logits = logits / config.temperature
        if config.top_k is not None:
            logits = apply_top_k(logits, config.top_k)
        if config.top_p is not None and config.top_p < 1.0:
            logits = apply_top_p(logits, config.top_p)
    return logits


def select_next(logits: Tensor, config: GenerationConfig, generator: torch.Generator | None) -> Tensor:
    """Processed logits [B, V] -> next tokens [B]: argmax when greedy, else a draw from softmax."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def seen_mask(rows: list[list[int]], vocab_size: int, device: torch.device) -> Tensor:
    """[B, V] bool, True for each token a row already holds (what the repetition penalty looks at)."""
    seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
    for i, ids in enumerate(rows):
        if ids:
            seen[i, torch.tensor(ids, device=device).clamp(max=vocab_size - 1)] = True
    return seen


# ------------------------------------------------------------------------------------ stop strings


def find_stop(text: str, stops: list[str], start: int = 0) -> int:
    """Index of the earliest stop string in text[start:] (as an index into text), or -1."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could still grow into a stop string (and must not be streamed)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


def stop_token_ids(tokenizer: Tokenizer | None, eos_token_id: int | None, stops: list[str]) -> set[int]:
    """The token ids that end a sequence: the tokenizer's stop tokens, the model's EOS, and each stop string
    that is a special token (decoding skips special tokens, so its text would never appear)."""
    if stops and tokenizer is None:
        raise LmstackError("stop strings need a tokenizer")
    ids: set[int] = set(tokenizer.stop_token_ids) if tokenizer is not None else set()
    if eos_token_id is not None:
        ids.add(eos_token_id)
    for s in stops:
        tid = tokenizer.token_to_id(s)
        if tid is not None and tokenizer.decode([tid]) != s:
            ids.add(tid)
    return ids


# ----------------------------------------------------------------------------------------- Sequence


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]  # the most likely alternatives (token text, logprob), best first


class Sequence:
    """One generated sequence: its tokens, its streamed text, how it ends, and how it samples.

    Used by every decode loop (Generator, the serving scheduler). `advance(logits)` chooses the next token with
    the config's settings (its own torch.Generator: seed + index, so a seeded choice gives the same text alone
    or in a batch), records it, and returns the text that can go out now - held back: a partial character and
    anything that may still grow into a stop string. A sequence ends on a stop token, a stop string (cut from
    the text), a completed constraint, or its token budget.

    context: the tokens the repetition penalty and the n-gram ban look at besides the new ones (the prompt for a
    decoder, the start token for an encoder-decoder, as transformers does).
    """

    def __init__(self, config: GenerationConfig, *, context: list[int], tokenizer: Tokenizer | None,
                 stop_ids: set[int], budget: int, vocab_size: int, device: torch.device, index: int = 0,
                 logprobs: int | None = None, constraint: Constraint | None = None) -> None:
        self.config, self.index, self.budget = config, index, budget
        self.tokenizer, self.stop_ids, self.logprobs = tokenizer, stop_ids, logprobs
        self.stops = list(config.stop)
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.context_len = len(context)
        self.ids: list[int] = []
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.text, self.sent = "", 0  # decoded text (cut at a stop string); how much of it went out
        self.finish_reason: str | None = None  # "stop" | "length" (| "cancelled", set by the scheduler)
        self.greedy = config.temperature == 0
        self.generator: torch.Generator | None = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            if config.seed is not None:
                self.generator.manual_seed(config.seed + index)  # choice i of a seeded request: seed + i
            else:
                self.generator.seed()
        self.seen = (seen_mask([context], vocab_size, device) if config.repetition_penalty != 1.0
                     else None)  # [1, V]
        self.history = list(context) if config.no_repeat_ngram_size else None  # context + new tokens
        self.constraint = constraint

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits decides: such rows share one batched argmax (`choose_tokens`)."""
        return (self.greedy and self.seen is None and self.history is None and self.constraint is None
                and self.logprobs is None)

    def choose(self, logits: Tensor) -> int:
        """logits [V] float32 -> the next token, with the config's sampling settings."""
        cfg = self.config
        banned = ([banned_ngram_tokens(self.history, cfg.no_repeat_ngram_size)] if self.history is not None
                  else None)
        processed = process_logits(logits[None], cfg, self.seen, banned)  # [1, V]
        if self.constraint is not None:
            return self.constraint.choose(processed[0], self.greedy, self.generator, self.budget - len(self.ids))
        return int(select_next(processed, cfg, self.generator)[0])

    def advance(self, logits: Tensor, token: int | None = None) -> tuple[str, TokenLogprob | None]:
        """Choose (unless `token` is given) and record the next token from logits [V] (float32); -> the text that
        can go out now, and the token's log-prob when asked for."""
        if token is None:
            token = int(logits.argmax()) if self.plain_greedy else self.choose(logits)
        info = None
        if self.logprobs is not None and token not in self.stop_ids:
            info = self._logprob(logits, token, self.logprobs)
        return self.push(token), info

    def push(self, token: int) -> str:
        """Record `token`; -> the text that can go out now."""
        self.ids.append(token)
        if self.seen is not None:
            self.seen[0, token] = True
        if self.history is not None:
            self.history.append(token)
        if token in self.stop_ids:
            return self._finish("stop")
        if self.decoder is not None:
            before = len(self.text)
            self.text += self.decoder.push(token)
            if self.stops:  # a new stop string can only end in the new text
                cut = find_stop(self.text, self.stops, max(0, before - self.max_stop + 1))
                if cut >= 0:
                    self.text = self.text[:cut]
                    return self._finish("stop", flush=False)
        if self.constraint is not None and self.constraint.complete:
            return self._finish("stop")
        if len(self.ids) >= self.budget:
            return self._finish("length")
        end = len(self.text) - held_back(self.text, self.stops)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def finish(self, reason: str) -> str:
        """End the sequence from outside (the caller's budget ran out first); -> the text still held back."""
        return self._finish(reason) if self.finish_reason is None else ""

    def _finish(self, reason: str, flush: bool = True) -> str:
        if flush and self.decoder is not None:
            self.text += self.decoder.flush()
            cut = find_stop(self.text, self.stops)
            self.text = self.text[:cut] if cut >= 0 else self.text
        self.finish_reason = reason
        out, self.sent = self.text[self.sent:], len(self.text)
        return out

    def _logprob(self, logits: Tensor, token: int, top: int) -> TokenLogprob:
        logp = torch.log_softmax(logits, dim=-1)  # [V]: the model's distribution, before sampling filters
        decode = self.tokenizer.decode if self.tokenizer is not None else str
        alternatives: list[tuple[str, float]] = []
        if top > 0:
            values, ids = torch.topk(logp, top)
            alternatives = [(decode([i]), v) for i, v in zip(ids.tolist(), values.tolist())]
        return TokenLogprob(decode([token]), float(logp[token]), alternatives)


def choose_tokens(seqs: list[Sequence], logits: Tensor) -> list[int | None]:
    """The plain-greedy rows' tokens from one batched argmax over logits [B, V] (one host sync); None for rows
    that choose for themselves (`Sequence.choose`)."""
    rows = [i for i, s in enumerate(seqs) if s.plain_greedy and s.finish_reason is None]
    tokens: list[int | None] = [None] * len(seqs)
    if rows:
        for i, t in zip(rows, logits[rows].argmax(dim=-1).tolist()):
            tokens[i] = t
    return tokens


# ----------------------------------------------------------------------------------------- options


# The sampling options of every generating verb (generate, chat): GenerationConfig's fields as CLI options / YAML
# keys / keyword arguments, each None until given.
SamplingOptions = option_group(GenerationConfig, exclude={"json_mode", "copy_from"}, name="SamplingOptions")


def sampling_config(options: Any = None, **defaults: Any) -> GenerationConfig:
    """The validated GenerationConfig for a verb: its own `defaults`, then the options that were given."""
    cfg = GenerationConfig(**{**defaults, **given(options)})
    cfg.stop = list(cfg.stop or [])
    cfg.validate()
    return cfg
