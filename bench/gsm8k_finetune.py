"""GSM8K fine-tuning of SmolLM2-135M-Instruct on CPU: LoRA, QLoRA and full FT against the base model, plus
catastrophic forgetting measured as tinyshakespeare val perplexity before and after.

    OMP_NUM_THREADS=1 python bench/gsm8k_finetune.py [--methods lora,qlora,full] [--train-seconds 600]
                                                     [--eval-n 40] [--max-new-tokens 200]

Each method trains through `lmstack finetune` (a subprocess: the CLI users run) on ../shared/data/gsm8k/train.jsonl
(chat template, loss on the answer only) for at most --train-seconds of wall time or --steps steps, whichever
comes first, in --precision (bf16 autocast over float32 weights by default). Unless --keep-annotations, the answers
lose GSM8K's `<<48/2=24>>` calculator annotations first (the text around them already states each step): a
135M model that copies them learns a second, unchecked copy of every product. Then every model answers the first --eval-n questions of ../shared/data/gsm8k/dev.jsonl with the same
greedy decoding (chat template, batched, --max-new-tokens) and the answer is the number after `####`, else the
last number in the reply (exact match against the reference's `#### N`). LoRA / QLoRA models are evaluated
merged (merge_lora: the same function as unmerged up to float rounding; QLoRA's base dequantized from NF4), every
model in --eval-dtype.
Perplexity: --ppl-windows windows of 256 tokens from the last 10% of tinyshakespeare (nanoGPT's val split).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402
from lmstack.runconfig import data_root  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = data_root()
MODEL = "smollm2-135m-instruct"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The number after '####', else the last number in the text; commas dropped, '72.0' -> '72'."""
    marked = text.split("####", 1)[1] if "####" in text else None
    found = NUMBER.findall(marked) if marked is not None else []
    found = found[:1] if found else NUMBER.findall(text)[-1:]
    if not found:
        return None
    value = found[0].replace(",", "").rstrip(".")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


ANNOTATION = re.compile(r"<<[^>]*>>")


def training_file(runs: Path, keep_annotations: bool) -> Path:
    """GSM8K train as given, or a copy whose answers lose their `<<a*b=c>>` calculator annotations."""
    source = DATA / "gsm8k" / "train.jsonl"
    if keep_annotations:
        return source
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    target = runs / "train-no-annotations.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps({**r, "answer": ANNOTATION.sub("", r["answer"])}) + "\n" for r in rows))
    return target


def per_method(value: str, method: str) -> str:
    """'300' for every method, or 'lora=330,qlora=280,full=170'."""
    if "=" not in value:
        return value
    return dict(item.split("=", 1) for item in value.split(","))[method]


def train(method: str, out: Path, data: Path, args: argparse.Namespace) -> dict:
    lr = {"full": args.full_lr, "lora": args.lora_lr, "qlora": args.lora_lr}[method]
    steps, seconds = per_method(args.steps, method), per_method(args.train_seconds, method)
    cmd = [sys.executable, "-m", "lmstack", "finetune", "--method", method, "--model", MODEL,
           "--data", f"gsm8k={data}", "--fields", "instruction=question,output=answer",
           "--precision", args.precision,
           "--out", str(out), "--max-steps", steps, "--max-time", seconds,
           "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len), "--lr", str(lr),
           "--warmup-steps", "10", "--eval-every", steps, "--eval-batches", "4",
           "--val-fraction", "0.005", "--targets", "all-linear", "--rank", "16", "--alpha", "32",
           "--seed", "0", "--no-progress", "--no-resume"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout)
    result["wall_s"] = time.perf_counter() - start
    (out / "result.json").write_text(json.dumps(result, indent=1))  # what --eval-only reads back
    return result


def load(method: str, out: Path, dtype: str):
    from lmstack.checkpoints import load_model
    from lmstack.peft.lora import merge_lora

    if method == "base":
        return load_model(MODEL, dtype=dtype)
    if method == "full":
        return load_model(str(out), dtype=dtype)
    loaded = load_model(None, adapter=str(out), dtype="float32")
    loaded.model = merge_lora(loaded.model, dtype=torch.float32).to(getattr(torch, dtype)).eval()
    return loaded


@torch.no_grad()
def gsm8k_accuracy(loaded, questions: list[dict], args: argparse.Namespace) -> tuple[float, list[str]]:
    from lmstack.generation import GenerationConfig, Generator

    gen = Generator(loaded.model, loaded.tokenizer)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.0)
    replies = []
    for i in range(0, len(questions), args.eval_batch):
        prompts = [gen.chat_prompt([{"role": "user", "content": q["question"]}])
                   for q in questions[i:i + args.eval_batch]]
        replies += [r.text for r in gen.generate_batch(prompts, cfg)]
    gen.release()
    correct = sum(final_number(r) == final_number(q["answer"]) for r, q in zip(replies, questions))
    return correct / len(questions), replies


@torch.no_grad()
def shakespeare_ppl(loaded, windows: int, length: int = 256) -> float:
    text = (DATA / "tinyshakespeare" / "input.txt").read_text()
    val = text[int(len(text) * 0.9):]
    ids = loaded.tokenizer.encode(val, add_special_tokens=False)
    step = max(length, (len(ids) - length - 1) // windows)
    nll, n = 0.0, 0
    for w in range(windows):
        chunk = torch.tensor(ids[w * step: w * step + length + 1])[None]  # [1, length + 1]
        logits = loaded.model(chunk[:, :-1])  # [1, length, V]
        nll += torch.nn.functional.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum").item()
        n += length
    return math.exp(nll / n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="lora,qlora,full")
    p.add_argument("--train-seconds", default="600", help="seconds, or per method: lora=1500,qlora=1500,full=1000")
    p.add_argument("--steps", default="150", help="optimizer steps, or per method: lora=330,qlora=280,full=170")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=320)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--full-lr", type=float, default=2e-5)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--keep-annotations", action="store_true", help="train on the <<...>> calculator annotations too")
    p.add_argument("--eval-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--eval-n", type=int, default=40)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--ppl-windows", type=int, default=16)
    p.add_argument("--runs", default="/tmp/lmstack-gsm8k-bench")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--eval-only", action="store_true", help="evaluate the runs already in --runs (RUNS/M/result.json)")
    p.add_argument("--title", default="Fine-tuning: GSM8K (LoRA, QLoRA, full) and forgetting",
                   help="the docs/benchmarks.md section to write")
    args = p.parse_args()
    torch.manual_seed(0)
    methods = [m for m in args.methods.split(",") if m]
    runs = Path(args.runs)
    questions = [json.loads(line) for line in (DATA / "gsm8k" / "dev.jsonl").read_text().splitlines()
                 if line.strip()][:args.eval_n]

    data = training_file(runs, args.keep_annotations)
    trained = {}
    for method in methods:
        if args.eval_only:
            trained[method] = json.loads((runs / method / "result.json").read_text())
            continue
        trained[method] = train(method, runs / method, data, args)
        r = trained[method]
        print(f"{method}: {r['steps']} steps in {r['elapsed_s']:.0f} s, val loss {r['best_val_loss']:.3f}",
              flush=True)
    rows = []
    for method in ["base", *methods]:
        loaded = load(method, runs / method, args.eval_dtype)
        t0 = time.perf_counter()
        acc, replies = gsm8k_accuracy(loaded, questions, args)
        eval_s = time.perf_counter() - t0
        ppl = shakespeare_ppl(loaded, args.ppl_windows)
        (runs / f"replies-{method}.json").parent.mkdir(parents=True, exist_ok=True)
        (runs / f"replies-{method}.json").write_text(json.dumps(replies, indent=1))
        marked = sum("####" in r for r in replies) / len(replies)
        rows.append((method, acc, marked, ppl, eval_s))
        print(f"{method}: accuracy {acc:.3f}, '####' in {marked:.0%} of replies, shakespeare ppl {ppl:.2f} "
              f"(eval {eval_s:.0f} s)", flush=True)
        del loaded

    base_acc, base_ppl = rows[0][1], rows[0][3]
    lines = ["| model | train steps | examples seen | train s | val loss | GSM8K acc | vs base | replies with `####` "
             "| shakespeare ppl | ppl vs base |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, acc, marked, ppl, _ in rows:
        r = trained.get(method)
        steps = f"{r['steps']}" if r else "-"
        seen = f"{r['steps'] * args.batch_size}" if r else "-"
        secs = f"{r['elapsed_s']:.0f}" if r else "-"
        val = f"{r['best_val_loss']:.3f}" if r else "-"
        lines.append(f"| {method} | {steps} | {seen} | {secs} | {val} | {acc:.3f} ({round(acc * len(questions))}/"
                     f"{len(questions)}) | {acc - base_acc:+.3f} | {marked:.0%} | {ppl:.2f} | {ppl / base_ppl:.3f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        annotations = "with" if args.keep_annotations else "without"
        notes = (f"Budget per method: at most {args.train_seconds} s of training wall time or {args.steps} "
                 f"steps, the learning rate's cosine schedule spanning those steps (batch {args.batch_size}, max_seq_len {args.max_seq_len}, chat template, loss on answers "
                 f"only, {args.precision}, answers {annotations} `<<...>>` annotations). LoRA/QLoRA: rank 16, "
                 f"alpha 32, all linear layers, lr {args.lora_lr}; full: lr {args.full_lr}. Eval: the first "
                 f"{len(questions)} questions of gsm8k/dev.jsonl, {args.eval_dtype}, greedy, at most "
                 f"{args.max_new_tokens} new tokens, exact match on the `####` number (else the last number). "
                 f"Perplexity: tinyshakespeare val (last 10%), {args.ppl_windows} windows of 256 tokens.")
        threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
        record(args.title, table + "\n\n" + notes,
               f"OMP_NUM_THREADS={threads} python " + " ".join(["bench/gsm8k_finetune.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
