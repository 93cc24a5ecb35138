"""The shared blocks every family is built from: norms, positions, MLPs, the transformer layer (attention and its
KV cache live in attention.py).

Shapes: B batch, T query length, S key length, C d_model, H heads, Hkv key/value heads, D head_dim.
Blocks take their sub-modules as arguments (builders live in each family's file), so a LoRA Linear or a
quantized Linear drops in by swapping a module, never by subclassing a model.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.models.attention import Attention, KVCache, apply_rope  # noqa: F401  (the blocks' one attention)

# ------------------------------------------------------------------------------------------- counting


def count_weights(module: nn.Module) -> int:
    """The weights `module` represents, however they are stored: its parameters, plus in x out for every
    packed or quantized linear whose weight is not a Parameter (int4/int8/NF4 buffers, a oneDNN-packed tensor).
    A packed copy of a tied embedding table (`tied`) counts once, under the table."""
    n = sum(p.numel() for p in module.parameters())
    for m in module.modules():
        if (hasattr(m, "in_features") and hasattr(m, "out_features") and m._parameters.get("weight") is None
                and not getattr(m, "tied", False)):
            n += m.in_features * m.out_features
    return n


# --------------------------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 as Llama does."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype:  # the fused kernel reduces in float32 already: same result, fewer ops
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}")


# ----------------------------------------------------------------------------------------- positions


def sinusoidal_table(n_positions: int, dim: int) -> Tensor:
    """The fixed sin/cos table of Vaswani et al.: [n_positions, dim], sin in even, cos in odd columns."""
    position = torch.arange(n_positions, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
    return table


def rope_table(n_positions: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin for rotary embeddings in the rotate-half layout used by HF Llama: each [n_positions, D]."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float32), inv_freq)  # [P, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [P, D]
    return angles.cos(), angles.sin()


# --------------------------------------------------------------------------------------------- MLPs

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class MLP(nn.Module):
    """down(act(up(x))), or with a gate (SwiGLU when act is SiLU): down(act(gate(x)) * up(x))."""

    def __init__(self, up_proj: nn.Module, down_proj: nn.Module, activation: str,
                 gate_proj: nn.Module | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        # Inference only (lmstack.quant.quantize.fuse_projections_): one module computing [gate | up], which
        # replaces gate_proj and up_proj (set to None).
        self.gate_up_proj: nn.Module | None = None
        self.act = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, C] -> [B, T, C]
        if self.gate_up_proj is not None:
            gate, h = self.gate_up_proj(x).chunk(2, dim=-1)  # [B, T, F] each
            h = self.act(gate) * h
        else:
            h = self.up_proj(x)
            h = self.act(self.gate_proj(x)) * h if self.gate_proj is not None else self.act(h)
        y = self.down_proj(h)
        return self.dropout(y) if self.training else y  # eval: skip the module call (a decode step has 60)


def make_mlp(d_model: int, d_ff: int, activation: str, gated: bool, bias: bool, dropout: float = 0.0) -> MLP:
    return MLP(up_proj=nn.Linear(d_model, d_ff, bias=bias), down_proj=nn.Linear(d_ff, d_model, bias=bias),
               activation=activation, gate_proj=nn.Linear(d_model, d_ff, bias=bias) if gated else None,
               dropout=dropout)


def make_attention(d_model: int, n_head: int, n_kv_head: int, head_dim: int, bias: bool,
                   scale: float | None = None, dropout: float = 0.0) -> Attention:
    return Attention(
        q_proj=nn.Linear(d_model, n_head * head_dim, bias=bias),
        k_proj=nn.Linear(d_model, n_kv_head * head_dim, bias=bias),
        v_proj=nn.Linear(d_model, n_kv_head * head_dim, bias=bias),
        o_proj=nn.Linear(n_head * head_dim, d_model, bias=bias),
        n_head=n_head, n_kv_head=n_kv_head, head_dim=head_dim, scale=scale, dropout=dropout)


# --------------------------------------------------------------------------------------------- heads


class TiedHead(nn.Module):
    """The output projection of a model whose head reuses its token embedding table: [.., C] -> [.., V].

    It holds no weights of its own (the checkpoint keeps one copy, under the embedding's key) and reads the
    embedding module through `owner` at call time, so swapping the embedding (a quantized one, say) swaps the
    head too. A table that can project itself (`embedding.project(x)`) does so.
    """

    def __init__(self, owner: nn.Module, attribute: str = "tok_emb") -> None:
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered as a child (no cycle, no second key)
        self.attribute = attribute

    @property
    def embedding(self) -> nn.Module:
        return getattr(self._owner[0], self.attribute)

    @property
    def weight(self) -> Tensor:
        return self.embedding.weight

    def forward(self, x: Tensor) -> Tensor:
        emb = self.embedding
        project = getattr(emb, "project", None)
        return project(x) if project is not None else F.linear(x, emb.weight)


# -------------------------------------------------------------------------------------------- block


def _identity(x: Tensor) -> Tensor:
    return x


class Block(nn.Module):
    """One transformer layer: self-attention, optional cross-attention, MLP; pre-norm or post-norm.

    pre-norm:  x = x + attn(norm(x));  x = x + mlp(norm(x))          (GPT-2, Llama, T5)
    post-norm: x = norm(x + attn(x));  x = norm(x + mlp(x))          (BERT, original Transformer)
    """

    def __init__(self, attn: Attention, attn_norm: nn.Module, mlp: nn.Module, mlp_norm: nn.Module,
                 cross_attn: Attention | None = None, cross_norm: nn.Module | None = None,
                 norm_first: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn, self.attn_norm = attn, attn_norm
        self.cross_attn, self.cross_norm = cross_attn, cross_norm
        self.mlp, self.mlp_norm = mlp, mlp_norm
        self.norm_first = norm_first
        self.dropout = nn.Dropout(dropout)

    def _residual(self, x: Tensor, norm: nn.Module, fn) -> Tensor:
        drop = self.dropout if self.training else _identity
        if self.norm_first:
            return x + drop(fn(norm(x)))
        return norm(x + drop(fn(x)))

    def forward(self, x: Tensor, *, rope: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None,
                is_causal: bool = False, input_pos: Tensor | None = None, memory: Tensor | None = None,
                memory_mask: Tensor | None = None, kv_len: int | None = None,
                cache: KVCache | None = None) -> Tensor:  # [B, T, C] -> [B, T, C]
        x = self._residual(x, self.attn_norm, lambda h: self.attn(
            h, rope=rope, mask=mask, is_causal=is_causal, input_pos=input_pos, kv_len=kv_len, cache=cache))
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_norm, lambda h: self.cross_attn(
                h, mask=memory_mask, memory=memory, cross=True))
        return self._residual(x, self.mlp_norm, self.mlp)
