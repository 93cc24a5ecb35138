"""GPT-2-124M-shaped causal pretraining on a GPU: lmstack's trainer against a plain transformers GPT2LMHeadModel in
a nanoGPT-style loop, with the same shape, data, batch, optimizer and precision, in one process.

    python bench/gpu_pretrain.py [--compile] [--steps 40] [--warmup 10] [--batch-size 16] [--seq-len 1024]
                                 [--shards DIR] [--out-dir DIR] [--no-record] [--set key=value ...]
    python bench/gpu_pretrain.py --device cpu --steps 3 --warmup 2 --batch-size 2 --seq-len 32 \\
                                 --set n_layer=2 --set n_head=2 --set d_model=64 --no-record     # a CPU check

Data: tinyshakespeare with a char tokenizer (configs/shakespeare-char-cpu.yaml's `prepare:` recipe), made into
shards once; the vocabulary (68) is padded to a multiple of 64 on both sides. lmstack runs `pretrain` (preset
gpt2-124m) as the CLI does, through a trainer subclass that only notes when each step's backward is done
(accumulate_gradients ends in .item(), so the device has finished). The peer trains GPT2LMHeadModel (dropout 0,
SDPA attention) on the very same batches (lmstack's batch source is a pure function of the step), with the same
fused AdamW (decay on matrices), learning-rate schedule, gradient clipping, bf16 autocast and, with --compile,
one torch.compile over forward and loss, as nanoGPT compiles its model with the loss inside. Both read the loss
with .item() every step, as the trainer does.

Reported per side: the median step time over the timed steps (after --warmup), tokens/s, MFU against the bf16
matmul peak measured in the same run, and the last step's training loss (the same batch on both sides); with
lmstack/peer ratios. MFU counts FLOPs per token as lmstack's trainer does (training/flops.py: 6 N + 12 L d T)
for both, N being the matmul parameters, which the two models share.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import record, section  # noqa: E402

from lmstack.config import DecoderConfig, from_name  # noqa: E402
from lmstack.data.batching import TokenShards  # noqa: E402
from lmstack.runconfig import data_root  # noqa: E402
from lmstack.training import pretrain as pretrain_module  # noqa: E402
from lmstack.training.flops import matmul_params, measure_peak_flops  # noqa: E402
from lmstack.training.optim import lr_at  # noqa: E402
from lmstack.training.trainer import Trainer, TrainOptions  # noqa: E402

PRESET = "gpt2-124m"
LR, MIN_LR, BETAS, WEIGHT_DECAY, GRAD_CLIP, SEED = 6e-4, 6e-5, (0.9, 0.95), 0.1, 1.0, 1337  # nanoGPT's GPT-2
EVAL_BATCHES = 4


class TimedTrainer(Trainer):
    """lmstack's trainer, noting when each step's forward and backward are done, and its loss."""

    last: TimedTrainer | None = None  # the one pretrain() made

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ends: list[float] = []
        self.losses: list[float] = []
        TimedTrainer.last = self

    def accumulate_gradients(self, step: int) -> tuple[float, int]:
        loss, tokens = super().accumulate_gradients(step)  # ends in .item(): the device is done with the step
        self.ends.append(time.perf_counter())
        self.losses.append(loss)
        return loss, tokens


def prepare_shards(shards: Path) -> None:
    """Char-level tinyshakespeare shards, as configs/shakespeare-char-cpu.yaml prepares them (`lmstack data
    prepare` with split tail, one document, no dedup)."""
    if (shards / "manifest.json").exists():
        return
    text = data_root() / "tinyshakespeare" / "input.txt"
    prep = pretrain_module.PrepareConfig(inputs=[str(text)], tokenizer="char", split="tail", doc_split="file",
                                         dedup=False, val_fraction=0.1)
    pretrain_module.prepare_from_config(prep, shards)


def model_config(args: argparse.Namespace, vocab: int) -> DecoderConfig:
    """The shape both sides train: the preset with the padded vocabulary and the --set overrides, checked to be
    GPT-2's blocks (the peer can build nothing else)."""
    overrides = pretrain_module.parse_overrides(args.set)
    cfg = from_name(PRESET, **{"vocab_size": vocab, "max_seq_len": max(args.seq_len + 1, 8), **overrides})
    gpt2 = (cfg.positions == "learned" and cfg.norm == "layernorm" and cfg.activation == "gelu_tanh"
            and not cfg.gated_mlp and cfg.attn_bias and cfg.mlp_bias and cfg.tie_embeddings
            and cfg.n_kv_head == cfg.n_head and cfg.head_dim * cfg.n_head == cfg.d_model)
    if not gpt2:
        raise SystemExit(f"--set {' '.join(args.set)}: the peer is GPT-2, so only sizes may change")
    return cfg


def step_stats(ends: list[float], losses: list[float], args: argparse.Namespace) -> dict[str, Any]:
    """Median step time over the timed steps: step i takes ends[i] - ends[i - 1] (its forward and backward and
    the previous step's optimizer update)."""
    times = [b - a for a, b in zip(ends, ends[1:])][args.warmup - 1:]
    step_s = statistics.median(times)
    return {"median_step_ms": step_s * 1e3, "tokens_per_s": args.batch_size * args.seq_len / step_s,
            "final_loss": losses[-1], "timed_steps": len(times), "losses": losses}


def lr_warmup(total: int) -> int:
    return max(1, total // 10)


def train_options(args: argparse.Namespace, peak: float) -> TrainOptions:  # type: ignore[valid-type]
    total = args.warmup + args.steps
    return TrainOptions(max_steps=total, batch_size=args.batch_size, lr=LR, min_lr=MIN_LR,
                        warmup_steps=lr_warmup(total), decay_steps=total, weight_decay=WEIGHT_DECAY,
                        beta1=BETAS[0], beta2=BETAS[1], grad_clip=GRAD_CLIP, precision="bf16",
                        compile=args.compile, eval_every=total, eval_batches=EVAL_BATCHES, log_every=total,
                        seed=SEED, peak_flops=peak, progress=False)


def run_lmstack(args: argparse.Namespace, shards: Path, vocab: int, peak: float) -> dict[str, Any]:
    out = Path(args.work_dir) / f"lmstack-{mode_name(args)}"
    with mock.patch.object(pretrain_module, "Trainer", TimedTrainer):
        result = pretrain_module.pretrain(model=PRESET, shards=str(shards), out=str(out), seq_len=args.seq_len,
                                          train=train_options(args, peak), resume=False,
                                          set=[f"vocab_size={vocab}", *args.set])
    trainer = TimedTrainer.last
    assert trainer is not None
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stats = step_stats(trainer.ends, trainer.losses, args)
    stats.update(flops_per_token=trainer.flops_per_token, matmul_params=matmul_params(trainer.state_model),
                 val_loss=result.best_val_loss, trainer_mfu_whole_run=metrics[-1]["mfu"],
                 checkpoint=str(out / "final"))
    TimedTrainer.last = None  # let the model go before the peer's is built
    return stats


def gpt2_peer(cfg: DecoderConfig, device: torch.device) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                    n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_ff, activation_function="gelu_new",
                    layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                    attn_pdrop=cfg.dropout, bos_token_id=None, eos_token_id=None, use_cache=False,
                    attn_implementation="sdpa")
    torch.manual_seed(SEED)
    return GPT2LMHeadModel(hf).to(device)


def peer_matmul_params(model: nn.Module) -> int:
    """training/flops.py's count for the HF model: matrices but the wte/wpe lookups, plus the tied head."""
    wte = model.transformer.wte.weight
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() >= 2 and ".wte." not in f".{name}"
            and ".wpe." not in f".{name}")
    return n + wte.numel()


def run_peer(args: argparse.Namespace, cfg: DecoderConfig, shards: Path, device: torch.device) -> dict[str, Any]:
    model = gpt2_peer(cfg, device).train()
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=True)
    tok = TokenShards(shards, "train").tokenizer()
    source = pretrain_module.shard_source("causal", shards, args.seq_len, SEED, EVAL_BATCHES, tok, 0)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=x).logits  # [B, T, V]
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))

    step_loss = torch.compile(loss_of) if args.compile else loss_of
    total = args.warmup + args.steps
    ends, losses = [], []
    for step in range(total):
        batch = source.train_batch(step, 0, args.batch_size)
        x, y = (batch[k].to(device, non_blocking=True) for k in ("input_ids", "labels"))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, LR, MIN_LR, lr_warmup(total), total)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = step_loss(x, y)
        loss.backward()
        losses.append(loss.item())
        ends.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {**step_stats(ends, losses, args), "matmul_params": peer_matmul_params(model)}


def mode_name(args: argparse.Namespace) -> str:
    return "compile" if args.compile else "eager"


def table(args: argparse.Namespace, cfg: DecoderConfig, peak: float, ours: dict[str, Any],
          peer: dict[str, Any]) -> tuple[str, dict[str, float]]:
    fpt = ours["flops_per_token"]
    for side in (ours, peer):
        side["mfu"] = side["tokens_per_s"] * fpt / peak
    ratios = {k: ours[k] / peer[k] for k in ("median_step_ms", "tokens_per_s", "mfu", "final_loss")}
    rows = [("median step (ms)", "median_step_ms", "{:.2f}"), ("tokens/s", "tokens_per_s", "{:,.0f}"),
            ("MFU", "mfu", "{:.1%}"), ("final train loss", "final_loss", "{:.4f}")]
    lines = [f"| {mode_name(args)}, bf16 autocast | lmstack | transformers GPT-2 | lmstack / peer |",
             "|---|---|---|---|"]
    lines += [f"| {label} | {fmt.format(ours[key])} | {fmt.format(peer[key])} | {ratios[key]:.3f} |"
              for label, key, fmt in rows]
    same = "the same" if ours["matmul_params"] == peer["matmul_params"] else \
        f"NOT the same ({ours['matmul_params']:,} against {peer['matmul_params']:,})"
    notes = (f"{cfg.n_layer} layers, {cfg.n_head} heads, d_model {cfg.d_model}, char vocabulary padded to "
             f"{cfg.vocab_size}, batch {args.batch_size} x {args.seq_len} tokens; {args.warmup} warm-up then "
             f"{args.steps} timed steps (medians). Matmul parameters: {ours['matmul_params']:,}, {same} on both "
             f"sides; {fpt / 1e6:,.1f} MFLOP per token (lmstack's training/flops.py, both sides). MFU against "
             f"the bf16 matmul peak measured in the same run: {peak / 1e9:,.1f} GFLOP/s. Final loss: the last "
             f"step's batch, the same on both sides (inits differ: lmstack N(0, 0.02) everywhere, GPT-2 scales "
             f"the residual projections). lmstack's own metrics.jsonl MFU over the whole run, warm-up "
             f"{'and compilation ' if args.compile else ''}included: {ours['trainer_mfu_whole_run']:.1%}.")
    return "\n".join(lines) + "\n\n" + notes, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="model overrides for both sides (sizes only), e.g. --set n_layer=2")
    parser.add_argument("--shards", default="runs/bench/gpu_pretrain/shards", help="prepared here if missing")
    parser.add_argument("--work-dir", default="runs/bench/gpu_pretrain", help="lmstack's run folders")
    parser.add_argument("--out-dir", default=None, help="also write gpu_pretrain-MODE.md and .json here")
    parser.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                        help="write the table to docs/benchmarks.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (a step's time is measured from the previous one)")
    if device.type == "cpu" and torch.cuda.is_available():
        parser.error("lmstack's trainer takes the GPU whenever there is one: hide it (CUDA_VISIBLE_DEVICES=) "
                     "to compare on the CPU")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; pass --device cpu")

    shards = Path(args.shards)
    prepare_shards(shards)
    vocab = math.ceil(TokenShards(shards, "train").vocab_size / 64) * 64
    cfg = model_config(args, vocab)
    peak = measure_peak_flops(torch.bfloat16, device=device.type, seconds=3.0 if device.type == "cuda" else 1.0)
    ours = run_lmstack(args, shards, vocab, peak)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    peer = run_peer(args, cfg, shards, device)
    body, ratios = table(args, cfg, peak, ours, peer)
    title = f"Pretraining on GPU: GPT-2 124M shape, lmstack vs transformers ({mode_name(args)})"
    command = "python bench/gpu_pretrain.py " + " ".join(sys.argv[1:])
    print(body)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"gpu_pretrain-{mode_name(args)}.md").write_text(section(title, body, command))
        summary = {"title": title, "command": command, "device": str(device), "peak_flops": peak,
                   "config": vars(args), "model": dataclasses.asdict(cfg), "lmstack": ours, "peer": peer,
                   "ratios": ratios}
        (out / f"gpu_pretrain-{mode_name(args)}.json").write_text(json.dumps(summary, indent=1, default=str))
    if args.record:
        record(title, body, command)


if __name__ == "__main__":
    main()
