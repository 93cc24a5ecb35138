"""Attention kernels on CPU, the figures behind `models.attention.attend`: half-precision training attention
(lmstack's matmul_attention against SDPA's flash kernel, forward + backward) and one-query cached decoding (bf16
SDPA against matmul_attention in float32), at SmolLM2-135M's heads (9 query, 3 kv, head_dim 64), plus the bare
matmul throughput that bounds a training step in fp32 and bf16.

    python bench/train_attention.py [--threads 2] [--repeats 15]

Attention rows: causal self-attention, q/k/v laid out as Attention.forward makes them (a [B, T, H, D] projection
viewed as [B, H, T, D]), one backward with a fixed output gradient; median milliseconds per call. `sdpa fp32`
casts bf16 q/k/v to float32 first (an alternative that was tried: faster than bf16 SDPA up to ~384 keys, but
slower than matmul_attention).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import median, record  # noqa: E402

from lmstack.models.attention import MATMUL_ATTENTION_MAX_KEYS, attend, matmul_attention  # noqa: E402

SHAPES = [(2, 160), (8, 160), (2, 256), (2, 384), (1, 1024)]  # (batch, keys)


def ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * median(times)


def attention_row(batch: int, keys: int, repeats: int) -> tuple[float, float, float]:
    g = torch.Generator().manual_seed(0)

    def heads(n: int) -> torch.Tensor:  # [B, n, T, D] as a view of a [B, T, n, D] projection
        return torch.randn(batch, keys, n, 64, generator=g).bfloat16().transpose(1, 2).requires_grad_()

    q, k, v = heads(9), heads(3), heads(3)
    grad = torch.randn(batch, 9, keys, 64, generator=g).bfloat16()

    def sdpa(dtype: torch.dtype) -> None:
        y = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=True, enable_gqa=True)
        y.to(torch.bfloat16).backward(grad)

    def ours() -> None:
        matmul_attention(q, k, v, None, None, is_causal=True).backward(grad)

    return ms(lambda: sdpa(torch.bfloat16), repeats), ms(lambda: sdpa(torch.float32), repeats), ms(ours, repeats)


DECODE_KEYS = [256, 768, 2048]  # cache slots a one-query decode step attends over


def decode_row(keys: int, repeats: int) -> tuple[float, float, float]:
    """One query per row over `keys` cache slots, the last not written yet: median microseconds of SDPA in bf16
    over a bf16 cache with a slot mask, of matmul_attention in float32 over the same (the previous choice, which
    converts the cache on every step), and of what `attend` does now: SDPA in float32 over the written slots of
    a float32 cache (models.attention.kv_cache_dtype), no mask."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, 1, 64, generator=g).bfloat16()
    k, v = (torch.randn(1, 3, keys, 64, generator=g).bfloat16() for _ in range(2))
    mask = (torch.arange(keys) <= keys - 2).view(1, 1, 1, keys)
    k32, v32 = k.float(), v.float()
    with torch.inference_mode():
        sdpa = ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), repeats)
        before = ms(lambda: matmul_attention(q, k, v, mask, None, dtype=torch.float32).bfloat16(), repeats)
        now = ms(lambda: attend(q, k32[:, :, :keys - 1], v32[:, :, :keys - 1], None), repeats)
    return 1e3 * sdpa, 1e3 * before, 1e3 * now


def matmul_gflops(dtype: torch.dtype, repeats: int) -> float:
    x, w = torch.randn(320, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)  # a SmolLM2 MLP projection
    return 2 * 320 * 576 * 1536 / (ms(lambda: x @ w.T, repeats) * 1e-3) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["| batch x keys | sdpa bf16 ms | sdpa fp32 ms | matmul_attention ms | sdpa bf16 / ours | lmstack uses |",
             "|---|---:|---:|---:|---:|---|"]
    for batch, keys in SHAPES:
        bf16, fp32, ours = attention_row(batch, keys, args.repeats)
        uses = "matmul_attention" if keys <= MATMUL_ATTENTION_MAX_KEYS else "sdpa"
        lines.append(f"| {batch} x {keys} | {bf16:.2f} | {fp32:.2f} | {ours:.2f} | {bf16 / ours:.2f} | {uses} |")
        print(lines[-1], flush=True)
    mm = {dtype: matmul_gflops(dtype, args.repeats) for dtype in (torch.float32, torch.bfloat16)}
    table = "\n".join(lines)
    body = (table + "\n\nForward + backward of causal attention, bf16 inputs, medians of "
            f"{args.repeats} calls. Bare 320x576 @ 576x1536 matmul: {mm[torch.float32]:.0f} GFLOP/s fp32, "
            f"{mm[torch.bfloat16]:.0f} GFLOP/s bf16 ({mm[torch.bfloat16] / mm[torch.float32]:.1f}x).")
    print(body)
    decode = ["| keys | sdpa bf16, masked us | matmul_attention fp32 over a bf16 cache us | attend (sdpa fp32, "
              "fp32 cache, written slots) us | sdpa bf16 / attend |", "|---|---:|---:|---:|---:|"]
    for keys in DECODE_KEYS:
        sdpa, before, now = decode_row(keys, 10 * args.repeats)
        decode.append(f"| {keys} | {sdpa:.0f} | {before:.0f} | {now:.0f} | {sdpa / now:.2f} |")
        print(decode[-1], flush=True)
    decode_body = ("\n".join(decode) + "\n\nOne query, batch 1, SmolLM2's heads (9 query, 3 key/value, 64 dims), "
                   f"medians of {10 * args.repeats} calls. Cached half-precision decoding on CPU keeps a float32 "
                   "cache and attends with SDPA in float32 over the slots written so far (`models.attention.attend`).")
    print(decode_body)
    if not args.no_record:
        command = "python " + " ".join(["bench/train_attention.py", *sys.argv[1:]])
        record("Training attention on CPU: matmul_attention vs SDPA", body, command)
        record("Decode attention on CPU: one query", decode_body, command)


if __name__ == "__main__":
    main()
