"""Attention: the KV cache, the kernels, the one function that picks a kernel (`attend`), and the module.

Shapes: B batch, T query length, S key length, C d_model, H heads, Hkv key/value heads, D head_dim.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack import kernels


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, D]; cos, sin: [B, 1, T, D] (already gathered at each token's position)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# ---------------------------------------------------------------------------------------- KV cache


def kv_cache_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype a KV cache keeps for a model of `dtype`: float32 on the CPU for half-precision models, because
    `attend` decodes in float32 there, and converting strided half-precision cache slices on every step cost more
    than the attention itself (SmolLM2, 550 keys: about 200 us per layer and tensor). Twice the cache memory."""
    if torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


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

    `attend` decides when this path is taken.
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


def one_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    """One query per row as elementwise products and sums: q [B, H, 1, D], k, v [B, Hkv, S, D] (any float
    dtype, read as float32) -> [B, H, 1, D] in q's dtype; mask None or bool [B|1, 1, 1, S] (True = attend).

    For a torch.compiled CPU decode step (`attend` decides): inductor fuses this into loops that read a bf16
    cache once, converting as they go, where SDPA stays an opaque call that wants a float32 cache, twice the
    bytes. SmolLM2 int4 with --compile decoded about 13% faster this way than with SDPA over a float32 cache
    (the median of six alternating runs).
    """
    B, H, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    qf = (q.float() * scale).view(B, Hkv, H // Hkv, 1, D)  # the G query heads of each kv head
    scores = (qf * k.float()[:, :, None]).sum(-1)  # [B, Hkv, G, S]
    if mask is not None:
        scores = scores.masked_fill(~mask.view(mask.shape[0], 1, 1, S), float("-inf"))
    probs = scores.softmax(dim=-1)
    return (probs[..., None] * v.float()[:, :, None]).sum(-2).view(B, H, 1, D).to(q.dtype)  # [B, H, 1, D]


MATMUL_ATTENTION_MAX_KEYS = 256  # training steps attend with matmul_attention up to this many keys (below)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, is_causal: bool = False,
           scale: float | None = None, dropout: float = 0.0) -> Tensor:
    """The one place that picks the attention kernel: q [B, H, T, D], k, v [B, Hkv, S, D] -> [B, H, T, D].

    - SDPA (with enable_gqa) everywhere, except on CPU where its kernels are slow for the shape:
    - a torch.compiled decode step (one query per row, over a half-precision cache: the compiled engine keeps its
      cache in the model's dtype, or float16 for a quantized float32 model, engine.compiled_cache_dtype, and
      builds the kernel before tracing): the C++ kernel `lmstack.kernels.decode_attention`. Where it cannot be
      built, or for other dtypes and masks, one_query_attention. (Eager decoding stays on SDPA: the kernel
      measured 3% faster there, less than the 2.5 s its first load costs a process.)
    - cached half-precision decoding (one query per row): SDPA in float32, over the float32 cache
      (kv_cache_dtype). Its half-precision kernel costs 4-7x that at SmolLM2's shapes (768 keys: 546 us
      against 102 us per layer).
    - half-precision training steps with at most MATMUL_ATTENTION_MAX_KEYS keys: matmul_attention in the
      autocast (or input) dtype. It keeps the [B, H, T, S] probabilities for backward, which grow with the
      square of the length, so SDPA's flash kernel takes over past that to keep activation memory low.
    The measurements behind both are bench/train_attention.py's, in docs/benchmarks.md ("Training attention on
    CPU" and "Decode attention on CPU").
    """
    if q.device.type == "cpu" and not dropout:
        if (not is_causal and torch.compiler.is_compiling() and kernels.decode_attention_ready()
                and kernels.decode_attention_fits(q, k, mask)):
            return kernels.decode_attention(q, k, v, mask, scale)
        if (q.shape[2] == 1 and k.dtype in (torch.bfloat16, torch.float16) and not is_causal
                and torch.compiler.is_compiling()
                and (mask is None or (mask.dtype == torch.bool and mask.shape[1] == 1))):
            return one_query_attention(q, k, v, mask, scale)
        if q.shape[2] == 1 and q.dtype != torch.float32 and not is_causal:
            mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale,
                                                  enable_gqa=k.shape[1] != q.shape[1]).to(q.dtype)
        dtype = _training_half_dtype(q, k)
        if dtype is not None:
            return matmul_attention(q, k, v, mask, scale, is_causal=is_causal, dtype=dtype)
    if k.dtype != q.dtype:  # a float32 cache (kv_cache_dtype) read by a half-precision prefill
        k, v = k.to(q.dtype), v.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout,
                                          scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _training_half_dtype(q: Tensor, k: Tensor) -> torch.dtype | None:
    """The half precision a CPU training step attends in with matmul_attention, or None for SDPA: a backward to
    come, at most MATMUL_ATTENTION_MAX_KEYS keys, and half precision (autocast's dtype takes precedence over
    the one RoPE promoted q to)."""
    if (k.shape[-2] > MATMUL_ATTENTION_MAX_KEYS or not torch.is_grad_enabled()
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
        # Inference only (lmstack.quant.quantize.fuse_projections_): one module computing [q | k | v], which
        # replaces q_proj, k_proj and v_proj (set to None); checkpoints and LoRA keep them separate.
        self.qkv_proj: nn.Module | None = None
        self.memory_kv: tuple[Tensor, Tensor] | None = None  # cached cross-attention keys/values
        # Prefix tuning (lmstack.peft.prompt): batch size -> learned keys, values [B, Hkv, P, D] put before the
        # self-attention keys and visible to every query. None = plain attention.
        self.prefix: Callable[[int], tuple[Tensor, Tensor]] | None = None

    def _heads(self, x: Tensor, n: int) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # [B, n, T, D]

    def forward(self, x: Tensor, *, rope: tuple[Tensor, Tensor] | None = None, mask: Tensor | None = None,
                is_causal: bool = False, input_pos: Tensor | None = None, memory: Tensor | None = None,
                cross: bool = False, kv_len: int | None = None, cache: KVCache | None = None) -> Tensor:
        """x: [B, T, C]. mask: bool [B|1, 1, T, S] (True = attend) or an additive float bias [B|1, H, T, S].

        Self-attention writes keys/values to `cache` (the model's, for this layer) at `input_pos`, then attends over
        its first `kv_len` slots (None = all; S = kv_len). For
        cross-attention (`cross=True`), `memory` [B, S, C] is projected once and reused while it is None.
        """
        B, T, _ = x.shape
        if self.qkv_proj is not None and not cross:
            q, k, v = self.qkv_proj(x).split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
                                              self.n_kv_head * self.head_dim], dim=-1)  # [B, T, H*D | Hkv*D]
            q, k, v = self._heads(q, self.n_head), self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)
        else:
            q = self._heads(self.q_proj(x), self.n_head)  # [B, H, T, D]
        if cross:
            if memory is not None:
                self.memory_kv = (self._heads(self.k_proj(memory), self.n_kv_head),
                                  self._heads(self.v_proj(memory), self.n_kv_head))
            if self.memory_kv is None:
                raise RuntimeError("cross-attention called without encoder memory")
            k, v = self.memory_kv  # [B, Hkv, S, D]
        else:
            if self.qkv_proj is None:
                k = self._heads(self.k_proj(x), self.n_kv_head)  # [B, Hkv, T, D]
                v = self._heads(self.v_proj(x), self.n_kv_head)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if cache is not None and input_pos is not None:
                k, v = cache.update(input_pos, k, v)  # [B, Hkv, S_max, D]
                if kv_len is not None:
                    k, v = k[:, :, :kv_len], v[:, :, :kv_len]  # [B, Hkv, S, D]
            if self.prefix is not None:
                k, v, mask = self._with_prefix(k, v, mask, is_causal, T)  # [B, Hkv, P + S, D]
        y = attend(q, k, v, mask, is_causal=is_causal and mask is None, scale=self.scale,
                   dropout=self.dropout if self.training else 0.0)  # [B, H, T, D]
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
