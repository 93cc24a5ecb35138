"""Encoder-decoder models: the original Transformer (Vaswani et al.) and a T5-style variant. One class, two configs.

Transformer: sinusoidal positions, embeddings scaled by sqrt(d_model), post-norm LayerNorm blocks, ReLU MLP with
biases, cross-attention, a tied output head. `final_norm=True` adds the final encoder/decoder LayerNorms that
`torch.nn.Transformer` has (the original post-norm model has none).

T5 features built here: bucketed relative position bias (yes; one table for the encoder, bidirectional, and one
for the decoder self-attention, unidirectional, each shared by all layers of its stack, none in cross-attention),
attention without the 1/sqrt(d) scale (`attn_scale=1.0`), pre-norm RMSNorm without biases, final norms, no
embedding scaling, decoder output scaled by d_model**-0.5 before the tied head (`scale_decoder_outputs`), the
gated-GELU MLP of T5 v1.1 (`gated_mlp`). HF T5 checkpoints are imported by `lmstack.checkpoints.hf`.
Not built: T5's own weight initialisation (we use a simple normal init) and its fp16 clamping.

Decoding interface (used by generation.py): `encode`, `decode` (with `input_pos` after `setup_cache`),
`clear_cache`, `reorder_cache`. Shapes: B batch, S source length, T target tokens, C d_model, H heads, V vocab.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.config import Seq2SeqConfig
from lmstack.errors import LmstackError
from lmstack.models.attention import Attention, KVCache
from lmstack.models.blocks import (Block, TiedHead, count_weights, make_attention, make_mlp, make_norm,
                                   sinusoidal_table)

# ------------------------------------------------------------------------------ relative position bias


def relative_position_bucket(relative_position: Tensor, bidirectional: bool, n_buckets: int,
                             max_distance: int) -> Tensor:
    """T5's buckets for key_pos - query_pos: exact for small distances, log-spaced up to max_distance."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:  # half the buckets for keys after the query
        n_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * n_buckets
        distance = relative_position.abs()
    else:  # a causal decoder only looks back; future keys are masked anyway
        distance = (-relative_position).clamp(min=0)
    max_exact = n_buckets // 2
    # clamp(min=1) only avoids log(0); those entries take the exact branch below.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (n_buckets - max_exact)).long()).clamp(max=n_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """A learned bias per (bucket, head), added to the attention scores of every layer in one stack."""

    def __init__(self, n_buckets: int, max_distance: int, n_head: int, bidirectional: bool) -> None:
        super().__init__()
        self.n_buckets, self.max_distance, self.bidirectional = n_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.zeros(n_buckets, n_head))

    def forward(self, query_pos: Tensor, key_pos: Tensor) -> Tensor:  # [T], [S] -> [1, H, T, S]
        buckets = relative_position_bucket(key_pos[None, :] - query_pos[:, None], self.bidirectional,
                                           self.n_buckets, self.max_distance)  # [T, S]
        return F.embedding(buckets, self.weight).permute(2, 0, 1).unsqueeze(0)


def combine_mask(keep: Tensor | None, bias: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """One SDPA mask from a bool mask [B|1, 1, T, S] (True = attend) and an additive bias [1, H, T, S].

    Without a bias the bool mask goes to SDPA as it is. With one, masked slots get the dtype's most negative
    value (not -inf, so a fully masked row gives a uniform softmax instead of NaN).
    """
    if bias is None:
        return keep
    bias = bias.to(dtype)
    if keep is None:
        return bias
    return torch.where(keep, bias, torch.finfo(dtype).min)  # [B|1, H, T, S]


# ------------------------------------------------------------------------------------------- model


def build_block(cfg: Seq2SeqConfig, cross: bool) -> Block:
    def attention() -> Attention:
        return make_attention(cfg.d_model, cfg.n_head, cfg.n_head, cfg.head_dim, cfg.bias,
                              scale=cfg.attn_scale, dropout=cfg.dropout)

    def norm() -> nn.Module:
        return make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)

    return Block(attn=attention(), attn_norm=norm(),
                 mlp=make_mlp(cfg.d_model, cfg.d_ff, cfg.activation, cfg.gated_mlp, cfg.bias, cfg.dropout),
                 mlp_norm=norm(), cross_attn=attention() if cross else None, cross_norm=norm() if cross else None,
                 norm_first=cfg.norm_first, dropout=cfg.dropout)


class Seq2Seq(nn.Module):
    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)  # shared by source, target and (tied) head
        # Learned positions: one table shared by both stacks, like the token embedding.
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.encoder_rel_bias = self.decoder_rel_bias = None
        if cfg.positions == "relative":
            self.encoder_rel_bias = RelativePositionBias(cfg.relative_buckets, cfg.relative_max_distance,
                                                         cfg.n_head, bidirectional=True)
            self.decoder_rel_bias = RelativePositionBias(cfg.relative_buckets, cfg.relative_max_distance,
                                                         cfg.n_head, bidirectional=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder_layers = nn.ModuleList(build_block(cfg, cross=False) for _ in range(cfg.n_encoder_layer))
        self.decoder_layers = nn.ModuleList(build_block(cfg, cross=True) for _ in range(cfg.n_decoder_layer))
        self.encoder_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps) if cfg.final_norm else None
        self.decoder_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps) if cfg.final_norm else None
        self.lm_head = TiedHead(self) if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._caches: list[KVCache] = []  # the decoder self-attention caches, made by setup_cache
        # Encoder padding mask [B, 1, 1, S], kept with the cross-attention keys/values for cached decoding.
        self.memory_mask: Tensor | None = None
        if self.tok_emb.weight.device.type != "meta":  # a meta skeleton gets its tables in `instantiate`
            self.reset_buffers()
        self._init_weights()

    def reset_buffers(self) -> None:
        """(Re)build the non-persistent tables on the current default device (used after meta-device loading)."""
        cfg = self.config
        if cfg.positions == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, RelativePositionBias):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.d_model ** -0.5)
        # Token embeddings sized so that both the scaled input and the (tied) logits start near unit variance.
        cfg = self.config
        if cfg.scale_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=cfg.d_model ** -0.5)
        elif cfg.scale_decoder_outputs:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=1.0)

    # ---------------------------------------------------------------------------------------- cache

    def setup_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """Preallocate a static self-attention KV cache in every decoder layer for up to `max_len` target tokens."""
        cfg = self.config
        max_len = max_len or cfg.max_seq_len
        if cfg.positions != "relative" and max_len > cfg.max_seq_len:
            raise LmstackError(f"cache length {max_len} exceeds max_seq_len={cfg.max_seq_len} of {cfg.name}")
        dtype = dtype or self.tok_emb.weight.dtype
        device = self.tok_emb.weight.device
        self._caches = [KVCache(batch_size, cfg.n_head, max_len, cfg.head_dim, dtype, device)
                        for _ in self.decoder_layers]

    def clear_cache(self) -> None:
        """Drop the self-attention caches, the cross-attention keys/values and the stored memory mask."""
        self._caches = []
        for layer in self.decoder_layers:
            layer.cross_attn.memory_kv = None
        self.memory_mask = None

    @property
    def cache_len(self) -> int:
        return self._caches[0].k.shape[2] if self._caches else 0

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: keep the rows `beam_idx` [B] of every cache, cross-attention keys/values included."""
        for cache in self._caches:
            cache.reorder(beam_idx)
        for layer in self.decoder_layers:
            if layer.cross_attn.memory_kv is not None:
                k, v = layer.cross_attn.memory_kv  # [B, H, S, D]
                layer.cross_attn.memory_kv = (k.index_select(0, beam_idx), v.index_select(0, beam_idx))
        if self.memory_mask is not None and self.memory_mask.shape[0] > 1:
            self.memory_mask = self.memory_mask.index_select(0, beam_idx)

    # -------------------------------------------------------------------------------------- forward

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens [B, T], positions [T] -> [B, T, C]: token embedding (scaled) plus absolute positions."""
        x = self.tok_emb(tokens)
        if self.config.scale_embeddings:
            x = x * math.sqrt(self.config.d_model)
        if self.config.positions == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)  # [T, C] broadcasts over B
        elif self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        return self.drop(x)

    def _check_length(self, n: int, what: str) -> None:
        if self.config.positions != "relative" and n > self.config.max_seq_len:
            raise LmstackError(f"{what} has {n} tokens, more than max_seq_len={self.config.max_seq_len}")

    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """src [B, S], src_mask [B, S] bool (True = real token) or None -> memory [B, S, C]."""
        S = src.shape[1]
        self._check_length(S, "source")
        pos = torch.arange(S, device=src.device)
        x = self.embed(src, pos)  # [B, S, C]
        keep = None if src_mask is None else src_mask.to(torch.bool)[:, None, None, :]  # [B, 1, 1, S]
        bias = self.encoder_rel_bias(pos, pos) if self.encoder_rel_bias is not None else None  # [1, H, S, S]
        mask = combine_mask(keep, bias, x.dtype)
        for layer in self.encoder_layers:
            x = layer(x, mask=mask)
        return self.encoder_norm(x) if self.encoder_norm is not None else x

    def decode(self, tgt: Tensor, memory: Tensor | None, memory_mask: Tensor | None = None,
               input_pos: Tensor | None = None, *, return_hidden: bool = False) -> Tensor:
        """tgt [B, T] -> logits [B, T, V] (hidden [B, T, C] with `return_hidden`).

        memory:      [B, S, C] encoder output. Cross-attention projects it once and keeps the keys/values;
                     pass None on later cached steps to reuse them.
        memory_mask: [B, S] bool, True = real source token. Kept with the keys/values, so None on later
                     steps reuses it.
        input_pos:   [T] target positions = cache slots to write (needs `setup_cache`). None = full causal
                     decoding over tgt (training, teacher forcing).
        """
        T = tgt.shape[1]
        device = tgt.device
        if memory is not None or memory_mask is not None:
            self.memory_mask = None if memory_mask is None else memory_mask.to(torch.bool)[:, None, None, :]
        if memory is None and self.decoder_layers[0].cross_attn.memory_kv is None:
            raise LmstackError("decode needs the encoder memory on its first call (memory=None reuses it)")
        if input_pos is None:
            self._check_length(T, "target")
            query_pos = key_pos = torch.arange(T, device=device)
        else:
            if self.cache_len == 0:
                raise LmstackError("decode with input_pos needs setup_cache(batch_size, max_len) first")
            query_pos, key_pos = input_pos, torch.arange(self.cache_len, device=device)
        x = self.embed(tgt, query_pos)  # [B, T, C]
        mask, is_causal = None, False
        if input_pos is None and self.decoder_rel_bias is None:
            is_causal = True  # SDPA's own causal mask
        else:  # a query at position p sees keys at positions <= p (cache slots hold positions)
            keep = (key_pos[None, :] <= query_pos[:, None])[None, None]  # [1, 1, T, S]
            bias = self.decoder_rel_bias(query_pos, key_pos) if self.decoder_rel_bias is not None else None
            mask = combine_mask(keep, bias, x.dtype)
        caches = self._caches if input_pos is not None and self._caches else [None] * len(self.decoder_layers)
        for layer, cache in zip(self.decoder_layers, caches):
            x = layer(x, mask=mask, is_causal=is_causal, input_pos=input_pos, memory=memory,
                      memory_mask=self.memory_mask, cache=cache)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        if return_hidden:
            return x
        return self.head(x)

    def head(self, hidden: Tensor) -> Tensor:
        """Decoder hidden states [.., C] -> logits [.., V]: the only way to logits, so a swapped head module
        (quantized, LoRA) takes effect everywhere."""
        if self.config.scale_decoder_outputs:
            hidden = hidden * self.config.d_model ** -0.5
        return self.lm_head(hidden)

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_emb.weight.dtype

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """Teacher forcing: src [B, S], tgt [B, T] (starts with the decoder start token) -> logits [B, T, V]."""
        return self.decode(tgt, self.encode(src, src_mask), src_mask)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Weights however stored (quantized and packed ones too: models.blocks.count_weights)."""
        n = count_weights(self)
        if exclude_embeddings:
            n -= sum(count_weights(e) for e in (self.tok_emb, self.pos_emb) if e is not None)
        return n
