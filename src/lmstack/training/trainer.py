"""The one training loop. Every method (pretraining, fine-tuning, PEFT, reward models, DPO, distillation) plugs in
an objective and a batch source; loss normalization, gradient accumulation, token counting, precision,
evaluation, logging and checkpointing live here and nowhere else.

Loss normalization: an objective returns the *sum* of per-token losses and the number of target tokens. Each
micro-batch backpropagates its sum; after the last micro-batch the gradients are scaled by 1 / (target tokens in
the whole step, across all ranks). So 4 micro-batches of 8 and 1 of 32 give the same gradient, and so do 2 ranks
with 2 micro-batches each.

Batches are pure functions of (step, micro-batch index), so "data position" is just the step: resuming restores
model, optimizer, schedule, RNG and step, and the run continues exactly as if never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from lmstack.errors import LmstackError
from lmstack.io import atomic_write_text
from lmstack.runconfig import option_group
from lmstack.training import flops
from lmstack.training import state as ckpt
from lmstack.training.optim import lr_at, make_optimizer


class LossOutput(NamedTuple):
    loss_sum: Tensor  # scalar, sum of per-token losses over the micro-batch
    n_targets: Tensor  # scalar, number of tokens the loss covers
    n_tokens: int  # tokens the model processed (inputs), for throughput


class Objective(Protocol):
    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput: ...


class BatchSource(Protocol):
    """Deterministic batches: the same (step, index) always gives the same batch."""

    seq_len: int

    def train_batch(self, step: int, index: int, batch_size: int) -> dict[str, Tensor]: ...

    def val_batch(self, index: int, batch_size: int) -> dict[str, Tensor]: ...


@dataclass
class TrainConfig:
    """The trainer's settings; `TrainOptions` below turns them into the CLI options and YAML `train:` keys that
    pretrain, finetune and align share, so a new setting here is a new option everywhere.

    Args:
        out_dir: run folder (the verbs set it from --out).
        max_steps: optimizer steps.
        max_tokens: stop after this many tokens.
        max_time: stop after this many seconds, with a checkpoint.
        batch_size: sequences per optimizer step, over all ranks.
        micro_batch_size: sequences per forward pass (gradient accumulation makes up the rest).
        lr: peak learning rate.
        min_lr: learning rate at the end of the cosine decay.
        warmup_steps: linear warmup steps.
        decay_steps: steps of the cosine decay (default max_steps).
        weight_decay: AdamW weight decay (matrices only).
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        grad_clip: gradient norm clipping (0 = off).
        precision: fp32 or bf16 (autocast).
        compile: torch.compile the training step.
        eval_every: steps between evaluations on val.
        eval_batches: batches per evaluation.
        early_stopping_patience: stop after this many evaluations without a better val loss.
        save_every: steps between checkpoints (default eval_every).
        keep_last: checkpoints to keep.
        log_every: steps between logged training losses.
        seed: random seed (data order, init).
        peak_flops: the device's peak FLOP/s for MFU (default: measured at start).
        progress: show a progress bar.
    """

    out_dir: str = "runs/default"
    max_steps: int = 1000
    max_tokens: int | None = None
    max_time: float | None = None  # seconds of training before a clean stop (with a checkpoint)
    batch_size: int = 32  # sequences per optimizer step, over all ranks
    micro_batch_size: int | None = None  # per forward pass; None = batch_size / world size
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int | None = None  # None = max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"  # autocast dtype
    compile: bool = False
    eval_every: int = 250
    eval_batches: int = 20
    early_stopping_patience: int | None = None  # evals without a new best val loss
    save_every: int | None = None  # None = eval_every
    keep_last: int = 2
    log_every: int = 10
    seed: int = 1337
    peak_flops: float | None = None  # for MFU; None = measured at start
    progress: bool = True

    def validate(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise LmstackError(f"precision must be fp32 or bf16, not {self.precision!r}")
        for name in ("max_steps", "batch_size", "eval_every", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise LmstackError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise LmstackError(f"lr must be > 0, got {self.lr}")

    # keys that may change between a run and its resumption
    RESUMABLE_CHANGES = frozenset({"max_steps", "max_tokens", "max_time", "progress", "eval_every", "save_every",
                                   "keep_last", "log_every", "peak_flops", "compile", "out_dir",
                                   "early_stopping_patience", "eval_batches"})


# The trainer's settings as an option group (each field `T | None`, None = not given; --out gives out_dir).
TrainOptions = option_group(TrainConfig, exclude={"out_dir"}, name="TrainOptions")


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(x: Tensor) -> Tensor:
    if world()[1] > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@dataclass
class TrainResult:
    step: int
    train_loss: float
    best_val_loss: float | None
    stop_reason: str
    elapsed_s: float
    tokens: int


class Trainer:
    """Runs `objective` on batches from `data`, optimizing the parameters of `model` that require grad.

    `model` is what the objective calls (possibly DDP/FSDP-wrapped); `state_model` is the unwrapped module whose
    trainable weights are checkpointed (for LoRA, only the adapter). `run_config` is the user's whole config,
    saved with every checkpoint so a resume with different settings is refused by name. `extra_eval(trainer)`
    adds its fields to every evaluation record (e.g. per-task val losses of a mixture, through `loss_on`).
    """

    def __init__(self, model: nn.Module, objective: Objective, data: BatchSource, config: TrainConfig,
                 run_config: dict[str, Any] | None = None, state_model: nn.Module | None = None,
                 on_save: Callable[[Path], None] | None = None,
                 extra_eval: Callable[[Trainer], dict[str, Any]] | None = None) -> None:
        config.validate()
        self.model, self.objective, self.data, self.config = model, objective, data, config
        self.state_model = state_model or model
        self.run_config = run_config or {}
        self.on_save = on_save
        self.extra_eval = extra_eval
        self.rank, self.world_size = world()
        micro = config.micro_batch_size or max(1, config.batch_size // self.world_size)
        if config.batch_size % (micro * self.world_size):
            raise LmstackError(f"batch_size {config.batch_size} is not a multiple of micro_batch_size {micro} x "
                               f"{self.world_size} ranks")
        self.micro_batch_size = micro
        self.accum = config.batch_size // (micro * self.world_size)
        self.out = Path(config.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise LmstackError("nothing to train: no parameter requires grad")
        self.optimizer = make_optimizer(self.model, config.lr, config.weight_decay, (config.beta1, config.beta2))
        self.step = 0
        self.tokens = 0
        self.best_val: float | None = None
        self.evals_since_best = 0
        self.device = next(iter(self.params)).device
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if config.precision == "bf16"
                         else contextlib.nullcontext())
        self.forward = torch.compile(self.objective) if config.compile else self.objective
        self.flops_per_token = flops.model_train_flops_per_token(self.state_model, getattr(data, "seq_len", 0))
        self.peak_flops = config.peak_flops
        self.peak_source = "TrainConfig.peak_flops"
        self._mfu_warned = False
        self.history: list[dict[str, Any]] = []
        self._tb = None

    # ---------------------------------------------------------------------------------- one step

    def accumulate_gradients(self, step: int) -> tuple[float, int]:
        """Forward/backward every micro-batch of `step`; returns (mean loss per target token, tokens seen)."""
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        n_targets = torch.zeros((), device=self.device)
        n_tokens = 0
        first = self.rank * self.accum
        for i in range(self.accum):
            batch = self._to_device(self.data.train_batch(step, first + i, self.micro_batch_size))
            sync = i == self.accum - 1
            no_sync = getattr(self.model, "no_sync", None)
            ctx = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
            with ctx:
                with self.autocast:
                    out = self.forward(self.model, batch)
                out.loss_sum.float().backward()
            loss_sum += out.loss_sum.detach().float()
            n_targets += out.n_targets.detach().float()
            n_tokens += out.n_tokens
        totals = _all_reduce_sum(torch.stack([loss_sum, n_targets]))
        if totals[1] <= 0:
            raise LmstackError(f"step {step}: the batch has no target tokens (all labels masked)")
        # DDP and FSDP average gradients over ranks; undo that, then divide by the global target count.
        scale = self.world_size / totals[1]
        grads = [p.grad for p in self.params if p.grad is not None]
        torch._foreach_mul_(grads, scale.to(grads[0].dtype) if grads else scale)
        return (totals[0] / totals[1]).item(), n_tokens * self.world_size

    def optimizer_step(self, step: int) -> float:
        cfg = self.config
        lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.decay_steps or cfg.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    # ---------------------------------------------------------------------------------------- eval

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        totals = torch.zeros(2, device=self.device)
        for i in range(self.config.eval_batches):
            if i % self.world_size != self.rank:
                continue
            batch = self._to_device(self.data.val_batch(i, self.micro_batch_size))
            with self.autocast:
                out = self.objective(self.model, batch)
            totals += torch.stack([out.loss_sum.float(), out.n_targets.float()])
        totals = _all_reduce_sum(totals)
        self.model.train()
        return (totals[0] / totals[1].clamp(min=1)).item()

    @torch.no_grad()
    def loss_on(self, batches: list[dict[str, Tensor]]) -> float:
        """Mean loss per target token over `batches`, on this process (for extra_eval)."""
        self.model.eval()
        totals = torch.zeros(2, device=self.device)
        for batch in batches:
            with self.autocast:
                out = self.objective(self.model, self._to_device(batch))
            totals += torch.stack([out.loss_sum.float(), out.n_targets.float()])
        self.model.train()
        return (totals[0] / totals[1].clamp(min=1)).item()

    # ----------------------------------------------------------------------------------- the loop

    def fit(self, resume: bool = True) -> TrainResult:
        cfg = self.config
        if resume:
            self.resume()
        else:
            self.start_over()
        if self.peak_flops is None:  # the peak of the dtype the matmuls run in
            peak = flops.peak_flops(self._matmul_dtype(), self.device.type)
            self.peak_flops, self.peak_source = peak.flops, peak.source
        self.out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        window_tokens, window_start, window_losses = 0, time.perf_counter(), []
        last_loss, stop_reason = float("nan"), "max_steps"
        bar = self._progress_bar()
        while self.step < cfg.max_steps:
            step = self.step
            loss, n_tokens = self.accumulate_gradients(step)
            if not math.isfinite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                last = ckpt.latest_checkpoint(self.ckpt_dir)
                kept = f"the last good checkpoint is {last.path}" if last else "no checkpoint was written yet"
                raise LmstackError(f"loss is {loss} at step {step}; stopping ({kept})")
            lr = self.optimizer_step(step)
            self.step, self.tokens = step + 1, self.tokens + n_tokens
            last_loss = loss
            window_losses.append(loss)
            window_tokens += n_tokens
            elapsed = time.perf_counter() - start
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                rate = window_tokens / max(1e-9, time.perf_counter() - window_start)
                mfu = self._mfu(rate)
                self._tensorboard({"train/loss": loss, "train/lr": lr, "train/tokens_per_s": rate, "train/mfu": mfu})
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", mfu=f"{mfu:.1%}" if mfu <= 1 else "?")
            if bar is not None:
                bar.update(1)
            done = self._stop_reason(elapsed)
            if self.step % cfg.eval_every == 0 or done or self.step == cfg.max_steps:
                val = self.evaluate()
                rate = window_tokens / max(1e-9, time.perf_counter() - window_start)
                record = {"step": self.step, "train_loss": sum(window_losses) / len(window_losses),
                          "val_loss": val, "val_ppl": math.exp(min(val, 50.0)), "tokens_per_s": rate,
                          "elapsed_s": elapsed, "lr": lr, "tokens": self.tokens,
                          "mfu": self._mfu(rate)}
                if record["mfu"] > 1:
                    record["mfu_warning"] = f"above 1: the peak FLOP/s ({self.peak_source}) is too low"
                if self.extra_eval is not None:
                    record.update(self.extra_eval(self))
                self._log_eval(record)
                window_tokens, window_start, window_losses = 0, time.perf_counter(), []
                if self.best_val is None or val < self.best_val:
                    self.best_val, self.evals_since_best = val, 0
                else:
                    self.evals_since_best += 1
                if cfg.early_stopping_patience and self.evals_since_best >= cfg.early_stopping_patience:
                    done = done or "early_stopping"
            save_every = cfg.save_every or cfg.eval_every
            if self.step % save_every == 0 or done or self.step == cfg.max_steps:
                self.save()
            if done:
                stop_reason = done
                break
        if bar is not None:
            bar.close()
        self._finish()
        return TrainResult(step=self.step, train_loss=last_loss, best_val_loss=self.best_val,
                           stop_reason=stop_reason, elapsed_s=time.perf_counter() - start, tokens=self.tokens)

    def _matmul_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.config.precision == "bf16" else torch.float32

    def _mfu(self, tokens_per_s: float) -> float:
        """Model FLOP utilization; above 1 the peak is wrong, which is said once on stderr (and a cached peak is
        dropped, so the next run measures it again)."""
        if not self.peak_flops:
            return 0.0
        mfu = tokens_per_s * self.flops_per_token / self.peak_flops
        if mfu > 1 and not self._mfu_warned:
            self._mfu_warned = True
            if self.peak_source.startswith(("cached", "measured")):
                flops.forget_peak_flops(self._matmul_dtype(), self.device.type)
            if self.rank == 0:
                print(f"warning: MFU {mfu:.0%} is above 100%, so the peak of {self.peak_flops / 1e9:,.1f} GFLOP/s "
                      f"({self.peak_source}) is too low; set peak_flops or {flops.PEAK_FLOPS_ENV}, or run "
                      "bench/peak_flops.py --save", file=sys.stderr)
        return mfu

    def _stop_reason(self, elapsed: float) -> str | None:
        cfg = self.config
        if cfg.max_tokens is not None and self.tokens >= cfg.max_tokens:
            return "max_tokens"
        if cfg.max_time is not None and elapsed >= cfg.max_time:
            return "max_time"
        return None

    # -------------------------------------------------------------------------------- checkpoints

    def trainable_state(self) -> dict[str, Tensor]:
        """Full (unsharded) trainable weights; a collective call under FSDP, so every rank must make it."""
        named = {n for n, p in self.state_model.named_parameters() if p.requires_grad}
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v for k, v in state.items() if k in named}

    def save(self) -> Path | None:
        state = {"config": dataclasses.asdict(self.config), "run_config": self.run_config, "tokens": self.tokens,
                 "best_val": self.best_val, "evals_since_best": self.evals_since_best}
        # Gathered into full tensors keyed by parameter name, so any world size can resume from it.
        model_state = self.trainable_state()
        optim_state = get_optimizer_state_dict(self.model, self.optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        try:
            path = ckpt.save_checkpoint(self.ckpt_dir, self.step, model_state, optim_state, state,
                                        self.config.keep_last)
        except OSError as e:
            last = ckpt.latest_checkpoint(self.ckpt_dir)
            kept = f"{last.path} is intact" if last else "no earlier checkpoint exists"
            raise LmstackError(f"cannot write checkpoint for step {self.step} ({e.strerror or e}); {kept}") from None
        if self.on_save is not None:
            self.on_save(path)
        return path

    def resume(self) -> bool:
        """Continue from the newest intact checkpoint in out_dir, if any; when checkpoints exist but none is
        intact, stop (fit(resume=False) starts over)."""
        last = ckpt.latest_checkpoint(self.ckpt_dir)
        if last is None:
            found = ckpt.list_checkpoints(self.ckpt_dir)
            if found:
                raise LmstackError(f"no intact checkpoint to resume from in {self.ckpt_dir}: "
                                   f"{', '.join(p.name for p in found)} are all incomplete or corrupt; "
                                   "pass --no-resume (resume=False) to start over from step 0")
            self._drop_metrics_after(0)  # a run killed before its first save logged evals it will replay
            return False
        ckpt.require_no_diff(last.state["config"], dataclasses.asdict(self.config),
                             set(TrainConfig.RESUMABLE_CHANGES), last.path)
        ckpt.require_no_diff(last.state.get("run_config", {}), self.run_config,
                             {"max_steps", "max_tokens", "max_time", "out", "out_dir", "progress", "resume"},
                             last.path)
        model_state, optim_state, rng = ckpt.load_checkpoint_tensors(last)
        named = {n for n, p in self.state_model.named_parameters() if p.requires_grad}
        missing = named - set(model_state)
        if missing:
            raise LmstackError(f"{last.path}: checkpoint lacks trainable weights {sorted(missing)[:3]}")
        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, model_state, options=full)
        set_optimizer_state_dict(self.model, self.optimizer, optim_state, options=full)
        ckpt.set_rng_state(rng)
        self.step = last.step
        self.tokens = int(last.state.get("tokens", 0))
        self.best_val = last.state.get("best_val")
        self.evals_since_best = int(last.state.get("evals_since_best", 0))
        # Evals logged after this checkpoint (by a run killed before its next save) are replayed, so drop them.
        self._drop_metrics_after(self.step)
        if self.rank == 0:
            print(f"resuming from step {self.step} (checkpoint {last.path})", file=sys.stderr)
        return True

    def start_over(self) -> None:
        """Train from step 0 in an out_dir that may hold an earlier run: its checkpoints and metrics go, so a
        later resume cannot pick up the old run's steps and metrics.jsonl holds each step once."""
        old = ckpt.list_checkpoints(self.ckpt_dir)
        if self.rank != 0:
            return
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        self._drop_metrics_after(0)
        if old:
            print(f"starting over: removed {len(old)} checkpoint(s) of the earlier run in {self.ckpt_dir}",
                  file=sys.stderr)

    def _drop_metrics_after(self, step: int) -> None:
        metrics = self.out / "metrics.jsonl"
        if self.rank == 0 and metrics.exists():
            kept = [r for r in read_metrics(metrics) if r["step"] <= step]
            atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in kept))

    # ------------------------------------------------------------------------------------ logging

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def _progress_bar(self):
        if not self.config.progress or self.rank != 0:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=self.config.max_steps, initial=self.step, desc="train", dynamic_ncols=True)

    def _tensorboard(self, scalars: dict[str, float]) -> None:
        if self.rank != 0:
            return
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is in the `train` extra
                self._tb = False
                return
            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        if self._tb:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, self.step)

    def _log_eval(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self._tensorboard({"val/loss": record["val_loss"], "val/ppl": record["val_ppl"]})
        if self.rank != 0:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _finish(self) -> None:
        if self.rank != 0:
            return
        if self._tb:
            self._tb.close()
        plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, png_path: Path) -> Path | None:
    """Train and val loss against step, from metrics.jsonl (matplotlib, in the `train` extra)."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, [r["train_loss"] for r in records], label="train")
    ax.plot(steps, [r["val_loss"] for r in records], label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path

