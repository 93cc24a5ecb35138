"""Eval throughput: `lmstack eval` vs lm-evaluation-harness' HF backend on the same examples, in one run, plus
the accuracy of base SmolLM2-135M-Instruct on every built-in task (the reference row).

Throughput: examples/s on the first --n examples of hh-rlhf-harmless (2 log-likelihood requests per example,
batched by the one Scorer) and gsm8k 0-shot (greedy generation, up to 256 new tokens, batched by Generator).
The HF side is lm-eval's `HFLM` (transformers' model loaded from the same GGUF) given the very same requests:
the (context, continuation) pairs and the prompts with the same stop strings. Model loading is not timed.
Each side runs --repeats times; the table shows medians.

    python bench/eval_throughput.py --n 8 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from common import machine, median, record  # noqa: E402

from lmstack.checkpoints import resolve  # noqa: E402
from lmstack.evaluation.runner import RunOptions, load_eval_model, run_task  # noqa: E402
from lmstack.evaluation.tasks import load_task  # noqa: E402

MODEL = "smollm2-135m-instruct"
# Examples per built-in task for the accuracy row (perplexity: 1024-token windows).
ACCURACY_LIMITS = {"course-quiz": None, "hh-rlhf-harmless": 40, "gsm8k": 20, "gsm8k-8shot": 5,
                   "multi30k-en-de": 20, "multi30k-en-fr": 20, "tinyshakespeare-ppl": 16}


def hf_backend(batch_size: int):
    import transformers
    from lm_eval.models.huggingface import HFLM
    path = resolve(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)


def instances(kind: str, args_list: list[tuple]) -> list:
    from lm_eval.api.instance import Instance
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args_list)]


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="examples per task for the throughput comparison")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-accuracy", action="store_true", help="only the throughput comparison")
    ap.add_argument("--skip-throughput", action="store_true", help="only the accuracy reference row")
    ap.add_argument("--tasks", default=",".join(ACCURACY_LIMITS), help="built-in tasks for the accuracy row")
    ap.add_argument("--limit", action="append", default=[], metavar="TASK=N",
                    help="examples for a task of the accuracy row (repeatable; default ACCURACY_LIMITS)")
    ap.add_argument("--no-record", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    opts = RunOptions(limit=args.n, batch_size=args.batch_size, progress=False)
    em = load_eval_model(MODEL)

    table = ""
    if not args.skip_throughput:
        hf = hf_backend(args.batch_size)
        rows = []
        # hh-rlhf-harmless: the same (context, continuation) pairs on both sides.
        spec = load_task("hh-rlhf-harmless")
        ours_s, ours = timed(lambda: run_task(em, spec, opts), args.repeats)
        pairs = [(ex["prompt"], c) for ex in ours.examples for c in ex["choices"]]
        hf_s, hf_out = timed(lambda: hf.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True),
                             args.repeats)
        hf_ll = [lp for lp, _ in hf_out]
        hf_acc = sum(hf_ll[2 * i] > hf_ll[2 * i + 1] for i in range(len(ours.examples))) / len(ours.examples)
        ours_ll = [ll for ex in ours.examples for ll in ex["loglikelihoods"]]
        max_diff = max(abs(a - b) for a, b in zip(ours_ll, hf_ll))
        rows.append(("hh-rlhf-harmless (2 log-likelihoods / example)", len(ours.examples), ours_s, hf_s,
                     f"acc {ours.metrics['acc']:.3f} vs {hf_acc:.3f}; max |Δ log-lik| {max_diff:.1e}"))
        print(f"hh-rlhf-harmless: lmstack {ours_s:.1f} s, lm-eval HF {hf_s:.1f} s", flush=True)

        # gsm8k 0-shot: the same prompts, stop strings and token budget on both sides.
        spec = load_task("gsm8k")
        ours_s, ours = timed(lambda: run_task(em, spec, opts), args.repeats)
        gen = {"until": spec.generation["stop"], "max_gen_toks": spec.generation["max_new_tokens"], "do_sample": False}
        requests = [(ex["prompt"], dict(gen)) for ex in ours.examples]
        hf_s, hf_text = timed(lambda: hf.generate_until(instances("generate_until", requests), disable_tqdm=True),
                              args.repeats)
        same = sum(a["output"].strip() == b.strip() for a, b in zip(ours.examples, hf_text)) / len(hf_text)
        rows.append(("gsm8k 0-shot (greedy, <= 256 new tokens)", len(ours.examples), ours_s, hf_s,
                     f"identical generations {same:.0%}"))
        print(f"gsm8k: lmstack {ours_s:.1f} s, lm-eval HF {hf_s:.1f} s", flush=True)

        lines = ["| task | examples | lmstack ex/s | lm-eval HF ex/s | speedup | check |", "|---|---:|---:|---:|---:|---|"]
        for name, n, a, b, check in rows:
            lines.append(f"| {name} | {n} | {n / a:.3g} | {n / b:.3g} | {b / a:.2f}x | {check} |")
        table = "\n".join(lines)
        print(table)

    acc_table = ""
    if not args.skip_accuracy:
        acc_lines = ["| task | metric | SmolLM2-135M-Instruct | examples | few-shot |", "|---|---|---:|---:|---:|"]
        limits = dict(ACCURACY_LIMITS)
        for item in args.limit:
            task, _, n = item.partition("=")
            limits[task] = int(n)
        for name in args.tasks.split(","):
            limit = limits.get(name)
            spec = load_task(name)
            t = time.perf_counter()
            res = run_task(em, spec, RunOptions(limit=limit, batch_size=args.batch_size, progress=False))
            shots = res.info.get("num_fewshot", "")
            for metric, value in res.metrics.items():
                acc_lines.append(f"| {name} | {metric} | {value:.4f} | {res.info['examples']} | {shots} |")
            print(f"{name}: {res.metrics} ({res.info['examples']} examples, {time.perf_counter() - t:.0f} s)",
                  flush=True)
            sig = res.info.get("bleu_signature")
            if sig:
                escaped = sig.replace("|", "\\|")  # a bare | would split the Markdown table cell
                acc_lines.append(f"| {name} | sacreBLEU signature | {escaped} | | |")
        acc_table = "\n".join(acc_lines)
        print(acc_table)

    if not args.no_record:
        command = "python bench/eval_throughput.py " + " ".join(sys.argv[1:])
        if table:
            record("Eval throughput: lmstack eval vs lm-eval HF backend",
                   f"Throughput on the first {args.n} examples (batch size {args.batch_size}, median of "
                   f"{args.repeats}; model load not timed). The lm-eval side is `HFLM` from lm-evaluation-harness "
                   "with transformers' model dequantized from the same GGUF, given the very same requests. The "
                   "machine is shared with other jobs, so absolute numbers are noisy; the ratio is measured in "
                   "one run.\n\n" + table, command)
        if acc_table:
            record(f"Eval reference: SmolLM2-135M-Instruct on built-in tasks ({args.tasks})",
                   "Base SmolLM2-135M-Instruct (Q4_1 GGUF, fp32 compute), first N examples of each task in file "
                   "order (`lmstack eval --limit N`; tinyshakespeare-ppl: N windows of 1024 tokens, stride "
                   "512).\n\n" + acc_table, command)
        print(f"recorded in docs/benchmarks.md ({machine()})")


if __name__ == "__main__":
    main()
