"""The compiled CPU decode step's attention: lmstack's C++ kernel (`lmstack.kernels.decode_attention`) against
the same attention written in torch ops and fused by inductor (`models.attention.one_query_attention`, the
previous choice and the fallback), and SDPA in float32.

    python bench/decode_attention.py [--threads 2] [--rounds 5] [--tokens 128]

Two tables. Per call: one query over a cache pool whose first 80% of slots are written (the rest masked, as in a
compiled step over the whole pool), SmolLM2's heads (9 query, 3 key/value, 64 dims), bf16 cache; each path
compiled alone with the C++ wrapper. Per token: SmolLM2 int4 from the shipped GGUF with `--compile`, in one
process, a 512-token prompt and `--tokens` greedy tokens, the kernel switched on and off between generations
(each a graph of its own, compiled before the timed rounds), medians over rounds and the median paired ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import median, record  # noqa: E402
from generate import prompt_ids  # noqa: E402
from train_attention import ms  # noqa: E402

from lmstack import kernels  # noqa: E402
from lmstack.models.attention import one_query_attention  # noqa: E402

POOLS = [256, 768, 2048]


def us(fn, repeats: int) -> float:
    return 1e3 * ms(fn, repeats)


def op_row(slots: int, repeats: int) -> tuple[float, float, float]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, 1, 64, generator=g).bfloat16()
    k, v = (torch.randn(1, 3, slots, 64, generator=g).bfloat16() for _ in range(2))
    mask = (torch.arange(slots) < int(0.8 * slots)).view(1, 1, 1, slots)
    compile = dict(fullgraph=True, options={"cpp_wrapper": True})
    ours = torch.compile(lambda q, k, v, m: kernels.decode_attention(q, k, v, m, None), **compile)
    fused = torch.compile(lambda q, k, v, m: one_query_attention(q, k, v, m, None), **compile)
    with torch.inference_mode():
        torch.testing.assert_close(ours(q, k, v, mask), fused(q, k, v, mask), atol=1e-2, rtol=1e-2)
        k32, v32 = k.float(), v.float()
        sdpa = us(lambda: F.scaled_dot_product_attention(q.float(), k32, v32, attn_mask=mask, enable_gqa=True),
                  repeats)
        return us(lambda: ours(q, k, v, mask), repeats), us(lambda: fused(q, k, v, mask), repeats), sdpa


def step_ab(rounds: int, tokens: int) -> tuple[list[float], list[float], bool]:
    from lmstack.checkpoints import load_model
    from lmstack.generation import GenerationConfig, Generator
    loaded = load_model("smollm2-135m-instruct", dtype="auto", quant="auto", inference=True, compile=True)
    gen = Generator(loaded.model, loaded.tokenizer, compile=True)
    ids = prompt_ids(loaded.tokenizer.encode, 512)
    cfg = GenerationConfig(max_new_tokens=tokens, temperature=0.0, stop=[])
    speed: dict[bool, list[float]] = {True: [], False: []}
    outputs: dict[bool, list[int]] = {}
    for r in range(rounds + 1):  # round 0 compiles both graphs
        for on in (True, False):
            kernels._state["decode_attention"] = on  # attend reads it while tracing; each value is its own graph
            res = gen.generate(ids, cfg)
            outputs[on] = res.token_ids
            if r:
                speed[on].append(res.decode_tokens_per_s)
        if r:
            print(f"round {r}: kernel {speed[True][-1]:.1f}, inductor {speed[False][-1]:.1f} tok/s", flush=True)
    kernels._state["decode_attention"] = True
    return speed[True], speed[False], outputs[True] == outputs[False]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.decode_attention_available():
        raise SystemExit("the kernel did not build here; nothing to compare")
    ops = ["| pool slots (80% written) | kernel us | inductor-fused torch ops us | sdpa fp32 us | inductor / kernel |",
           "|---:|---:|---:|---:|---:|"]
    for slots in POOLS:
        ours, fused, sdpa = op_row(slots, args.repeats)
        ops.append(f"| {slots} | {ours:.0f} | {fused:.0f} | {sdpa:.0f} | {fused / ours:.2f} |")
        print(ops[-1], flush=True)
    on, off, same = step_ab(args.rounds, args.tokens)
    ratio = median([a / b for a, b in zip(on, off)])
    step = ["| attention in the compiled step | decode tok/s (median) | paired ratio |", "|---|---:|---:|",
            f"| lmstack kernel | {median(on):.1f} | {ratio:.2f} |",
            f"| inductor-fused torch ops (one_query_attention) | {median(off):.1f} | 1.00 |"]
    body = ("\n".join(ops) + f"\n\nOne query, batch 1, medians of {args.repeats} calls, each path compiled alone "
            "(C++ wrapper).\n\n" + "\n".join(step) + f"\n\nSmolLM2-135M int4 (shipped GGUF, `--compile`), one "
            f"process, a 512-token prompt, {args.tokens} greedy tokens, {args.rounds} rounds after the compile "
            f"round; same greedy tokens both ways: {'yes' if same else 'no'}.")
    print(body)
    if not args.no_record:
        record("Decode attention in the compiled CPU step: C++ kernel vs inductor", body,
               "python " + " ".join(["bench/decode_attention.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
