"""Encoder-decoder translation from scratch on Multi30k en->de, scored with sacreBLEU on test_2016_flickr.

    python bench/multi30k_translation.py [--threads 2] [--run runs/bench/multi30k] [--beams 4]

Trains with configs/multi30k-en-de.yaml unless the run folder already holds a finished model (final/), then
translates the 1,000 test sentences with greedy search and with beam search and reports BLEU (with sacreBLEU's
signature), the training wall time and the decoding time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

from lmstack.runconfig import data_root  # noqa: E402
from lmstack.training.pretrain import pretrain  # noqa: E402
from lmstack.training.trainer import TrainOptions  # noqa: E402
from lmstack.checkpoints import load_model  # noqa: E402
from lmstack.generation import GenerationConfig, Generator  # noqa: E402

DATA = data_root() / "multi30k"


def translate(gen: Generator, sources: list[str], beams: int, batch_size: int) -> tuple[list[str], float]:
    cfg = GenerationConfig(max_new_tokens=80, num_beams=beams, temperature=0.0)
    out: list[str] = []
    start = time.perf_counter()
    for i in range(0, len(sources), batch_size):
        out += [r.text.strip() for r in gen.generate_batch(sources[i:i + batch_size], cfg)]
    return out, time.perf_counter() - start


def main() -> None:
    import sacrebleu

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", default="runs/bench/multi30k")
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    if not (run / "final" / "lmstack.json").exists():
        pretrain(config="configs/multi30k-en-de.yaml", out=str(run), train=TrainOptions(progress=False))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loaded = load_model(str(run / "final"))
    gen = Generator(loaded.model, loaded.tokenizer)
    sources = (DATA / "test_2016_flickr.en").read_text().splitlines()[: args.limit]
    refs = (DATA / "test_2016_flickr.de").read_text().splitlines()[: args.limit]
    rows, signature = [], ""
    for name, beams, bs in (("greedy", 1, 64), (f"beam {args.beams}", args.beams, 16)):
        hyps, seconds = translate(gen, sources, beams, bs)
        metric = sacrebleu.BLEU()
        bleu = metric.corpus_score(hyps, [refs])
        signature = str(metric.get_signature())  # known only after scoring (it records the reference count)
        rows.append((name, bleu.score, seconds))
        print(f"{name}: BLEU {bleu.score:.2f} ({seconds:.0f} s)  e.g. {hyps[0]!r} / {refs[0]!r}")
    train_s = records[-1]["elapsed_s"]
    steps = records[-1]["step"]
    table = ["| decoding | sacreBLEU | decode s (1,000 sentences) |", "|---|---|---|"]
    table += [f"| {name} | {bleu:.2f} | {seconds:.0f} |" for name, bleu, seconds in rows]
    body = "\n".join(table) + (
        f"\n\nTransformer (3+3 layers, d=256, 4 heads, joint byte-level BPE 8k trained on the train split), from "
        f"scratch with configs/multi30k-en-de.yaml: {steps} steps in {train_s / 60:.1f} min of training "
        f"(best val loss {min(r['val_loss'] for r in records):.3f}). Target: >= 30 BLEU within 60 minutes. "
        f"sacreBLEU signature: `{signature}`.")
    print(body)
    record("Pretraining: Multi30k en-de translation from scratch", body,
           f"python bench/multi30k_translation.py --threads {args.threads} --beams {args.beams}")


if __name__ == "__main__":
    main()
