"""Milvus as the vector backend of a RAG index (pymilvus; Milvus Lite for `milvus-lite:///PATH` or `--backend
milvus`, a server for `milvus://host:port/collection`). Every Milvus failure reaches the user as one line.

What runs where:
  SQLite (the `.sqlite` file beside it)  documents, chunks, text, metadata filters, FTS5/BM25, and a copy of
                                         every vector: the source of truth, written in one transaction per
                                         document
  Milvus                                 vector search only: a collection (id = chunk id, doc_id, vector) with a
                                         FLAT inner-product index, so results equal the exact SQLite backend

Milvus and SQLite cannot share a transaction, so writes go through an outbox: the SQLite transaction that
changes a document also records which chunk ids Milvus must upsert or delete, and after the commit `sync()`
applies them and clears those rows. A writer killed between the two leaves the rows there, and the next open
of the index applies them. Until then Milvus may return ids SQLite no longer has: search results are looked
up in SQLite, so such ids are dropped. Metadata filters become a `doc_id in [...]` expression.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lmstack.errors import LmstackError

if TYPE_CHECKING:
    from lmstack.rag.store import Store

BATCH = 1000


@contextlib.contextmanager
def milvus_errors(what: str, uri: str) -> Iterator[None]:
    """Any pymilvus / gRPC failure inside -> one LmstackError line naming what failed and where."""
    try:
        yield
    except LmstackError:
        raise
    except Exception as e:  # pymilvus raises MilvusException, gRPC and connection errors alike
        detail = (getattr(e, "message", None) or str(e) or type(e).__name__).strip().splitlines()[0]
        raise LmstackError(f"Milvus {what} failed ({uri}): {detail}") from None


class MilvusVectors:
    name = "milvus"

    def __init__(self, store: Store, uri: str, collection: str) -> None:
        try:
            from pymilvus import DataType, MilvusClient
        except ImportError:
            raise LmstackError("a Milvus index needs pymilvus (and milvus-lite for a local file): "
                               "pip install 'lmstack[milvus]'") from None
        self.store, self.collection, self.uri = store, collection, uri
        with milvus_errors("open", uri):
            self.client = MilvusClient(uri)
            self._open_collection(DataType)

    def _open_collection(self, DataType: Any) -> None:
        collection, store = self.collection, self.store
        if not self.client.has_collection(collection):
            schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("doc_id", DataType.INT64)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=store.dim)
            index = self.client.prepare_index_params()
            index.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
            # Strong: a search sees every write before it, also one by another process (Milvus's default,
            # Bounded, may lag a server's latest writes by seconds)
            self.client.create_collection(collection, schema=schema, index_params=index, consistency_level="Strong")
        else:
            fields = {f["name"]: f for f in self.client.describe_collection(collection)["fields"]}
            dim = int(fields.get("vector", {}).get("params", {}).get("dim", -1))
            if dim != store.dim:
                raise LmstackError(f"Milvus collection {collection!r} holds vectors of dim {dim}, "
                                   f"the index {store.dim}")
            # A collection another process created (or Milvus restarted) is "released": load it for search.
            self.client.load_collection(collection)

    def sync(self) -> None:
        """Apply the outbox: upsert the vectors of chunks that exist, delete the ids that do not."""
        with milvus_errors("write", self.uri):
            self._sync()

    def _sync(self) -> None:
        conn = self.store.conn
        pending = conn.execute("SELECT chunk_id, op FROM vector_outbox ORDER BY chunk_id").fetchall()
        for start in range(0, len(pending), BATCH):
            part = pending[start:start + BATCH]
            ids = [r[0] for r in part]
            rows = conn.execute(f"SELECT id, doc_id, vector FROM chunks WHERE id IN ({','.join('?' * len(ids))})",
                                ids).fetchall()
            present = {r[0] for r in rows}
            if rows:
                self.client.upsert(self.collection, [
                    {"id": r[0], "doc_id": r[1], "vector": np.frombuffer(r[2], dtype="<f4").tolist()} for r in rows])
            gone = [i for i in ids if i not in present]
            if gone:
                self.client.delete(self.collection, ids=gone)
            # Only the rows we applied: a writer may have queued a newer op for the same id meanwhile.
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("DELETE FROM vector_outbox WHERE chunk_id = ? AND op = ?", [tuple(r) for r in part])
            conn.execute("COMMIT")

    def search(self, query: np.ndarray, k: int, doc_ids: Sequence[int] | None) -> list[tuple[int, float]]:
        if k < 1:
            return []
        expr = f"doc_id in [{', '.join(str(int(d)) for d in doc_ids)}]" if doc_ids is not None else ""
        with milvus_errors("search", self.uri):
            hits = self.client.search(self.collection, data=[np.asarray(query, dtype=np.float32).tolist()],
                                      limit=min(k, 16384), filter=expr, search_params={"metric_type": "IP"})
        return [(int(h["id"]), float(h["distance"])) for h in hits[0]]

    def count(self) -> int:
        with milvus_errors("count", self.uri):
            return int(self.client.query(self.collection, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def close(self) -> None:
        with milvus_errors("close", self.uri):
            self.client.close()
