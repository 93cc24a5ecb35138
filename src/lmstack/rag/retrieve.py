"""Retrieval over an index: BM25 (FTS5), exact vector search, and hybrid = a convex combination of the two scores.

Hybrid score of a chunk = bm25_weight x BM25 / (the query's best BM25) + vector_weight x cosine, over the union of
the two lists read `depth` deep (default max(50, 4k)); a chunk outside the BM25 list adds 0 for BM25, and every
candidate's cosine is exact. The defaults 0.3 / 0.7 make it a convex combination. Scores, not ranks: reciprocal
rank fusion lost chunks that only BM25 ranks first (Bruch et al., 2023, "An Analysis of Fusion Functions for
Hybrid Retrieval"; docs/benchmarks.md, "RAG retrieval: score fusion"). Every hit also carries `similarity`, the
cosine between the query and the chunk vector, whatever the mode: it is the calibrated number that `rag_ask`
compares with its "I don't know" threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from lmstack.errors import LmstackError
from lmstack.rag.embedding import Embedder
from lmstack.rag.store import ChunkRow, Filters, Store

Mode = Literal["hybrid", "bm25", "vector"]
MODES: tuple[str, ...] = ("bm25", "vector", "hybrid")
BM25_WEIGHT, VECTOR_WEIGHT = 0.3, 0.7  # chosen on the tuning questions (docs/benchmarks.md, "RAG retrieval")


@dataclass
class Hit:
    chunk: ChunkRow
    score: float  # the mode's score: -bm25, cosine, or the fused score
    similarity: float  # cosine of the query and chunk vectors
    bm25_rank: int | None = None
    vector_rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self.chunk)
        out.update(score=round(self.score, 6), similarity=round(self.similarity, 6), bm25_rank=self.bm25_rank,
                   vector_rank=self.vector_rank, location=self.chunk.location())
        return out


def fuse(bm25: list[tuple[int, float]], cosine: dict[int, float], bm25_weight: float, vector_weight: float
         ) -> list[tuple[int, float]]:
    """Hybrid scores: bm25_weight x BM25 / max BM25 + vector_weight x cosine for each id of `cosine` (the
    candidates; an id missing from `bm25` adds 0 for BM25) -> (id, score) best first (ties: first seen first)."""
    top = max((s for _, s in bm25), default=0.0)
    lexical = {cid: s / top for cid, s in bm25} if top > 0 else {}
    scores = {cid: bm25_weight * lexical.get(cid, 0.0) + vector_weight * c for cid, c in cosine.items()}
    return sorted(scores.items(), key=lambda kv: -kv[1])


def search(store: Store, embedder: Embedder | None, query: str, k: int = 5, mode: str = "hybrid",
           filters: Filters | None = None, bm25_weight: float = BM25_WEIGHT, vector_weight: float = VECTOR_WEIGHT,
           depth: int | None = None, query_vector: np.ndarray | None = None) -> list[Hit]:
    """The k best chunks for `query`. `embedder` must be the index's model (checked); `query_vector` [D] skips
    embedding the query (benchmarks pass random ones)."""
    if mode not in MODES:
        raise LmstackError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if k < 1:
        raise LmstackError(f"k must be >= 1, not {k}")
    if not (bm25_weight >= 0 and vector_weight >= 0 and bm25_weight + vector_weight > 0):
        raise LmstackError(f"bm25_weight and vector_weight must be >= 0, not both 0 (got {bm25_weight}, "
                           f"{vector_weight})")
    if query_vector is None:
        if embedder is None:
            raise ValueError("search needs an embedder or a query vector")
        store.check_model(embedder.name, embedder.dim)
        query_vector = embedder.encode([query])[0]  # [D]
    depth = depth or max(50, 4 * k)
    bm25 = store.bm25(query, depth if mode == "hybrid" else k, filters) if mode != "vector" else []
    vector = store.vector_search(query_vector, depth if mode == "hybrid" else k, filters) if mode != "bm25" else []
    rows = store.chunks(list(dict.fromkeys([cid for cid, _ in bm25 + vector])))  # Milvus may hold stale ids
    bm25, vector = [(c, s) for c, s in bm25 if c in rows], [(c, s) for c, s in vector if c in rows]
    ids = list(dict.fromkeys([cid for cid, _ in bm25 + vector]))
    cosine = dict(zip(ids, (store.vectors_of(ids) @ query_vector).tolist()))  # every candidate's, exact
    if mode == "bm25":
        ranked = bm25[:k]
    elif mode == "vector":
        ranked = vector[:k]
    else:
        ranked = fuse(bm25, cosine, bm25_weight, vector_weight)[:k]
    bm25_rank = {cid: r for r, (cid, _) in enumerate(bm25, start=1)}
    vector_rank = {cid: r for r, (cid, _) in enumerate(vector, start=1)}
    return [Hit(rows[cid], float(s), cosine[cid], bm25_rank.get(cid), vector_rank.get(cid)) for cid, s in ranked]
