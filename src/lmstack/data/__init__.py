"""Data: corpus preparation into token shards, tokenizer training, and per-objective batch makers."""

from lmstack.data.batching import (
    CausalBatches,
    MaskedLMBatches,
    PairDataset,
    Seq2SeqBatch,
    SpanCorruptionBatches,
    TokenShards,
    mask_tokens,
    random_spans_noise_mask,
    sentinel_token_ids,
    span_corrupt,
)
from lmstack.data.prepare import clean_text, load_tokenizer, prepare_data, read_documents, special_token_ids
from lmstack.data.tokenizer_train import train_tokenizer

__all__ = [
    "CausalBatches", "MaskedLMBatches", "PairDataset", "Seq2SeqBatch", "SpanCorruptionBatches", "TokenShards",
    "clean_text", "load_tokenizer", "mask_tokens", "prepare_data", "random_spans_noise_mask", "read_documents",
    "sentinel_token_ids", "span_corrupt", "special_token_ids", "train_tokenizer",
]
