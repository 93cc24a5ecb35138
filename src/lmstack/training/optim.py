"""AdamW with decay only on matrices, and linear warmup then cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weights of dimension >= 2 (matrices, embeddings); never biases or norm gains."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   eps: float = 1e-8) -> torch.optim.AdamW:
    groups = [g for g in param_groups(model, weight_decay) if g["params"]]
    # fused AdamW exists on CPU and GPU since torch 2.4 and is noticeably faster than the for-loop version
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `decay_steps` (nanoGPT's)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
