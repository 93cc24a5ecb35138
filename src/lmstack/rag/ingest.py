"""Ingestion: files and folders -> extracted text -> chunks -> embeddings -> the index, incrementally.

A document is identified by its absolute path and versioned by the SHA-256 of its bytes (plus the JSONL field
read from it). Re-ingesting an unchanged file does nothing; a changed file is replaced (old chunks, vectors
and FTS rows out, new ones in, in one transaction); with `prune`, documents under the given folders whose
files are gone are removed. A file that cannot be read (corrupt PDF, bad JSONL line, no permission) is
skipped with a warning naming it, and the ingest goes on.

Chunks of several documents are embedded together (in batches of similar length) for throughput, then each
document is written in its own transaction.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.checkpoints.registry import DEFAULT_EMBEDDING_MODEL
from lmstack.errors import LmstackError
from lmstack.rag.chunk import Chunk, chunk_document
from lmstack.rag.embedding import Embedder, get_embedder
from lmstack.rag.extract import SUFFIXES, Document, ExtractError, extract, kind_of
from lmstack.rag.store import DocumentRecord, Store, open_index

DEFAULT_CHUNK_TOKENS = 200
DEFAULT_OVERLAP = 32
EMBED_AT_ONCE = 64  # chunks gathered from several documents before one embedding call and commit (a kill
# loses at most these; a few seconds of MiniLM on one CPU core)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def discover(paths: list[str]) -> tuple[list[Path], list[Path]]:
    """The supported files under `paths` (folders recursively, sorted) and the resolved roots themselves."""
    files: dict[Path, None] = {}
    roots = []
    for given in paths:
        root = Path(given).expanduser()
        if not root.exists():
            raise LmstackError(f"not found: {given}")
        root = root.resolve()
        roots.append(root)
        if root.is_dir():
            files.update((p, None) for p in sorted(root.rglob("*"))
                         if p.is_file() and kind_of(p) and not any(part.startswith(".") for part in
                                                                   p.relative_to(root).parts))
        elif kind_of(root):
            files[root] = None
        else:
            raise LmstackError(f"{given}: unsupported file type {root.suffix!r} "
                               f"(supported: {', '.join(sorted(SUFFIXES))})")
    return list(files), roots


def content_hash(data: bytes, kind: str | None, field: str) -> str:
    h = hashlib.sha256(data)
    if kind == "jsonl":  # another field is other content
        h.update(b"\0field=" + field.encode())
    return h.hexdigest()


def embedding_text(chunk: Chunk) -> str:
    """What gets embedded: the heading path gives a chunk from the middle of a section its topic."""
    return f"{chunk.heading}\n{chunk.text}" if chunk.heading else chunk.text


class _Batch:
    """Documents waiting for their embeddings; `flush` embeds them batch by batch, advancing `bar`, then writes
    each one."""

    def __init__(self, store: Store, embedder: Embedder, bar: Any) -> None:
        self.store, self.embedder, self.bar = store, embedder, bar  # bar: chunks embedded (tqdm)
        self.docs: list[tuple[DocumentRecord, list[Chunk]]] = []

    def add(self, record: DocumentRecord, chunks: list[Chunk]) -> None:
        self.docs.append((record, chunks))
        self.bar.total = (self.bar.total or 0) + len(chunks)
        self.bar.refresh()

    @property
    def n_chunks(self) -> int:
        return sum(len(chunks) for _, chunks in self.docs)

    def flush(self) -> int:
        texts = [embedding_text(c) for _, chunks in self.docs for c in chunks]
        step = self.embedder.batch_size  # one embedding batch per call, so the bar moves as it runs
        parts = [self._encode(texts[i:i + step]) for i in range(0, len(texts), step)]
        vectors = np.concatenate(parts) if parts else np.zeros((0, self.embedder.dim), np.float32)  # [n, D]
        at = 0
        for record, chunks in self.docs:  # each document is its own transaction
            self.store.write_document(record, chunks, vectors[at:at + len(chunks)])
            at += len(chunks)
        self.docs = []
        return at

    def _encode(self, texts: list[str]) -> np.ndarray:
        vectors = self.embedder.encode(texts)  # [n, D]
        self.bar.update(len(texts))
        return vectors


def ingest(paths: list[str], index: str, embedding_model: str = DEFAULT_EMBEDDING_MODEL, source: str | None = None,
           field: str = "text", chunk_tokens: int | None = None, overlap: int | None = None, prune: bool = False,
           batch_size: int = 32, progress: bool = True, embedder: Embedder | None = None) -> dict[str, Any]:
    """Add, update and (with prune) remove the documents under `paths` in the index at `index`."""
    from tqdm import tqdm

    if not paths:
        raise LmstackError("give at least one file or folder to index")
    if batch_size < 1:
        raise LmstackError(f"batch_size must be >= 1, not {batch_size}")
    if chunk_tokens is not None and chunk_tokens < 1:  # before the index is opened, so none is created
        raise LmstackError(f"chunk_tokens must be >= 1, not {chunk_tokens}")
    files, roots = discover(paths)
    embedder = embedder or get_embedder(embedding_model, batch_size)
    wanted = {"chunk_tokens": chunk_tokens or min(DEFAULT_CHUNK_TOKENS, embedder.max_text_tokens),
              "overlap": DEFAULT_OVERLAP if overlap is None else overlap}
    if wanted["chunk_tokens"] > embedder.max_text_tokens:
        raise LmstackError(f"chunk_tokens={wanted['chunk_tokens']} is more than {embedding_model} reads "
                           f"({embedder.max_text_tokens} tokens)")
    if not 0 <= wanted["overlap"] < wanted["chunk_tokens"] // 2:
        raise LmstackError(f"overlap must be >= 0 and under half of chunk_tokens, not {wanted['overlap']}")
    start = time.perf_counter()
    with open_index(index, create=True, embedding_model=embedder.name, dim=embedder.dim, chunking=wanted) as store:
        store.check_model(embedder.name, embedder.dim)
        for key, value in (("chunk_tokens", chunk_tokens), ("overlap", overlap)):
            if value is not None and value != store.chunking[key]:
                raise LmstackError(f"{index} was chunked with {key}={store.chunking[key]}, not {value}; "
                                   "build a new index to change it")
        counts = {"added": 0, "updated": 0, "unchanged": 0, "removed": 0, "chunks": 0}
        skipped: list[dict[str, str]] = []
        bar = tqdm(files, desc="rag index", unit="file", disable=not progress)
        batch = _Batch(store, embedder, tqdm(desc="embedding", unit="chunk", total=0, disable=not progress))
        for path in bar:
            try:
                data = path.read_bytes()
                stat = path.stat()
            except OSError as e:
                skipped.append({"path": str(path), "reason": e.strerror or str(e)})
                warn(f"skipping {path}: {e.strerror or e}")
                continue
            kind = kind_of(path)
            digest = content_hash(data, kind, field)
            old = store.document(str(path))
            if old is not None and old["sha256"] == digest:
                counts["unchanged"] += 1
                continue
            try:
                doc: Document = extract(path, data, field)
            except ExtractError as e:
                skipped.append({"path": str(path), "reason": str(e)})
                warn(f"skipping {e}")
                continue
            chunks = chunk_document(doc, embedder.backend, store.chunking["chunk_tokens"], store.chunking["overlap"])
            record = DocumentRecord(str(path), source or _default_source(path, roots), doc.title, doc.kind, digest,
                                    stat.st_size, stat.st_mtime)
            batch.add(record, chunks)
            counts["updated" if old is not None else "added"] += 1
            if batch.n_chunks >= EMBED_AT_ONCE:
                counts["chunks"] += batch.flush()
                bar.set_postfix(chunks=counts["chunks"])
        counts["chunks"] += batch.flush()
        batch.bar.close()
        if prune:
            counts["removed"] = store.delete_documents(_gone(store, roots, set(map(str, files))))
        stats = store.stats()
    seconds = time.perf_counter() - start
    return {**counts, "skipped": skipped, "seconds": round(seconds, 3),
            "chunks_per_s": round(counts["chunks"] / seconds, 1) if counts["chunks"] and seconds > 0 else None,
            "index": stats}


def _default_source(path: Path, roots: list[Path]) -> str:
    """The name of the folder (or file) argument the document was found under."""
    for root in roots:
        if path == root or root in path.parents:
            return root.name
    return path.parent.name


def _gone(store: Store, roots: list[Path], present: set[str]) -> list[str]:
    """Indexed documents inside `roots` whose files were not found this time."""
    gone = []
    for root in roots:
        rows = store.documents(str(root) + "/") if root.is_dir() else [store.document(str(root))]
        gone += [r["path"] for r in rows if r is not None and r["path"] not in present]
    return gone
