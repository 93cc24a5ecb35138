"""Data pipeline: tokenizer training, `data prepare` shards, and the per-objective batch makers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from lmstack.data import (
    CausalBatches,
    MaskedLMBatches,
    PairDataset,
    SpanCorruptionBatches,
    TokenShards,
    clean_text,
    load_tokenizer,
    mask_tokens,
    prepare_data,
    random_spans_noise_mask,
    sentinel_token_ids,
    span_corrupt,
    special_token_ids,
    train_tokenizer,
)
from lmstack.data.batching import IGNORE_INDEX, span_corruption_lengths, step_generator
from lmstack.errors import LmstackError
from lmstack.tokenizer import Tokenizer

torch.set_num_threads(2)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
MULTI30K = DATA / "multi30k"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first ~200 KB of tinyshakespeare: enough for a small BPE, quick to train on."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer([str(corpus)], out=str(tmp_path_factory.mktemp("bpe")), kind="bpe", vocab_size=500,
                           sentinels=8)


def _shard_tokens(out: Path, split: str) -> np.ndarray:
    manifest = json.loads((out / "manifest.json").read_text())
    arrays = [np.memmap(out / s["file"], dtype=manifest["dtype"], mode="r") for s in manifest["shards"][split]]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=manifest["dtype"])


def _documents(tokens: np.ndarray, eos: int, tok: Tokenizer) -> list[str]:
    """Split a token stream at EOS and decode each document; every document must end with EOS."""
    assert len(tokens) == 0 or tokens[-1] == eos
    docs, start = [], 0
    for end in np.flatnonzero(tokens == eos):
        docs.append(tok.decode(tokens[start:end].tolist()))
        start = end + 1
    return docs


# ------------------------------------------------------------------------------------------ tokenizers


def test_bpe_tokenizer_round_trips_and_matches_transformers(bpe: Path) -> None:
    tok = Tokenizer.from_dir(bpe)
    assert tok.vocab_size == 500
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<pad>"
    for text in ["First Citizen:\nBefore we proceed any further, hear me speak.",
                 "Unseen bytes still round-trip: déjà vu, 你好, 🙂, tabs\tand  spaces\n\n"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    # Merges were learned: common English takes far fewer tokens than bytes.
    assert len(tok.encode("the citizens of Rome")) < len("the citizens of Rome") / 2
    specials = {tok.backend.id_to_token(i) for i in special_token_ids(tok)}
    assert {"<|endoftext|>", "<pad>", "[MASK]", "<unk>", "<extra_id_0>", "<extra_id_7>"} <= specials
    assert len(sentinel_token_ids(tok)) == 8
    # Special tokens are matched whole, never split.
    assert tok.encode("a<|endoftext|>b").count(tok.eos_token_id) == 1

    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(bpe))
    text = "O Romeo, Romeo! wherefore art thou Romeo?"
    assert ref(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert ref.mask_token == "[MASK]" and ref.eos_token == "<|endoftext|>" and ref.unk_token == "<unk>"


def test_char_tokenizer_is_one_token_per_character(corpus: Path, tmp_path: Path) -> None:
    out = train_tokenizer([str(corpus)], out=str(tmp_path / "char"), kind="char", vocab_size=200, min_frequency=1)
    tok = Tokenizer.from_dir(out)
    chars = set(clean_text(corpus.read_text(encoding="utf-8")))
    assert tok.vocab_size == len(chars) + 4  # every character seen, plus the four default special tokens
    text = "KING RICHARD III:\nNow is the winter of our discontent!"
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.encode("\u00e9") == [tok.token_to_id("<unk>")]  # never seen in the corpus


def test_tokenizer_trains_on_jsonl_field(tmp_path: Path) -> None:
    rows = [{"id": i, "content": f"record {i} says hello to the world"} for i in range(200)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = train_tokenizer([str(tmp_path / "d.jsonl")], out=str(tmp_path / "tok"), vocab_size=300, field="content")
    tok = Tokenizer.from_dir(out)
    assert tok.backend.token_to_id("Ġhello") is not None  # learned from the field's text
    assert tok.backend.token_to_id("content") is None  # the JSON keys were not trained on
    with pytest.raises(LmstackError, match=r"needs vocab_size >= 260 .*got 100"):
        train_tokenizer([str(tmp_path / "d.jsonl")], out=str(tmp_path / "t2"), vocab_size=100, field="content")


# ------------------------------------------------------------------------------------------ cleaning


def test_clean_text_normalizes_unicode_and_whitespace() -> None:
    assert clean_text("  a \t b  \r\n\r\n\r\n\n  c\u00a0d  \n") == "a b\n\nc d"
    assert clean_text("Cafe\u0301") == "Caf\u00e9"  # NFC composes
    assert clean_text("\ufb01le", "NFC") == "\ufb01le" and clean_text("\ufb01le", "NFKC") == "file"
    assert clean_text(" \n\t\n ") == ""
    with pytest.raises(LmstackError, match="unknown normalization"):
        clean_text("x", "NFD")


# ------------------------------------------------------------------------------------------ prepare


def _write_small_corpus(root: Path) -> tuple[list[str], list[str]]:
    """A text file and a JSONL file with a known number of duplicates and short documents."""
    text = ("First  paragraph,\twith   messy spacing.\r\nSecond line.\n\n\n\n"
            "Second paragraph.\n\n"
            "First paragraph, with messy spacing.\nSecond line.\n\n"  # a duplicate once cleaned
            "ok\n\n"  # too short with min_chars=5
            "   \t  \n\n"  # a blank line, not a document
            "Third paragraph: caf\u0065\u0301 au lait.\n")
    (root / "a.txt").write_text(text, encoding="utf-8")
    records = [{"text": "Second paragraph."},  # duplicate of a text-file document
               {"text": "A JSONL document about tokenizers."},
               {"text": "Another one, with a\nline break."},
               {"text": "x"},  # too short
               {"text": "  \n\t "}]  # empty once cleaned
    (root / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "\n", encoding="utf-8")
    kept = ["First paragraph, with messy spacing.\nSecond line.", "Second paragraph.",
            "Third paragraph: caf\u00e9 au lait.", "A JSONL document about tokenizers.",
            "Another one, with a\nline break."]
    return [str(root / "a.txt"), str(root / "b.jsonl")], kept


def test_prepare_cleans_dedups_splits_and_packs(bpe: Path, tmp_path: Path) -> None:
    inputs, kept = _write_small_corpus(tmp_path)
    out = tmp_path / "out"
    manifest = prepare_data(inputs, out=str(out), tokenizer=str(bpe), val_fraction=0.4, min_chars=5, seed=3, progress=False)
    tok = Tokenizer.from_dir(bpe)

    assert manifest["documents"] == {"read": 10, "kept": 5, "dropped": 5, "too_short": 3, "duplicates": 2,
                                     "train": manifest["documents"]["train"], "val": manifest["documents"]["val"]}
    assert manifest["documents"]["train"] + manifest["documents"]["val"] == 5
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 500
    assert manifest["eos_id"] == tok.eos_token_id and manifest["tokenizer"]["hash"] == tok.hash()
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert Tokenizer.from_dir(out / "tokenizer").hash() == tok.hash()

    decoded: dict[str, list[str]] = {}
    for split in ("train", "val"):
        tokens = _shard_tokens(out, split)
        assert tokens.dtype == np.uint16
        assert len(tokens) == manifest["tokens"][split] == sum(s["tokens"] for s in manifest["shards"][split])
        decoded[split] = _documents(tokens, tok.eos_token_id, tok)
        assert len(decoded[split]) == manifest["documents"][split]
    assert sorted(decoded["train"] + decoded["val"]) == sorted(kept)  # EOS after each document, text intact

    # Same seed, same split; the assignment is a property of (seed, document), not of the order.
    again = prepare_data(list(reversed(inputs)), out=str(tmp_path / "again"), tokenizer=str(bpe), val_fraction=0.4,
                         min_chars=5, seed=3, progress=False)
    assert sorted(_documents(_shard_tokens(tmp_path / "again", "val"), tok.eos_token_id, tok)) == \
        sorted(decoded["val"])
    assert again["documents"] == manifest["documents"]


def test_val_split_fraction_and_seed(bpe: Path, tmp_path: Path) -> None:
    (tmp_path / "lines.txt").write_text("".join(f"document number {i}\n" for i in range(3000)))
    splits = {}
    for seed in (0, 1):
        m = prepare_data([str(tmp_path / "lines.txt")], out=str(tmp_path / f"o{seed}"), tokenizer=str(bpe), val_fraction=0.1,
                         seed=seed, doc_split="line", progress=False)
        assert abs(m["documents"]["val"] / 3000 - 0.1) < 0.02
        splits[seed] = _shard_tokens(tmp_path / f"o{seed}", "val")
    assert not np.array_equal(splits[0], splits[1])  # another seed, another split


def test_shards_roll_over_at_shard_tokens(bpe: Path, tmp_path: Path) -> None:
    text = "\n\n".join(f"Paragraph {i} of a corpus long enough for several shards." for i in range(60))
    (tmp_path / "c.txt").write_text(text)
    m = prepare_data([str(tmp_path / "c.txt")], out=str(tmp_path / "out"), tokenizer=str(bpe), val_fraction=0.0,
                     shard_tokens=100, progress=False)
    sizes = [s["tokens"] for s in m["shards"]["train"]]
    assert len(sizes) > 3 and all(n == 100 for n in sizes[:-1]) and 0 < sizes[-1] <= 100
    assert m["shards"]["val"] == [] and m["tokens"]["val"] == 0
    tok = Tokenizer.from_dir(bpe)
    docs = _documents(_shard_tokens(tmp_path / "out", "train"), tok.eos_token_id, tok)
    assert docs == text.split("\n\n")  # documents cross shard boundaries intact, in order

    # A smaller rerun in the same folder leaves no stale shards behind.
    m2 = prepare_data([str(tmp_path / "c.txt")], out=str(tmp_path / "out"), tokenizer=str(bpe), val_fraction=0.0,
                      shard_tokens=10**6, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.bin")) == ["train_000.bin"]
    assert m2["tokens"]["train"] == m["tokens"]["train"]


def test_long_document_is_tokenized_in_pieces_with_the_same_ids(bpe: Path, corpus: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import lmstack.data.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "_ENCODE_BATCH_CHARS", 3000)  # the 200 KB file becomes ~70 pieces
    m = prepare_data([str(corpus)], out=str(tmp_path / "out"), tokenizer=str(bpe), doc_split="file", val_fraction=0.0,
                     progress=False)
    tok = Tokenizer.from_dir(bpe)
    whole = tok.encode(clean_text(corpus.read_text(encoding="utf-8")))
    assert m["documents"]["kept"] == 1
    assert _shard_tokens(tmp_path / "out", "train").tolist() == whole + [tok.eos_token_id]


def test_big_vocab_uses_uint32(tmp_path: Path) -> None:
    # A word-level tokenizer with 70k words: ids above 65535 must survive the shards.
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    Tokenizer(backend, eos_token="<|endoftext|>").save(tmp_path / "tok")
    (tmp_path / "c.txt").write_text("w5 w69999 w65536\n\nw12 w69998\n")
    m = prepare_data([str(tmp_path / "c.txt")], out=str(tmp_path / "out"), tokenizer=str(tmp_path / "tok"), val_fraction=0.0,
                     progress=False)
    assert m["dtype"] == "uint32"
    tokens = _shard_tokens(tmp_path / "out", "train")
    assert tokens.dtype == np.uint32
    assert tokens.tolist() == [6, 70000, 65537, 0, 13, 69999, 0]


def test_parquet_input(bpe: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"Parquet row {i} holds a short document." for i in range(50)]
    table = pa.table({"id": list(range(50)), "body": docs})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=16)
    m = prepare_data([str(tmp_path / "d.parquet")], out=str(tmp_path / "out"), tokenizer=str(bpe), field="body",
                     val_fraction=0.0, progress=False)
    tok = Tokenizer.from_dir(bpe)
    assert _documents(_shard_tokens(tmp_path / "out", "train"), tok.eos_token_id, tok) == docs
    assert m["documents"]["kept"] == 50
    with pytest.raises(LmstackError, match=r"d\.parquet: no column 'text' \(columns: id, body\)"):
        prepare_data([str(tmp_path / "d.parquet")], out=str(tmp_path / "o2"), tokenizer=str(bpe), progress=False)


def test_bad_input_errors(bpe: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken\n')
    with pytest.raises(LmstackError, match=r"bad\.jsonl:3: invalid JSON \("):
        prepare_data([str(bad)], out=str(tmp_path / "o"), tokenizer=str(bpe), progress=False)
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(LmstackError, match=r"bad\.jsonl:2: no field 'text'"):
        prepare_data([str(bad)], out=str(tmp_path / "o"), tokenizer=str(bpe), progress=False)
    (tmp_path / "empty.txt").write_text("  \n\n\t\n\nab\n")
    with pytest.raises(LmstackError, match=r"no documents left after cleaning in .*empty\.txt"):
        prepare_data([str(tmp_path / "empty.txt")], out=str(tmp_path / "o"), tokenizer=str(bpe), min_chars=3, progress=False)
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert list((tmp_path / "o").glob("*.bin")) == [] and list((tmp_path / "o").glob(".*tmp")) == []
    with pytest.raises(LmstackError, match="input not found"):
        prepare_data([str(tmp_path / "missing.txt")], out=str(tmp_path / "o"), tokenizer=str(bpe), progress=False)
    (tmp_path / "latin1.txt").write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(LmstackError, match=r"latin1\.txt:2: not valid UTF-8"):
        prepare_data([str(tmp_path / "latin1.txt")], out=str(tmp_path / "o"), tokenizer=str(bpe), progress=False)


@pytest.mark.slow
def test_prepare_with_model_tokenizers(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("Hello there.\n\nGeneral Kenobi!\n")
    # A GGUF file's tokenizer (read from metadata only); its EOS separates documents.
    m = prepare_data([str(tmp_path / "c.txt")], out=str(tmp_path / "smol"), tokenizer="smollm2-135m-instruct",
                     val_fraction=0.0, progress=False)
    tok = load_tokenizer("smollm2-135m-instruct")
    assert m["vocab_size"] == 49152 and m["dtype"] == "uint16" and m["eos_id"] == tok.eos_token_id
    assert _documents(_shard_tokens(tmp_path / "smol", "train"), tok.eos_token_id, tok) == \
        ["Hello there.", "General Kenobi!"]
    # A BERT folder has no EOS: [SEP] separates documents.
    m = prepare_data([str(tmp_path / "c.txt")], out=str(tmp_path / "bert"), tokenizer="minilm-l6", val_fraction=0.0,
                     progress=False)
    bert = load_tokenizer("minilm-l6")
    assert m["eos_id"] == bert.token_to_id("[SEP]")
    assert _documents(_shard_tokens(tmp_path / "bert", "train"), m["eos_id"], bert) == \
        ["hello there.", "general kenobi!"]


STREAMING_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from lmstack.data import prepare_data
    tok, small, big, out = sys.argv[1:5]
    # Warm up on a small file so imports and one-off allocations are in the baseline.
    prepare_data([small], out=out + "/warm", tokenizer=tok, progress=False)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    m = prepare_data([big], out=out + "/big", tokenizer=tok, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mb": (peak - base) / 1024, "tokens": m["tokens"], "docs": m["documents"]}))
""")


@pytest.mark.slow
def test_prepare_streams_in_constant_memory(tmp_path: Path) -> None:
    # A word-level tokenizer keeps this test fast; the reading, cleaning and packing code is what is measured.
    from tokenizers import trainers

    backend = HFTokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.train_from_iterator([SHAKESPEARE.read_text()], trainers.WordLevelTrainer(
        vocab_size=5000, special_tokens=["<|endoftext|>", "<unk>"]))
    Tokenizer(backend, eos_token="<|endoftext|>").save(tmp_path / "tok")
    paragraphs = SHAKESPEARE.read_text().split("\n\n")
    with open(tmp_path / "big.txt", "w") as f:  # ~50 MB of distinct documents of ~1.5 KB
        for rep in range(45):
            for i in range(0, len(paragraphs), 10):
                f.write(f"{rep}: " + "\n".join(paragraphs[i:i + 10]) + "\n\n")
    size_mb = (tmp_path / "big.txt").stat().st_size / 2**20
    assert size_mb > 45
    result = subprocess.run([sys.executable, "-c", STREAMING_SCRIPT, str(tmp_path / "tok"), str(SHAKESPEARE),
                             str(tmp_path / "big.txt"), str(tmp_path)], capture_output=True, text=True,
                            timeout=300, env={"PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "true"})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["tokens"]["train"] > 8_000_000
    # Holding the file (50 MB of str) or its tokens (9M ids) would add well over 50 MB.
    assert report["growth_mb"] < 25, report


# ------------------------------------------------------------------------------------------ batching


@pytest.fixture(scope="module")
def shards(bpe: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    prepare_data([str(corpus)], out=str(out), tokenizer=str(bpe), val_fraction=0.1, progress=False)
    return out


def test_causal_batches_are_deterministic_in_seed_and_step(shards: Path) -> None:
    train = TokenShards(shards, "train")
    assert train.num_tokens == json.loads((shards / "manifest.json").read_text())["tokens"]["train"]
    a = CausalBatches(train, batch_size=4, block_size=32, seed=7)
    x, y = a.batch_at(11)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    # Resume: a fresh maker (as after a restart) gives the same batch for the same (seed, step).
    x2, y2 = CausalBatches(TokenShards(shards, "train"), 4, 32, seed=7).batch_at(11)
    torch.testing.assert_close(x, x2)
    torch.testing.assert_close(y, y2)
    assert not torch.equal(x, a.batch_at(12)[0])
    assert not torch.equal(x, CausalBatches(train, 4, 32, seed=8).batch_at(11)[0])
    # Each row is a contiguous window of the token stream.
    stream = torch.from_numpy(np.asarray(train.shards[0], dtype=np.int64))
    row = torch.cat([x[0], y[0, -1:]])
    windows = stream.unfold(0, 33, 1)  # [N, 33]
    assert bool((windows == row).all(dim=1).any())
    evals = list(a.eval_batches(max_batches=2))
    assert len(evals) == 2 and evals[0][0].shape == (4, 32)
    with pytest.raises(LmstackError, match="no train shard holds"):
        CausalBatches(train, 2, train.num_tokens + 5).batch_at(0)


def test_token_shards_detect_truncation(shards: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    with open(copy / "train_000.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(LmstackError, match=r"train_000\.bin: expected \d+ bytes .* found 100 bytes"):
        TokenShards(copy, "train")
    with pytest.raises(LmstackError, match="no manifest.json"):
        TokenShards(tmp_path, "train")


def test_mask_tokens_rates() -> None:
    g = torch.Generator().manual_seed(0)
    vocab, mask_id, specials = 1000, 3, [0, 1, 2, 3]
    ids = torch.randint(4, vocab, (200, 1000), generator=g)  # 200k tokens
    ids[:, ::50] = 0  # separators: never picked
    inputs, labels = mask_tokens(ids, mask_id, vocab, specials, g)
    special = ids == 0
    picked = labels != IGNORE_INDEX
    assert not picked[special].any() and torch.equal(inputs[special], ids[special])
    torch.testing.assert_close(labels[picked], ids[picked])
    n = picked.sum().item()
    assert abs(n / (~special).sum().item() - 0.15) < 0.01
    masked = (inputs == mask_id) & picked
    randomized = (inputs != ids) & (inputs != mask_id) & picked
    kept = (inputs == ids) & picked
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    assert abs(randomized.sum().item() / n - 0.1) < 0.01
    assert abs(kept.sum().item() / n - 0.1) < 0.01
    assert torch.equal(inputs[~picked], ids[~picked])  # nothing else changes


def test_masked_lm_batches(shards: Path, bpe: Path) -> None:
    tok = Tokenizer.from_dir(bpe)
    maker = MaskedLMBatches(TokenShards(shards, "train"), 8, 64, tok.token_to_id("[MASK]"), special_token_ids(tok),
                            seed=1)
    x, labels = maker.batch_at(3)
    x2, labels2 = maker.batch_at(3)
    assert x.shape == labels.shape == (8, 64)
    assert torch.equal(x, x2) and torch.equal(labels, labels2)
    assert (x == tok.token_to_id("[MASK]")).any() and (labels != IGNORE_INDEX).any()


def _uncorrupt(inputs: list[int], targets: list[int], sentinels: list[int], eos: int) -> list[int]:
    """Rebuild the original sequence: each sentinel in the inputs takes the tokens after it in the targets."""
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets[:-1]:
        if t in sentinels:
            current = t
            spans[t] = []
        else:
            spans[current].append(t)
    assert inputs[-1] == eos and targets[-1] == eos
    out: list[int] = []
    for t in inputs[:-1]:
        out.extend(spans[t] if t in sentinels else [t])
    return out


def test_span_corruption_reconstructs_and_matches_t5_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    sentinels = list(range(1099, 999, -1))  # T5 layout: <extra_id_0> is the last id
    eos = 1
    ids = torch.randint(2, 999, (64, 512), generator=g)
    inputs, targets = span_corrupt(ids, sentinels, eos, g)
    assert (inputs.shape[1], targets.shape[1]) == span_corruption_lengths(512)
    for row in range(64):
        assert _uncorrupt(inputs[row].tolist(), targets[row].tolist(), sentinels, eos) == ids[row].tolist()
        assert inputs[row].tolist().count(sentinels[0]) == 1  # spans numbered in order, from <extra_id_0>

    masks = torch.stack([random_spans_noise_mask(512, g) for _ in range(200)])  # [200, 512]
    assert abs(masks.float().mean().item() - 0.15) < 0.005
    starts = masks & ~torch.cat([torch.zeros(200, 1, dtype=torch.bool), masks[:, :-1]], dim=1)
    assert abs(masks.sum().item() / starts.sum().item() - 3.0) < 0.1  # mean span length
    assert not masks[:, 0].any()  # T5's mask starts with a non-noise span
    lengths = torch.diff(torch.cat([torch.nonzero(starts[0]).flatten(), torch.tensor([512])]))
    assert lengths.unique().numel() > 1  # gaps vary: spans are randomly placed
    assert not torch.equal(masks[0], masks[1])


def test_span_corruption_batches(shards: Path, bpe: Path) -> None:
    tok = Tokenizer.from_dir(bpe)
    sentinels = sentinel_token_ids(tok)
    maker = SpanCorruptionBatches(TokenShards(shards, "train"), 4, 40, sentinels, seed=0)
    inputs, targets = maker.batch_at(5)
    assert (inputs.shape[1], targets.shape[1]) == span_corruption_lengths(40)
    assert torch.equal(inputs, maker.batch_at(5)[0]) and torch.equal(targets, maker.batch_at(5)[1])
    with pytest.raises(LmstackError, match="sentinel tokens"):
        SpanCorruptionBatches(TokenShards(shards, "train"), 1, 400, sentinels).batch_at(0)


@pytest.fixture(scope="module")
def pair_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    root = tmp_path_factory.mktemp("m30k")
    lines = []
    for lang in ("en", "de"):
        lines += (MULTI30K / f"train.{lang}").read_text(encoding="utf-8").splitlines()[:200]
    (root / "text.txt").write_text("\n".join(lines), encoding="utf-8")
    return Tokenizer.from_dir(train_tokenizer([str(root / "text.txt")], out=str(root / "tok"), vocab_size=600,
                                              doc_split="line"))


def test_seq2seq_batches_on_multi30k(pair_tokenizer: Tokenizer) -> None:
    tok = pair_tokenizer
    data = PairDataset(MULTI30K / "train.en", MULTI30K / "train.de", tok, max_len=128, limit=200)
    assert len(data) == 200
    en = (MULTI30K / "train.en").read_text(encoding="utf-8").splitlines()[:200]
    de = (MULTI30K / "train.de").read_text(encoding="utf-8").splitlines()[:200]
    batches = list(data.batches(16, seed=0, epoch=0))
    assert len(batches) == data.num_batches(16) == 13
    seen_src, seen_tgt = [], []
    padding = 0
    for b in batches:
        assert b.src_ids.shape == b.src_mask.shape and b.tgt_in.shape == b.tgt_mask.shape == b.labels.shape
        assert (b.tgt_in[:, 0] == data.bos_id).all()
        assert torch.equal(b.labels == IGNORE_INDEX, ~b.tgt_mask)
        assert (b.src_ids[~b.src_mask] == data.src_pad_id).all()
        for r in range(b.src_ids.shape[0]):
            src = b.src_ids[r][b.src_mask[r]].tolist()
            label = b.labels[r][b.tgt_mask[r]].tolist()
            assert label[-1] == tok.eos_token_id
            assert b.tgt_in[r][b.tgt_mask[r]].tolist()[1:] == label[:-1]  # teacher forcing: shifted by one
            seen_src.append(tok.decode(src))
            seen_tgt.append(tok.decode(label[:-1]))
        padding += (~b.src_mask).sum().item()
    # Every pair exactly once, still aligned.
    assert sorted(zip(seen_src, seen_tgt, strict=True)) == sorted(zip(en, de, strict=True))
    # Length bucketing: far less padding than a random order would give.
    shuffled = data.collate([data.pairs[i] for i in torch.randperm(200, generator=torch.Generator().manual_seed(0))
                             .tolist()[:16]])
    assert padding / sum(b.src_mask.numel() for b in batches) < 0.5 * (~shuffled.src_mask).float().mean().item()

    again = list(data.batches(16, seed=0, epoch=0))
    assert all(torch.equal(a.src_ids, b.src_ids) for a, b in zip(batches, again, strict=True))
    other = list(data.batches(16, seed=0, epoch=1))
    assert not all(a.src_ids.shape == b.src_ids.shape and torch.equal(a.src_ids, b.src_ids)
                   for a, b in zip(batches, other, strict=True))
    resumed = list(data.batches(16, seed=0, epoch=0, start=5))
    assert all(torch.equal(a.labels, b.labels) for a, b in zip(batches[5:], resumed, strict=True)) and len(resumed) == 8


def test_seq2seq_pairs_must_align(pair_tokenizer: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "b.txt").write_text("eins\nzwei\n")
    with pytest.raises(LmstackError, match=r"a\.txt has 3 lines but .*b\.txt has 2"):
        PairDataset(tmp_path / "a.txt", tmp_path / "b.txt", pair_tokenizer, 16)


def test_step_generator_depends_on_seed_and_step() -> None:
    draw = [torch.randint(10**9, (4,), generator=step_generator(s, k)) for s, k in [(0, 0), (0, 1), (1, 0), (0, 0)]]
    assert torch.equal(draw[0], draw[3])
    assert not torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])


def test_tail_split_is_a_contiguous_cut_of_the_token_stream(tmp_path):
    """nanoGPT's split: the first 90% of a single document trains, the last 10% validates."""
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(5000))
    corpus = tmp_path / "one.txt"
    corpus.write_text(text)
    tok = train_tokenizer([str(corpus)], out=str(tmp_path / "tok"), kind="char", doc_split="file")
    manifest = prepare_data([str(corpus)], out=str(tmp_path / "out"), tokenizer=str(tok), doc_split="file", split="tail",
                            val_fraction=0.1, shard_tokens=1000, progress=False)
    total = len(text) + 1  # + EOS
    assert manifest["tokens"]["train"] == int(total * 0.9)
    assert manifest["tokens"]["val"] == total - int(total * 0.9)
    t = Tokenizer.from_dir(tmp_path / "out" / "tokenizer")

    def read(split: str) -> list[int]:
        ids: list[int] = []
        for shard in manifest["shards"][split]:
            ids += np.fromfile(tmp_path / "out" / shard["file"], dtype=manifest["dtype"]).tolist()
        return ids
    train_ids, val_ids = read("train"), read("val")
    assert t.decode(train_ids + val_ids[:-1]) == text
    assert val_ids[-1] == manifest["eos_id"]


# ------------------------------------------------------------------------- hardening (issue 13)


def test_negative_counts_are_refused_with_one_line(corpus: Path, bpe: Path, tmp_path: Path) -> None:
    with pytest.raises(LmstackError, match="sentinels must be >= 0, got -3"):
        train_tokenizer([str(corpus)], out=str(tmp_path / "tok"), sentinels=-3)
    with pytest.raises(LmstackError, match="min_chars must be >= 0, got -4"):
        prepare_data([str(corpus)], out=str(tmp_path / "out"), tokenizer=str(bpe), min_chars=-4, progress=False)
    assert not (tmp_path / "tok").exists() and not (tmp_path / "out").exists()


def test_a_failed_prepare_leaves_no_new_folder_and_keeps_what_was_there(bpe: Path, tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("a\n\nb\n", encoding="utf-8")  # every document is too short
    out = tmp_path / "new" / "shards"
    with pytest.raises(LmstackError, match="no documents left"):
        prepare_data([str(tmp_path / "short.txt")], out=str(out), tokenizer=str(bpe), min_chars=5, progress=False)
    assert not (tmp_path / "new").exists()
    # a folder that held an earlier run keeps it whole: its manifest, its shards, and unrelated files
    (tmp_path / "c.txt").write_text("hello world, a document long enough\n", encoding="utf-8")
    kept = tmp_path / "kept"
    prepare_data([str(tmp_path / "c.txt")], out=str(kept), tokenizer=str(bpe), val_fraction=0.0, progress=False)
    (kept / "notes.txt").write_text("mine", encoding="utf-8")
    before = {p.name: p.read_bytes() for p in kept.iterdir() if p.is_file()}
    with pytest.raises(LmstackError, match="no documents left"):
        prepare_data([str(tmp_path / "short.txt")], out=str(kept), tokenizer=str(bpe), min_chars=5, progress=False)
    assert {p.name: p.read_bytes() for p in kept.iterdir() if p.is_file()} == before
