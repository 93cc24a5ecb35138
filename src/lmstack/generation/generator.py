"""The synchronous generation API: generate, stream, generate_batch, beam search.

One decode loop (`Generator._sample`) drives one `Sequence` per row (generation.sampling) over a family
adapter: `_CausalAdapter` runs decoder-only models on the shared `DecodeEngine` (generation.engine), the same
prefill / decode steps the serving scheduler drives; `_Seq2SeqAdapter` encodes the source once and then decodes
from the start token. Beam search shares the logit operations and the adapters.

Shapes: B rows (prompts, or prompts x beams), T prompt length, V vocabulary, K beam candidates.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.errors import LmstackError
from lmstack.generation.constraints import constraint_for, token_texts
from lmstack.generation.engine import CACHE_BUCKET, DecodeEngine, _compile, cache_len, pad_id
from lmstack.generation.sampling import (GenerationConfig, Sequence, apply_no_repeat_ngram,
                                         apply_repetition_penalty, banned_ngram_tokens, choose_tokens, find_stop,
                                         seen_mask, stop_token_ids)
from lmstack.tokenizer import Tokenizer


@dataclass
class GenerationResult:
    text: str  # the new text, cut before a stop string; stop tokens are not in it
    token_ids: list[int]  # the new tokens, including the EOS / stop-string tokens that ended the generation
    prompt_tokens: int
    new_tokens: int
    finish_reason: str  # "stop" (EOS / stop string / a completed constraint) or "length"
    prefill_s: float  # prompt -> first new token
    decode_s: float  # the remaining new tokens

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token comes out of prefill; decode made the others.
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else 0.0


def chat_prompt(tokenizer: Tokenizer | None, messages: list[dict[str, Any]]) -> list[int]:
    """Render messages with the tokenizer's chat template (plus the assistant header) and encode them."""
    if tokenizer is None:
        raise LmstackError("this model has no tokenizer; a chat prompt needs one")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # The template writes its own BOS / special tokens, as transformers' apply_chat_template assumes.
    return tokenizer.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------------------- model adapters


class _CausalAdapter:
    """Decoder-only models on the shared engine: B rows of the pool, row i at its own length."""

    def __init__(self, model: nn.Module, pad_id: int, compile: bool, max_len: int | None) -> None:
        self.model, self.pad_id, self.max_len = model, pad_id, max_len
        self.context = model.config.max_seq_len if max_len is None else min(max_len, model.config.max_seq_len)
        self.device = model.device
        self.engine = DecodeEngine(model, pad_id, compile=compile)
        self.positions: list[int] = []  # the cache slot each row's next token is written to

    def plan(self, prompts: list[list[int]], max_new_tokens: int) -> list[int]:
        """Each row's token budget: max_new_tokens, or fewer where the context ends."""
        for ids in prompts:
            if not ids:
                raise LmstackError("prompt is empty")
            if len(ids) >= self.context:
                raise LmstackError(f"prompt is {len(ids)} tokens; the context is {self.context}")
        return [min(max_new_tokens, self.context - len(p)) for p in prompts]

    def context_tokens(self, prompt: list[int]) -> list[int]:
        return prompt  # the repetition penalty and n-gram ban look at prompt + generated, as in transformers

    def prefill(self, prompts: list[list[int]], n_new: int) -> Tensor:
        """Write the prompts to rows 0..B-1 of the pool; -> logits of the first new token [B, V] (float32)."""
        needed = max(len(p) for p in prompts) + n_new - 1
        slots = self.max_len if self.max_len is not None else cache_len(needed, self.context, CACHE_BUCKET)
        self.engine.reserve(len(prompts), slots)  # a pool of the same size (and its compiled graph) is kept
        self.positions = [len(p) for p in prompts]
        return self.engine.prefill(0, prompts)

    def step(self, tokens: Tensor, done: list[bool] | None = None) -> Tensor:
        """tokens [B, 1] -> logits [B, V]. A finished row (`done`) stays at its slot, so it never outgrows the
        cache while longer rows go on."""
        logits = self.engine.decode(tokens[:, 0].tolist(), self.positions)
        self.positions = [p if done is not None and done[i] else p + 1 for i, p in enumerate(self.positions)]
        return logits

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.engine.reorder(beam_idx)  # beams of a prompt share its length, so positions stay

    def release(self) -> None:
        self.engine.release()


def decode_one_token_seq2seq(model: nn.Module, tokens: Tensor, input_pos: Tensor) -> Tensor:
    """One cached Seq2Seq decoder step -> logits [B, V]. The cross-attention keys/values and the memory mask
    were kept by the first step (and follow `reorder_cache`), so both are passed as None."""
    return model.decode(tokens, None, None, input_pos)[:, -1].float()


class _Seq2SeqAdapter:
    """Encoder-decoder models: encode the (right-padded) sources once; the decoder starts from bos_token_id.

    The first decoder step passes the encoder memory, which the cross-attention projects and caches; later
    steps pass None and reuse it. Every row decodes at the same slot (the decoder starts empty for all).
    """

    def __init__(self, model: nn.Module, pad_id: int, compile: bool, max_len: int | None) -> None:
        self.model, self.pad_id, self.max_len = model, pad_id, max_len
        cfg = model.config
        self.context = cfg.max_seq_len if max_len is None else min(max_len, cfg.max_seq_len)
        self.start_id = cfg.bos_token_id
        self.device = next(model.parameters()).device
        self.step_fn = _compile(decode_one_token_seq2seq, self.device) if compile else decode_one_token_seq2seq

    def plan(self, prompts: list[list[int]], max_new_tokens: int) -> list[int]:
        for ids in prompts:
            if not ids:
                raise LmstackError("source is empty")
            if len(ids) > self.model.config.max_seq_len:
                raise LmstackError(f"prompt is {len(ids)} tokens; the context is {self.model.config.max_seq_len}")
        # The decoder holds the start token + new tokens - 1.
        return [min(max_new_tokens, self.context)] * len(prompts)

    def context_tokens(self, prompt: list[int]) -> list[int]:
        return [self.start_id]  # transformers penalizes the decoder's tokens only

    def prefill(self, prompts: list[list[int]], n_new: int) -> Tensor:
        B, S = len(prompts), max(map(len, prompts))
        dev = self.device
        src = torch.tensor([p + [self.pad_id] * (S - len(p)) for p in prompts], device=dev)  # [B, S]
        src_mask = torch.tensor([[True] * len(p) + [False] * (S - len(p)) for p in prompts], device=dev)  # [B, S]
        memory = self.model.encode(src, src_mask)  # [B, S, C]
        slots = self.max_len if self.max_len is not None else cache_len(n_new, self.context, CACHE_BUCKET)
        self.model.setup_cache(B, slots, memory.dtype)
        self.input_pos = torch.zeros(1, dtype=torch.long, device=dev)  # [1]
        start = torch.full((B, 1), self.start_id, dtype=torch.long, device=dev)
        return self.model.decode(start, memory, src_mask, self.input_pos)[:, -1].float()

    def step(self, tokens: Tensor, done: list[bool] | None = None) -> Tensor:
        self.input_pos += 1  # every row, finished or not: the budget is the same for all, so none outgrows it
        return self.step_fn(self.model, tokens, self.input_pos)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.model.reorder_cache(beam_idx)

    def release(self) -> None:
        self.model.clear_cache()


# ----------------------------------------------------------------------------------------- generator


class Generator:
    """Text generation for one model: greedy, sampling, beam search, stop strings, streaming, batches, JSON mode.

    compile=True wraps the decode step in torch.compile (shapes stay static, so it compiles once per cache size;
    pass max_len to fix the cache size). The KV cache is kept between calls of the same shape; `release()`
    frees it.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None, *, compile: bool = False,
                 max_len: int | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        self.pad_id = pad_id(model, tokenizer)
        family = getattr(cfg, "family", "decoder")
        if family == "decoder":
            self.adapter: _CausalAdapter | _Seq2SeqAdapter = _CausalAdapter(model, self.pad_id, compile, max_len)
        elif family == "seq2seq":
            self.adapter = _Seq2SeqAdapter(model, self.pad_id, compile, max_len)
        else:
            raise LmstackError(f"cannot generate text with a {family!r} model; use a decoder or seq2seq model")
        self.vocab_size: int = cfg.vocab_size
        self.last_result: GenerationResult | None = None
        self._token_texts: list[str] | None = None  # every token's text, built at the first JSON- or copy-mode call

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
        self.stop_ids(config)
        return self._stream(ids, config)

    def _stream(self, ids: list[int], config: GenerationConfig) -> Iterator[str]:
        results: list[GenerationResult] = []
        yield from self._sample([ids], config, results, stream=True)
        self.last_result = results[0]

    def generate_batch(self, prompts: list[str | list[int]], config: GenerationConfig) -> list[GenerationResult]:
        """Several prompts at once (right-padded in the cache pool); each result equals what the prompt would
        give alone (a seeded row samples as if alone)."""
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
        return chat_prompt(self.tokenizer, messages)

    def stop_ids(self, config: GenerationConfig) -> set[int]:
        """The token ids that end a sequence under `config` (EOS, stop tokens, special-token stop strings)."""
        return stop_token_ids(self.tokenizer, getattr(self.model.config, "eos_token_id", None), config.stop)

    def sequence(self, prompt: list[int], config: GenerationConfig, budget: int, *, index: int = 0,
                 logprobs: int | None = None, stop_ids: set[int] | None = None) -> Sequence:
        """The state of one sequence generated from `prompt` (what the decode loops drive)."""
        stop_ids = stop_ids if stop_ids is not None else self.stop_ids(config)
        if config.json_mode or config.copy_from:
            self.prepare_token_texts()
        constraint = constraint_for(config, self.tokenizer, self._token_texts, stop_ids)
        return Sequence(config, context=self.adapter.context_tokens(prompt), tokenizer=self.tokenizer,
                        stop_ids=stop_ids, budget=budget,
                        vocab_size=self.vocab_size, device=self.adapter.device, index=index, logprobs=logprobs,
                        constraint=constraint)

    def prepare_token_texts(self) -> None:
        """Decode every token's text once (about a second for a 50k vocabulary), for JSON- and copy-mode calls."""
        if self._token_texts is None and self.tokenizer is not None:
            self._token_texts = token_texts(self.tokenizer)

    def release(self) -> None:
        """Free the KV cache."""
        self.adapter.release()

    # ------------------------------------------------------------------------------------ helpers

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise LmstackError("this model has no tokenizer (its folder has no tokenizer.json), so text cannot be "
                                   "encoded; pass token ids, or copy the tokenizer.json it was trained with")
            return self.tokenizer.encode(prompt)
        ids = [int(i) for i in prompt]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise LmstackError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        return ids

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

        One batched argmax (one host sync) per step serves every plain greedy row; the other rows choose through
        their `Sequence`.
        """
        adapter = self.adapter
        budgets = adapter.plan(prompts, config.max_new_tokens)
        stop_ids = self.stop_ids(config)
        seqs = [self.sequence(p, config, b, stop_ids=stop_ids) for p, b in zip(prompts, budgets)]

        t0 = time.perf_counter()
        logits = adapter.prefill(prompts, max(budgets))  # [B, V]
        t1 = None
        while True:
            tokens = choose_tokens(seqs, logits)
            for i, seq in enumerate(seqs):
                if seq.finish_reason is None:
                    text, _ = seq.advance(logits[i], tokens[i])
                    if stream and i == 0 and text:
                        yield text
            if t1 is None:
                t1 = time.perf_counter()
            done = [seq.finish_reason is not None for seq in seqs]
            if all(done):
                break
            fed = torch.tensor([seq.ids[-1] for seq in seqs], device=adapter.device)[:, None]  # [B, 1]
            logits = adapter.step(fed, done)
        t2 = time.perf_counter()

        for prompt, seq in zip(prompts, seqs):
            results.append(GenerationResult(
                text=seq.text if self.tokenizer is not None else "", token_ids=seq.ids, prompt_tokens=len(prompt),
                new_tokens=len(seq.ids), finish_reason=seq.finish_reason or "length", prefill_s=t1 - t0,
                decode_s=t2 - t1))

    # ------------------------------------------------------------------------------ beam search

    @torch.inference_mode()
    def _beam_search(self, prompts: list[list[int]], config: GenerationConfig) -> list[GenerationResult]:
        """Beam search with transformers' semantics (`generate(num_beams=n, do_sample=False)`, early_stopping
        False): each step keeps the top K = max(2, 1 + n_eos) * n candidates over all beams; candidates that
        end (EOS, stop string, length) among the top n enter the finished set with score / length**penalty;
        the search ends when the best running beam, scored at the current length, cannot beat the worst
        finished one (per prompt), or when every candidate ends. The repetition penalty and the n-gram ban
        act on the log-probabilities, as transformers' logits processors do.
        """
        adapter = self.adapter
        n_new = min(adapter.plan(prompts, config.max_new_tokens))
        stops, stop_ids = list(config.stop), self.stop_ids(config)
        B, nb = len(prompts), config.num_beams
        eos = torch.tensor(sorted(stop_ids), dtype=torch.long)
        K = max(2, 1 + len(stop_ids)) * nb
        lp = config.length_penalty
        ngram = config.no_repeat_ngram_size
        NEG = -1.0e9

        t0 = time.perf_counter()
        expanded = [p for p in prompts for _ in range(nb)]  # [B * nb] rows, beams of a prompt adjacent
        contexts = [adapter.context_tokens(p) for p in expanded]
        logits = adapter.prefill(expanded, n_new)  # [B*nb, V]
        dev = logits.device
        V = logits.shape[-1]
        eos = eos.to(dev)
        seen = None
        if config.repetition_penalty != 1.0:
            seen = seen_mask(contexts, V, dev)  # [B*nb, V]
        top_nb = torch.arange(K, device=dev) < nb  # [K] only the best n candidates may finish
        offsets = torch.arange(B, device=dev)[:, None] * nb  # [B, 1] row of each prompt's first beam

        run_tokens = torch.full((B, nb, n_new), self.pad_id, dtype=torch.long, device=dev)
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
            if ngram:
                rows = run_tokens[:, :, :step].reshape(B * nb, step).tolist()
                logp = apply_no_repeat_ngram(logp, [banned_ngram_tokens(c + r, ngram)
                                                    for c, r in zip(contexts, rows)])
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
