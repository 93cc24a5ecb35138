"""The one generation path: prefill / decode_one_token over a static KV cache, sampling, beam search, streaming.

After gpt-fast's generate.py. A small adapter per model family owns the cache and the positions:
`_CausalAdapter` (Decoder: prompt -> prefill) and `_Seq2SeqAdapter` (Seq2Seq: encode the source once, then the
decoder starts from its start token). Everything above the adapters - sampling, stopping, stop strings,
streaming, beam search, batching - is shared by both families.

Shapes: B rows (prompts, or prompts x beams), T prompt length, V vocabulary, K beam candidates.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.errors import LmstackError
from lmstack.tokenizer import StreamDecoder, Tokenizer

CACHE_BUCKET = 256  # cache lengths are rounded up to this, so a compiled step sees few distinct shapes


# ------------------------------------------------------------------------------------------- config


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)  # stop strings, not included in the output text
    seed: int | None = None

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
        if self.num_beams < 1:
            raise LmstackError(f"num_beams must be >= 1, not {self.num_beams}")
        if self.num_beams > 1 and self.temperature > 0:
            raise LmstackError("beam search is deterministic: use num_beams=1 to sample, or temperature=0")
        if not math.isfinite(self.length_penalty):
            raise LmstackError(f"length_penalty must be a finite number, not {self.length_penalty}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise LmstackError("stop strings must be non-empty strings")


@dataclass
class GenerationResult:
    text: str  # the new text, cut before a stop string; stop tokens are not in it
    token_ids: list[int]  # the new tokens, including the EOS / stop-string tokens that ended the generation
    prompt_tokens: int
    new_tokens: int
    finish_reason: str  # "stop" (EOS / stop string) or "length" (max_new_tokens or the context end)
    prefill_s: float  # prompt -> first new token
    decode_s: float  # the remaining new tokens

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token comes out of prefill; decode made the others.
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else 0.0


# ------------------------------------------------------------------------- sampling (pure functions)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty, as transformers' RepetitionPenaltyLogitsProcessor: logits [B, V], seen [B, V] bool.

    Seen tokens get score / penalty when positive and score * penalty when negative, so penalty > 1 always
    makes them less likely.
    """
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


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


def process_logits(logits: Tensor, config: GenerationConfig, seen: Tensor | None) -> Tensor:
    """Repetition penalty, then (when sampling) temperature, top-k, top-p - transformers' order. [B, V] fp32."""
    if seen is not None and config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
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


class _Row:
    """One sequence of a sampling loop: its new tokens, its text so far, and why it ended."""

    def __init__(self, tokenizer: Tokenizer | None, stops: list[str], stop_ids: set[int]) -> None:
        self.stops, self.stop_ids = stops, stop_ids
        self.ids: list[int] = []
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None and stops else None
        self.text = ""  # complete characters decoded so far (tracked only when there are stop strings)
        self.cut = -1  # where a stop string starts in self.text
        self.finish_reason: str | None = None
        self.max_stop = max((len(s) for s in stops), default=0)

    def push(self, token: int) -> None:
        self.ids.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return
        if self.decoder is not None:
            before = len(self.text)
            self.text += self.decoder.push(token)
            # A new stop string can only end in the new text, so search from max_stop - 1 characters before it.
            self.cut = find_stop(self.text, self.stops, max(0, before - self.max_stop + 1))
            if self.cut >= 0:
                self.finish_reason = "stop"


# ------------------------------------------------------------------------------------- model adapters


@contextlib.contextmanager
def single_row_matmuls(rows: int, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Route a one-row (M=1) bf16/fp16 CPU step around oneDNN, whose matmul is 2-3x slower than ATen's own
    kernel for a single row (SmolLM2's 49152x576 head: 3.3 vs 1.9 ms; a layer's Linears: 360 vs 130 us). From
    two rows up oneDNN wins, so batches and prefills keep it."""
    if rows != 1 or device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def decode_one_token(model: nn.Module, tokens: Tensor, input_pos: Tensor, position_ids: Tensor | None,
                     key_padding_mask: Tensor | None) -> Tensor:
    """One cached decoder step: tokens [B, 1] at cache slot input_pos [1] -> logits [B, V] (float32)."""
    logits = model(tokens, input_pos=input_pos, position_ids=position_ids, key_padding_mask=key_padding_mask)
    return logits[:, -1].float()


def decode_one_token_seq2seq(model: nn.Module, tokens: Tensor, input_pos: Tensor) -> Tensor:
    """One cached Seq2Seq decoder step -> logits [B, V]. The cross-attention keys/values and the memory mask
    were kept by the first step (and follow `reorder_cache`), so both are passed as None."""
    return model.decode(tokens, None, None, input_pos)[:, -1].float()


def _compile(fn: Any, device: torch.device) -> Any:
    # CUDA graphs ("reduce-overhead") need CUDA; on CPU the default inductor mode is the one that pays off.
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(fn, mode=mode, fullgraph=True)


def _cache_len(needed: int, limit: int, fixed: int | None) -> int:
    if fixed is not None:
        return fixed
    return min(limit, -(-needed // CACHE_BUCKET) * CACHE_BUCKET)


class _CausalAdapter:
    """Decoder-only models: the prompt is prefilled into the cache; rows are left-padded to one length."""

    def __init__(self, model: nn.Module, pad_id: int, compile: bool, max_len: int | None) -> None:
        self.model, self.pad_id, self.max_len = model, pad_id, max_len
        self.context = model.config.max_seq_len if max_len is None else min(max_len, model.config.max_seq_len)
        self.device = model.device
        self.step_fn = _compile(decode_one_token, self.device) if compile else decode_one_token

    def plan(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        """How many new tokens fit: max_new_tokens, or fewer where the context ends."""
        for ids in prompts:
            if not ids:
                raise LmstackError("prompt is empty")
            if len(ids) >= self.context:
                raise LmstackError(f"prompt is {len(ids)} tokens; the context is {self.context}")
        return min(max_new_tokens, self.context - max(map(len, prompts)))

    def context_tokens(self, prompts: list[list[int]]) -> list[list[int]]:
        return prompts  # the repetition penalty looks at prompt + generated, as in transformers

    def prefill(self, prompts: list[list[int]], n_new: int) -> Tensor:
        """Write the prompts to a fresh cache; -> logits of the first new token [B, V] (float32)."""
        B, T = len(prompts), max(map(len, prompts))
        cache_len = _cache_len(T + n_new - 1, self.context, self.max_len)
        if self.model.cache_shape() != (B, cache_len, self.model.dtype):
            self.model.setup_cache(B, cache_len)  # else reuse the buffers (and the compiled graph)
        dev = self.device
        tokens = torch.tensor([[self.pad_id] * (T - len(p)) + p for p in prompts], device=dev)  # [B, T]
        self.input_pos = torch.arange(T, device=dev)  # [T] cache slots
        if all(len(p) == T for p in prompts):
            self.position_ids = self.key_padding_mask = None  # positions = slots
            logits = self.model(tokens, input_pos=self.input_pos, last_only=True)
        else:
            real = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts], device=dev)  # [B, T]
            position_ids = (real.cumsum(-1) - 1).clamp(min=0)  # 0 at each row's first real token
            self.key_padding_mask = torch.ones(B, cache_len, dtype=torch.bool, device=dev)  # [B, S]
            self.key_padding_mask[:, :T] = real
            # Causal and padding, but every query sees itself: a pad query that sees nothing would turn into
            # NaN under SDPA and poison the layers above through its (masked) value vectors.
            causal = torch.ones(T, cache_len, dtype=torch.bool, device=dev).tril()  # [T, S]
            diag = torch.eye(T, cache_len, dtype=torch.bool, device=dev)
            mask = (causal & self.key_padding_mask[:, None, :]) | diag  # [B, T, S]
            logits = self.model(tokens, input_pos=self.input_pos, position_ids=position_ids,
                                attn_mask=mask[:, None], last_only=True)
            self.position_ids = position_ids[:, -1:].clone()  # [B, 1]
        self.input_pos = self.input_pos[-1:].clone()  # [1], advanced in place before each step
        return logits[:, -1].float()

    def step(self, tokens: Tensor) -> Tensor:  # tokens [B, 1] -> logits [B, V]
        self.input_pos += 1
        if self.position_ids is not None:
            self.position_ids += 1
        with single_row_matmuls(tokens.shape[0], self.model.device, self.model.dtype):
            return self.step_fn(self.model, tokens, self.input_pos, self.position_ids, self.key_padding_mask)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.model.reorder_cache(beam_idx)

    def release(self) -> None:
        self.model.clear_cache()


class _Seq2SeqAdapter:
    """Encoder-decoder models: encode the (right-padded) sources once; the decoder starts from bos_token_id.

    The first decoder step passes the encoder memory, which the cross-attention projects and caches; later
    steps pass None and reuse it.
    """

    def __init__(self, model: nn.Module, pad_id: int, compile: bool, max_len: int | None) -> None:
        self.model, self.pad_id, self.max_len = model, pad_id, max_len
        cfg = model.config
        self.context = cfg.max_seq_len if max_len is None else min(max_len, cfg.max_seq_len)
        self.start_id = cfg.bos_token_id
        self.device = next(model.parameters()).device
        self.step_fn = _compile(decode_one_token_seq2seq, self.device) if compile else decode_one_token_seq2seq

    def plan(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        for ids in prompts:
            if not ids:
                raise LmstackError("source is empty")
            if len(ids) > self.model.config.max_seq_len:
                raise LmstackError(f"prompt is {len(ids)} tokens; the context is {self.model.config.max_seq_len}")
        return min(max_new_tokens, self.context)  # the decoder holds the start token + new tokens - 1

    def context_tokens(self, prompts: list[list[int]]) -> list[list[int]]:
        return [[self.start_id] for _ in prompts]  # transformers penalizes the decoder's tokens only

    def prefill(self, prompts: list[list[int]], n_new: int) -> Tensor:
        B, S = len(prompts), max(map(len, prompts))
        dev = self.device
        src = torch.tensor([p + [self.pad_id] * (S - len(p)) for p in prompts], device=dev)  # [B, S]
        src_mask = torch.tensor([[True] * len(p) + [False] * (S - len(p)) for p in prompts], device=dev)  # [B, S]
        memory = self.model.encode(src, src_mask)  # [B, S, C]
        self.model.setup_cache(B, _cache_len(n_new, self.context, self.max_len), memory.dtype)
        self.input_pos = torch.zeros(1, dtype=torch.long, device=dev)  # [1]
        start = torch.full((B, 1), self.start_id, dtype=torch.long, device=dev)
        return self.model.decode(start, memory, src_mask, self.input_pos)[:, -1].float()

    def step(self, tokens: Tensor) -> Tensor:
        self.input_pos += 1
        return self.step_fn(self.model, tokens, self.input_pos)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.model.reorder_cache(beam_idx)

    def release(self) -> None:
        self.model.clear_cache()


# ----------------------------------------------------------------------------------------- generator


class Generator:
    """Text generation for one model: greedy, sampling, beam search, stop strings, streaming, batches.

    compile=True wraps the decode step in torch.compile (shapes stay static, so it compiles once per cache size;
    pass max_len to fix the cache size). The KV cache is kept between calls of the same shape; `release()`
    frees it.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None, *, compile: bool = False,
                 max_len: int | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        pad = pad if pad is not None else getattr(cfg, "pad_token_id", None)
        pad = pad if pad is not None else getattr(cfg, "eos_token_id", None)
        pad = pad if pad is not None else 0  # pads are masked out; any id will do
        family = getattr(cfg, "family", "decoder")
        if family == "decoder":
            self.adapter: _CausalAdapter | _Seq2SeqAdapter = _CausalAdapter(model, pad, compile, max_len)
        elif family == "seq2seq":
            self.adapter = _Seq2SeqAdapter(model, pad, compile, max_len)
        else:
            raise LmstackError(f"cannot generate text with a {family!r} model; use a decoder or seq2seq model")
        self.stop_ids: set[int] = set(tokenizer.stop_token_ids) if tokenizer is not None else set()
        if getattr(cfg, "eos_token_id", None) is not None:
            self.stop_ids.add(cfg.eos_token_id)
        self.vocab_size: int = cfg.vocab_size
        self.last_result: GenerationResult | None = None

    # ------------------------------------------------------------------------------------- public

    def generate(self, prompt: str | list[int], config: GenerationConfig) -> GenerationResult:
        return self.generate_batch([prompt], config)[0]

    def stream(self, prompt: str | list[int], config: GenerationConfig) -> Iterator[str]:
        """Text pieces as they are decided; after exhaustion `self.last_result` holds the GenerationResult."""
        config.validate()  # here, not at the first next(): bad input fails where the call is made
        if config.num_beams > 1:
            raise LmstackError("beam search cannot stream (the best beam is known only at the end)")
        ids = self._encode(prompt)
        self.adapter.plan([ids], config.max_new_tokens)
        self._stops(config)
        return self._stream(ids, config)

    def _stream(self, ids: list[int], config: GenerationConfig) -> Iterator[str]:
        results: list[GenerationResult] = []
        yield from self._sample([ids], config, results, stream=True)
        self.last_result = results[0]

    def generate_batch(self, prompts: list[str | list[int]], config: GenerationConfig) -> list[GenerationResult]:
        """Several prompts at once (left-padded); each result equals what the prompt would give alone."""
        config.validate()
        if not prompts:
            return []
        ids = [self._encode(p) for p in prompts]
        results: list[GenerationResult] = []
        if config.num_beams > 1:
            results = self._beam_search(ids, config)
        else:
            for _ in self._sample(ids, config, results, stream=False):
                pass
        self.last_result = results[-1]
        return results

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Render messages with the tokenizer's chat template (plus the assistant header) and encode them."""
        if self.tokenizer is None:
            raise LmstackError("this model has no tokenizer; a chat prompt needs one")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        # The template writes its own BOS / special tokens, as transformers' apply_chat_template assumes.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def release(self) -> None:
        """Free the KV cache."""
        self.adapter.release()

    # ------------------------------------------------------------------------------------ helpers

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise LmstackError("this model has no tokenizer; pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        ids = [int(i) for i in prompt]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise LmstackError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        return ids

    def _stops(self, config: GenerationConfig) -> tuple[list[str], set[int]]:
        """Stop strings, and the stop token ids; a stop string that is a special token stops on its id (decoding
        skips special tokens, so its text would never appear)."""
        if config.stop and self.tokenizer is None:
            raise LmstackError("stop strings need a tokenizer")
        stop_ids = set(self.stop_ids)
        for s in config.stop:
            tid = self.tokenizer.token_to_id(s)
            if tid is not None and self.tokenizer.decode([tid]) != s:
                stop_ids.add(tid)
        return list(config.stop), stop_ids

    def _text(self, row_ids: list[int], finish_reason: str, stops: list[str], stop_ids: set[int]) -> str:
        if self.tokenizer is None:
            return ""
        ids = row_ids[:-1] if finish_reason == "stop" and row_ids and row_ids[-1] in stop_ids else row_ids
        text = self.tokenizer.decode(ids)
        cut = find_stop(text, stops)
        return text[:cut] if cut >= 0 else text

    # ------------------------------------------------------------------------- greedy / sampling

    @torch.inference_mode()
    def _sample(self, prompts: list[list[int]], config: GenerationConfig, results: list[GenerationResult],
                stream: bool) -> Iterator[str]:
        """The decode loop for greedy and sampling, B rows at once; yields row 0's text pieces when streaming.

        One host sync per step (`tolist` of the new tokens) serves EOS, stop strings and streaming together.
        """
        adapter = self.adapter
        n_new = adapter.plan(prompts, config.max_new_tokens)
        stops, stop_ids = self._stops(config)
        generator = None
        if config.temperature > 0:
            generator = torch.Generator(device=adapter.device)
            if config.seed is not None:
                generator.manual_seed(config.seed)
            else:
                generator.seed()
        rows = [_Row(self.tokenizer, stops, stop_ids) for _ in prompts]
        streamer = StreamDecoder(self.tokenizer) if stream and self.tokenizer is not None else None
        streamed = 0  # characters of rows[0]'s text already yielded (stop-string mode)

        t0 = time.perf_counter()
        logits = adapter.prefill(prompts, n_new)  # [B, V]
        seen = None
        if config.repetition_penalty != 1.0:
            seen = seen_mask(adapter.context_tokens(prompts), logits.shape[-1], logits.device)  # [B, V]
        t1 = None
        for step in range(n_new):
            next_tokens = select_next(process_logits(logits, config, seen), config, generator)  # [B]
            tokens = next_tokens.tolist()
            if t1 is None:
                t1 = time.perf_counter()
            for row, tok in zip(rows, tokens):
                if row.finish_reason is None:
                    row.push(tok)
            if streamer is not None:
                row = rows[0]
                if row.decoder is None:  # no stop strings: stream token by token, skipping a stop token
                    if len(row.ids) == step + 1 and not (row.finish_reason == "stop"):
                        piece = streamer.push(row.ids[-1])
                        if piece:
                            yield piece
                else:  # hold back text that may still become a stop string
                    end = row.cut if row.cut >= 0 else len(row.text) - held_back(row.text, stops)
                    if row.finish_reason is None and end > streamed:
                        yield row.text[streamed:end]
                        streamed = end
            if all(row.finish_reason is not None for row in rows) or step == n_new - 1:
                break
            if seen is not None:
                seen.scatter_(1, next_tokens[:, None], True)
            logits = adapter.step(next_tokens[:, None])
        t2 = time.perf_counter()

        for row in rows:
            reason = row.finish_reason or "length"
            results.append(GenerationResult(
                text=self._text(row.ids, reason, stops, stop_ids), token_ids=row.ids,
                prompt_tokens=len(prompts[len(results)]), new_tokens=len(row.ids), finish_reason=reason,
                prefill_s=(t1 or t2) - t0, decode_s=t2 - (t1 or t2)))
        if streamer is not None:  # whatever was held back (an incomplete character, a partial stop string)
            text = results[0].text
            if rows[0].decoder is None:
                tail = streamer.flush()
                if tail:
                    yield tail
            elif len(text) > streamed:
                yield text[streamed:]

    # ------------------------------------------------------------------------------ beam search

    @torch.inference_mode()
    def _beam_search(self, prompts: list[list[int]], config: GenerationConfig) -> list[GenerationResult]:
        """Beam search with transformers' semantics (`generate(num_beams=n, do_sample=False)`, early_stopping
        False): each step keeps the top K = max(2, 1 + n_eos) * n candidates over all beams; candidates that
        end (EOS, stop string, length) among the top n enter the finished set with score / length**penalty;
        the search ends when the best running beam, scored at the current length, cannot beat the worst
        finished one (per prompt), or when every candidate ends.
        """
        adapter = self.adapter
        n_new = adapter.plan(prompts, config.max_new_tokens)
        stops, stop_ids = self._stops(config)
        B, nb = len(prompts), config.num_beams
        eos = torch.tensor(sorted(stop_ids), dtype=torch.long)
        K = max(2, 1 + len(stop_ids)) * nb
        lp = config.length_penalty
        NEG = -1.0e9

        t0 = time.perf_counter()
        expanded = [p for p in prompts for _ in range(nb)]  # [B * nb] rows, beams of a prompt adjacent
        logits = adapter.prefill(expanded, n_new)  # [B*nb, V]
        dev = logits.device
        V = logits.shape[-1]
        eos = eos.to(dev)
        seen = None
        if config.repetition_penalty != 1.0:
            seen = seen_mask(adapter.context_tokens(expanded), V, dev)  # [B*nb, V]
        top_nb = torch.arange(K, device=dev) < nb  # [K] only the best n candidates may finish
        offsets = torch.arange(B, device=dev)[:, None] * nb  # [B, 1] row of each prompt's first beam

        run_tokens = torch.full((B, nb, n_new), self.adapter.pad_id, dtype=torch.long, device=dev)
        run_scores = torch.full((B, nb), NEG, device=dev)
        run_scores[:, 0] = 0.0  # only beam 0 is live at first, or all beams would pick the same tokens
        fin_tokens = run_tokens.clone()
        fin_scores = torch.full((B, nb), NEG, device=dev)
        fin_done = torch.zeros(B, nb, dtype=torch.bool, device=dev)
        fin_len = torch.zeros(B, nb, dtype=torch.long, device=dev)
        fin_stopped = torch.zeros(B, nb, dtype=torch.bool, device=dev)  # ended by EOS / stop string
        improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
        t1 = None

        for step in range(n_new):
            logp = F.log_softmax(logits, dim=-1)  # [B*nb, V]
            if seen is not None:
                logp = apply_repetition_penalty(logp, seen, config.repetition_penalty)
            logp = (logp.view(B, nb, V) + run_scores[..., None]).view(B, nb * V)
            top_lp, top_idx = torch.topk(logp, K)  # [B, K]
            src_beam, tok = top_idx // V, top_idx % V  # [B, K]
            cand = torch.take_along_dim(run_tokens, src_beam[..., None], dim=1)  # [B, K, n_new]
            cand[:, :, step] = tok
            stopped = torch.isin(tok, eos)  # [B, K]
            if stops:
                stopped |= self._stop_string_hits(cand[:, :, :step + 1], stops)
            hits = stopped | (step == n_new - 1)  # the last step ends every candidate (length)

            # The best n candidates that go on.
            run_lp = top_lp + hits.float() * NEG
            keep = torch.topk(run_lp, nb).indices  # [B, nb]
            run_tokens = torch.take_along_dim(cand, keep[..., None], dim=1)
            run_scores = torch.take_along_dim(run_lp, keep, dim=1)
            beam_src = torch.take_along_dim(src_beam, keep, dim=1)  # [B, nb]

            # Candidates that ended join the finished set if they beat its worst member.
            just = hits & top_nb  # [B, K]
            score = top_lp / ((step + 1) ** lp) + (~improvable).float() * NEG + (~just).float() * NEG
            merged_scores = torch.cat([fin_scores, score], dim=1)  # [B, nb + K]
            best = torch.topk(merged_scores, nb).indices  # [B, nb]
            fin_scores = torch.take_along_dim(merged_scores, best, dim=1)
            fin_tokens = torch.take_along_dim(torch.cat([fin_tokens, cand], dim=1), best[..., None], dim=1)
            fin_done = torch.take_along_dim(torch.cat([fin_done, just], dim=1), best, dim=1)
            fin_stopped = torch.take_along_dim(torch.cat([fin_stopped, stopped], dim=1), best, dim=1)
            fin_len = torch.take_along_dim(
                torch.cat([fin_len, torch.full_like(tok, step + 1)], dim=1), best, dim=1)

            # Can a running beam still beat the worst finished one (scored at the running length)?
            worst = torch.where(fin_done, fin_scores.min(dim=1, keepdim=True).values, NEG)  # [B, nb]
            best_running = run_scores[:, :1] / ((step + 1) ** lp)  # [B, 1]
            improvable = improvable & (best_running > worst).any(dim=-1, keepdim=True)
            go_on = bool((improvable.any() & ~hits.all()).item())  # the one host sync of the step
            if t1 is None:
                t1 = time.perf_counter()
            if not go_on:
                break

            flat_src = (beam_src + offsets).view(-1)  # [B*nb] cache rows of the parents
            adapter.reorder_cache(flat_src)
            next_tokens = run_tokens[:, :, step].reshape(-1, 1)  # [B*nb, 1]
            if seen is not None:
                seen = seen.index_select(0, flat_src).scatter_(1, next_tokens, True)
            logits = adapter.step(next_tokens)
        t2 = time.perf_counter()

        results = []
        lengths, stopped_best = fin_len[:, 0].tolist(), fin_stopped[:, 0].tolist()
        for b in range(B):
            ids = fin_tokens[b, 0, :lengths[b]].tolist()
            reason = "stop" if stopped_best[b] else "length"
            results.append(GenerationResult(
                text=self._text(ids, reason, stops, stop_ids), token_ids=ids, prompt_tokens=len(prompts[b]),
                new_tokens=len(ids), finish_reason=reason, prefill_s=(t1 or t2) - t0, decode_s=t2 - (t1 or t2)))
        return results

    def _stop_string_hits(self, cand: Tensor, stops: list[str]) -> Tensor:
        """[B, K, L] candidate tokens -> [B, K] bool: the candidate's text holds a stop string."""
        rows = cand.tolist()
        hits = [[find_stop(self.tokenizer.decode(ids), stops) >= 0 for ids in beams] for beams in rows]
        return torch.tensor(hits, dtype=torch.bool, device=cand.device)
