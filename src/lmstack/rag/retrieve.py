"""Retrieval over an index: BM25 (FTS5), exact vector search, and hybrid = weighted reciprocal rank fusion.

Hybrid score of a chunk = w_bm25 / (60 + rank in BM25) + w_vector / (60 + rank in vector search), ranks from 1,
a missing rank adding nothing (Cormack et al., 2009, with k = 60). Each list is read `depth` deep
(default max(50, 4k)). Every hit also carries `similarity`, the cosine between the query and the chunk vector,
whatever the mode: it is the calibrated number that `rag_ask` compares with its "I don't know" threshold.
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
RRF_K = 60


@dataclass
class Hit:
    chunk: ChunkRow
    score: float  # the mode's score: -bm25, cosine, or the fused RRF score
    similarity: float  # cosine of the query and chunk vectors
    bm25_rank: int | None = None
    vector_rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self.chunk)
        out.update(score=round(self.score, 6), similarity=round(self.similarity, 6), bm25_rank=self.bm25_rank,
                   vector_rank=self.vector_rank, location=self.chunk.location())
        return out


def rrf(rankings: list[list[int]], weights: list[float], k: int = RRF_K) -> list[tuple[int, float]]:
    """Weighted reciprocal rank fusion of ranked id lists -> (id, score) best first (ties: first seen first)."""
    scores: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights):
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + weight / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])


def search(store: Store, embedder: Embedder | None, query: str, k: int = 5, mode: str = "hybrid",
           filters: Filters | None = None, bm25_weight: float = 1.0, vector_weight: float = 1.0,
           depth: int | None = None, query_vector: np.ndarray | None = None) -> list[Hit]:
    """The k best chunks for `query`. `embedder` must be the index's model (checked); `query_vector` [D] skips
    embedding the query (benchmarks pass random ones)."""
    if mode not in MODES:
        raise LmstackError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if k < 1:
        raise LmstackError(f"k must be >= 1, not {k}")
    if bm25_weight < 0 or vector_weight < 0:
        raise LmstackError("bm25_weight and vector_weight must be >= 0")
    if query_vector is None:
        if embedder is None:
            raise ValueError("search needs an embedder or a query vector")
        store.check_model(embedder.name, embedder.dim)
        query_vector = embedder.encode([query])[0]  # [D]
    depth = depth or max(50, 4 * k)
    bm25 = store.bm25(query, depth if mode == "hybrid" else k, filters) if mode != "vector" else []
    vector = store.vector_search(query_vector, depth if mode == "hybrid" else k, filters) if mode != "bm25" else []
    if mode == "bm25":
        ranked = bm25
    elif mode == "vector":
        ranked = vector
    else:
        ranked = rrf([[i for i, _ in bm25], [i for i, _ in vector]], [bm25_weight, vector_weight])
    bm25_rank = {cid: r for r, (cid, _) in enumerate(bm25, start=1)}
    vector_rank = {cid: r for r, (cid, _) in enumerate(vector, start=1)}
    rows = store.chunks([cid for cid, _ in ranked[:k + 10]])  # a few spare: Milvus may hold stale ids
    ranked = [(cid, s) for cid, s in ranked if cid in rows][:k]
    ids = [cid for cid, _ in ranked]
    sims = store.vectors_of(ids) @ query_vector if ids else np.zeros(0)  # [k]
    return [Hit(rows[cid], float(s), float(sim), bm25_rank.get(cid), vector_rank.get(cid))
            for (cid, s), sim in zip(ranked, sims)]
