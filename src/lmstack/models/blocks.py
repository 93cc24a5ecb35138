"""The shared blocks every family is built from: norms, positions, attention (self, cross, GQA), MLPs, KV cache.

Shapes: B batch, T query length, S key length, C d_model, H heads, Hkv key/value heads, D head_dim.
Blocks take their sub-modules as arguments (builders live in each family's file), so a LoRA Linear or a
quantized Linear drops in by swapping a module, never by subclassing a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 as Llama does."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
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


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, D]; cos, sin: [B, 1, T, D] (already gathered at each token's position)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# ---------------------------------------------------------------------------------------- KV cache


class KVCache(nn.Module):
    """A preallocated key/value cache: [B, Hkv, S_max, D]. Writes go to slots `input_pos`.

    input_pos [T] writes every row at the same slots; input_pos [B, T] gives each row its own slots (continuous
    batching, where every row of a cache pool has its own length).
    """

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # input_pos: [T] or [B, T]; k, v: [B, Hkv, T, D] -> whole cache [B, Hkv, S_max, D]
        if input_pos.dim() == 2:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # [B, 1]
            self.k[rows, :, input_pos] = k.transpose(1, 2).to(self.k.dtype)  # indexed view: [B, T, Hkv, D]
            self.v[rows, :, input_pos] = v.transpose(1, 2).to(self.v.dtype)
            return self.k, self.v
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v

    def view(self, rows: slice, length: int) -> KVCache:
        """A cache over `rows` and the first `length` slots that shares this one's storage (writes go through)."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[rows, :, :length], persistent=False)
        view.register_buffer("v", self.v[rows, :, :length], persistent=False)
        return view

    def reorder(self, beam_idx: Tensor) -> None:
        """Beam search: keep the rows of the surviving beams."""
        self.k.copy_(self.k.index_select(0, beam_idx))
        self.v.copy_(self.v.index_select(0, beam_idx))


# --------------------------------------------------------------------------------------- attention


def matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None, *,
                     is_causal: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """Attention with plain matmuls: q [B, H, T, D], k, v [B, Hkv, S, D] -> [B, H, T, D] in `dtype` (default
    q's). Same result as SDPA with enable_gqa (head h reads kv head h // G, G = H / Hkv); mask as in
    Attention.forward; is_causal is SDPA's top-left tril. The G query heads of a kv head are stacked as the
    rows of one matmul, so k and v are never repeated.

    Attention takes this path on CPU where SDPA's kernels are slow for the shape:
    - cached bf16/fp16 decoding (one query per row), in float32: SDPA's half-precision kernel costs about 5x
      this there (365 vs 70 us at SmolLM2's shapes, S=768), a third of a decode step. float32, because ATen's
      bf16 batched matmul without oneDNN (single-row decode steps turn it off, see
      generation.single_row_matmuls) is 3x slower than casting, and float32 is the more exact anyway.
    - short half-precision training sequences (see _matmul_attention_dtype), in half precision; the CPU
      softmax kernel accumulates in float32.
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = D ** -0.5 if scale is None else scale
    dtype = dtype or q.dtype
    q, k, v = (q * scale).to(dtype), k.to(dtype), v.to(dtype)
    scores = (q.reshape(B, Hkv, G * T, D) @ k.transpose(-1, -2)).view(B, Hkv, G, T, S)
    if is_causal:
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if mask is not None:  # [B|1, 1, T|1, S] or a per-head bias [B|1, H, T|1, S]
        mask = mask.reshape(mask.shape[0], Hkv, G, *mask.shape[2:]) if mask.shape[1] != 1 else mask.unsqueeze(1)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask.to(dtype)
    probs = scores.softmax(dim=-1).view(B, Hkv, G * T, S)
    return (probs @ v).view(B, H, T, D)


MATMUL_ATTENTION_MAX_KEYS = 256  # training steps attend with matmul_attention up to this many keys (below)


def _matmul_attention_dtype(q: Tensor, k: Tensor) -> torch.dtype | None:
    """The half precision a CPU training step attends in with matmul_attention, or None to use SDPA.

    Up to MATMUL_ATTENTION_MAX_KEYS, matmul_attention's forward + backward is 1.5-2.7x as fast as SDPA's bf16
    flash kernel at SmolLM2's 9 query / 3 kv heads (bench/train_attention.py, three runs). It keeps the
    [B, H, T, S] probabilities for backward, which grow with the square of the length, so past 256 keys (1.2-1.7x
    at 384, slower at 1024) SDPA takes over to keep activation memory low.
    Under autocast the half dtype is autocast's, whatever RoPE promoted q to.
    """
    if (q.device.type != "cpu" or k.shape[-2] > MATMUL_ATTENTION_MAX_KEYS or not torch.is_grad_enabled()
            or not (q.requires_grad or k.requires_grad)):
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


class Attention(nn.Module):
    """Multi-head attention through SDPA, with grouped-query heads, RoPE, a KV cache and cross-attention.

    q, k, v and o are separate Linears (design note 5). For cross-attention, k and v read `memory` (the
    encoder output) once; later decode steps reuse the stored projections.
    """

    def __init__(self, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, o_proj: nn.Module,
                 n_head: int, n_kv_head: int, head_dim: int, scale: float | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.scale = scale
        self.dropout = dropout
        self.kv_cache: KVCache | None = None
        self.memory_kv: tuple[Tensor, Tensor] | None = None  # cached cross-attention keys/values
        # Prefix tuning (lmstack.peft.prompt): batch size -> learned keys, values [B, Hkv, P, D] put before the
        # self-attention keys and visible to every query. None = plain attention.
        self.prefix: Callable[[int], tuple[Tensor, Tensor]] | None = None

    def _heads(self, x: Tensor, n: int) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # [B, n, T, D]

    def forward(self, x: Tensor, *, rope: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None,
                is_causal: bool = False, input_pos: Tensor | None = None, memory: Tensor | None = None,
                cross: bool = False, kv_len: int | None = None) -> Tensor:
        """x: [B, T, C]. mask: bool [B|1, 1, T, S] (True = attend) or an additive float bias [B|1, H, T, S].

        Self-attention writes keys/values to the KV cache at `input_pos` when one is set up, then attends over
        its first `kv_len` slots (None = all; S = kv_len). For
        cross-attention (`cross=True`), `memory` [B, S, C] is projected once and reused while it is None.
        """
        B, T, _ = x.shape
        q = self._heads(self.q_proj(x), self.n_head)  # [B, H, T, D]
        if cross:
            if memory is not None:
                self.memory_kv = (self._heads(self.k_proj(memory), self.n_kv_head),
                                  self._heads(self.v_proj(memory), self.n_kv_head))
            if self.memory_kv is None:
                raise RuntimeError("cross-attention called without encoder memory")
            k, v = self.memory_kv  # [B, Hkv, S, D]
        else:
            k = self._heads(self.k_proj(x), self.n_kv_head)  # [B, Hkv, T, D]
            v = self._heads(self.v_proj(x), self.n_kv_head)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if self.kv_cache is not None and input_pos is not None:
                k, v = self.kv_cache.update(input_pos, k, v)  # [B, Hkv, S_max, D]
                if kv_len is not None:
                    k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # [B, Hkv, S, D]
            if self.prefix is not None:
                k, v, mask = self._with_prefix(k, v, mask, is_causal, T)  # [B, Hkv, P + S, D]
        if (T == 1 and q.device.type == "cpu" and q.dtype != torch.float32 and not (is_causal and mask is None)
                and not (self.training and self.dropout)):
            y = matmul_attention(q, k, v, mask, self.scale, dtype=torch.float32).to(q.dtype)  # cached decoding
        elif (dtype := _matmul_attention_dtype(q, k)) and not (self.training and self.dropout):
            y = matmul_attention(q, k, v, mask, self.scale, is_causal=is_causal and mask is None, dtype=dtype)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
                enable_gqa=self.n_kv_head != self.n_head)  # [B, H, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def _with_prefix(self, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool,
                     T: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Prepend the prefix keys/values; the mask gets P always-visible columns (is_causal made explicit)."""
        pk, pv = self.prefix(k.shape[0])  # [B, Hkv, P, D]
        P, S = pk.shape[2], k.shape[2]
        if mask is None and is_causal:  # SDPA's is_causal is tril over [T, S]; spelled out to add columns
            mask = torch.ones(T, S, dtype=torch.bool, device=k.device).tril()[None, None]  # [1, 1, T, S]
        if mask is not None:
            fill = torch.ones if mask.dtype == torch.bool else torch.zeros  # attend / zero additive bias
            mask = torch.cat([fill(*mask.shape[:-1], P, dtype=mask.dtype, device=mask.device), mask], dim=-1)
        return torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2), mask


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
        self.act = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, C] -> [B, T, C]
        h = self.up_proj(x)
        h = self.act(self.gate_proj(x)) * h if self.gate_proj is not None else self.act(h)
        return self.dropout(self.down_proj(h))


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


# -------------------------------------------------------------------------------------------- block


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
        if self.norm_first:
            return x + self.dropout(fn(norm(x)))
        return norm(x + self.dropout(fn(x)))

    def forward(self, x: Tensor, *, rope: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None,
                is_causal: bool = False, input_pos: Tensor | None = None, memory: Tensor | None = None,
                memory_mask: Tensor | None = None, kv_len: int | None = None) -> Tensor:  # [B, T, C] -> [B, T, C]
        x = self._residual(x, self.attn_norm, lambda h: self.attn(
            h, rope=rope, mask=mask, is_causal=is_causal, input_pos=input_pos, kv_len=kv_len))
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_norm, lambda h: self.cross_attn(
                h, mask=memory_mask, memory=memory, cross=True))
        return self._residual(x, self.mlp_norm, self.mlp)
