"""Check `lmstack plan` against reality: peak RSS of real CPU training steps vs the planner's total.

Each config trains for 3 steps in a fresh Python process (model from lmstack.models.build_model, AdamW from
lmstack.training.optim.make_optimizer, loss from lmstack.training.objectives.causal_lm, bf16 through autocast as
the trainer does), and reports ru_maxrss. A separate process measures the idle RSS after importing torch and
lmstack: the planner's FRAMEWORK_OVERHEAD_BYTES. The table goes to stdout and to docs/benchmarks.md.

    .venv/bin/python bench/plan_validate.py            # ~2.5 min of CPU on 2 threads (longer when the machine is busy)
    .venv/bin/python bench/plan_validate.py --no-write # print only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from lmstack.config import config_to_dict, from_name
from lmstack.plan import FRAMEWORK_OVERHEAD_BYTES, plan_config

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

MB = 2**20

# (label, preset, overrides, precision, batch, seq)
CONFIGS: list[tuple[str, str, dict[str, Any], str, int, int]] = [
    ("gpt2-style L6 d384 V8k fp32", "gpt2-124m",
     dict(n_layer=6, d_model=384, n_head=6, vocab_size=8192, max_seq_len=256), "fp32", 8, 256),
    ("gpt2-style L6 d384 V8k bf16", "gpt2-124m",
     dict(n_layer=6, d_model=384, n_head=6, vocab_size=8192, max_seq_len=256), "bf16", 4, 256),
    ("llama-style L8 d384 GQA V8k bf16", "smollm2-135m",
     dict(n_layer=8, d_model=384, n_head=6, n_kv_head=2, d_ff=1024, vocab_size=8192, max_seq_len=256),
     "bf16", 8, 256),
    ("llama-style L4 d256 V49k fp32 (big vocab)", "smollm2-135m",
     dict(n_layer=4, d_model=256, n_head=4, n_kv_head=2, d_ff=768, max_seq_len=256), "fp32", 4, 256),
]

IDLE = """
import resource, torch, lmstack, lmstack.models.decoder, lmstack.training.objectives, lmstack.training.optim
torch.set_num_threads(2)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

TRAIN = """
import contextlib, json, resource, sys, torch
from lmstack.config import config_from_dict
from lmstack.models import build_model
from lmstack.training.objectives import causal_lm
from lmstack.training.optim import make_optimizer
torch.set_num_threads(2)
torch.manual_seed(0)
args = json.loads(sys.argv[1])
model = build_model(config_from_dict(args["config"])).train()
optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args["precision"] == "bf16"
            else contextlib.nullcontext())
V, B, T = model.config.vocab_size, args["batch"], args["seq"]
for step in range(3):
    ids = torch.randint(0, V, (B, T + 1))
    with autocast:
        out = causal_lm(model, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    (out.loss_sum / out.n_targets).float().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


# glibc raises its mmap threshold after large frees, so later tensors come from the heap and freed memory stays
# in RSS; a fixed 128 KiB threshold returns every large tensor to the OS, so RSS tracks live tensors.
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_python(code: str, *args: str, env: dict[str, str] | None = None) -> int:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the table, do not touch docs/benchmarks.md")
    opts = parser.parse_args()

    idle = run_python(IDLE)
    rows = []
    for label, preset, overrides, precision, batch, seq in CONFIGS:
        cfg = from_name(preset, **overrides)
        planned = plan_config(cfg, precision=precision, batch=batch, seq=seq, device="cpu")
        args = json.dumps({"config": config_to_dict(cfg), "precision": precision, "batch": batch, "seq": seq})
        measured = run_python(TRAIN, args)
        fixed = run_python(TRAIN, args, env=FIXED_MMAP)
        rows.append((label, planned, measured, fixed))
        print(f"{label}: predicted {planned['total_bytes_per_device'] / MB:.0f} MB, measured {measured / MB:.0f} MB "
              f"(default malloc), {fixed / MB:.0f} MB (fixed mmap threshold)", flush=True)

    lines = [
        "| config | params | batch x seq | weights+grads+optim MB | activations MB | predicted MB "
        "| measured MB (glibc default) | ratio | measured MB (MALLOC_MMAP_THRESHOLD_=131072) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    hits = fixed_hits = 0
    for label, p, measured, fixed in rows:
        state = p["weights_bytes"] + p["grads_bytes"] + p["optimizer_bytes"]
        total = p["total_bytes_per_device"]
        hits += abs(total / measured - 1) <= 0.2
        fixed_hits += abs(total / fixed - 1) <= 0.2
        lines.append(f"| {label} | {p['parameters'] / 1e6:.1f}M | {p['batch']}x{p['seq']} | {state / MB:.0f} | "
                     f"{(p['activations_bytes'] + p['autocast_weight_copies_bytes']) / MB:.0f} | "
                     f"{total / MB:.0f} | {measured / MB:.0f} | {total / measured:.2f} | {fixed / MB:.0f} | "
                     f"{total / fixed:.2f} |")
    summary = (f"Idle RSS after importing torch + lmstack: measured {idle / MB:.0f} MB "
               f"(planner constant FRAMEWORK_OVERHEAD_BYTES = {FRAMEWORK_OVERHEAD_BYTES / MB:.0f} MB). "
               f"Within 20%: {hits} of {len(rows)} configs with glibc's default malloc, {fixed_hits} of {len(rows)} "
               "with a fixed mmap threshold. The planner counts live tensors; with the default malloc, freed "
               "activation memory is partly kept in the heap and the RSS high-water mark grows over the first "
               "steps, so default-malloc ratios below 1 are allocator retention, not missing tensors.")
    table = "\n".join(lines)
    print(table)
    print(summary)
    if opts.no_write:
        return
    body = ("Peak RSS (ru_maxrss) of 3 AdamW training steps in a fresh process vs `lmstack plan`'s "
            "total_bytes_per_device (ratio = predicted / measured), 2 threads.\n\n" + table + "\n\n" + summary)
    record("Memory planner validation", body, "python bench/plan_validate.py")


if __name__ == "__main__":
    main()
