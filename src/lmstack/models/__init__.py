"""Model families, one factory (`build_model(config)` picks the class from `config.family`), and the protocol that
generation, training, evaluation and serving program against.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lmstack.config import ModelConfig
from lmstack.errors import LmstackError


def build_model(config: ModelConfig) -> nn.Module:
    family = getattr(config, "family", None)
    if family == "decoder":
        from lmstack.models.decoder import Decoder
        return Decoder(config)
    if family == "encoder":
        from lmstack.models.encoder import Encoder
        return Encoder(config)
    if family == "seq2seq":
        from lmstack.models.seq2seq import Seq2Seq
        return Seq2Seq(config)
    raise LmstackError(f"unsupported model family {family!r}; supported: decoder, encoder, seq2seq")


@runtime_checkable
class CausalLM(Protocol):
    """What a causal language model offers its callers; `Decoder` implements it, and so do the PEFT wrappers that
    change what it computes (prompt tuning) by composition over a Decoder.

    Callers never read the weights of the head or the caches: they call `head`, and the cache methods, so a
    swapped module (a quantized or LoRA head, a quantized embedding) takes effect everywhere.

    forward(tokens [B, T], *, input_pos, position_ids, key_padding_mask, attn_mask, inputs_embeds, last_only,
            return_hidden) -> logits [B, T, V], or hidden states [B, T, C] with return_hidden
    head(hidden [.., C]) -> logits [.., V]
    setup_cache(batch_size, max_len=None, dtype=None); clear_cache(); cache_shape() -> (rows, slots, dtype) | None;
    reorder_cache(beam_idx [B])   (beam search)
    use_cache_rows(rows, length); copy_cache_row(src, dst, length)   (continuous batching, Decoder only)
    """

    config: object

    def __call__(self, tokens: Tensor, **kwargs: object) -> Tensor: ...

    def head(self, hidden: Tensor) -> Tensor: ...

    def setup_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> None: ...

    def clear_cache(self) -> None: ...

    def cache_shape(self) -> tuple[int, int, torch.dtype] | None: ...

    def reorder_cache(self, beam_idx: Tensor) -> None: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...
