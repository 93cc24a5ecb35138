"""Model families and one factory: `build_model(config)` picks the class from `config.family`."""

from __future__ import annotations

from torch import nn

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
