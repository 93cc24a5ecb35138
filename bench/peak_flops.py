"""Peak matmul FLOP/s of this machine (fp32 and bf16), the denominator of every MFU figure we report.

    python bench/peak_flops.py [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json

import torch

from lmstack.training.flops import measure_peak_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rows[name] = max(measure_peak_flops(dtype, size=size, seconds=args.seconds / 2) for size in (1024, 2048))
    if args.json:
        print(json.dumps(rows))
        return
    print(f"| dtype | peak matmul GFLOP/s ({args.threads} threads) |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value / 1e9:,.1f} |")


if __name__ == "__main__":
    main()
