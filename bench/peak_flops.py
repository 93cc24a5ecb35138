"""Peak matmul FLOP/s of this machine (fp32 and bf16), the denominator of every MFU figure we report.

    python bench/peak_flops.py [--threads 2] [--seconds 6] [--json] [--save]

--save stores the figures in the cache the trainer reads (~/.cache/lmstack/peak_flops.json, keyed by processor,
thread count and dtype), replacing what an earlier, perhaps disturbed, measurement left there.
"""

from __future__ import annotations

import argparse
import json

import torch

from lmstack.io import atomic_write_json
from lmstack.training.flops import _read_cache, machine_key, measure_peak_flops, peak_flops_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0, help="per dtype")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", action="store_true", help="write the figures to the trainer's cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows = {name: measure_peak_flops(dtype, seconds=args.seconds) for name, dtype in dtypes.items()}
    if args.save:
        path = peak_flops_cache()
        atomic_write_json(path, {**_read_cache(path), **{machine_key(dtypes[n]): v for n, v in rows.items()}})
    if args.json:
        print(json.dumps(rows))
        return
    print(f"| dtype | peak matmul GFLOP/s ({args.threads} threads) |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value / 1e9:,.1f} |")


if __name__ == "__main__":
    main()
