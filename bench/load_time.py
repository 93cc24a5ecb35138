"""Load time of `load_model` for the shipped SmolLM2 GGUF and a native bf16 folder, per way of skipping init.

    python bench/load_time.py [--before SRC] [--repeats 3] [--native DIR] [--record]

Each measurement is a fresh process (so torch's lazy imports count, as for a user): it imports torch, then
times `load_model(target, dtype="bfloat16")` alone. Variants:
  after        this checkout: skip_init is a thread-local torch function mode
  before       --before SRC (an lmstack src/ from before the change, whose skip_init patched torch.nn.init for
               the whole process), when given
  meta-no-skip this checkout with skip_init replaced by a no-op: what random init on the meta device costs
               (it imports torch._dynamo through torch._refs)
Reports the median of the repeats and whether torch._dynamo ended up imported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import median, record  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"

CHILD = """
import contextlib, json, sys, time
import torch
if {no_skip}:
    import lmstack.checkpoints.load as L
    L.skip_init = contextlib.nullcontext
from lmstack.checkpoints import load_model
start = time.perf_counter()
loaded = load_model({target!r}, dtype="bfloat16")
elapsed = time.perf_counter() - start
print(json.dumps({{"load_s": elapsed, "dynamo": "torch._dynamo" in sys.modules}}))
"""


def one_run(src: Path, target: str, no_skip: bool) -> dict:
    code = CHILD.format(no_skip=no_skip, target=target)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"})
    if out.returncode != 0:
        raise SystemExit(f"child failed ({src}, {target}): {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="an lmstack src/ folder from before the change")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--native", type=Path, help="a native bf16 SmolLM2 folder (made with convert if absent)")
    parser.add_argument("--record", action="store_true", help="write the table to docs/benchmarks.md")
    args = parser.parse_args()

    native = args.native or Path(tempfile.gettempdir()) / "lmstack-smollm2-native-bf16"
    if not (native / "lmstack.json").exists():
        subprocess.run([sys.executable, "-m", "lmstack", "convert", "smollm2-135m-instruct", str(native),
                        "--to", "native", "--dtype", "bfloat16"], check=True, env={"PYTHONPATH": str(SRC),
                                                                                   "PATH": "/usr/bin:/bin"})
    variants = [("after", SRC, False)]
    if args.before:
        variants.insert(0, ("before", args.before, False))
    variants.append(("meta-no-skip", SRC, True))
    rows = ["| variant | target | load s (median of %d) | runs | torch._dynamo imported |" % args.repeats,
            "|---|---|---|---|---|"]
    for name, src, no_skip in variants:
        for label, target in (("GGUF Q4_1", "smollm2-135m-instruct"), ("native bf16", str(native))):
            runs = [one_run(src, target, no_skip) for _ in range(args.repeats)]
            times = [r["load_s"] for r in runs]
            row = (f"| {name} | {label} | {median(times):.2f} | {', '.join(f'{t:.2f}' for t in times)} | "
                   f"{'yes' if any(r['dynamo'] for r in runs) else 'no'} |")
            rows.append(row)
            print(row, flush=True)
    table = "\n".join(rows)
    print(table)
    if args.record:
        record("Model load time: skipping random init", table + "\n\nContended: 2 shared cores.",
               "python bench/load_time.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
