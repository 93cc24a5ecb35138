"""Greedy decode speed on a GPU from a native checkpoint (what `lmstack pretrain` writes to OUT/final): bf16 eager
and compiled, and the quantization schemes of `lmstack quantize`, applied in memory.

    python bench/gpu_generate.py --model runs/bench/gpu_pretrain/lmstack-eager/final [--device cuda]
                                 [--new-tokens 200] [--rows bf16 bf16-compile int8 nf4 int4-g32 w8a8] [--out F.json]

The bf16 rows load as `lmstack generate --device` does (its load_generator). Quantized rows quantize the bf16
model in memory as `lmstack quantize` does (fuse q|k|v, then quantize_), since quantized native checkpoints load
on the CPU only (checkpoints/load.py). int4 runs on the CPU
int4 kernel only (quant/int4.py): it is tried on a GPU, and its refusal there is reported as expected.

Each row: one short generation first (compilation, CUDA graph capture), then the median decode tokens/s of
--repeats greedy generations of --new-tokens tokens. Exits 1 when a row that should work fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from lmstack.checkpoints import load_model
from lmstack.generation import GenerationConfig, Generator
from lmstack.generation.chat import load_generator
from lmstack.quant.quantize import fuse_projections_, quantize_

ROWS = ("bf16", "bf16-compile", "int8", "nf4", "int4-g32", "w8a8")
EXPECTED_ON_GPU = {"int4-g32": "CPU-only by design: quantize_ refuses int4 off the CPU (quant/int4.py)"}


def generator_for(row: str, model: str, device: str) -> Generator:
    """The bf16 rows load as `lmstack generate` does; the others are quantized as `lmstack quantize` does."""
    if row.startswith("bf16"):
        return load_generator(model, "bfloat16", compile=row.endswith("-compile"), device=device)[0]
    loaded = load_model(model, dtype=torch.bfloat16, device=device)
    fuse_projections_(loaded.model)
    quantize_(loaded.model, row)
    return Generator(loaded.model, loaded.tokenizer)


def measure(row: str, args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    gen = generator_for(row, args.model, args.device)
    greedy = GenerationConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    gen.generate(args.prompt, GenerationConfig(max_new_tokens=16, temperature=0.0))  # compile, capture graphs
    warm_s = time.perf_counter() - start
    results = [gen.generate(args.prompt, greedy) for _ in range(args.repeats)]
    return {"decode_tok_s": statistics.median(r.decode_tokens_per_s for r in results),
            "prefill_tok_s": statistics.median(r.prefill_tokens_per_s for r in results),
            "new_tokens": results[-1].new_tokens, "load_and_warm_s": warm_s, "text": results[-1].text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a native folder, e.g. a pretrain run's final/")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    on_gpu = torch.device(args.device).type != "cpu"
    rows: list[dict[str, Any]] = []
    for row in args.rows:
        expected = EXPECTED_ON_GPU.get(row) if on_gpu else None
        try:
            result = {"row": row, "status": "ok", **measure(row, args)}
        except Exception as e:  # every row is tried; the exit status says whether a required one failed
            traceback.print_exc()
            result = {"row": row, "status": "expected-fail" if expected else "FAIL",
                      "error": f"{type(e).__name__}: {e}"}
        if expected:
            result["note"] = expected
        rows.append(result)
        print(json.dumps(result), flush=True)
    print(f"\n| {args.device} | decode tok/s | prefill tok/s | new tokens | status |\n|---|---|---|---|---|")
    for r in rows:
        if r["status"] == "ok":
            print(f"| {r['row']} | {r['decode_tok_s']:,.1f} | {r['prefill_tok_s']:,.0f} | {r['new_tokens']} | ok |")
        else:
            print(f"| {r['row']} | | | | {r['status']}: {r.get('note') or r['error'][:100]} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "device": args.device, "rows": rows}, indent=1))
    sys.exit(1 if any(r["status"] == "FAIL" for r in rows) else 0)


if __name__ == "__main__":
    main()
