"""GPTQ against round to nearest: SmolLM2 int4 perplexity, the same scheme quantized both ways in one run.

    python bench/gptq.py [--calibrate 1024] [--schemes int4-g32 int4-g64]

Each scheme is written three times by `lmstack quantize` (quantize()): round to nearest (llama.cpp's Q4 formats
are round to nearest too), GPTQ on the first `--calibrate` tokens of tinyshakespeare (the verb's default
calibration text), and GPTQ on `--calibrate` tokens of a mix (tinyshakespeare's start, the starts of course notes
000 and 003, 40 self-instruct seed tasks with their answers). The embedding and tied head are int8 in all
(`--embedding-scheme int8`), so the difference is the blocks'. Perplexity: the last 20,000
characters of tinyshakespeare (the verb's held-out text, never calibrated on) and of course note 002, windows of
512 tokens, stride 256. The source is SmolLM2's Q4_1 GGUF in bf16: int4-g32 groups coincide with its blocks, so
round to nearest there is nearly lossless, and g64 is where requantizing loses.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NOTE = DATA / "course-notes" / "002_92ff86f50255085d.txt"


def calibration_mix(path: Path) -> str:
    """Write the mixed calibration text to `path`; none of it is in the perplexity texts (their ends)."""
    import json
    seeds = [json.loads(line) for line in (DATA / "self-instruct" / "seed_tasks.jsonl").read_text().splitlines()[:40]]
    parts = [(DATA / "tinyshakespeare" / "input.txt").read_text()[:3000],
             (DATA / "course-notes" / "000_677e061d84fd6afc.txt").read_text()[:3000],
             (DATA / "course-notes" / "003_342bd825bd5048d9.txt").read_text()[:3000],
             "\n\n".join(t["instruction"] + "\n" + t["instances"][0]["output"] for t in seeds)[:3000]]
    path.write_text("\n\n".join(parts))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--calibrate", type=int, default=1024)
    parser.add_argument("--schemes", nargs="+", default=["int4-g32", "int4-g64"])
    args = parser.parse_args()
    import torch

    from lmstack.checkpoints import load_model
    from lmstack.compression.quantize import HELD_OUT_CHARS, held_out_perplexity, quantize
    torch.set_num_threads(2)
    notes = NOTE.read_text()[-HELD_OUT_CHARS:]
    rows, source = [], None
    with tempfile.TemporaryDirectory() as tmp:
        mix = calibration_mix(Path(tmp) / "mix.txt")
        methods = [("round to nearest", 0, None), ("GPTQ, tinyshakespeare", args.calibrate, None),
                   ("GPTQ, mix", args.calibrate, mix)]
        for scheme in args.schemes:
            for method, calibrate, text in methods:
                out = Path(tmp) / f"{scheme}-{len(rows)}"
                t0 = time.perf_counter()
                report = quantize(model=args.model, scheme=scheme, out=str(out), embedding_scheme="int8",
                                  calibrate=calibrate, calibration_text=text, decode_tokens=0,
                                  compare=source is None)
                seconds = time.perf_counter() - t0
                if source is None:
                    src = load_model(args.model, dtype=torch.bfloat16)
                    source = (report["source"]["perplexity"], held_out_perplexity(src.model, src.tokenizer, notes))
                    del src
                q = load_model(str(out), dtype=torch.bfloat16)
                rows.append((scheme, method, calibrate,
                             report["quantized"]["perplexity"], held_out_perplexity(q.model, q.tokenizer, notes),
                             report.get("calibrate_s"), seconds, report["bytes"]))
    lines = ["| scheme (int8 embedding) | method | calibration tokens | MB | ppl tinyshakespeare | ppl course notes "
             "| excess over bf16 (tinyshakespeare) | excess x round to nearest | calibration s | quantize s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| source (bf16, the GGUF dequantized) | - | - | - | {source[0]:.3f} | {source[1]:.3f} | - | - | - | - |"]
    rtn_excess: dict[str, float] = {}
    for scheme, method, calibrate, ppl, ppl_notes, calib_s, seconds, size in rows:
        excess = ppl - source[0]
        rtn_excess.setdefault(scheme, excess)
        lines.append(f"| {scheme} | {method} | {calibrate} | {size / 1e6:.1f} | {ppl:.3f} | {ppl_notes:.3f} | "
                     f"{excess:+.3f} | {excess / rtn_excess[scheme]:.2f} | "
                     f"{'-' if calib_s is None else f'{calib_s:.1f}'} | {seconds:.0f} |")
    body = "\n".join(lines) + (
        f"\n\nSmolLM2-135M-Instruct; GPTQ on {args.calibrate} tokens (tinyshakespeare's first, or the mix's) in windows of 512, "
        "damping 0.01, blocks of 128 columns, groups' scale and zero set from the updated weights; layers in order, "
        "each calibrated on the already quantized layers' outputs. Perplexity on the last 20,000 characters of "
        "tinyshakespeare and of course note 002 (windows of 512, stride 256). 2 threads.")
    print(body)
    record("GPTQ against round to nearest: SmolLM2 int4", body,
           f"python bench/gptq.py --calibrate {args.calibrate} --schemes {' '.join(args.schemes)}")


if __name__ == "__main__":
    main()
