"""FLOP counts for MFU and the planner, and a quick measurement of this machine's peak matmul FLOP/s."""

from __future__ import annotations

import time

import torch
from torch import nn


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matmuls: everything but embedding lookups and 1-D tensors (norms, biases)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    n = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings)
    from lmstack.models.blocks import TiedHead
    if isinstance(getattr(model, "lm_head", None), TiedHead):  # a tied head reuses the embedding matrix as a matmul
        n += model.lm_head.weight.numel()
    return n


def train_flops_per_token(n_matmul_params: int, n_layer: int, d_attn: int, seq_len: int) -> float:
    """6·N for the weight matmuls (forward 2N, backward 4N) plus 12·L·d·T for attention scores (PaLM, app. B)."""
    return 6.0 * n_matmul_params + 12.0 * n_layer * d_attn * seq_len


def model_train_flops_per_token(model: nn.Module, seq_len: int) -> float:
    cfg = model.config
    n_layer = getattr(cfg, "n_layer", 0) or (getattr(cfg, "n_encoder_layer", 0) + getattr(cfg, "n_decoder_layer", 0))
    d_attn = getattr(cfg, "n_head", 1) * (getattr(cfg, "head_dim", None) or cfg.d_model // cfg.n_head)
    return train_flops_per_token(matmul_params(model), n_layer, d_attn, seq_len)


def measure_peak_flops(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 1.0,
                       device: str = "cpu") -> float:
    """Best sustained FLOP/s of a square matmul, the denominator of MFU."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - t0))
    return best
