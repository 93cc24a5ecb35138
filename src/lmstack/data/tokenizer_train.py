"""`lmstack tokenizer train`: a byte-level BPE (GPT-2 style) or a character-level tokenizer, with HF `tokenizers`.

Training streams documents through `train_from_iterator`, read and cleaned exactly as `data prepare` reads them,
so the corpus never has to fit in memory. The result is an HF-layout folder (tokenizer.json +
tokenizer_config.json) that `lmstack.tokenizer.Tokenizer.from_dir` and transformers both load.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmstack.data.prepare import DocSplit, Format, Normalization, clean_text, read_documents
from lmstack.errors import LmstackError
from lmstack.io import atomic_write_json
from lmstack.tokenizer import Tokenizer

EOS, PAD, MASK, UNK = "<|endoftext|>", "<pad>", "[MASK]", "<unk>"
DEFAULT_SPECIAL_TOKENS = [EOS, PAD, MASK, UNK]


def sentinel_tokens(n: int) -> list[str]:
    """T5's span-corruption sentinels <extra_id_0> ... <extra_id_{n-1}>."""
    return [f"<extra_id_{i}>" for i in range(n)]


def _texts(inputs: list[str], field: str, format: Format, doc_split: DocSplit,
           normalize: Normalization) -> Iterator[str]:
    for raw in read_documents(inputs, field, format, doc_split):
        text = clean_text(raw, normalize)
        if text:
            yield text


def train_tokenizer(inputs: list[str], *, out: str, kind: Literal["bpe", "char"] = "bpe", vocab_size: int = 8000,
                    field: str = "text", special_tokens: list[str] | None = None, min_frequency: int = 2,
                    sentinels: int = 0, format: Format = "auto", doc_split: DocSplit = "blank-line",
                    normalize: Normalization = "NFC") -> Path:
    """Train a byte-level BPE or a char-level tokenizer on text / JSONL / Parquet files; returns the folder.

    bpe: byte-level BPE (ByteLevel pre-tokenizer and decoder, all 256 bytes in the initial alphabet, so any text
    round-trips). char: one token per character seen at least `min_frequency` times (WordLevel over single
    characters; unseen characters become <unk>).

    Args:
        inputs: text, JSONL or Parquet files (or folders).
        out: folder to write tokenizer.json and tokenizer_config.json to.
        kind: bpe (byte-level BPE) or char.
        vocab_size: BPE vocabulary size, special tokens included.
        field: the JSONL / Parquet field holding the text.
        special_tokens: the special tokens (default <|endoftext|> (EOS), <pad>, [MASK], <unk>); repeat the
            option for more.
        min_frequency: BPE merges need at least this many occurrences.
        sentinels: add this many T5 sentinels <extra_id_N> (for span corruption).
        format: the input format (default: from each file's extension).
        doc_split: how plain text splits into documents: file, line or blank-line.
        normalize: unicode normalization: NFC, NFKC or none.
    """
    if sentinels < 0:
        raise LmstackError(f"sentinels must be >= 0, got {sentinels}")
    specials = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    specials += [t for t in sentinel_tokens(sentinels) if t not in specials]
    if len(set(specials)) != len(specials):
        raise LmstackError(f"duplicate special tokens in {specials}")
    if vocab_size <= len(specials):
        raise LmstackError(f"vocab_size {vocab_size} leaves no room beyond the {len(specials)} special tokens")
    if min_frequency < 1:
        raise LmstackError(f"min_frequency must be at least 1, got {min_frequency}")

    if kind == "bpe":
        if vocab_size < len(specials) + 256:
            raise LmstackError(f"a byte-level BPE needs vocab_size >= {len(specials) + 256} "
                               f"(256 bytes + {len(specials)} special tokens), got {vocab_size}")
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif kind == "char":
        unk = UNK if UNK in specials else None
        backend = HFTokenizer(models.WordLevel(unk_token=unk))
        # Every character (newlines included) is its own pre-token, hence its own word; Fuse joins them back.
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=specials, show_progress=False)
    else:
        raise LmstackError(f"unknown tokenizer kind {kind!r}; use bpe or char")

    counted = 0

    def texts() -> Iterator[str]:
        nonlocal counted
        for text in _texts(inputs, field, format, doc_split, normalize):
            counted += 1
            yield text

    backend.train_from_iterator(texts(), trainer=trainer)
    if counted == 0:
        raise LmstackError(f"no documents left after cleaning in {', '.join(inputs)}")

    tokenizer = Tokenizer(backend, eos_token=EOS if EOS in specials else specials[0] if specials else None,
                          pad_token=PAD if PAD in specials else None)
    out_dir = Path(out)
    tokenizer.save(out_dir)
    # Name the other special tokens too, so transformers' AutoTokenizer and the MLM/T5 objectives find them.
    cfg_file = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    if MASK in specials:
        cfg["mask_token"] = MASK
    if UNK in specials:
        cfg["unk_token"] = UNK
    named = {cfg.get(k) for k in ("eos_token", "pad_token", "mask_token", "unk_token")}
    cfg["additional_special_tokens"] = [t for t in specials if t not in named]
    cfg["lmstack_tokenizer_kind"] = kind
    atomic_write_json(cfg_file, cfg)
    return out_dir
