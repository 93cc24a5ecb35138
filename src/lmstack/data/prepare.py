"""`lmstack data prepare`: text / JSONL / Parquet -> cleaned, deduplicated, tokenized, packed token shards.

Everything streams: documents are read one at a time, cleaned, hashed (exact dedup and the train/val split both
key on that hash, so neither needs to see the corpus twice), tokenized in small batches and appended to raw
`.bin` shards. Memory is constant in corpus size apart from the dedup set (16 bytes of hash per kept document).

The output folder holds `train_000.bin ...`, `val_000.bin ...` (little-endian uint16 or uint32 token ids, one
EOS after every document), a copy of the tokenizer under `tokenizer/`, and `manifest.json`, written last and
atomically; `lmstack.data.batching.TokenShards` reads it back.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
from tqdm import tqdm

from lmstack.errors import LmstackError
from lmstack.io import atomic_write_json, json_records, remove_stale_temps, temp_path
from lmstack.tokenizer import Tokenizer

SHARDS_FORMAT = "lmstack-shards-v1"
Format = Literal["auto", "text", "jsonl", "parquet"]
DocSplit = Literal["file", "line", "blank-line"]
Normalization = Literal["NFC", "NFKC", "none"]

_JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
_ENCODE_BATCH_CHARS = 1 << 18  # ~256K characters per encode_batch call: fast, and small Encoding objects


# ------------------------------------------------------------------------------------------ tokenizer


def load_tokenizer(name_or_path: str | Path) -> Tokenizer:
    """A tokenizer folder (tokenizer.json), a native/HF model folder, a GGUF file, or a registry model name.

    BERT-style tokenizers have no EOS; their [SEP] then serves as the document separator.
    """
    path = Path(name_or_path).expanduser()
    if not (path.is_dir() and (path / "tokenizer.json").exists()):
        from lmstack.checkpoints import detect_format, resolve
        path = resolve(str(name_or_path))
        if detect_format(path) == "gguf":  # only the metadata: no weights are dequantized
            from lmstack.checkpoints.gguf import gguf_tokenizer, read_gguf
            return gguf_tokenizer(read_gguf(path))
        if not (path / "tokenizer.json").exists():
            raise LmstackError(f"tokenizer.json not found in {path}")
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer.eos_token is None:
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.exists() else {}
        sep = cfg.get("sep_token")
        tokenizer.eos_token = sep.get("content") if isinstance(sep, dict) else sep
    return tokenizer


def special_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of the tokenizer's special added tokens (never masked, never span-corrupted)."""
    return sorted(i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special)


# ------------------------------------------------------------------------------------------ reading


def _input_files(inputs: list[str]) -> list[Path]:
    """Files as given; folders expand to their non-hidden files, sorted, so the order is reproducible."""
    if not inputs:
        raise LmstackError("no input files given")
    files: list[Path] = []
    for name in inputs:
        path = Path(name).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise LmstackError(f"input folder is empty: {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise LmstackError(f"input not found: {path}")
    return files


def _file_format(path: Path, fmt: Format) -> str:
    if fmt != "auto":
        return fmt
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    if suffixes and suffixes[0] in _JSONL_SUFFIXES:
        return "jsonl"
    if path.suffix == ".parquet":
        return "parquet"
    return "text"


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _lines(path: Path, progress: tqdm | None) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its newline), reading bytes so progress counts what was read."""
    with _open_binary(path) as f:
        pending = 0
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LmstackError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            pending += len(raw)
            if progress is not None and pending >= 1 << 20:
                progress.update(pending)
                pending = 0
            yield lineno, line
        if progress is not None:
            progress.update(pending)


def _text_documents(path: Path, doc_split: DocSplit, progress: tqdm | None) -> Iterator[str]:
    if doc_split == "file":  # one document per file: that document is held in memory
        yield "".join(line for _, line in _lines(path, progress))
    elif doc_split == "line":
        for _, line in _lines(path, progress):
            yield line
    elif doc_split == "blank-line":
        paragraph: list[str] = []
        for _, line in _lines(path, progress):
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph)
                paragraph = []
        if paragraph:
            yield "".join(paragraph)
    else:
        raise LmstackError(f"unknown doc_split {doc_split!r}; use file, line or blank-line")


def _jsonl_documents(path: Path, fieldname: str, progress: tqdm | None) -> Iterator[str]:
    for lineno, record in json_records(path, _lines(path, progress)):
        if not isinstance(record, dict) or fieldname not in record:
            raise LmstackError(f"{path}:{lineno}: no field '{fieldname}'")
        value = record[fieldname]
        if not isinstance(value, str):
            raise LmstackError(f"{path}:{lineno}: field '{fieldname}' is {type(value).__name__}, not a string")
        yield value


def _parquet_documents(path: Path, fieldname: str, progress: tqdm | None) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LmstackError("reading Parquet needs pyarrow: pip install 'lmstack[data]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid has a one-line message
        raise LmstackError(f"{path}: cannot read Parquet ({str(e).splitlines()[0]})") from None
    names = pf.schema_arrow.names
    if fieldname not in names:
        raise LmstackError(f"{path}: no column '{fieldname}' (columns: {', '.join(names)})")
    size, rows, done, row = path.stat().st_size, max(pf.metadata.num_rows, 1), 0, 0
    for batch in pf.iter_batches(batch_size=1024, columns=[fieldname]):  # bounded memory, even for big row groups
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:
                continue
            if not isinstance(value, str):
                raise LmstackError(f"{path}: row {row}: column '{fieldname}' is {type(value).__name__}, "
                                   "not a string")
            yield value
        if progress is not None:
            step = size * row // rows - done
            progress.update(step)
            done += step


def read_documents(inputs: list[str], field: str = "text", format: Format = "auto",
                   doc_split: DocSplit = "blank-line", progress: tqdm | None = None) -> Iterator[str]:
    """Raw documents from text, JSONL (optionally .gz) and Parquet files, one at a time."""
    for path in _input_files(inputs):
        fmt = _file_format(path, format)
        if fmt == "text":
            yield from _text_documents(path, doc_split, progress)
        elif fmt == "jsonl":
            yield from _jsonl_documents(path, field, progress)
        elif fmt == "parquet":
            yield from _parquet_documents(path, field, progress)
        else:
            raise LmstackError(f"unknown format {fmt!r}; use auto, text, jsonl or parquet")


# ------------------------------------------------------------------------------------------ cleaning

_NEWLINES = re.compile(r"\r\n?|[\u2028\u2029\x85]")
_SPACES = re.compile(r"[^\S\n]{2,}|[^\S\n ]")  # whitespace runs (newlines aside) and any lone non-space blank
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_text(text: str, normalize: Normalization = "NFC") -> str:
    """Unicode-normalize, unify newlines, collapse spaces/tabs, strip lines, keep paragraph breaks (one blank line)."""
    ascii_only = text.isascii()  # fast path: ASCII is already NFC/NFKC and has no exotic line breaks
    if normalize != "none":
        if normalize not in ("NFC", "NFKC"):
            raise LmstackError(f"unknown normalization {normalize!r}; use NFC, NFKC or none")
        if not ascii_only:
            text = unicodedata.normalize(normalize, text)
    if "\r" in text or not ascii_only:
        text = _NEWLINES.sub("\n", text)
    text = _SPACES.sub(" ", text)  # now the only blanks are single spaces and newlines
    text = text.replace(" \n", "\n").replace("\n ", "\n")  # strip every line
    return _BLANK_RUNS.sub("\n\n", text).strip()


def _doc_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _is_val(doc_hash: bytes, seed: int, val_fraction: float) -> bool:
    # A keyed hash of the document: deterministic for (seed, text), independent of order, needs no second pass.
    key = seed.to_bytes(8, "little", signed=True)
    u = int.from_bytes(hashlib.blake2b(doc_hash, digest_size=8, key=key).digest(), "little") / 2**64
    return u < val_fraction


# ------------------------------------------------------------------------------------------ shards


@dataclass
class _ShardWriter:
    """Appends token arrays to `<split>_NNN.bin`, starting a new shard every `shard_tokens` tokens."""

    out: Path
    split: str
    dtype: np.dtype
    shard_tokens: int
    shards: list[dict[str, Any]] = dataclass_field(default_factory=list)
    _file: IO[bytes] | None = None
    _count: int = 0

    def _tmp(self, index: int) -> Path:
        return temp_path(self.out / f"{self.split}_{index:03d}.bin")

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._file is None:
                remove_stale_temps(self.out / f"{self.split}_{len(self.shards):03d}.bin")  # of a killed run
                self._file = open(self._tmp(len(self.shards)), "wb")
                self._count = 0
            take = min(tokens.size, self.shard_tokens - self._count)
            self._file.write(tokens[:take].astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
            self._count += take
            tokens = tokens[take:]
            if self._count == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.shards.append({"file": f"{self.split}_{len(self.shards):03d}.bin", "tokens": self._count})

    def finish(self) -> list[dict[str, Any]]:
        """Close the last shard and move every shard to its final name."""
        if self._file is not None:
            self._close_shard()
        for index, shard in enumerate(self.shards):
            os.replace(self._tmp(index), self.out / shard["file"])
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        for index in range(len(self.shards) + 1):
            self._tmp(index).unlink(missing_ok=True)


def _pieces(text: str, size: int) -> list[str]:
    """Cut a long cleaned document into pieces of at most `size` characters, so its Encoding objects stay small.

    Cuts fall just before a space; in cleaned text every space sits between two non-blank characters, where
    byte-level BPE and Metaspace pre-tokenizers split anyway (" word" is one pre-token), so the ids match those
    of the whole document. Only text without a space in size/2 characters (e.g. CJK) is cut blindly.
    """
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + size // 2, start + size)
        cut = start + size if cut <= start else cut
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _move_tail_to_val(out_dir: Path, train: list[dict[str, Any]], dtype: np.dtype,
                      val_fraction: float) -> dict[str, list[dict[str, Any]]]:
    """Turn the last `val_fraction` of the train token stream into the val split, shard by shard, streaming."""
    total = sum(s["tokens"] for s in train)
    cut = int(total * (1.0 - val_fraction))
    kept: list[dict[str, Any]] = []
    val: list[dict[str, Any]] = []
    start = 0
    for shard in train:
        path = out_dir / shard["file"]
        end = start + shard["tokens"]
        if end <= cut:
            kept.append(shard)
        else:
            local = max(cut - start, 0)
            name = f"val_{len(val):03d}.bin"
            if local == 0:
                os.replace(path, out_dir / name)
            else:
                src = np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r")
                with open(out_dir / name, "wb") as f:
                    for i in range(local, len(src), 1 << 22):
                        f.write(np.asarray(src[i:i + (1 << 22)]).tobytes())
                    f.flush()
                    os.fsync(f.fileno())
                del src
                os.truncate(path, local * dtype.itemsize)
                kept.append({"file": shard["file"], "tokens": local})
            val.append({"file": name, "tokens": shard["tokens"] - local})
        start = end
    return {"train": kept, "val": val}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ------------------------------------------------------------------------------------------ prepare


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what mkdir(parents=True) will create), or None."""
    missing = None
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing = folder
    return missing


def prepare_data(inputs: list[str], *, out: str, tokenizer: str, field: str = "text", val_fraction: float = 0.1,
                 min_chars: int = 1, dedup: bool = True, normalize: Normalization = "NFC",
                 shard_tokens: int = 50_000_000, seed: int = 0, format: Format = "auto",
                 doc_split: DocSplit = "blank-line", split: Literal["hash", "tail"] = "hash",
                 progress: bool = True) -> dict[str, Any]:
    """Clean, deduplicate, tokenize and pack text / JSONL / Parquet into train and val token shards.

    Returns the manifest. Plain-text files are split into documents by `doc_split` (whole file, each line, or
    blank-line separated paragraphs); JSONL and Parquet take `field` of each record. Each document is followed
    by EOS (and preceded by BOS when the tokenizer adds one). With split=hash, documents go to val with
    probability `val_fraction`, decided by a hash of the document keyed by `seed`. With split=tail, the last
    `val_fraction` of the token stream is val, cut mid-document if need be (nanoGPT's split of a single-file
    corpus such as tinyshakespeare).

    Args:
        inputs: text, JSONL or Parquet files (or folders); read streaming, so larger than RAM is fine.
        out: folder for the shards and manifest.json.
        tokenizer: a tokenizer folder, or any model name or path (its tokenizer is used).
        field: the JSONL / Parquet field holding the text.
        val_fraction: share of documents (split hash) or of tokens (split tail) that go to val.
        min_chars: drop documents shorter than this after cleaning.
        dedup: drop exact duplicate documents.
        normalize: unicode normalization: NFC, NFKC or none.
        shard_tokens: tokens per shard file.
        seed: seed of the hash split.
        format: the input format (default: from each file's extension).
        doc_split: how plain text splits into documents: file, line or blank-line.
        split: hash (by document) or tail (the last val_fraction of the token stream, as nanoGPT).
        progress: show a progress bar.
    """
    if split not in ("hash", "tail"):
        raise LmstackError(f"unknown split {split!r}; use hash or tail")
    if not 0.0 <= val_fraction < 1.0:
        raise LmstackError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise LmstackError(f"shard_tokens must be positive, got {shard_tokens}")
    if min_chars < 0:
        raise LmstackError(f"min_chars must be >= 0, got {min_chars}")
    if normalize not in ("NFC", "NFKC", "none"):
        raise LmstackError(f"unknown normalization {normalize!r}; use NFC, NFKC or none")
    if doc_split not in ("file", "line", "blank-line"):
        raise LmstackError(f"unknown doc_split {doc_split!r}; use file, line or blank-line")
    files = _input_files(inputs)  # fail on a missing input before any work
    tok = load_tokenizer(tokenizer)
    eos = tok.eos_token_id
    bos = tok.bos_token_id if tok.add_bos else None
    if eos is None:
        raise LmstackError(f"tokenizer {tokenizer} has no EOS token to separate documents")
    dtype = token_dtype(tok.vocab_size)

    out_dir = Path(out)
    created = _first_missing(out_dir)  # removed again if this run fails: it holds nothing of anyone else's
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {s: _ShardWriter(out_dir, s, dtype, shard_tokens) for s in ("train", "val")}
    counts = {"read": 0, "kept": 0, "too_short": 0, "duplicates": 0, "train": 0, "val": 0}
    seen: set[bytes] = set()
    encode = getattr(tok.backend, "encode_batch_fast", tok.backend.encode_batch)  # fast: no offsets
    batch: list[tuple[str, str, bool, bool]] = []  # (split, text, starts a document, ends a document)
    batch_chars = 0

    def flush() -> None:
        # Tokenize a batch of documents and append each, with its separators, to its split's shard.
        nonlocal batch_chars
        encodings = encode([text for _, text, _, _ in batch], add_special_tokens=False)
        for split in ("train", "val"):
            flat: list[int] = []
            for (target, _, starts, ends), enc in zip(batch, encodings, strict=True):
                if target == split:
                    if starts and bos is not None:
                        flat.append(bos)
                    flat.extend(enc.ids)
                    if ends:
                        flat.append(eos)
            if flat:
                tokens = np.array(flat, dtype=np.int64)
                if tokens.max() > np.iinfo(dtype).max:
                    raise LmstackError(f"token id {tokens.max()} does not fit {dtype.name}")
                writers[split].write(tokens)
        batch.clear()
        batch_chars = 0

    total = sum(p.stat().st_size for p in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not progress)
    try:
        for raw in read_documents([str(p) for p in files], field, format, doc_split, bar):
            counts["read"] += 1
            text = clean_text(raw, normalize)
            if len(text) < max(min_chars, 1):
                counts["too_short"] += 1
                continue
            digest = _doc_hash(text)
            if dedup:
                if digest in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(digest)
            target = "val" if split == "hash" and _is_val(digest, seed, val_fraction) else "train"
            counts["kept"] += 1
            counts[target] += 1
            pieces = _pieces(text, _ENCODE_BATCH_CHARS)
            for i, piece in enumerate(pieces):
                batch.append((target, piece, i == 0, i == len(pieces) - 1))
                batch_chars += len(piece)
                if batch_chars >= _ENCODE_BATCH_CHARS:
                    flush()
        if batch:
            flush()
        if counts["kept"] == 0:
            raise LmstackError(f"no documents left after cleaning in {', '.join(inputs)}")
        (out_dir / "manifest.json").unlink(missing_ok=True)  # no manifest may point at half-replaced shards
        shards = {s: w.finish() for s, w in writers.items()}
        if split == "tail":
            shards = _move_tail_to_val(out_dir, shards["train"], dtype, val_fraction)
    except BaseException:
        for w in writers.values():
            w.abort()
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        bar.close()

    # Shards of an earlier, larger run in the same folder would be confusing: remove those not listed now.
    listed = {s["file"] for split in shards.values() for s in split}
    for stale in out_dir.glob("*.bin"):
        if re.fullmatch(r"(train|val)_\d{3,}\.bin", stale.name) and stale.name not in listed:
            stale.unlink()
    tok.save(out_dir / "tokenizer")
    manifest: dict[str, Any] = {
        "format": SHARDS_FORMAT,
        "inputs": [str(p) for p in files],
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "eos_id": eos,
        "bos_id": bos,
        "tokenizer": {"source": str(tokenizer), "hash": tok.hash(), "dir": "tokenizer"},
        "documents": {"read": counts["read"], "kept": counts["kept"],
                      "dropped": counts["too_short"] + counts["duplicates"], "too_short": counts["too_short"],
                      "duplicates": counts["duplicates"], "train": counts["train"], "val": counts["val"]},
        "tokens": {s: sum(x["tokens"] for x in shards[s]) for s in shards},
        "shards": shards,
        "options": {"field": field, "val_fraction": val_fraction, "min_chars": min_chars, "dedup": dedup,
                    "normalize": normalize, "shard_tokens": shard_tokens, "seed": seed, "format": format,
                    "doc_split": doc_split, "split": split},
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest
