"""The RAG index: one SQLite file (stdlib sqlite3, WAL) with documents, chunks, float32 vectors and FTS5 BM25.

Tables:
  meta           key/value: embedding model and dimension, chunking, vector backend, `generation`
  documents      one row per file: path (unique), source label, title, sha256 of the content, mtime, ingest time
  chunks         text, heading path, page, line, character offsets, token count, vector (float32 LE BLOB)
  chunks_fts     FTS5 over chunks.text and chunks.heading (external content, kept in step by triggers)
  vector_outbox  chunk ids whose vectors an external vector backend (Milvus) still has to upsert or delete

Every change to a document (replace or delete) is one transaction, so after a crash each document is either
fully there (row, all chunks, vectors and FTS entries) or absent. Each write transaction also increments
`meta.generation`: readers cache the vector matrix and reload it only when that counter moved.

Exact vector search (`ExactVectors`) is one matmul over the cached [N, D] matrix plus topk, in torch. The
backend is chosen explicitly (`index_uri`): a path or `sqlite:///PATH` is this file alone; `--backend milvus`,
`milvus-lite:///PATH` or `milvus://host:port/collection` also keep the vectors in Milvus and search them there
(see `lmstack.rag.milvus_store`); documents, chunks and BM25 stay here. `meta` records the backend and the
embedding model, and opening the index with another one is an error.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import parse_qs, urlparse

import numpy as np

from lmstack.errors import LmstackError

if TYPE_CHECKING:
    from lmstack.rag.chunk import Chunk

SCHEMA_VERSION = "1"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    source TEXT,
    title TEXT,
    kind TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    ingested_at REAL NOT NULL,
    n_chunks INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    doc_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    ord INTEGER NOT NULL,
    text TEXT NOT NULL,
    heading TEXT,
    page INTEGER,
    line INTEGER,
    start INTEGER NOT NULL,
    "end" INTEGER NOT NULL,
    n_tokens INTEGER NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    text, heading, content='chunks', content_rowid='id', tokenize='porter unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text, heading) VALUES (new.id, new.text, new.heading);
END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text, heading) VALUES ('delete', old.id, old.text, old.heading);
END;
CREATE TABLE IF NOT EXISTS vector_outbox (chunk_id INTEGER PRIMARY KEY, op TEXT NOT NULL);
"""
# Words too common to help BM25 (they only slow the OR query down).
STOPWORDS = set("""a an and are as at be by can do does for from has have how i if in is it its of on or so that
the their there these this to was were what when where which who why will with you your""".split())


# ------------------------------------------------------------------------------------------- records


@dataclass
class DocumentRecord:
    path: str  # absolute
    source: str | None
    title: str
    kind: str
    sha256: str
    size: int
    mtime: float


@dataclass
class ChunkRow:
    id: int
    doc_id: int
    ord: int
    text: str
    heading: str | None
    page: int | None
    line: int | None
    start: int
    end: int
    n_tokens: int
    path: str
    title: str | None
    source: str | None
    kind: str

    def location(self) -> str:
        """Where the chunk is: "page 3", "line 12", and the character span."""
        where = [f"page {self.page}"] if self.page is not None else []
        where += [f"line {self.line}"] if self.line is not None else []
        where.append(f"chars {self.start}-{self.end}")
        if self.heading:
            where.append(f"§ {self.heading}")
        return ", ".join(where)


_CHUNK_COLUMNS = ('c.id, c.doc_id, c.ord, c.text, c.heading, c.page, c.line, c.start, c."end", c.n_tokens, '
                  'd.path, d.title, d.source, d.kind')


def parse_date(value: str | float | None, what: str) -> float | None:
    """An ISO date or date-time ("2024-05-01", "2024-05-01T12:00") or a Unix time -> Unix time."""
    if value is None or isinstance(value, (int, float)):
        return value
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise LmstackError(f"{what}: {value!r} is not an ISO date such as 2024-05-01") from None


@dataclass
class Filters:
    """Metadata filters on the chunk's document; all given ones must hold."""

    source: str | None = None  # the source label given at ingest
    path_prefix: str | None = None  # documents whose absolute path starts with this
    since: float | None = None  # Unix time, inclusive
    until: float | None = None  # Unix time, inclusive
    date_field: Literal["ingested", "mtime"] = "ingested"  # which date `since`/`until` look at

    def __post_init__(self) -> None:
        if self.date_field not in ("ingested", "mtime"):
            raise LmstackError(f"date_field must be 'ingested' or 'mtime', not {self.date_field!r}")
        if self.path_prefix is not None and not self.path_prefix.startswith(("/", "milvus:")):
            self.path_prefix = str(Path(self.path_prefix).expanduser().absolute())

    @property
    def empty(self) -> bool:
        return self.source is None and self.path_prefix is None and self.since is None and self.until is None

    def where(self) -> tuple[str, list[Any]]:
        """SQL conditions on `documents d` (joined with AND) and their parameters; "1" when there are none."""
        conds, params = [], []
        if self.source is not None:
            conds.append("d.source = ?")
            params.append(self.source)
        if self.path_prefix is not None:
            conds.append("d.path LIKE ? ESCAPE '\\'")
            params.append(re.sub(r"([\\%_])", r"\\\1", self.path_prefix) + "%")
        column = "d.ingested_at" if self.date_field == "ingested" else "d.mtime"
        if self.since is not None:
            conds.append(f"{column} >= ?")
            params.append(self.since)
        if self.until is not None:
            conds.append(f"{column} <= ?")
            params.append(self.until)
        return (" AND ".join(conds) or "1"), params


def fts_query(text: str) -> str | None:
    """A free-text question -> an FTS5 query: the OR of its quoted words (no FTS syntax reaches SQLite)."""
    words = dict.fromkeys(w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS)
    return " OR ".join(f'"{w}"' for w in words) or None


def to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


# ------------------------------------------------------------------------------------ vector search


class VectorBackend(Protocol):
    """Where vector search runs: exact in torch over SQLite's vectors, or in Milvus."""

    name: str

    def search(self, query: np.ndarray, k: int, doc_ids: Sequence[int] | None) -> list[tuple[int, float]]:
        """query [D] unit vector -> up to k (chunk id, cosine) best first, only from doc_ids when given."""
        ...

    def sync(self) -> None:
        """Apply pending writes (the outbox) after a commit; nothing to do for the exact backend."""
        ...

    def close(self) -> None: ...


class ExactVectors:
    """Exact inner-product search: the [N, D] matrix is loaded once and reloaded when `generation` moves."""

    name = "exact"

    def __init__(self, store: Store) -> None:
        self.store = store
        self.generation: int | None = None
        self.ids = np.zeros(0, dtype=np.int64)  # [N] chunk ids, ascending
        # torch [D, N] float32: stored transposed, because on CPU the [1, D] @ [D, N] product runs at BLAS speed
        # (about FAISS flat's) while [N, D] @ [D] goes through a ~3x slower path
        self.matrix_t: Any = None
        self.doc_ids: Any = None  # torch [N] int64

    def refresh(self) -> None:
        import torch

        if self.store.generation() == self.generation:
            return
        conn, dim = self.store.conn, self.store.dim
        with self.store.snapshot():  # count, rows and generation from one consistent read
            generation = self.store.generation()
            n = conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
            matrix = np.empty((n, dim), dtype=np.float32)  # filled row by row: no second copy of all blobs
            ids = np.empty(n, dtype=np.int64)
            doc_ids = np.empty(n, dtype=np.int64)
            for i, (cid, did, blob) in enumerate(conn.execute("SELECT id, doc_id, vector FROM chunks ORDER BY id")):
                ids[i], doc_ids[i] = cid, did
                matrix[i] = np.frombuffer(blob, dtype="<f4")
        self.ids, self.doc_ids = ids, torch.from_numpy(doc_ids)
        self.matrix_t = torch.from_numpy(np.ascontiguousarray(matrix.T))  # [D, N]
        self.generation = generation

    def search(self, query: np.ndarray, k: int, doc_ids: Sequence[int] | None) -> list[tuple[int, float]]:
        import torch

        self.refresh()
        if len(self.ids) == 0 or k < 1:
            return []
        scores = (torch.from_numpy(np.asarray(query, dtype=np.float32))[None] @ self.matrix_t)[0]  # [N]
        if doc_ids is not None:
            allowed = torch.isin(self.doc_ids, torch.tensor(list(doc_ids), dtype=torch.int64))  # [N] bool
            k = min(k, int(allowed.sum()))
            scores = scores.masked_fill(~allowed, float("-inf"))
        top = torch.topk(scores, min(k, len(self.ids)))
        return [(int(self.ids[i]), float(s)) for s, i in zip(top.values, top.indices)]

    def sync(self) -> None:
        pass

    def close(self) -> None:
        self.matrix_t = self.doc_ids = None


# -------------------------------------------------------------------------------------------- store


class Store:
    """An open index. Not shared between threads: each thread or process opens its own (WAL lets readers run
    while one writer writes)."""

    def __init__(self, uri: str, sqlite_path: Path, vector_backend: str, conn: sqlite3.Connection) -> None:
        self.uri, self.path, self.conn = uri, sqlite_path, conn
        self.meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        stored = self.meta.get("vector_backend", "exact")
        if stored != vector_backend:
            name = {v: k for k, v in _META_BACKEND.items()}
            raise LmstackError(f"{uri}: this index was built with the {name.get(stored, stored)} backend, not "
                               f"{name.get(vector_backend, vector_backend)}; open it with --backend "
                               f"{name.get(stored, stored)}")
        self.vectors: VectorBackend = ExactVectors(self)

    # ------------------------------------------------------------------------------------ metadata

    @property
    def embedding_model(self) -> str:
        return self.meta["embedding_model"]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def chunking(self) -> dict[str, int]:
        return {"chunk_tokens": int(self.meta["chunk_tokens"]), "overlap": int(self.meta["overlap"])}

    def check_model(self, name: str, dim: int | None = None) -> None:
        """Refuse an embedding model other than the one the index was built with."""
        if name != self.embedding_model or (dim is not None and dim != self.dim):
            raise LmstackError(
                f"{self.uri} was built with embedding model {self.embedding_model!r} (dim {self.dim}), not "
                f"{name!r}{f' (dim {dim})' if dim is not None else ''}; query with {self.embedding_model!r} or "
                "build a new index")

    def generation(self) -> int:
        return int(self.conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    # -------------------------------------------------------------------------------- transactions

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE takes the write lock up front); bumps `generation`."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.vectors.sync()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """A read transaction: every query inside sees the same committed state."""
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    # -------------------------------------------------------------------------------------- writes

    def document(self, path: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM documents WHERE path = ?", (path,)).fetchone()

    def documents(self, prefix: str | None = None) -> list[sqlite3.Row]:
        where, params = Filters(path_prefix=prefix).where() if prefix else ("1", [])
        return self.conn.execute(f"SELECT * FROM documents d WHERE {where} ORDER BY path", params).fetchall()

    def _delete(self, doc_id: int) -> None:
        if self.outbox:
            self.conn.execute("INSERT OR REPLACE INTO vector_outbox SELECT id, 'delete' FROM chunks WHERE doc_id = ?",
                              (doc_id,))
        self.conn.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
        self.conn.execute("DELETE FROM documents WHERE id = ?", (doc_id,))

    def write_document(self, doc: DocumentRecord, chunks: list[Chunk], vectors: np.ndarray) -> int:
        """Replace (or add) the document at doc.path with these chunks and vectors [n, D], atomically."""
        if vectors.shape != (len(chunks), self.dim):
            raise ValueError(f"vectors {vectors.shape} do not match {len(chunks)} chunks of dim {self.dim}")
        with self.transaction() as conn:
            old = self.document(doc.path)
            if old is not None:
                self._delete(old["id"])
            cur = conn.execute(
                "INSERT INTO documents (path, source, title, kind, sha256, size, mtime, ingested_at, n_chunks) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (doc.path, doc.source, doc.title, doc.kind, doc.sha256, doc.size, doc.mtime, time.time(), len(chunks)))
            doc_id = cur.lastrowid
            conn.executemany(
                'INSERT INTO chunks (doc_id, ord, text, heading, page, line, start, "end", n_tokens, vector) '
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(doc_id, c.ord, c.text, c.heading, c.page, c.line, c.start, c.end, c.n_tokens, to_blob(v))
                 for c, v in zip(chunks, vectors)])
            if self.outbox:
                conn.execute("INSERT OR REPLACE INTO vector_outbox SELECT id, 'upsert' FROM chunks WHERE doc_id = ?",
                             (doc_id,))
        return doc_id

    def delete_documents(self, paths: list[str]) -> int:
        """Remove these documents (each in its own transaction); returns how many existed."""
        removed = 0
        for path in paths:
            with self.transaction():
                row = self.document(path)
                if row is not None:
                    self._delete(row["id"])
                    removed += 1
        return removed

    @property
    def outbox(self) -> bool:
        return self.vectors.name != "exact"

    # -------------------------------------------------------------------------------------- search

    def doc_ids(self, filters: Filters | None) -> list[int] | None:
        """The documents that pass `filters`, or None for "all" (no filter)."""
        if filters is None or filters.empty:
            return None
        where, params = filters.where()
        return [r[0] for r in self.conn.execute(f"SELECT d.id FROM documents d WHERE {where}", params)]

    def bm25(self, query: str, k: int, filters: Filters | None = None) -> list[tuple[int, float]]:
        """FTS5 BM25 over chunk text and headings: up to k (chunk id, score) best first (score = -bm25, higher
        is better)."""
        match = fts_query(query)
        if match is None or k < 1:
            return []
        where, params = (filters or Filters()).where()
        rows = self.conn.execute(
            "SELECT c.id, bm25(chunks_fts, 1.0, 0.5) AS s FROM chunks_fts "
            "JOIN chunks c ON c.id = chunks_fts.rowid JOIN documents d ON d.id = c.doc_id "
            f"WHERE chunks_fts MATCH ? AND {where} ORDER BY s LIMIT ?", [match, *params, k]).fetchall()
        return [(cid, -score) for cid, score in rows]

    def vector_search(self, query: np.ndarray, k: int, filters: Filters | None = None) -> list[tuple[int, float]]:
        if query.shape != (self.dim,):
            raise LmstackError(f"query vector has shape {tuple(query.shape)}, the index holds dim {self.dim}")
        doc_ids = self.doc_ids(filters)
        if doc_ids is not None and not doc_ids:
            return []
        return self.vectors.search(query, k, doc_ids)

    def chunks(self, ids: Sequence[int]) -> dict[int, ChunkRow]:
        """Chunk rows by id (ids that no longer exist are left out)."""
        out: dict[int, ChunkRow] = {}
        for start in range(0, len(ids), 500):
            part = list(ids[start:start + 500])
            rows = self.conn.execute(
                f"SELECT {_CHUNK_COLUMNS} FROM chunks c JOIN documents d ON d.id = c.doc_id "
                f"WHERE c.id IN ({','.join('?' * len(part))})", part)
            out.update((r[0], ChunkRow(*r)) for r in rows)
        return out

    def vectors_of(self, ids: Sequence[int]) -> np.ndarray:
        """[len(ids), D] stored vectors, in the order of `ids`."""
        found = dict(self.conn.execute(
            f"SELECT id, vector FROM chunks WHERE id IN ({','.join('?' * len(ids))})", list(ids)).fetchall())
        return np.stack([np.frombuffer(found[i], dtype="<f4") for i in ids]) if ids else np.zeros((0, self.dim),
                                                                                                np.float32)

    def stats(self) -> dict[str, Any]:
        n_docs, n_chunks = self.conn.execute(
            "SELECT (SELECT count(*) FROM documents), (SELECT count(*) FROM chunks)").fetchone()
        return {"index": self.uri, "documents": n_docs, "chunks": n_chunks, "embedding_model": self.embedding_model,
                "dim": self.dim, "vector_backend": self.vectors.name, **self.chunking}

    def close(self) -> None:
        self.vectors.close()
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ opening


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=60.0)  # autocommit; transactions are explicit
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 60000")
    conn.execute("PRAGMA journal_mode = WAL")  # readers never block the writer, nor the writer them
    conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: a crash keeps every committed transaction whole
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


BACKENDS = ("sqlite", "milvus")
_META_BACKEND = {"sqlite": "exact", "milvus": "milvus"}  # the name `meta.vector_backend` records


def index_uri(index: str, backend: str | None = None) -> str:
    """An index path and an optional --backend -> the index URI. A plain path is SQLite unless backend is
    "milvus" (then Milvus Lite in that file); a URI names its backend itself, and a different --backend is an
    error."""
    if backend is not None and backend not in BACKENDS:
        raise LmstackError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    scheme = index.split("://", 1)[0] if "://" in index else None
    if scheme is None:
        return f"milvus-lite:///{index}" if backend == "milvus" else index
    uri_backend = {"sqlite": "sqlite", "milvus-lite": "milvus", "milvus": "milvus"}.get(scheme)
    if uri_backend is None:
        raise LmstackError(f"{index}: unknown index scheme {scheme!r} (use a path, sqlite:///PATH, "
                           "milvus-lite:///PATH or milvus://HOST:PORT/COLLECTION)")
    if backend is not None and backend != uri_backend:
        raise LmstackError(f"{index} is a {uri_backend} index, not {backend}: drop --backend or change the URI")
    return index


def _uri_path(uri: str, scheme: str) -> Path:
    """SQLAlchemy's convention: scheme:///relative/path, scheme:////absolute/path."""
    path = uri[len(scheme) + 4:]
    if not path:
        raise LmstackError(f"{uri}: no path after {scheme}:///")
    return Path(path)


def parse_uri(uri: str) -> tuple[Path, dict[str, str] | None]:
    """Index URI -> (SQLite path, Milvus settings or None).

    A path or `sqlite:///PATH`: everything in that SQLite file. `milvus-lite:///PATH`: Milvus Lite in PATH (e.g.
    notes.db), the rest in `PATH.sqlite`. `milvus://host:port/collection?meta=PATH`: a Milvus server; the rest
    in PATH (default `./<collection>.lmstack.sqlite`). A path ending in .db is SQLite like any other path.
    """
    if uri.startswith("milvus://"):
        parsed = urlparse(uri)
        try:
            port = parsed.port or 19530
        except ValueError:
            raise LmstackError(f"{uri}: the port is not a number") from None
        if not parsed.hostname:
            raise LmstackError(f"{uri}: a Milvus URI is milvus://host:port/collection")
        collection = parsed.path.strip("/") or "lmstack_chunks"
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", collection):
            raise LmstackError(f"{uri}: a collection name is letters, digits and _, not {collection!r}")
        meta = parse_qs(parsed.query).get("meta", [f"{collection}.lmstack.sqlite"])[0]
        return Path(meta), {"uri": f"http://{parsed.hostname}:{port}", "collection": collection}
    if uri.startswith("milvus-lite://"):
        path = _uri_path(uri, "milvus-lite")
        return Path(str(path) + ".sqlite"), {"uri": str(path.absolute()), "collection": "lmstack_chunks"}
    if uri.startswith("sqlite://"):
        return _uri_path(uri, "sqlite"), None
    return Path(uri), None


def open_index(uri: str, *, create: bool = False, embedding_model: str | None = None, dim: int | None = None,
               chunking: dict[str, int] | None = None) -> Store:
    """Open the index at `uri`; with create=True make it (with the model, dim and chunking) when it is missing."""
    sqlite_path, milvus = parse_uri(uri)
    backend = "milvus" if milvus else "exact"
    exists = sqlite_path.exists() and sqlite_path.stat().st_size > 0
    lite = Path(uri + ".sqlite")
    if milvus is None and lite.exists() and "://" not in uri:
        raise LmstackError(f"{uri}: {lite} beside it holds a Milvus Lite index: open it as "
                           f"milvus-lite:///{uri} or with --backend milvus")
    if milvus is not None and not exists and uri.startswith("milvus-lite://") and Path(milvus["uri"]).exists():
        raise LmstackError(f"{milvus['uri']} exists but is not a Milvus Lite index of lmstack (no {sqlite_path} "
                           "beside it); if it is a SQLite index, open it without --backend milvus")
    if not exists and not create:
        raise LmstackError(f"index not found: {uri} (build it with `lmstack rag index`)")
    if create:
        sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = _connect(sqlite_path)
        if create:
            conn.executescript(SCHEMA)
        has_model = conn.execute("SELECT count(*) FROM meta WHERE key = 'embedding_model'").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise LmstackError(f"{sqlite_path}: not a usable index ({e})") from None
    if create and embedding_model is not None:
        if dim is None or chunking is None:
            raise ValueError("creating an index needs embedding_model, dim and chunking")
        conn.execute("BEGIN IMMEDIATE")
        values = {"schema": SCHEMA_VERSION, "embedding_model": embedding_model, "dim": str(dim),
                  "vector_backend": backend, "generation": "0", "created_at": str(time.time()),
                  **{k: str(v) for k, v in chunking.items()}}
        conn.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", values.items())  # keeps old ones
        conn.execute("COMMIT")
        has_model = 1
    if not has_model:
        conn.close()
        raise LmstackError(f"{uri}: an empty index; build it with `lmstack rag index`")
    store = Store(uri, sqlite_path, backend, conn)
    if milvus:
        from lmstack.rag.milvus_store import MilvusVectors

        try:
            store.vectors = MilvusVectors(store, milvus["uri"], milvus["collection"])
            store.vectors.sync()  # finish what a crashed writer left in the outbox
        except BaseException:
            conn.close()
            raise
    return store
