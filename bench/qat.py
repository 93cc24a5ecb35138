"""QAT against PTQ: held-out perplexity of SmolLM2 unquantized, quantized after training (PTQ) and trained with
fake-quant weights (QAT), with the same training tokens for QAT and for an unquantized fine-tune.

    python bench/qat.py [--schemes int3-g32] [--steps 30] [--batch-size 8] [--seq-len 128] [--record]

Training text: tinyshakespeare without its last 20,000 characters, cut into chunks (first line as the
instruction, the rest as the response, the `plain` template). Held-out text: the last --eval-chars characters
(scored with `lmstack quantize`'s strided windows). Both fine-tunes are `lmstack.training.finetune.finetune`
(method full, the same seed, steps, batches and learning rate), so they see the same tokens in the same order;
the only difference is `qat=SCHEME`. Rows:

    base                    the model as loaded (float32)
    base + PTQ              round-to-nearest quantization of it, no calibration
    fine-tune               full fine-tune, float
    fine-tune + PTQ         that fine-tune, then round-to-nearest quantization
    QAT                     the same fine-tune through fake-quant weights, converted to the packed layers

PTQ is prepare_qat_ then convert_qat_ with no training between (for int4 that is exactly `quantize_`, checked in
tests/test_qat.py), so int3/int2, which `lmstack quantize` does not offer, get the same round-to-nearest.
SmolLM2 ships as a Q4_1 GGUF: its weights already sit on an int4 grid of groups of 32, so int4-g32 PTQ of it
loses almost nothing, and the lower widths are where PTQ visibly fails.

Smoke run (a minute or two): python bench/qat.py --steps 2 --batch-size 2 --seq-len 64 --eval-chars 1500
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

from lmstack.checkpoints import DEFAULT_MODEL, load_model  # noqa: E402
from lmstack.compression.quantize import HELD_OUT_CHARS, held_out_perplexity  # noqa: E402
from lmstack.quant.qat import convert_qat_, prepare_qat_  # noqa: E402
from lmstack.runconfig import data_root  # noqa: E402
from lmstack.training.finetune import finetune  # noqa: E402
from lmstack.training.trainer import TrainOptions  # noqa: E402


def training_file(text: str, out: Path, chunk_chars: int) -> Path:
    """Alpaca records from consecutive chunks of `text`: the first line is the instruction, the rest the output."""
    rows = []
    for start in range(0, len(text) - chunk_chars, chunk_chars):
        head, _, rest = text[start:start + chunk_chars].strip().partition("\n")
        if head.strip() and rest.strip():
            rows.append(json.dumps({"instruction": head.strip(), "output": rest.strip()}))
    out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


def ptq_(model: torch.nn.Module, scheme: str, embedding_scheme: str) -> torch.nn.Module:
    prepare_qat_(model, scheme, embedding_scheme=embedding_scheme)
    convert_qat_(model)
    return model


def perplexity(model: torch.nn.Module, tokenizer, text: str, window: int) -> float:
    with torch.inference_mode():
        return held_out_perplexity(model.eval(), tokenizer, text, window)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--schemes", default="int3-g32", help="comma list of QAT schemes (quant.qat.QAT_SCHEMES)")
    p.add_argument("--embedding-scheme", default="int8", help="the embedding's and tied head's scheme, or none")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--eval-chars", type=int, default=8000, help="held-out characters from the end (<= 20000)")
    p.add_argument("--window", type=int, default=256, help="perplexity window in tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--record", action="store_true", help="write the table to docs/benchmarks.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not 0 < args.eval_chars <= HELD_OUT_CHARS:
        p.error(f"--eval-chars must be in 1..{HELD_OUT_CHARS} (the held-out tail never trained on)")

    text = (data_root() / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    train_text, held_out = text[:-HELD_OUT_CHARS], text[-args.eval_chars:]
    base = load_model(args.model, dtype="float32")
    tokenizer = base.tokenizer
    rows: list[tuple[str, str, float, float]] = []  # (row, scheme, perplexity, seconds)

    def add(name: str, scheme: str, model: torch.nn.Module, seconds: float = 0.0) -> None:
        ppl = perplexity(model, tokenizer, held_out, args.window)
        rows.append((name, scheme, ppl, seconds))
        print(f"{name:18s} {scheme:10s} perplexity {ppl:9.3f}  (fine-tune {seconds:.0f} s wall)", flush=True)

    add("base", "float32", base.model)
    schemes = args.schemes.split(",")
    for scheme in schemes:
        add("base + PTQ", scheme, ptq_(load_model(args.model, dtype="float32").model, scheme, args.embedding_scheme))
    del base

    train = TrainOptions(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_every=args.steps,
                         eval_batches=2, log_every=max(1, args.steps // 5), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        data = training_file(train_text, Path(tmp) / "shakespeare.jsonl", chunk_chars=args.seq_len * 4)
        common = dict(method="full", model=args.model, data=[str(data)], template="plain", format="alpaca",
                      max_seq_len=args.seq_len, dtype="float32", train=train, resume=False)
        t0 = time.perf_counter()
        finetune(out=str(Path(tmp) / "float"), **common)
        float_s = time.perf_counter() - t0
        add("fine-tune", "float32", load_model(str(Path(tmp) / "float"), dtype="float32").model, float_s)
        for scheme in schemes:
            tuned = load_model(str(Path(tmp) / "float"), dtype="float32").model
            add("fine-tune + PTQ", scheme, ptq_(tuned, scheme, args.embedding_scheme), float_s)
            out = Path(tmp) / f"qat-{scheme}"
            t0 = time.perf_counter()
            finetune(out=str(out), qat=scheme, qat_embedding=args.embedding_scheme, **common)
            add("QAT", scheme, load_model(str(out), dtype="bfloat16").model, time.perf_counter() - t0)

    tokens = args.steps * args.batch_size * args.seq_len
    body = (f"Held-out perplexity on the last {args.eval_chars:,} characters of tinyshakespeare ({args.window}-token "
            f"windows, half stride) of {args.model}. Both fine-tunes: full, {args.steps} steps x {args.batch_size} "
            f"examples of at most {args.seq_len} tokens (at most {tokens:,} tokens, the same batches in the same "
            f"order), lr {args.lr:g}, on the rest of tinyshakespeare. The embedding and tied head use "
            f"{args.embedding_scheme} in every quantized row. PTQ is round-to-nearest without calibration; int3 "
            "and int2 are stored as int4 codes (no smaller file).\n\n"
            "| row | scheme | perplexity | vs base | fine-tune wall s (load, train, save) |\n|---|---|---|---|---|\n")
    base_ppl = rows[0][2]
    for name, scheme, ppl, seconds in rows:
        body += f"| {name} | {scheme} | {ppl:.3f} | {ppl / base_ppl:.3f}x | {seconds:.0f} |\n"
    print(body)
    if args.record:
        record("QAT vs PTQ (SmolLM2, tinyshakespeare)", body,
               "python bench/qat.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))


if __name__ == "__main__":
    main()
