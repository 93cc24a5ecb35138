"""Model configs: one small dataclass per architecture family, plus named presets.

Each dataclass stores only plain values, so it round-trips through JSON. Derived fields are filled in
`__post_init__`. `from_name("smollm2-135m", n_layer=2)` returns a preset with overrides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from lmstack.errors import LmstackError

Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "gelu_tanh", "relu", "silu"]
Positions = Literal["learned", "sinusoidal", "rope", "relative", "none"]


@dataclass
class DecoderConfig:
    """Decoder-only language model: GPT-2 (learned positions, LayerNorm, GELU) or Llama (RoPE, RMSNorm, SwiGLU, GQA)."""

    name: str = "decoder"
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None = n_head (multi-head); fewer = grouped-query attention
    d_model: int = 768
    d_ff: int | None = None  # None = 4 * d_model
    head_dim: int | None = None  # None = d_model // n_head
    max_seq_len: int = 1024
    positions: Positions = "learned"
    rope_base: float = 10000.0
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    activation: Activation = "gelu_tanh"
    gated_mlp: bool = False  # SwiGLU-style gate when True
    attn_bias: bool = True
    mlp_bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    family: str = field(default="decoder", init=False)

    def __post_init__(self) -> None:
        self.n_kv_head = self.n_kv_head or self.n_head
        self.d_ff = self.d_ff or 4 * self.d_model
        self.head_dim = self.head_dim or self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise LmstackError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.positions not in ("learned", "sinusoidal", "rope", "none"):
            raise LmstackError(f"decoder positions must be learned, sinusoidal, rope or none, not {self.positions!r}")


@dataclass
class EncoderConfig:
    """Encoder-only (BERT): token-type and learned position embeddings, post-norm blocks, an MLM head."""

    name: str = "encoder"
    vocab_size: int = 30522
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int | None = None
    max_seq_len: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    activation: Activation = "gelu"
    dropout: float = 0.0
    pad_token_id: int = 0
    mask_token_id: int | None = None
    pooling: Literal["cls", "mean"] = "mean"
    normalize_embeddings: bool = True
    embed_max_len: int | None = None  # sentence-transformers' max_seq_length; None = max_seq_len
    mlm_head: bool = True  # BertForMaskedLM head; sentence-transformers checkpoints ship BertModel only
    cls_pooler: bool = False  # BertModel's [CLS] dense+tanh pooler, kept when the checkpoint has it
    family: str = field(default="encoder", init=False)

    def __post_init__(self) -> None:
        self.d_ff = self.d_ff or 4 * self.d_model
        if self.d_model % self.n_head:
            raise LmstackError(f"d_model={self.d_model} is not a multiple of n_head={self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


@dataclass
class Seq2SeqConfig:
    """Encoder-decoder: the original Transformer (sinusoidal, post-norm, ReLU) or T5-style (relative bias, pre-RMSNorm)."""

    name: str = "seq2seq"
    vocab_size: int = 37000  # shared source/target vocabulary
    n_encoder_layer: int = 6
    n_decoder_layer: int = 6
    n_head: int = 8
    d_model: int = 512
    d_ff: int | None = None
    head_dim: int | None = None
    max_seq_len: int = 512
    positions: Positions = "sinusoidal"  # "relative" = T5 bucketed relative position bias
    relative_buckets: int = 32
    relative_max_distance: int = 128
    norm: Norm = "layernorm"
    norm_first: bool = False  # False = post-norm (original Transformer); True = pre-norm (T5)
    norm_eps: float = 1e-5
    activation: Activation = "relu"
    gated_mlp: bool = False
    bias: bool = True
    tie_embeddings: bool = True
    scale_embeddings: bool = True  # multiply embeddings by sqrt(d_model), as in Vaswani et al.
    final_norm: bool | None = None  # norm after the last encoder/decoder layer; None = norm_first
    attn_scale: float | None = None  # None = 1/sqrt(head_dim); T5 uses 1.0
    scale_decoder_outputs: bool = False  # multiply decoder output by d_model**-0.5 before the head (T5, tied)
    dropout: float = 0.1
    pad_token_id: int = 0
    bos_token_id: int = 1  # decoder start token
    eos_token_id: int = 2
    family: str = field(default="seq2seq", init=False)

    def __post_init__(self) -> None:
        self.d_ff = self.d_ff or 4 * self.d_model
        self.head_dim = self.head_dim or self.d_model // self.n_head
        self.final_norm = self.norm_first if self.final_norm is None else self.final_norm
        if self.positions not in ("sinusoidal", "relative", "learned"):
            raise LmstackError(f"seq2seq positions must be sinusoidal, learned or relative, not {self.positions!r}")


ModelConfig = Union[DecoderConfig, EncoderConfig, Seq2SeqConfig]
CONFIG_CLASSES: dict[str, type] = {"decoder": DecoderConfig, "encoder": EncoderConfig, "seq2seq": Seq2SeqConfig}

_LLAMA = dict(positions="rope", norm="rmsnorm", activation="silu", gated_mlp=True, attn_bias=False, mlp_bias=False)
_T5 = dict(positions="relative", norm="rmsnorm", norm_first=True, bias=False, scale_embeddings=False, norm_eps=1e-6,
           attn_scale=1.0, scale_decoder_outputs=True)

PRESETS: dict[str, tuple[type, dict[str, Any]]] = {
    "smollm2-135m": (DecoderConfig, dict(
        vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536, max_seq_len=8192,
        rope_base=100000.0, norm_eps=1e-5, tie_embeddings=True, bos_token_id=1, eos_token_id=2, **_LLAMA)),
    "gpt2-124m": (DecoderConfig, dict(
        vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024, eos_token_id=50256,
        bos_token_id=50256)),
    "minilm-l6": (EncoderConfig, dict(
        vocab_size=30522, n_layer=6, n_head=12, d_model=384, d_ff=1536, max_seq_len=512, mask_token_id=103)),
    "bert-base": (EncoderConfig, dict(mask_token_id=103)),
    "transformer-base": (Seq2SeqConfig, dict()),
    "t5-small": (Seq2SeqConfig, dict(vocab_size=32128, d_model=512, d_ff=2048, n_head=8, head_dim=64,
                                     dropout=0.1, pad_token_id=0, bos_token_id=0, eos_token_id=1, **_T5)),
    # Tiny configs for tests: same shapes of code paths, a few thousand parameters.
    "tiny-llama": (DecoderConfig, dict(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128,
                                       max_seq_len=128, **_LLAMA)),
    "tiny-gpt2": (DecoderConfig, dict(vocab_size=256, n_layer=2, n_head=4, d_model=64, max_seq_len=128)),
    "tiny-bert": (EncoderConfig, dict(vocab_size=256, n_layer=2, n_head=4, d_model=64, d_ff=128, max_seq_len=128,
                                      mask_token_id=4)),
    "tiny-transformer": (Seq2SeqConfig, dict(vocab_size=256, n_encoder_layer=2, n_decoder_layer=2, n_head=4,
                                             d_model=64, d_ff=128, max_seq_len=128, dropout=0.0)),
    "tiny-t5": (Seq2SeqConfig, dict(vocab_size=256, n_encoder_layer=2, n_decoder_layer=2, n_head=4, d_model=64,
                                    d_ff=128, max_seq_len=128, relative_buckets=8, relative_max_distance=32,
                                    **{**_T5, "dropout": 0.0})),
}


def from_name(name: str, **overrides: Any) -> ModelConfig:
    """Return the named preset with `overrides` applied; unknown names or keys raise a one-line error."""
    if name not in PRESETS:
        raise LmstackError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    cls, values = PRESETS[name]
    merged = {**values, **overrides, "name": overrides.get("name", name)}
    return build_config(cls, merged)


def build_config(cls: type, values: dict[str, Any]) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise LmstackError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**values)


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """Inverse of `config_to_dict`; the `family` key picks the dataclass."""
    values = dict(values)
    family = values.pop("family", "decoder")
    if family not in CONFIG_CLASSES:
        raise LmstackError(f"unsupported model family {family!r}; supported: {', '.join(CONFIG_CLASSES)}")
    return build_config(CONFIG_CLASSES[family], values)
