"""BERT-style masked-LM pretraining on the English side of Multi30k plus tinyshakespeare; masked-token accuracy.

    python bench/mlm_encoder.py [--threads 2] [--run runs/bench/mlm]

Trains with configs/mlm-encoder.yaml (unless the run folder already holds final/), then measures, on the val
shards, the share of masked positions (15%; 80/10/10) whose top-1 prediction is the original token.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

from lmstack.checkpoints import load_model  # noqa: E402
from lmstack.training.objectives import IGNORE  # noqa: E402
from lmstack.runconfig import resolve_path  # noqa: E402
from lmstack.training.pretrain import pretrain, shard_source  # noqa: E402
from lmstack.training.trainer import TrainOptions  # noqa: E402

CONFIG = "configs/mlm-encoder.yaml"


@torch.no_grad()
def masked_accuracy(run: Path, shards: Path, seq_len: int, batches: int) -> tuple[float, int]:
    loaded = load_model(str(run / "final"))
    source = shard_source("mlm", shards, seq_len, seed=1234, eval_batches=batches, tokenizer=loaded.tokenizer,
                          decoder_start=0)
    correct = total = 0
    for i in range(batches):
        batch = source.val_batch(i, 32)
        hidden = loaded.model(batch["input_ids"])
        picked = batch["labels"] != IGNORE
        pred = loaded.model.mlm_logits(hidden[picked]).argmax(-1)
        correct += int((pred == batch["labels"][picked]).sum())
        total += int(picked.sum())
    return correct / total, total


def main() -> None:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", default="runs/bench/mlm")
    parser.add_argument("--eval-batches", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    if not (run / "final" / "lmstack.json").exists():
        pretrain(config=CONFIG, out=str(run), train=TrainOptions(progress=False))
    cfg = yaml.safe_load(Path(CONFIG).read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    acc, n = masked_accuracy(run, resolve_path(cfg["shards"]), cfg["seq_len"], args.eval_batches)
    body = (f"| model | steps | train min | val loss | masked-token accuracy (val) |\n|---|---|---|---|---|\n"
            f"| BERT-style 4 layers, d=256, BPE 8k | {records[-1]['step']} | {records[-1]['elapsed_s'] / 60:.1f} | "
            f"{records[-1]['val_loss']:.3f} | {acc:.1%} of {n:,} masked positions |\n\n"
            "Masking: 15% of non-special tokens; 80% [MASK], 10% random, 10% unchanged (accuracy counts all three).")
    print(body)
    record("Pretraining: BERT-style masked LM", body, f"python bench/mlm_encoder.py --threads {args.threads}")


if __name__ == "__main__":
    main()
