"""Encoder-only model (BERT): word + position + token-type embeddings, post-norm bidirectional blocks.

Heads: an MLM head tied to the word embeddings (as BertForMaskedLM), an optional [CLS] pooler (dense + tanh,
as BertModel), and sentence embeddings by mean or [CLS] pooling with L2 normalization (as
sentence-transformers). Shapes: B batch, T tokens, C d_model, V vocab, N texts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.config import EncoderConfig
from lmstack.errors import LmstackError
from lmstack.models.blocks import ACTIVATIONS, Block, count_weights, make_attention, make_mlp

if TYPE_CHECKING:
    from lmstack.tokenizer import Tokenizer


def build_block(cfg: EncoderConfig) -> Block:
    # BERT applies dropout once per sub-layer, after the output projection: the Block's dropout does that.
    return Block(
        attn=make_attention(cfg.d_model, cfg.n_head, cfg.n_head, cfg.head_dim, bias=True, dropout=cfg.dropout),
        attn_norm=nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps),
        mlp=make_mlp(cfg.d_model, cfg.d_ff, cfg.activation, gated=False, bias=True),
        mlp_norm=nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps),
        norm_first=False, dropout=cfg.dropout)


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size > 0 else None
        self.emb_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(build_block(cfg) for _ in range(cfg.n_layer))
        # MLM head: transform (dense -> act -> LayerNorm), then the tied word embeddings plus a bias.
        self.mlm_dense = nn.Linear(cfg.d_model, cfg.d_model) if cfg.mlm_head else None
        self.mlm_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.mlm_head else None
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.mlm_head else None
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model) if cfg.cls_pooler else None
        self.reset_buffers()
        self.apply(self._init_weights)

    def reset_buffers(self) -> None:
        """Nothing to rebuild: positions are learned, so every tensor is in the state dict."""

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # -------------------------------------------------------------------------------------- forward

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        """input_ids [B, T]; attention_mask [B, T] (1/True = real token); token_type_ids [B, T] -> hidden [B, T, C]."""
        T = input_ids.shape[1]
        if T > self.config.max_seq_len:
            raise LmstackError(f"sequence of {T} tokens is longer than max_seq_len={self.config.max_seq_len}")
        positions = torch.arange(T, device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(positions)[None]  # [B, T, C]
        if self.type_emb is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.type_emb(types)
        x = self.drop(self.emb_norm(x))
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
        for layer in self.layers:
            x = layer(x, mask=mask)
        return x

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """hidden [..., C] -> logits [..., V] (the objective passes only the masked positions, [N, C])."""
        if self.mlm_dense is None:
            raise RuntimeError("this encoder has no MLM head (mlm_head=False in its config)")
        h = self.mlm_norm(ACTIVATIONS[self.config.activation](self.mlm_dense(hidden)))
        return h @ self.tok_emb.weight.t() + self.mlm_bias

    def pooled_cls(self, hidden: Tensor) -> Tensor:
        """BertModel's pooler output: tanh(dense(hidden[:, 0])) -> [B, C]."""
        if self.pooler is None:
            raise RuntimeError("this encoder has no [CLS] pooler (cls_pooler=False in its config)")
        return torch.tanh(self.pooler(hidden[:, 0]))

    # ------------------------------------------------------------------------------ sentence embeddings

    @staticmethod
    def pool(hidden: Tensor, attention_mask: Tensor | None, mode: Literal["cls", "mean"]) -> Tensor:
        """hidden [B, T, C], attention_mask [B, T] -> [B, C]: the [CLS] vector or the mean over real tokens."""
        if mode == "cls":
            return hidden[:, 0]
        if mode != "mean":
            raise ValueError(f"unknown pooling mode {mode!r}; use 'cls' or 'mean'")
        if attention_mask is None:
            return hidden.mean(dim=1)
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [B, T, 1]
        # Clamp as sentence-transformers does, so an all-padding row gives zeros instead of NaN.
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None, normalize: bool | None = None,
              token_type_ids: Tensor | None = None) -> Tensor:
        """Sentence embeddings [B, C] with the config's pooling; normalize=None uses config.normalize_embeddings."""
        hidden = self(input_ids, attention_mask, token_type_ids)  # [B, T, C]
        pooled = self.pool(hidden, attention_mask, self.config.pooling)
        normalize = self.config.normalize_embeddings if normalize is None else normalize
        return F.normalize(pooled, p=2, dim=-1) if normalize else pooled

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Weights however stored (quantized and packed ones too: models.blocks.count_weights)."""
        n = count_weights(self)
        if exclude_embeddings:
            n -= sum(count_weights(e) for e in (self.tok_emb, self.pos_emb, self.type_emb) if e is not None)
        return n


@torch.inference_mode()
def encode_texts(model: Encoder, tokenizer: Tokenizer, texts: list[str], batch_size: int = 32,
                 max_length: int | None = None, normalize: bool | None = None) -> Tensor:
    """Embed `texts` -> [N, C] float32 on CPU, in batches padded to their longest text (pad id from the config).

    Texts longer than `max_length` tokens (default: config.embed_max_len, i.e. sentence-transformers'
    max_seq_length, else max_seq_len) are truncated as transformers does (see `tokenize_batch`).
    """
    cfg = model.config
    max_length = max_length or cfg.embed_max_len or cfg.max_seq_len
    device = model.tok_emb.weight.device
    out: list[Tensor] = []
    for start in range(0, len(texts), batch_size):
        input_ids, attention_mask = tokenize_batch(tokenizer, texts[start:start + batch_size], max_length,
                                                   cfg.pad_token_id)  # [b, T] each
        emb = model.embed(input_ids.to(device), attention_mask.to(device), normalize=normalize)  # [b, C]
        out.append(emb.float().cpu())
    if not out:
        return torch.zeros(0, cfg.d_model)
    return torch.cat(out)  # [N, C]


def tokenize_batch(tokenizer: Tokenizer, texts: list[str], max_length: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """texts -> input_ids [b, T] right-padded with `pad_id`, attention_mask [b, T] (1 = real token).

    A text over `max_length` tokens loses the end of its text, not its closing special tokens ([SEP]).
    """
    tail = _n_trailing_special(tokenizer)
    batch = [ids if len(ids) <= max_length else ids[:max_length - tail] + ids[len(ids) - tail:]
             for ids in tokenizer.encode_batch(texts)]
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [b, T]
    attention_mask = torch.zeros(len(batch), width, dtype=torch.long)  # [b, T]
    for row, ids in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return input_ids, attention_mask


def _n_trailing_special(tokenizer: Tokenizer) -> int:
    """How many special tokens encode() appends (1 for BERT's [SEP]): truncation cuts the text before them."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    for lead in range(len(full) - len(plain) + 1):
        if full[lead:lead + len(plain)] == plain:
            return len(full) - lead - len(plain)
    return 0
