"""Continuous batching: one scheduler thread drives the shared decode engine over a pool of KV-cache rows.

The pool is the model's static cache [max_batch, Hkv, S, D] per layer. Every sequence (one choice of one
request) owns a row and its own length. Each iteration of the loop

1. retires cancelled sequences,
2. admits waiting requests into free rows: their prompts are prefilled together (`DecodeEngine.prefill`,
   right-padded, a bounded number of tokens per iteration), and a request with n > 1 choices copies its
   prefilled row n - 1 times,
3. decodes one token for every active row in one forward (`DecodeEngine.decode`: each row at its own cache
   slot, over the first L slots, L = the longest row, bucketed),
4. retires finished rows by moving the last active row into the hole (its used slots only), which keeps the
   active rows at the front of the pool.

The scheduler owns only the thread, the queue, admission, cancellation and the events. Sampling, stopping,
streamed text and log-probs are `lmstack.generation.Sequence`'s, and the forward passes are the engine's: the
same code `Generator` runs, so the server samples exactly as `generate` does (every sequence has its own
`torch.Generator`: a seed gives the same text alone or in a batch). Requests for different LoRA adapters share
the batch: `serving.lora.MultiLoRALinear` applies each adapter to its own rows.

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
from torch import nn

from lmstack.errors import LmstackError
from lmstack.generation.constraints import JsonConstraint, constraint_for, token_texts
from lmstack.generation.engine import DecodeEngine, pad_id
from lmstack.generation.generator import chat_prompt
from lmstack.generation.sampling import GenerationConfig, Sequence, TokenLogprob, choose_tokens, stop_token_ids
from lmstack.serving.lora import AdapterRouter
from lmstack.serving.metrics import Metrics
from lmstack.tokenizer import Tokenizer

# ------------------------------------------------------------------------------------------ events


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


# --------------------------------------------------------------------------------------- scheduler


class Scheduler:
    """Owns the model's cache pool (through the engine) and the loop thread; `submit` is thread-safe."""

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
        self.engine = DecodeEngine(model, pad_id(model, tokenizer))
        self.engine.reserve(max_batch, context)  # the pool: [max_batch, Hkv, S, D] per layer
        self.active: list[tuple[Job, Sequence]] = []  # row i of the pool holds active[i]
        self.waiting: collections.deque[Job] = collections.deque()
        self.lock = threading.Condition()
        self._texts: list[str] | None = None  # token texts, built at the first JSON- or copy-mode request
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
        return chat_prompt(self.tokenizer, messages)

    def prepare_token_texts(self) -> None:
        """Decode every token's text once (about a second for a 50k vocabulary), for JSON- and copy-mode
        requests."""
        if self._texts is None:
            self._texts = token_texts(self.tokenizer)

    def submit(self, job: Job) -> None:
        """Queue a job (the caller validated its sizes); LmstackError when the queue is full."""
        if job.json_mode or job.config.json_mode or job.config.copy_from:
            self.prepare_token_texts()
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
        jobs = {id(job): job for job, _ in self.active}
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

    # ------------------------------------------------------------------------------------- rows

    def _sequence(self, job: Job, index: int) -> Sequence:
        """Choice `index` of `job`: the shared per-sequence state, with the job's settings."""
        cfg = job.config
        stop_ids = stop_token_ids(self.tokenizer, getattr(self.model.config, "eos_token_id", None), cfg.stop)
        constraint = (JsonConstraint(self.tokenizer, self._texts) if job.json_mode
                      else constraint_for(cfg, self.tokenizer, self._texts, stop_ids))
        return Sequence(cfg, context=job.prompt_ids, tokenizer=self.tokenizer, stop_ids=stop_ids,
                        budget=min(cfg.max_new_tokens, self.context - len(job.prompt_ids)),
                        vocab_size=self.vocab_size, device=self.device, index=index, logprobs=job.logprobs,
                        constraint=constraint)

    @staticmethod
    def _written(job: Job, seq: Sequence) -> int:
        """Cache slots a row has written: the prompt and every token fed back (all but the newest)."""
        return len(job.prompt_ids) + max(len(seq.ids) - 1, 0)

    def _retire(self, row: int) -> None:
        """Free `row`: the last active row moves into it (only its used slots are copied)."""
        last = len(self.active) - 1
        if row != last:
            self.engine.copy_row(last, row, self._written(*self.active[last]))
            self.active[row] = self.active[last]
        self.active.pop()

    def _retire_cancelled(self) -> None:
        for row in range(len(self.active) - 1, -1, -1):
            if self.active[row][0].cancelled.is_set():
                self._retire(row)
        with self.lock:
            kept = [j for j in self.waiting if not j.cancelled.is_set()]
            if len(kept) != len(self.waiting):
                self.waiting = collections.deque(kept)
        self._update_gauges()

    def _retire_finished(self) -> None:
        for row in range(len(self.active) - 1, -1, -1):
            if self.active[row][1].finish_reason is not None:
                self._retire(row)
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
        start = len(self.active)
        self.router.set_rows([j.adapter for j in jobs], self.device)
        logits = self.engine.prefill(start, [j.prompt_ids for j in jobs])  # [k, V]
        seqs = [(j, self._sequence(job, i)) for j, job in enumerate(jobs) for i in range(job.n)]
        for job in jobs:
            self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        # Choice 0 of job j sits in row start + j, where its prompt was prefilled; other choices copy that row.
        self.active += [(jobs[j], seq) for j, seq in seqs if seq.index == 0]
        for j, seq in seqs:
            if seq.index > 0:
                self.engine.copy_row(start + j, len(self.active), len(jobs[j].prompt_ids))
                self.active.append((jobs[j], seq))
        for j, seq in seqs:
            self._advance(jobs[j], seq, logits[j], None)
        self._retire_finished()

    # ----------------------------------------------------------------------------------- decode

    def _decode_step(self) -> None:
        n = len(self.active)
        self.router.set_rows([job.adapter for job, _ in self.active], self.device)
        started = time.perf_counter()
        logits = self.engine.decode([seq.ids[-1] for _, seq in self.active],
                                    [self._written(job, seq) for job, seq in self.active])  # [n, V]
        tokens = choose_tokens([seq for _, seq in self.active], logits)
        for i, (job, seq) in enumerate(self.active):
            self._advance(job, seq, logits[i], tokens[i])
        self.metrics.observe_step(n, time.perf_counter() - started)
        self._retire_finished()

    def _advance(self, job: Job, seq: Sequence, logits: torch.Tensor, token: int | None) -> None:
        """Choose seq's next token from logits [V], record it, and emit what can go out."""
        if job.cancelled.is_set():
            seq.finish_reason = "cancelled"
            return
        text, info = seq.advance(logits, token)
        self.metrics.completion_tokens.inc()
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
            self.metrics.ttft.observe(job.first_token_at - job.submitted)
        if text or info is not None:
            _emit(job, Delta(seq.index, text, [info] if info is not None else []))
        if seq.finish_reason is not None:
            job.finished += 1
            _emit(job, Finish(seq.index, seq.finish_reason, seq.text, len(seq.ids)))
