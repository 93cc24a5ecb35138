"""Shared by the benchmark scripts: machine description, medians, and appending a dated section to
docs/benchmarks.md (replacing an older section with the same title)."""

from __future__ import annotations

import datetime
import platform
import re
import statistics
import subprocess
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (StopIteration, OSError):
        cpu = platform.processor() or "unknown CPU"
    # the vector ISA ATen dispatches to: the same model name has come with and without AVX512 here
    isa = torch.backends.cpu.get_cpu_capability()
    host = (f"{cpu} ({isa}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}")
    if not torch.cuda.is_available():
        return host
    gpu = torch.cuda.get_device_properties(torch.cuda.current_device())
    return f"{gpu.name} ({gpu.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}) on {host}"


def median(values: list[float]) -> float:
    return statistics.median(values)


def section(title: str, body: str, command: str) -> str:
    """The `## title` section that `record` writes: the date, machine, command and `body`."""
    stamp = datetime.date.today().isoformat()
    return f"## {title}\n\n{stamp} · {machine()}\n\nCommand: `{command}`\n\n{body.strip()}\n"


def record(title: str, body: str, command: str) -> None:
    """Write `body` under `## title` in docs/benchmarks.md with the date, machine and command."""
    new = section(title, body, command)
    BENCHMARKS_MD.parent.mkdir(parents=True, exist_ok=True)
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n\nMedians and ratios from runs on the stated machine; every table names the command that made it.\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: new + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + new
    BENCHMARKS_MD.write_text(text)
