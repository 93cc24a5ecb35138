"""Continuous batching: one scheduler thread runs the model over a pool of KV-cache rows.

The pool is a static cache [max_batch, Hkv, S, D] per layer. Every sequence (one choice of one request) owns a
row and its own length. Each iteration of the loop

1. retires cancelled sequences,
2. admits waiting requests into free rows: their prompts are prefilled together (right-padded, a bounded
   number of tokens per iteration), and a request with n > 1 choices copies its prefilled row n - 1 times,
3. decodes one token for every active row in one forward: input_pos [B, 1] gives each row its own cache slot
   and its own causal mask (`KVCache` / `Decoder` per-row slots), over a view of the first `n_active` rows and
   the first L slots (L = the longest row, bucketed), so short batches pay for what they use,
4. retires finished rows by moving the last active row into the hole (its used slots only), which keeps the
   active rows at the front of the pool.

Requests for different LoRA adapters share the batch: `serving.lora.MultiLoRALinear` applies each adapter to
its own rows. Sampling reuses `lmstack.generation` (process_logits / select_next / seen_mask, stop strings) and
`StreamDecoder`, so the server samples exactly as `Generator` does; every sequence has its own
`torch.Generator`, so a seed gives the same text alone or in a batch.

Results go out through each job's `emit` callback (called on the scheduler thread): `Delta` events with new
text and token log-probs, then one `Finish` per choice, or an `Error`.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lmstack.errors import LmstackError
from lmstack.generation import (GenerationConfig, Generator, find_stop, held_back, process_logits, seen_mask,
                                select_next, single_row_matmuls)
from lmstack.serving.json_mode import JsonConstraint, token_texts
from lmstack.serving.lora import AdapterRouter
from lmstack.serving.metrics import Metrics
from lmstack.tokenizer import StreamDecoder, Tokenizer

SLOT_BUCKET = 64  # attention spans a multiple of this many cache slots


# ------------------------------------------------------------------------------------------ events


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]  # the most likely alternatives (token text, logprob), best first


@dataclass
class Delta:
    index: int  # the choice
    text: str
    logprobs: list[TokenLogprob]


@dataclass
class Finish:
    index: int
    reason: str  # "stop" | "length"
    text: str  # the whole text of the choice
    completion_tokens: int


@dataclass
class Error:
    message: str


Event = Delta | Finish | Error


@dataclass
class Job:
    """One request: a prompt, its sampling settings, and n choices."""

    prompt_ids: list[int]
    config: GenerationConfig
    emit: Callable[[Event], None]
    n: int = 1
    adapter: int = 0  # 0 = the base model, i = the i-th adapter
    logprobs: int | None = None  # None = off; k = also report the k most likely alternatives
    json_mode: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished: int = 0  # choices that ended

    def cancel(self) -> None:
        self.cancelled.set()


def _emit(job: Job, event: Event) -> None:
    """Hand `event` to the job's consumer; a consumer that is gone (its event loop closed) cancels the job
    instead of taking the scheduler thread down."""
    try:
        job.emit(event)
    except Exception:
        job.cancel()


class _Seq:
    """One choice of a job in one cache row: its tokens, its text so far, and how it ends."""

    def __init__(self, job: Job, index: int, tokenizer: Tokenizer, stops: list[str], stop_ids: set[int],
                 budget: int, vocab_size: int, texts: list[str] | None, device: torch.device) -> None:
        self.job, self.index = job, index
        self.stops, self.stop_ids, self.budget = stops, stop_ids, budget
        self.max_stop = max((len(s) for s in stops), default=0)
        self.ids: list[int] = []
        self.decoder = StreamDecoder(tokenizer)
        self.text, self.sent = "", 0  # decoded text; how much of it went out
        self.pos = len(job.prompt_ids)  # the cache slot the next token is written to
        self.finish_reason: str | None = None
        cfg = job.config
        self.greedy = cfg.temperature == 0
        self.generator: torch.Generator | None = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            if cfg.seed is not None:
                self.generator.manual_seed(cfg.seed + index)  # choice i of a seeded request: seed + i
            else:
                self.generator.seed()
        self.seen = (seen_mask([job.prompt_ids], vocab_size, device) if cfg.repetition_penalty != 1.0
                     else None)  # [1, V]
        self.json = JsonConstraint(tokenizer, texts) if job.json_mode else None

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: these rows share one batched argmax."""
        return self.greedy and self.seen is None and self.json is None

    def choose(self, logits: Tensor) -> int:
        """logits [V] float32 -> the next token, with the request's sampling settings."""
        cfg = self.job.config
        processed = process_logits(logits[None], cfg, self.seen)  # [1, V]
        if self.json is not None:
            return self.json.choose(processed[0], self.greedy, self.generator, self.budget - len(self.ids))
        return int(select_next(processed, cfg, self.generator)[0])

    def push(self, token: int) -> str:
        """Take a new token; -> the text that can go out now (held back: a possible stop string, a partial
        character)."""
        self.ids.append(token)
        if self.seen is not None:
            self.seen[0, token] = True
        if token in self.stop_ids:
            return self._finish("stop")
        before = len(self.text)
        self.text += self.decoder.push(token)
        if self.stops:  # a new stop string can only end in the new text
            cut = find_stop(self.text, self.stops, max(0, before - self.max_stop + 1))
            if cut >= 0:
                self.text = self.text[:cut]
                return self._finish("stop", flush=False)
        if self.json is not None and self.json.complete:
            return self._finish("stop")
        if len(self.ids) >= self.budget:
            return self._finish("length")
        end = len(self.text) - held_back(self.text, self.stops)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def _finish(self, reason: str, flush: bool = True) -> str:
        if flush:
            self.text += self.decoder.flush()
            cut = find_stop(self.text, self.stops)
            self.text = self.text[:cut] if cut >= 0 else self.text
        self.finish_reason = reason
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


# --------------------------------------------------------------------------------------- scheduler


class Scheduler:
    """Owns the model, its cache pool and the loop thread; `submit` is thread-safe."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, *, max_batch: int, context: int,
                 router: AdapterRouter | None = None, metrics: Metrics | None = None,
                 max_queue: int = 256, prefill_tokens: int = 2048) -> None:
        if getattr(model.config, "family", "decoder") != "decoder":
            raise LmstackError("serve needs a decoder-only model")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.context = max_batch, context
        self.router = router or AdapterRouter()
        self.metrics = metrics or Metrics()
        self.max_queue, self.prefill_tokens = max_queue, prefill_tokens
        self.device = model.device
        self.vocab_size = model.config.vocab_size
        self.reference = Generator(model, tokenizer)  # stop ids, stop strings and chat prompts as generate does
        self.pad_id = self.reference.adapter.pad_id
        model.setup_cache(max_batch, context)  # the pool: [max_batch, Hkv, S, D] per layer
        self.active: list[_Seq] = []  # row i of the pool holds active[i]
        self.waiting: collections.deque[Job] = collections.deque()
        self.lock = threading.Condition()
        self._texts: list[str] | None = None  # token texts, built at the first JSON-mode request
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name="lmstack-scheduler", daemon=True)

    # ----------------------------------------------------------------------------------- public

    def start(self) -> None:
        self.thread.start()

    def shutdown(self) -> None:
        with self.lock:
            self._stop = True
            self.lock.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return self.reference.chat_prompt(messages)

    def stops(self, config: GenerationConfig) -> tuple[list[str], set[int]]:
        return self.reference._stops(config)

    def prepare_json_mode(self) -> None:
        """Decode every token's text once (about a second for a 50k vocabulary), for JSON-mode requests."""
        if self._texts is None:
            self._texts = token_texts(self.tokenizer)

    def submit(self, job: Job) -> None:
        """Queue a job (the caller validated its sizes); LmstackError when the queue is full."""
        if job.json_mode:
            self.prepare_json_mode()
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise LmstackError("the request queue is full")
            self.waiting.append(job)
            self.metrics.queue_depth.set(len(self.waiting))
            self.lock.notify_all()

    @property
    def load(self) -> tuple[int, int]:
        """(waiting jobs, active sequences)."""
        return len(self.waiting), len(self.active)

    # ------------------------------------------------------------------------------------- loop

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.lock:
                while not self._stop and not self.waiting and not self.active:
                    self.lock.wait(timeout=1.0)
                if self._stop:
                    break
            try:
                with torch.inference_mode():
                    self._retire_cancelled()
                    self._admit()
                    if self.active:
                        self._decode_step()
            except Exception as e:  # a bug must not kill the server: fail the affected requests, keep going
                traceback.print_exc(file=sys.stderr)
                self._fail_all(f"internal error in the scheduler ({type(e).__name__})")
        self._fail_all("the server is shutting down")

    def _fail_all(self, message: str) -> None:
        jobs = {id(s.job): s.job for s in self.active}
        with self.lock:
            jobs.update({id(j): j for j in self.waiting})
            self.waiting.clear()
        self.active = []
        for job in jobs.values():
            _emit(job, Error(message))
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.running.set(len(self.active))

    # ---------------------------------------------------------------------------------- caching

    def _install(self, rows: slice, length: int) -> None:
        """Run the next forward over a view of the pool: `rows` and the first `length` slots."""
        self.model.use_cache_rows(rows, length)

    def _copy_row(self, src: int, dst: int, length: int) -> None:
        self.model.copy_cache_row(src, dst, length)

    def _retire(self, row: int) -> None:
        """Free `row`: the last active row moves into it (only its used slots are copied)."""
        last = len(self.active) - 1
        if row != last:
            self._copy_row(last, row, self.active[last].pos)
            self.active[row] = self.active[last]
        self.active.pop()

    def _retire_cancelled(self) -> None:
        for row in range(len(self.active) - 1, -1, -1):
            if self.active[row].job.cancelled.is_set():
                self._retire(row)
        with self.lock:
            kept = [j for j in self.waiting if not j.cancelled.is_set()]
            if len(kept) != len(self.waiting):
                self.waiting = collections.deque(kept)
        self._update_gauges()

    # ---------------------------------------------------------------------------------- prefill

    def _admit(self) -> None:
        """Prefill the waiting jobs that fit in the free rows (and the per-iteration token budget)."""
        jobs: list[Job] = []
        free = self.max_batch - len(self.active)
        with self.lock:
            while self.waiting:
                job = self.waiting[0]
                width = max([len(job.prompt_ids), *(len(j.prompt_ids) for j in jobs)])
                if job.n > free or (jobs and width * (len(jobs) + 1) > self.prefill_tokens):
                    break
                jobs.append(self.waiting.popleft())
                free -= job.n
            self.metrics.queue_depth.set(len(self.waiting))
        if not jobs:
            return
        logits = self._prefill(jobs)  # [k, V]
        start = len(self.active)
        seqs: list[tuple[int, _Seq]] = []  # (job number, sequence)
        for j, job in enumerate(jobs):
            stops, stop_ids = self.stops(job.config)
            budget = min(job.config.max_new_tokens, self.context - len(job.prompt_ids))
            seqs += [(j, _Seq(job, i, self.tokenizer, stops, stop_ids, budget, self.vocab_size, self._texts,
                              self.device)) for i in range(job.n)]
            self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        # Choice 0 of job j sits in row start + j, where its prompt was prefilled; other choices copy that row.
        self.active += [seq for _, seq in seqs if seq.index == 0]
        for j, seq in seqs:
            if seq.index > 0:
                self._copy_row(start + j, len(self.active), len(jobs[j].prompt_ids))
                self.active.append(seq)
        for j, seq in seqs:
            self._advance(seq, logits[j])
        self._retire_finished()

    def _prefill(self, jobs: list[Job]) -> Tensor:
        """Write the prompts of `jobs` into the next free rows; -> logits of each first new token [k, V]."""
        k, T = len(jobs), max(len(j.prompt_ids) for j in jobs)
        start = len(self.active)
        tokens = torch.tensor([j.prompt_ids + [self.pad_id] * (T - len(j.prompt_ids)) for j in jobs],
                              device=self.device)  # [k, T], right-padded: pads only see (and spoil) later slots
        self._install(slice(start, start + k), T)
        self.router.set_rows([j.adapter for j in jobs], self.device)
        hidden = self.model(tokens, input_pos=torch.arange(T, device=self.device), return_hidden=True)  # [k, T, C]
        last = torch.tensor([len(j.prompt_ids) - 1 for j in jobs], device=self.device)
        hidden = hidden[torch.arange(k, device=self.device), last]  # [k, C]: each prompt's last token
        return self.model.head(hidden).float()  # [k, V]

    # ----------------------------------------------------------------------------------- decode

    def _decode_step(self) -> None:
        seqs = self.active
        n = len(seqs)
        length = min(self.context, -(-(max(s.pos for s in seqs) + 1) // SLOT_BUCKET) * SLOT_BUCKET)
        self._install(slice(0, n), length)
        self.router.set_rows([s.job.adapter for s in seqs], self.device)
        tokens = torch.tensor([[s.ids[-1]] for s in seqs], device=self.device)  # [n, 1]
        input_pos = torch.tensor([[s.pos] for s in seqs], device=self.device)  # [n, 1]: each row's own slot
        started = time.perf_counter()
        with single_row_matmuls(n, self.device, self.model.dtype):
            logits = self.model(tokens, input_pos=input_pos)[:, -1].float()  # [n, V]
        for s in seqs:
            s.pos += 1
        greedy = [i for i, s in enumerate(seqs) if s.plain_greedy and s.job.logprobs is None]
        argmax = dict(zip(greedy, logits[greedy].argmax(dim=-1).tolist())) if greedy else {}
        for i, seq in enumerate(seqs):
            self._advance(seq, logits[i], argmax.get(i))
        self.metrics.observe_step(n, time.perf_counter() - started)
        self._retire_finished()

    def _advance(self, seq: _Seq, logits: Tensor, token: int | None = None) -> None:
        """Choose seq's next token from logits [V], record it, and emit what can go out."""
        job = seq.job
        if job.cancelled.is_set():
            seq.finish_reason = "cancelled"
            return
        if token is None:
            token = int(logits.argmax()) if seq.plain_greedy else seq.choose(logits)
        info: list[TokenLogprob] = []
        if job.logprobs is not None and token not in seq.stop_ids:
            info.append(self._logprob(logits, token, job.logprobs))
        text = seq.push(token)
        self.metrics.completion_tokens.inc()
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
            self.metrics.ttft.observe(job.first_token_at - job.submitted)
        if text or info:
            _emit(job, Delta(seq.index, text, info))
        if seq.finish_reason is not None:
            job.finished += 1
            _emit(job, Finish(seq.index, seq.finish_reason, seq.text, len(seq.ids)))

    def _logprob(self, logits: Tensor, token: int, top: int) -> TokenLogprob:
        logp = torch.log_softmax(logits, dim=-1)  # [V]: the model's distribution, before sampling filters
        alternatives: list[tuple[str, float]] = []
        if top > 0:
            values, ids = torch.topk(logp, top)
            alternatives = [(self.tokenizer.decode([i]), v) for i, v in zip(ids.tolist(), values.tolist())]
        return TokenLogprob(self.tokenizer.decode([token]), float(logp[token]), alternatives)

    def _retire_finished(self) -> None:
        for row in range(len(self.active) - 1, -1, -1):
            if self.active[row].finish_reason is not None:
                self._retire(row)
        self._update_gauges()
