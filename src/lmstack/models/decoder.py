"""Decoder-only language models: GPT-2 (learned positions, LayerNorm, GELU) and Llama (RoPE, RMSNorm, SwiGLU, GQA).

One class covers both; the config picks the blocks. Shapes: B batch, T new tokens, S cache length, V vocab.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmstack.config import DecoderConfig
from lmstack.models.attention import KVCache, kv_cache_dtype
from lmstack.models.blocks import (Block, TiedHead, count_weights, make_attention, make_mlp, make_norm, rope_table,
                                   sinusoidal_table)


def build_block(cfg: DecoderConfig) -> Block:
    return Block(
        attn=make_attention(cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.attn_bias,
                            dropout=cfg.dropout),
        attn_norm=make_norm(cfg.norm, cfg.d_model, cfg.norm_eps),
        mlp=make_mlp(cfg.d_model, cfg.d_ff, cfg.activation, cfg.gated_mlp, cfg.mlp_bias, cfg.dropout),
        mlp_norm=make_norm(cfg.norm, cfg.d_model, cfg.norm_eps),
        norm_first=True, dropout=cfg.dropout)


class Decoder(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(build_block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        # A tied head reuses tok_emb's table, so the checkpoint holds one copy.
        self.lm_head = TiedHead(self) if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._cache_pool: list[KVCache] = []  # one cache per layer, made by setup_cache
        self._caches: list[KVCache] = []  # what each layer attends over: the pool, or views of it
        if self.tok_emb.weight.device.type != "meta":  # a meta skeleton gets its tables in `instantiate`
            self.reset_buffers()
        self.apply(self._init_weights)

    def reset_buffers(self) -> None:
        """(Re)build the non-persistent tables on the current default device (used after meta-device loading)."""
        cfg = self.config
        if cfg.positions == "rope":
            cos, sin = rope_table(cfg.max_seq_len, cfg.head_dim, cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)  # [P, D]
            self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.positions == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------------------------------- cache

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the norms' weights: a quantized model keeps them in it)."""
        return self.norm.weight.dtype

    def setup_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """Preallocate a static KV cache for `batch_size` sequences of up to `max_len` tokens."""
        cfg = self.config
        max_len = max_len or cfg.max_seq_len
        dtype = dtype or kv_cache_dtype(self.dtype, self.device)
        self._cache_pool = [KVCache(batch_size, cfg.n_kv_head, max_len, cfg.head_dim, dtype, self.device)
                            for _ in self.layers]
        self._caches = list(self._cache_pool)

    def clear_cache(self) -> None:
        self._cache_pool, self._caches = [], []

    def cache_shape(self) -> tuple[int, int, torch.dtype] | None:
        """(rows, slots, dtype) of the cache setup_cache made, or None without one."""
        if not self._cache_pool:
            return None
        k = self._cache_pool[0].k
        return k.shape[0], k.shape[2], k.dtype

    @property
    def cache_len(self) -> int:
        return self._caches[0].k.shape[2] if self._caches else 0

    def reorder_cache(self, beam_idx: Tensor) -> None:
        for cache in self._caches:
            cache.reorder(beam_idx)

    def use_cache_rows(self, rows: slice, length: int) -> None:
        """Attend over a view of the cache: `rows` and the first `length` slots, sharing its storage (continuous
        batching runs each step over the active rows and the slots they use)."""
        self._caches = [pool.view(rows, length) for pool in self._cache_pool]

    def cached_kv(self) -> list[tuple[Tensor, Tensor]]:
        """Each layer's whole cache: (keys, values), each [B, Hkv, S, D]."""
        return [(pool.k, pool.v) for pool in self._cache_pool]

    def copy_cache_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` slots of cache row `src` into row `dst`."""
        for pool in self._cache_pool:
            pool.k[dst, :, :length] = pool.k[src, :, :length]
            pool.v[dst, :, :length] = pool.v[src, :, :length]

    # -------------------------------------------------------------------------------------- forward

    def embed(self, tokens: Tensor, position_ids: Tensor) -> Tensor:
        x = self.tok_emb(tokens)  # [B, T, C]
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        elif self.config.positions == "sinusoidal":
            x = x + self.pos_table[position_ids].to(x.dtype)
        return self.drop(x)

    def forward(self, tokens: Tensor, *, input_pos: Tensor | None = None, position_ids: Tensor | None = None,
                key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None, last_only: bool = False,
                return_hidden: bool = False) -> Tensor:
        """tokens: [B, T] -> logits [B, T, V] ([B, 1, V] with `last_only`, hidden [B, T, C] with `return_hidden`).

        input_pos:        [T] cache slots to write; needs `setup_cache`. None = no cache (training).
                          [B, T]: each row writes its own slots and sees its own slots <= each (continuous
                          batching over a pool of cache rows of different lengths).
        position_ids:     [B, T] positions for RoPE / learned embeddings; default input_pos or arange(T).
        key_padding_mask: [B, S] bool, True for real tokens (S = T without cache, cache length with it).
        attn_mask:        [B, 1, T, S] bool, overrides the causal mask (packed sequences use a block mask).
        inputs_embeds:    [B, T, C] embeddings to use instead of looking `tokens` up (prompt tuning).
        """
        B, T = tokens.shape[:2] if inputs_embeds is None else inputs_embeds.shape[:2]
        device = self.device
        if position_ids is None:
            base = input_pos if input_pos is not None else torch.arange(T, device=device)
            position_ids = base if base.dim() == 2 else base.unsqueeze(0).expand(B, T)
        if inputs_embeds is None:
            x = self.embed(tokens, position_ids)
        else:
            x = self.drop(inputs_embeds)
        rope = None
        if self.config.positions == "rope":
            rope = (self.rope_cos[position_ids].unsqueeze(1).to(x.dtype),  # [B, 1, T, D]
                    self.rope_sin[position_ids].unsqueeze(1).to(x.dtype))
        mask, is_causal = attn_mask, False
        # A cached prefill (several queries at shared slots) attends over the slots written so far, not the whole
        # cache; into an empty cache that is plain causal attention, which SDPA's flash kernel does faster than a
        # masked one (SmolLM2 bf16, a 512-token prompt: SDPA 207 -> 155 ms, 38% -> 30% of the prefill).
        # An eager one-token step on the CPU does the same: attention reads only the slots written so far instead
        # of the whole cache (a compiled step keeps the cache's static shape; on a GPU, reading the length back
        # would synchronize every step).
        kv_len = None
        one_token_eager = T == 1 and device.type == "cpu" and not torch.compiler.is_compiling()
        if input_pos is not None and ((input_pos.dim() == 1 and T > 1) or one_token_eager):
            kv_len = int(input_pos.max()) + 1
        if mask is None:
            if input_pos is not None:  # cached: query at slot p sees slots <= p
                if kv_len == T and key_padding_mask is None and int(input_pos[0]) == 0:
                    is_causal = True
                elif kv_len is not None and T == 1 and input_pos.dim() == 1 and key_padding_mask is None:
                    pass  # one query at the last written slot: it sees every slot up to kv_len, no mask needed
                else:
                    slots = torch.arange(kv_len or self.cache_len, device=device)
                    mask = slots <= input_pos[..., None]  # [T, S], or [B, T, S] for per-row slots
                    mask = mask.view(-1, 1, *mask.shape[-2:])  # [1|B, 1, T, S]
            elif key_padding_mask is not None:
                mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
            else:
                is_causal = True
            if key_padding_mask is not None:
                mask = mask & key_padding_mask[:, None, None, :kv_len]  # [B, 1, T, S]
        elif kv_len is not None:
            mask = mask[..., :kv_len]
        caches = self._caches if input_pos is not None else [None] * len(self.layers)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, rope=rope, mask=mask, is_causal=is_causal, input_pos=input_pos, kv_len=kv_len, cache=cache)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if return_hidden:
            return x
        return self.head(x)  # [B, T, V]

    def head(self, hidden: Tensor) -> Tensor:
        """Hidden states [.., C] -> logits [.., V]: the only way to logits, so a swapped head module (quantized,
        LoRA) takes effect in generation, training, evaluation and serving alike."""
        return self.lm_head(hidden)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Weights however stored (quantized and packed ones too: models.blocks.count_weights)."""
        n = count_weights(self)
        if exclude_embeddings:
            n -= sum(count_weights(e) for e in (self.tok_emb, self.pos_emb) if e is not None)
        return n
