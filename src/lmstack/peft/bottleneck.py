"""Houlsby bottleneck adapters (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP").

A small residual MLP, h + up(act(down(h))), placed after the attention and after the MLP of every block, before
each residual add. It is inserted by composition: `block.attn` and `block.mlp` are wrapped by `WithBottleneck`,
which calls the original module (all arguments passed through) and then the adapter. No model class changes.

Note: wrapping moves the wrapped module's keys under `.inner` (layers.0.attn.inner.q_proj.weight), so load base
weights before `apply_bottleneck` and save the bottlenecks alone with `peft.lora.peft_state_dict` (their keys are
`layers.0.attn.adapter.down.weight`, ...: `adapter` is the attribute, kept so that saved files stay loadable).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmstack.errors import LmstackError
from lmstack.models.blocks import ACTIVATIONS, Block


class BottleneckAdapter(nn.Module):
    """h + up(act(down(h))): [..., C] -> [..., C], with a bottleneck of m << C features."""

    def __init__(self, dim: int, bottleneck: int, activation: str = "gelu", init_std: float = 1e-2) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise LmstackError(f"unknown adapter activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if bottleneck < 1:
            raise LmstackError(f"adapter bottleneck must be >= 1, not {bottleneck}")
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.act = ACTIVATIONS[activation]
        # Near-identity start (Houlsby et al. sec. 3.6): N(0, init_std) truncated at 2 std, zero biases, so the
        # projection is close to zero and the block starts as the pretrained one.
        for lin in (self.down, self.up):
            nn.init.trunc_normal_(lin.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
            nn.init.zeros_(lin.bias)

    def forward(self, h: Tensor) -> Tensor:
        w = self.down.weight
        return h + self.up(self.act(self.down(h.to(w.dtype)))).to(h.dtype)


class WithBottleneck(nn.Module):
    """inner(*args, **kwargs), then the adapter; attributes it lacks are read from `inner`. Everything a call
    needs (the KV cache too) comes in its arguments, so nothing has to be forwarded into `inner`."""

    peft_switch = True  # disable_adapter() turns the bottleneck off
    peft_weights = ("adapter",)  # what peft_state_dict saves

    def __init__(self, inner: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.inner = inner
        self.adapter = adapter
        self.disabled = False

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        y = self.inner(*args, **kwargs)
        return y if self.disabled else self.adapter(y)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)


def apply_bottleneck(model: nn.Module, bottleneck: int = 64, activation: str = "gelu",
                     init_std: float = 1e-2) -> nn.Module:
    """Wrap the attention and MLP of every block with a bottleneck adapter (in place); freeze everything else."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise LmstackError("the model has no transformer blocks to put adapters in")
    if any(isinstance(b.attn, WithBottleneck) for b in blocks):
        raise LmstackError("the model already has bottleneck adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in blocks:
        dim = block.attn.o_proj.out_features  # d_model (also for LoRALinear projections)
        device, dtype = _param_like(block)
        block.attn = WithBottleneck(block.attn, BottleneckAdapter(dim, bottleneck, activation, init_std))
        block.mlp = WithBottleneck(block.mlp, BottleneckAdapter(dim, bottleneck, activation, init_std))
        block.attn.adapter.to(device=device, dtype=dtype)
        block.mlp.adapter.to(device=device, dtype=dtype)
    return model


def _param_like(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    # Adapter weights stay float32 over a half-precision model (the trainer's bf16 autocast handles the matmuls).
    return p.device, torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype
