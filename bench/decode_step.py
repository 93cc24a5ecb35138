"""One cached decode step of SmolLM2-135M, by what the inference load does to the model: lmstack's variants in
one process, interleaved, against transformers' bf16 step on the same weights.

    python bench/decode_step.py [--threads 2] [--context 512] [--steps 20] [--rounds 5]

Rows: float32; bf16 without the inference swaps (plain Linears; the float32 KV cache and float32 decode
attention apply to every bf16 CPU model); bf16 after `load_model(inference=True)` (oneDNN-packed linears and
head); the `--dtype auto` model (the GGUF's Q4 kept as int4 and fused, bf16 head packed). Each round times
`--steps` one-token steps after a `--context`-token prefill for every variant in turn, so machine noise hits all
rows alike; the table gives the median over rounds of the per-round median step. The peer is transformers'
LlamaForCausalLM in bf16, stepping its own DynamicCache the same way.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402


def lmstack_stepper(dtype: str, quant: str, inference: bool, context: int, slots: int):
    from lmstack.checkpoints import load_model
    model = load_model("smollm2-135m-instruct", dtype=dtype, quant=quant, inference=inference).model
    ids = torch.randint(0, 1000, (1, context), generator=torch.Generator().manual_seed(0))
    model.setup_cache(1, slots)

    def reset() -> None:
        model(ids, input_pos=torch.arange(context))

    def step(i: int) -> None:
        model(ids[:, -1:], input_pos=torch.tensor([context + i]), last_only=True)
    return reset, step


def transformers_stepper(context: int):
    from transformers import AutoModelForCausalLM, DynamicCache

    from lmstack.checkpoints import resolve
    path = resolve("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (1, context), generator=torch.Generator().manual_seed(0))
    state = {}

    def reset() -> None:
        state["cache"] = DynamicCache()
        model(ids, past_key_values=state["cache"], use_cache=True)

    def step(i: int) -> None:
        model(ids[:, -1:], past_key_values=state["cache"], use_cache=True)
    return reset, step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    slots = args.context + args.steps + 256
    variants = {
        "transformers bf16 (peer)": transformers_stepper(args.context),
        "lmstack fp32": lmstack_stepper("float32", "dequantize", True, args.context, slots),
        "lmstack bf16, plain (inference=False)": lmstack_stepper("bfloat16", "dequantize", False, args.context, slots),
        "lmstack bf16, inference=True (packed)": lmstack_stepper("bfloat16", "dequantize", True, args.context, slots),
        "lmstack --dtype auto (int4 fused, bf16 head packed)": lmstack_stepper("auto", "auto", True, args.context,
                                                                              slots),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, (reset, step) in variants.items():
                reset()
                ts = []
                for i in range(args.steps):
                    t = time.perf_counter()
                    step(i)
                    ts.append(time.perf_counter() - t)
                times[name].append(statistics.median(ts) * 1e3)
    peer = statistics.median(times["transformers bf16 (peer)"])
    fp32 = statistics.median(times["lmstack fp32"])
    lines = ["| variant | step ms | tok/s | × transformers bf16 | × lmstack fp32 |", "|---|---:|---:|---:|---:|"]
    for name, ms in times.items():
        m = statistics.median(ms)
        lines.append(f"| {name} | {m:.1f} | {1e3 / m:.1f} | {peer / m:.2f} | {fp32 / m:.2f} |")
    body = "\n".join(lines) + (
        f"\n\nOne cached decode step (the model's forward only: no sampling) after a {args.context}-token prefill, "
        f"median over {args.rounds} interleaved rounds of the median of {args.steps} steps, {args.threads} threads.")
    print(body)
    record("Decode step by inference swap: SmolLM2-135M on CPU", body,
           "python bench/decode_step.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
