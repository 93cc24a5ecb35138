"""FLOP counts for MFU and the planner, and this machine's peak matmul FLOP/s (measured once, then cached)."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmstack.errors import LmstackError
from lmstack.io import atomic_write_json


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matmuls: everything but embedding lookups and 1-D tensors (norms, biases)."""
    from lmstack.models.blocks import TiedHead
    from lmstack.models.seq2seq import RelativePositionBias  # a lookup table too (T5's relative positions)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, RelativePositionBias))}
    n = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings)
    if any(isinstance(m, TiedHead) for m in model.modules()):  # a tied head reuses the [V, C] table as a matmul
        n += model.config.vocab_size * model.config.d_model
    return n


def train_flops_per_token(n_matmul_params: int, n_layer: int, d_attn: int, seq_len: int) -> float:
    """6·N for the weight matmuls (forward 2N, backward 4N) plus 12·L·d·T for attention scores (PaLM, app. B)."""
    return 6.0 * n_matmul_params + 12.0 * n_layer * d_attn * seq_len


def model_train_flops_per_token(model: nn.Module, seq_len: int) -> float:
    cfg = model.config
    n_layer = getattr(cfg, "n_layer", 0) or (getattr(cfg, "n_encoder_layer", 0) + getattr(cfg, "n_decoder_layer", 0))
    d_attn = getattr(cfg, "n_head", 1) * (getattr(cfg, "head_dim", None) or cfg.d_model // cfg.n_head)
    return train_flops_per_token(matmul_params(model), n_layer, d_attn, seq_len)


def measure_peak_flops(dtype: torch.dtype = torch.float32, size: int | None = None, seconds: float = 3.0,
                       device: str = "cpu") -> float:
    """Best sustained FLOP/s of a square matmul in `dtype`, the denominator of MFU.

    The best of many timed batches over `seconds`, at two sizes (None) or one: a busy neighbour on a shared
    machine only ever slows a batch down, so the best batch is the least disturbed one. Too short a window
    (the trainer once used 0.5 s) underestimates the peak and gives MFUs above 100%.
    """
    sizes = [size] if size else ([1024, 2048] if device == "cpu" else [4096, 8192])
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        t0 = time.perf_counter()
        a @ b  # warm-up: thread pool, kernel selection
        slow = device == "cpu" and (once := time.perf_counter() - t0) > seconds / 8
        if slow:  # a dtype this CPU has no fast path for (bf16 without AVX512-BF16: about 1 GFLOP/s): a product
            # small enough that timed batches fit the window, instead of minutes at full size
            n = max(64, int(n * (seconds / 8 / once) ** (1 / 3)))
            a, b = a[:n, :n].contiguous(), b[:n, :n].contiguous()
        a @ b
        deadline = time.perf_counter() + seconds / len(sizes)
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            for _ in range(2):
                a @ b
            if device != "cpu":
                torch.cuda.synchronize()
            best = max(best, 2 * 2 * n**3 / (time.perf_counter() - t0))
        if slow:  # no larger size after it
            break
    return best


# ------------------------------------------------------------------------------ the peak, cached per machine

PEAK_FLOPS_ENV = "LMSTACK_PEAK_FLOPS"  # FLOP/s; overrides the cache (TrainConfig.peak_flops overrides both)


@dataclass
class Peak:
    flops: float
    source: str  # where the figure came from, for messages: the env var, the cache file, or "measured"


def peak_flops_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmstack" / "peak_flops.json"


def machine_key(dtype: torch.dtype, device: str = "cpu") -> str:
    """What a peak depends on: the processor, the thread count (CPU) and the dtype."""
    if device == "cuda":
        return f"cuda {torch.cuda.get_device_name()} {str(dtype).removeprefix('torch.')}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu {model} threads={torch.get_num_threads()} {str(dtype).removeprefix('torch.')}"


def _read_cache(path: Path) -> dict[str, float]:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and v > 0} if isinstance(
        values, dict) else {}


def peak_flops(dtype: torch.dtype, device: str = "cpu") -> Peak:
    """This machine's peak matmul FLOP/s in `dtype`: $LMSTACK_PEAK_FLOPS, else the cached measurement, else a
    new measurement (then cached under machine_key)."""
    env = os.environ.get(PEAK_FLOPS_ENV)
    if env:
        try:
            value = float(env)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise LmstackError(f"{PEAK_FLOPS_ENV} must be a positive number of FLOP/s (e.g. 1.5e11), got {env!r}")
        return Peak(value, PEAK_FLOPS_ENV)
    path, key = peak_flops_cache(), machine_key(dtype, device)
    cache = _read_cache(path)
    if key in cache:
        return Peak(cache[key], f"cached in {path}")
    value = measure_peak_flops(dtype, device=device)
    try:
        atomic_write_json(path, {**_read_cache(path), key: value})
    except OSError:  # a read-only home: measure again next time
        pass
    return Peak(value, "measured")


def forget_peak_flops(dtype: torch.dtype, device: str = "cpu") -> None:
    """Drop this machine's cached peak (found too low), so the next run measures it again."""
    path = peak_flops_cache()
    cache = _read_cache(path)
    if cache.pop(machine_key(dtype, device), None) is not None:
        try:
            atomic_write_json(path, cache)
        except OSError:
            pass
