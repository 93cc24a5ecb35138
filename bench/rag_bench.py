"""RAG on CPU: ingest and embedding throughput against sentence-transformers, query latency at 10k and 100k
synthetic chunks (retrieval only, and retrieval + SmolLM2 generation), exact vector search against FAISS flat,
and the retrieval modes on the 47 course-notes questions.

    OMP_NUM_THREADS=1 python bench/rag_bench.py --threads 1 [--scales 10000 100000] [--queries 50] [--gen-queries 3]

- Ingest: `rag index` of the course notes (extract, chunk, embed, write) in chunks/s, next to
  sentence-transformers encoding the same chunk texts (the embedding alone, the floor of any ingest built on it).
- Embedding: sentences/s of lmstack's MiniLM and sentence-transformers' on the same 96 chunk texts and batch
  size (median of 3). On a loaded shared machine use --threads 1: torch's spinning threads otherwise dominate.
- Scale: synthetic chunks (60 words drawn Zipf-like from the course notes' vocabulary, random unit vectors,
  100 chunks per document) written through the store; queries of 5 vocabulary words embedded with MiniLM (the
  query embedding is part of the latency). Retrieval+generation answers with SmolLM2 (32 new tokens).
- FAISS: IndexFlatIP over the same [N, 384] matrix; recall@10 of lmstack's exact search against it, and the
  latency of one query (torch matmul + topk vs FAISS), 200 random queries. faiss-cpu is a benchmark oracle,
  not a dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import median, record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTES = ROOT.parent / "shared" / "data" / "course-notes"
QA = ROOT / "tests" / "data" / "course_notes_qa.jsonl"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_ingest_and_embed(tmp: Path, batch: int) -> tuple[list[str], dict]:
    from sentence_transformers import SentenceTransformer

    from lmstack.checkpoints import resolve
    from lmstack.rag.embedding import get_embedder
    from lmstack.rag.ingest import embedding_text, ingest

    embedder = get_embedder("minilm-l6", batch)
    embedder.encode(["warm up"])
    out = ingest([str(NOTES)], str(tmp / "notes.sqlite"), progress=False, batch_size=batch, embedder=embedder)
    from lmstack.rag.store import open_index

    with open_index(str(tmp / "notes.sqlite")) as store:
        rows = store.chunks([r[0] for r in store.conn.execute("SELECT id FROM chunks")])
    texts = [embedding_text(r) for r in rows.values()][:96]  # what ingest embedded (a third: 3 repeats x 2)
    st = SentenceTransformer(str(resolve("minilm-l6")), device="cpu")
    st.encode(["warm up"])
    ours_s, st_s = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        embedder.encode(texts)
        ours_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        st.encode(texts, batch_size=batch, normalize_embeddings=True)
        st_s.append(time.perf_counter() - t0)
    return texts, {"chunks": out["chunks"], "ingest_chunks_per_s": out["chunks_per_s"],
                   "ours_per_s": len(texts) / median(ours_s), "st_per_s": len(texts) / median(st_s),
                   "n_texts": len(texts)}


def vocabulary() -> list[str]:
    words = re.findall(r"[a-z]{3,}", " ".join(p.read_text().lower() for p in NOTES.glob("*.txt")))
    counts: dict[str, int] = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    return sorted(counts, key=lambda w: -counts[w])[:4000]


def build_synthetic(db: Path, n: int, vocab: list[str], rng: np.random.Generator) -> tuple[float, np.ndarray]:
    """n synthetic chunks in a fresh index; returns the write time and the [n, 384] matrix."""
    from lmstack.rag.chunk import Chunk
    from lmstack.rag.store import DocumentRecord, open_index

    weights = 1 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()
    matrix = rng.standard_normal((n, 384)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    t0 = time.perf_counter()
    with open_index(str(db), create=True, embedding_model="minilm-l6", dim=384,
                    chunking={"chunk_tokens": 200, "overlap": 32}) as store:
        for d in range(0, n, 100):
            chunks = []
            for i in range(d, min(n, d + 100)):
                text = " ".join(rng.choice(vocab, size=60, p=weights))
                chunks.append(Chunk(i - d, 0, len(text), text, 60, None, None, 1))
            record_ = DocumentRecord(f"/synthetic/doc{d // 100:05d}.txt", "synthetic", f"doc{d // 100}", "text",
                                     f"{d}", 0, 0.0)
            store.write_document(record_, chunks, matrix[d:d + len(chunks)])
    return time.perf_counter() - t0, matrix


def bench_scale(n: int, tmp: Path, vocab: list[str], args: argparse.Namespace) -> dict:
    import faiss
    import torch

    from lmstack.generation.chat import generation_config
    from lmstack.rag.answer import answer, get_generator
    from lmstack.rag.embedding import get_embedder
    from lmstack.rag.retrieve import search
    from lmstack.rag.store import open_index

    rng = np.random.default_rng(n)
    db = tmp / f"synthetic{n}.sqlite"
    write_s, matrix = build_synthetic(db, n, vocab, rng)
    embedder = get_embedder("minilm-l6")
    queries = [" ".join(rng.choice(vocab[:2000], size=5)) for _ in range(args.queries)]
    result: dict = {"n": n, "write_chunks_per_s": n / write_s}
    with open_index(str(db)) as store:
        t0 = time.perf_counter()
        store.vectors.refresh()  # the cached matrix: loaded once per change of the index
        result["matrix_load_s"] = time.perf_counter() - t0
        for mode in ("bm25", "vector", "hybrid"):
            search(store, embedder, queries[0], 5, mode)  # warm
            times = []
            for q in queries:
                t0 = time.perf_counter()
                search(store, embedder, q, 5, mode)
                times.append(time.perf_counter() - t0)
            result[mode] = (percentile(times, 50) * 1e3, percentile(times, 95) * 1e3)
        generator = get_generator("smollm2-135m-instruct")
        cfg = generation_config(max_new_tokens=32)
        times = []
        for q in queries[:args.gen_queries]:
            t0 = time.perf_counter()
            answer(q, search(store, embedder, q, 5, "hybrid"), generator, cfg, embedder, min_score=-1.0)
            times.append(time.perf_counter() - t0)
        result["rag"] = (percentile(times, 50) * 1e3, percentile(times, 95) * 1e3)

        # exact search against FAISS flat on the same vectors
        index = faiss.IndexFlatIP(384)
        index.add(matrix)
        qv = rng.standard_normal((200, 384)).astype(np.float32)
        qv /= np.linalg.norm(qv, axis=1, keepdims=True)
        ids = store.vectors.ids  # row -> chunk id
        ours_t, faiss_t, hits = [], [], 0
        for q in qv:
            t0 = time.perf_counter()
            ours = store.vectors.search(q, 10, None)
            ours_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _, rows = index.search(q[None], 10)
            faiss_t.append(time.perf_counter() - t0)
            hits += len({c for c, _ in ours} & {int(ids[r]) for r in rows[0]})
        result.update(recall10=hits / (10 * len(qv)), ours_ms=median(ours_t) * 1e3, faiss_ms=median(faiss_t) * 1e3,
                      torch_threads=torch.get_num_threads(), faiss_threads=faiss.omp_get_max_threads())
    return result


def bench_modes(tmp: Path) -> dict:
    from lmstack.rag import rag_eval

    report = rag_eval(str(QA), index=str(tmp / "notes.sqlite"), generate=False, progress=False)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--gen-queries", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="rag_bench."))
    try:
        texts, emb = bench_ingest_and_embed(tmp, args.batch)
        print(json.dumps(emb), flush=True)
        vocab = vocabulary()
        scales = [bench_scale(n, tmp, vocab, args) for n in args.scales]
        for s in scales:
            print(json.dumps(s), flush=True)
        modes = bench_modes(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines = [f"Course notes: {emb['chunks']} chunks of <= 200 MiniLM tokens; batch {args.batch}.", "",
             "| measure | lmstack | sentence-transformers | ratio |", "|---|---:|---:|---:|",
             f"| embedding, sentences/s ({emb['n_texts']} chunk texts) | {emb['ours_per_s']:.1f} | "
             f"{emb['st_per_s']:.1f} | {emb['ours_per_s'] / emb['st_per_s']:.2f}x |",
             f"| ingest (extract+chunk+embed+write), chunks/s vs ST embedding alone | {emb['ingest_chunks_per_s']:.1f}"
             f" | {emb['st_per_s']:.1f} | {emb['ingest_chunks_per_s'] / emb['st_per_s']:.2f}x |", "",
             f"Synthetic chunks (60 words, random unit vectors); {args.queries} queries of 5 words, k=5, latency "
             f"includes embedding the query; retrieval+generation: {args.gen_queries} queries, SmolLM2-135M, "
             "32 new tokens.", "",
             "| chunks | write chunks/s | matrix load s | bm25 p50/p95 ms | vector p50/p95 ms | hybrid p50/p95 ms "
             "| hybrid + generation p50/p95 ms |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for s in scales:
        lines.append(f"| {s['n']:,} | {s['write_chunks_per_s']:.0f} | {s['matrix_load_s']:.2f} | "
                     + " | ".join(f"{s[m][0]:.1f} / {s[m][1]:.1f}" for m in ("bm25", "vector", "hybrid", "rag")) + " |")
    lines += ["", "Exact vector search, one query, top-10, 200 random unit queries (search only, no embedding):", "",
              "| chunks | recall@10 vs FAISS IndexFlatIP | lmstack torch ms | FAISS ms | lmstack / FAISS time |",
              "|---:|---:|---:|---:|---:|"]
    for s in scales:
        lines.append(f"| {s['n']:,} | {s['recall10']:.4f} | {s['ours_ms']:.2f} | {s['faiss_ms']:.2f} | "
                     f"{s['ours_ms'] / s['faiss_ms']:.2f}x |")
    k = modes["k"]
    lines += ["", f"Retrieval modes on {modes['questions']} course-notes questions (tests/data/course_notes_qa.jsonl; "
              "relevant = a chunk of the gold note covering half of the gold snippet):", "",
              f"| mode | recall@{k} | MRR |", "|---|---:|---:|"]
    for mode, m in modes["retrieval"].items():
        lines.append(f"| {mode} | {m[f'recall@{k}']:.3f} | {m['mrr']:.3f} |")
    lines += ["", "The machine is shared (load average about 8 on its cores during these runs): absolute times are noisy, "
              "the ratios compare engines measured back to back in the same run."]
    body = "\n".join(lines)
    print(body)
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = f"{threads}python bench/rag_bench.py " + " ".join(sys.argv[1:])
    record("RAG: ingest, embeddings, query latency, exact search vs FAISS", body, command.strip())


if __name__ == "__main__":
    main()
