"""nanoGPT's shakespeare-char CPU recipe on lmstack's trainer, then one modern change at the same wall time.

    python bench/shakespeare_char.py [--threads 2] [--steps 2000]

Baseline: configs/shakespeare-char-cpu.yaml (GPT-2 blocks: learned positions, LayerNorm, GELU; 4 layers, 4 heads,
128 dims, block 64, batch 12, 2000 iterations, lr 1e-3 cosine to 2000, dropout 0). nanoGPT reports val loss
1.88 after about 3 minutes on a laptop CPU. Modern: the same recipe with Llama blocks (RoPE, RMSNorm, SwiGLU at
matched parameter count), capped at the baseline's wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

from lmstack.training.pretrain import pretrain  # noqa: E402
from lmstack.training.trainer import TrainOptions  # noqa: E402
from lmstack.training.flops import measure_peak_flops  # noqa: E402

CONFIG = "configs/shakespeare-char-cpu.yaml"
MODERN = ["positions=rope", "norm=rmsnorm", "activation=silu", "gated_mlp=true", "d_ff=344"]


def run(out: Path, steps: int, extra: list[str], max_time: float | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = dataclasses.asdict(pretrain(config=CONFIG, out=str(out), set=extra, resume=False,
                                         train=TrainOptions(max_steps=steps, max_time=max_time, progress=False)))
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens_per_s = result["tokens"] / result["elapsed_s"]
    return {"val_loss": records[-1]["val_loss"], "best_val": result["best_val_loss"], "steps": result["step"],
            "wall_s": wall, "train_s": result["elapsed_s"], "tokens_per_s": tokens_per_s,
            "mfu": records[-1]["mfu"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default="runs/bench/shakespeare")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = measure_peak_flops(torch.float32, seconds=2.0)
    base = run(Path(args.out) / "gpt2", args.steps, [])
    modern = run(Path(args.out) / "modern", args.steps, MODERN, max_time=base["train_s"])
    rows = [("nanoGPT (published, laptop CPU)", "1.88", "", "~180", "", ""),
            ("lmstack GPT-2 blocks (nanoGPT recipe)", f"{base['val_loss']:.3f}", base["steps"],
             f"{base['train_s']:.0f}", f"{base['tokens_per_s']:,.0f}", f"{base['mfu']:.1%}"),
            ("lmstack RoPE+RMSNorm+SwiGLU, same wall time", f"{modern['val_loss']:.3f}", modern["steps"],
             f"{modern['train_s']:.0f}", f"{modern['tokens_per_s']:,.0f}", f"{modern['mfu']:.1%}")]
    table = ["| run | val loss | steps | train s | tokens/s | MFU |", "|---|---|---|---|---|---|"]
    table += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    body = "\n".join(table) + (f"\n\nMFU is against the measured fp32 peak matmul throughput of "
                               f"{peak / 1e9:,.1f} GFLOP/s ({args.threads} threads, `bench/peak_flops.py`). "
                               f"Val loss ratio modern/baseline: {modern['val_loss'] / base['val_loss']:.3f}.")
    print(body)
    record("Pretraining: nanoGPT shakespeare-char on CPU", body,
           f"python bench/shakespeare_char.py --threads {args.threads} --steps {args.steps}")


if __name__ == "__main__":
    main()
