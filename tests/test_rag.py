"""RAG: extraction (txt/md/html/pdf/jsonl), chunking, incremental ingest, embeddings vs sentence-transformers,
BM25 / vector / hybrid ranks, filters, the embedding-model check, crash safety, concurrent readers, Milvus Lite."""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lmstack.errors import LmstackError
from lmstack.rag import rag_ask, rag_eval, rag_index, rag_search
from lmstack.rag.chunk import chunk_document
from lmstack.rag.embedding import get_embedder
from lmstack.rag.extract import extract
from lmstack.rag.ingest import ingest
from lmstack.rag.retrieve import BM25_WEIGHT, VECTOR_WEIGHT, fuse, search
from lmstack.rag.store import Filters, open_index

from rag_helpers import TOPICS, make_pdf, write_corpus

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def embedder():
    return get_embedder("minilm-l6")


def index(paths, db, **kw):
    return ingest([str(p) for p in paths], str(db), progress=False, **kw)


# ------------------------------------------------------------------------------------------ extraction


def test_formats_are_extracted_and_a_corrupt_pdf_is_skipped(tmp_path, embedder, capsys) -> None:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("Plain text about kettles. Kettles boil water.\n")
    (folder / "b.md").write_text("# Guide\n\nIntro line.\n\n## Setup\n\nInstall the teapot first. Then pour.\n")
    (folder / "sub" / "c.html").write_text(
        "<html><head><title>Page T</title><style>p{color:red}</style><script>var x = 'hidden';</script></head>"
        "<body><h1>Top</h1><p>First &amp; foremost paragraph.</p><h2>Deeper</h2><p>Nested words here.</p>"
        "</body></html>")
    (folder / "d.jsonl").write_text('{"body": "Record one."}\n\n{"body": "Record two."}\n')
    (folder / "e.pdf").write_bytes(make_pdf(["Page one talks about owls.", "Page two talks about larks."]))
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog garbage")
    (folder / "ignored.bin").write_bytes(b"\0\1")
    out = index([folder], tmp_path / "i.sqlite", field="body")
    assert out["added"] == 5 and [s["path"] for s in out["skipped"]] == [str((folder / "broken.pdf").resolve())]
    assert "warning: skipping" in capsys.readouterr().err and "broken.pdf" in out["skipped"][0]["reason"]
    with open_index(str(tmp_path / "i.sqlite")) as store:
        rows = store.chunks([r[0] for r in store.conn.execute("SELECT id FROM chunks")])
    by_file = {}
    for row in rows.values():
        by_file.setdefault(Path(row.path).name, []).append(row)
    html = by_file["c.html"]
    assert html[0].title == "Page T" and "hidden" not in " ".join(r.text for r in html)
    assert any(r.heading == "Top > Deeper" and "Nested words" in r.text for r in html)
    assert "First & foremost" in html[0].text
    pdf = sorted(by_file["e.pdf"], key=lambda r: r.ord)
    assert [(r.page, "owls" in r.text, "larks" in r.text) for r in pdf] == [(1, True, False), (2, False, True)]
    jsonl = sorted(by_file["d.jsonl"], key=lambda r: r.ord)
    assert [(r.line, r.text) for r in jsonl] == [(1, "Record one."), (3, "Record two.")]
    md = by_file["b.md"]
    assert md[0].title == "Guide" and any(r.heading == "Guide > Setup" and "teapot" in r.text for r in md)


def test_bad_jsonl_field_names_the_line(tmp_path) -> None:
    from lmstack.rag.extract import ExtractError

    path = tmp_path / "x.jsonl"
    with pytest.raises(ExtractError, match=r"x\.jsonl:2: no string field 'text'"):
        extract(path, b'{"text": "ok"}\n{"other": 1}\n')


# -------------------------------------------------------------------------------------------- chunking


MARKDOWN = "# Title\n\n" + "\n\n".join(
    f"## Section {s}\n\n" + " ".join(f"Sentence {s}.{i} has several plain words in it." for i in range(12))
    for s in range(3)) + "\n"


def test_chunks_keep_offsets_sections_sentences_and_overlap(embedder) -> None:
    doc = extract(Path("notes.md"), MARKDOWN.encode())
    chunks = chunk_document(doc, embedder.backend, max_tokens=60, overlap=16)
    assert len(chunks) > 3
    for c in chunks:
        assert doc.text[c.start:c.end] == c.text  # exact character offsets
        assert len(embedder.backend.encode(c.text, add_special_tokens=False).ids) <= 60
        assert c.n_tokens <= 60
        # never across sections, never mid-sentence
        assert len(set(re.findall(r"Sentence (\d)\.", c.text))) == 1
        assert c.text.rstrip().endswith(".")
        assert c.line == doc.text.count("\n", 0, c.start) + 1
    assert {c.heading for c in chunks} == {f"Title > Section {s}" for s in range(3)}
    same_section = [(a, b) for a, b in zip(chunks, chunks[1:]) if a.heading == b.heading]
    assert same_section and all(b.start < a.end for a, b in same_section)  # overlap repeats whole sentences
    # a heading is never left alone: the title runs on into section 0's first chunk, each section's first
    # chunk starts at its heading (every chunk holds a sentence, checked above)
    assert chunks[0].text.startswith("# Title\n\n## Section 0\n\nSentence 0.0")
    firsts = [c for a, c in zip([None, *chunks], chunks) if a is None or a.heading != c.heading]
    assert [c.text.split("\n")[0] for c in firsts[1:]] == ["## Section 1", "## Section 2"]


def test_an_over_long_sentence_is_split_at_word_starts(embedder) -> None:
    text = " ".join(f"word{i}" for i in range(400)) + "."
    doc = extract(Path("long.txt"), text.encode())
    chunks = chunk_document(doc, embedder.backend, max_tokens=50, overlap=0)
    assert len(chunks) > 5 and all(c.n_tokens <= 50 for c in chunks)
    assert all(re.fullmatch(r"word\d+", c.text.split()[0]) for c in chunks)  # no chunk starts mid-word
    assert " ".join(c.text for c in chunks) == text


# ---------------------------------------------------------------------------------- incremental ingest


def test_reingest_skips_unchanged_replaces_changed_prunes_deleted(tmp_path, embedder) -> None:
    paths = write_corpus(tmp_path / "c")
    db = tmp_path / "i.sqlite"
    first = index([tmp_path / "c"], db)
    assert (first["added"], first["chunks"]) == (5, 5)
    again = index([tmp_path / "c"], db)
    assert (again["added"], again["updated"], again["unchanged"], again["chunks"]) == (0, 0, 5, 0)
    with open_index(str(db)) as store:
        before = store.stats()["chunks"]
        ids_before = {r[0] for r in store.conn.execute("SELECT id FROM chunks")}
    paths["bread"].write_text("Sourdough starter is a culture of wild yeast and lactobacilli.\n")
    paths["tides"].unlink()
    changed = index([tmp_path / "c"], db, prune=True)
    assert (changed["updated"], changed["unchanged"], changed["removed"]) == (1, 3, 1)
    with open_index(str(db)) as store:
        assert store.stats()["chunks"] == before - 1
        assert not store.bm25("kneading gluten", 5) and store.bm25("sourdough lactobacilli", 5)
        assert not store.bm25("spring tides moon", 5)  # the FTS rows of a pruned document are gone
        ids_after = {r[0] for r in store.conn.execute("SELECT id FROM chunks")}
        assert len(ids_before & ids_after) == 3  # the three unchanged documents kept their chunks
        fts = store.conn.execute("SELECT count(*) FROM chunks_fts").fetchone()[0]
        assert fts == store.stats()["chunks"]


# -------------------------------------------------------------------------------------------- embeddings


def test_embeddings_match_sentence_transformers(embedder) -> None:
    from sentence_transformers import SentenceTransformer

    from lmstack.checkpoints import resolve

    texts = ["A short one.", "Volcanoes erupt when magma rises through the crust, and ash clouds spread.",
             " ".join(["long text"] * 150), "Ünïcödé and émojis 🙂 too", "x"]
    ours = embedder.encode(texts)  # [5, 384]
    st = SentenceTransformer(str(resolve("minilm-l6")), device="cpu").encode(texts, convert_to_numpy=True,
                                                                              normalize_embeddings=True)
    cos = (ours * st).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(st, axis=1)
    assert cos.min() >= 0.9999, cos
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_embed_verb_writes_rows_in_order(tmp_path, embedder) -> None:
    from safetensors.numpy import load_file

    from lmstack.rag import embed

    src = tmp_path / "t.jsonl"
    src.write_text('{"text": "first", "body": "b"}\n{"text": "second one"}\n{"text": "third"}\n')
    out = embed(str(src), out=str(tmp_path / "e.safetensors"))
    matrix = load_file(tmp_path / "e.safetensors")["embeddings"]
    assert out["n"] == 3 and matrix.shape == (3, 384)
    assert np.allclose(matrix, embedder.encode(["first", "second one", "third"]), atol=1e-6)
    with pytest.raises(LmstackError, match=r"t\.jsonl:2: no string field 'body'"):
        embed(str(src), out=str(tmp_path / "e.npy"), field="body")


# --------------------------------------------------------------------------------------------- retrieval


@pytest.fixture(scope="module")
def corpus_index(tmp_path_factory, embedder):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root / "science", {k: TOPICS[k] for k in ("volcano", "orbit", "tides")})
    write_corpus(root / "arts", {k: TOPICS[k] for k in ("bread", "violin")})
    db = root / "i.sqlite"
    index([root / "science"], db)
    index([root / "arts"], db)
    return db, root


def fts5_bm25(docs: list[list[str]], query: list[str], k1: float = 1.2, b: float = 0.75) -> list[float]:
    """SQLite FTS5's bm25() for one column, by hand (its IDF is floored at 1e-6)."""
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    scores = []
    for doc in docs:
        s = 0.0
        for term in query:
            df = sum(term in d for d in docs)
            idf = max(math.log((n - df + 0.5) / (df + 0.5)), 1e-6)
            tf = doc.count(term)
            s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        scores.append(s)
    return scores


def test_bm25_scores_match_a_hand_computation(tmp_path, embedder) -> None:
    words = {"d0": "alpha beta gamma delta", "d1": "alpha alpha kappa", "d2": "kappa lambda mu nu xi omicron",
             "d3": "beta kappa kappa kappa", "d4": "rho sigma tau"}
    write_corpus(tmp_path / "w", words)
    db = tmp_path / "w.sqlite"
    index([tmp_path / "w"], db)
    with open_index(str(db)) as store:
        hits = store.bm25("alpha kappa", 10)
        names = {cid: Path(row.path).stem for cid, row in store.chunks([c for c, _ in hits]).items()}
    expected = fts5_bm25([words[f"d{i}"].split() for i in range(5)], ["alpha", "kappa"])
    got = {names[cid]: score for cid, score in hits}
    assert set(got) == {"d0", "d1", "d2", "d3"}  # d4 matches neither term
    for name, score in got.items():
        assert score == pytest.approx(expected[int(name[1])], rel=1e-6)
    assert [names[c] for c, _ in hits] == sorted(got, key=lambda n: -expected[int(n[1])])


def test_fuse_matches_a_hand_computation() -> None:
    bm25 = [(10, 8.0), (20, 4.0)]  # 30 and 40: no BM25 match
    cosine = {10: 0.2, 20: 0.5, 30: 0.9, 40: -0.1}
    fused = dict(fuse(bm25, cosine, 0.3, 0.7))
    assert fused == pytest.approx({10: 0.3 + 0.14, 20: 0.15 + 0.35, 30: 0.63, 40: -0.07})
    assert [i for i, _ in fuse(bm25, cosine, 0.3, 0.7)] == [30, 20, 10, 40]
    assert [i for i, _ in fuse([], cosine, 0.3, 0.7)] == [30, 20, 10, 40]  # no lexical match: cosine order


def test_the_commands_hybrid_weights_are_the_searchs() -> None:
    import inspect

    for fn in (rag_search, rag_ask, rag_eval):  # literals there: lmstack.rag keeps numpy out of the CLI's start
        params = inspect.signature(fn).parameters
        assert (params["bm25_weight"].default, params["vector_weight"].default) == (BM25_WEIGHT, VECTOR_WEIGHT)


def test_vector_and_hybrid_ranks(corpus_index, embedder) -> None:
    db, _ = corpus_index
    query = "Why does dough rise in the oven?"
    with open_index(str(db)) as store:
        q = embedder.encode([query])[0]
        all_ids = [r[0] for r in store.conn.execute("SELECT id FROM chunks ORDER BY id")]
        matrix = store.vectors_of(all_ids)  # [N, D]
        vector = search(store, embedder, query, 5, "vector")
        expected = [all_ids[i] for i in np.argsort(-(matrix @ q))]
        assert [h.chunk.id for h in vector] == expected
        assert [h.score for h in vector] == pytest.approx(sorted(matrix @ q, reverse=True), abs=1e-5)
        assert Path(vector[0].chunk.path).stem == "bread"
        hybrid = search(store, embedder, query, 5, "hybrid", bm25_weight=2.0, vector_weight=1.0)
        lexical = dict(store.bm25(query, 50))
        cosine = dict(zip(all_ids, (matrix @ q).tolist()))  # the corpus is under the depth: every chunk a candidate
        hand = {cid: 2.0 * lexical.get(cid, 0.0) / max(lexical.values()) + cosine[cid] for cid in all_ids}
        assert [h.chunk.id for h in hybrid] == sorted(all_ids, key=lambda cid: -hand[cid])[:5]
        for h in hybrid:  # each fused score by hand: 2 x BM25 over the best + 1 x the exact cosine
            assert h.score == pytest.approx(hand[h.chunk.id], abs=1e-5)
            assert h.similarity == pytest.approx(cosine[h.chunk.id], abs=1e-5)
        bm25 = search(store, embedder, query, 5, "bm25")
        assert {h.chunk.id: h.bm25_rank for h in hybrid if h.bm25_rank} == \
            {h.chunk.id: r for r, h in enumerate(bm25, 1) if h.chunk.id in {x.chunk.id for x in hybrid}}
        assert [h.score for h in hybrid] == sorted((h.score for h in hybrid), reverse=True)


def test_metadata_filters(corpus_index, embedder) -> None:
    db, root = corpus_index
    def stems(**kw):
        return {Path(h["path"]).stem for h in rag_search("gravity and strings", index=str(db), k=10, **kw)}
    assert stems(source="arts") == {"bread", "violin"}
    assert stems(source="science", mode="vector") == {"volcano", "orbit", "tides"}
    assert stems(path_prefix=str(root / "science" / "o")) == {"orbit"}
    assert stems(since="2999-01-01") == set() and stems(until="2999-01-01", mode="vector") == set(TOPICS)
    old = datetime.datetime(2020, 1, 1).timestamp()
    os.utime(root / "arts" / "violin.txt", (old, old))
    with open_index(str(db)) as store:  # the stored mtime is read at ingest: re-date the row as a re-ingest would
        with store.transaction() as conn:
            conn.execute("UPDATE documents SET mtime = ? WHERE path LIKE '%violin.txt'", (old,))
    assert stems(until="2021-01-01", date_field="mtime", mode="vector") == {"violin"}
    assert "violin" not in stems(since="2021-01-01", date_field="mtime", mode="bm25")
    with pytest.raises(LmstackError, match="not an ISO date"):
        stems(since="last week")


def test_an_index_refuses_another_embedding_model(corpus_index, tmp_path) -> None:
    db, _ = corpus_index
    with open_index(str(db)) as store:
        assert (store.embedding_model, store.dim) == ("minilm-l6", 384)
        with pytest.raises(LmstackError, match="built with embedding model 'minilm-l6' \\(dim 384\\)"):
            store.check_model("other-encoder", 384)
        with pytest.raises(LmstackError, match="dim 768"):
            store.check_model("minilm-l6", 768)
    with pytest.raises(LmstackError, match="built with embedding model 'minilm-l6'"):
        rag_search("q", index=str(db), embedding_model="bert-base")
    with pytest.raises(LmstackError, match="index not found"):
        rag_search("q", index=str(tmp_path / "missing.sqlite"))
    # the stored model wins over the query: an index whose meta names another model is refused at query time
    copy = tmp_path / "copy.sqlite"
    conn = sqlite3.connect(db)
    conn.execute(f"VACUUM INTO '{copy}'")
    conn.close()
    conn = sqlite3.connect(copy)
    conn.execute("UPDATE meta SET value = '768' WHERE key = 'dim'")
    conn.commit()
    conn.close()
    with pytest.raises(LmstackError, match="dim 768"):
        rag_search("q", index=str(copy))
    # adding documents with another model than the stored one is refused too, before anything is written
    conn = sqlite3.connect(copy)
    conn.execute("UPDATE meta SET value = '384' WHERE key = 'dim'")
    conn.execute("UPDATE meta SET value = 'other-encoder' WHERE key = 'embedding_model'")
    conn.commit()
    conn.close()
    write_corpus(tmp_path / "new", {"extra": "An extra document."})
    with pytest.raises(LmstackError, match="built with embedding model 'other-encoder' \\(dim 384\\), not 'minilm-l6'"):
        index([tmp_path / "new"], copy)
    conn = sqlite3.connect(copy)
    assert conn.execute("SELECT count(*) FROM documents WHERE path LIKE '%extra.txt'").fetchone()[0] == 0
    conn.close()


# ------------------------------------------------------------------------------------------- reliability


CRASHING_INGEST = textwrap.dedent("""
    import sys, time
    from lmstack.rag import ingest as ing

    class Stalling:
        # the store's connection, stalling inside the 3rd document's transaction after one chunk row
        def __init__(self, conn):
            self._conn, self.docs = conn, 0
        def __getattr__(self, name):
            return getattr(self._conn, name)
        def executemany(self, sql, rows):
            if sql.startswith("INSERT INTO chunks"):
                self.docs += 1
                if self.docs == 3:
                    rows = list(rows)
                    self._conn.execute(sql, rows[0])
                    print("MID", flush=True)
                    time.sleep(120)
            return self._conn.executemany(sql, rows)

    real_open = ing.open_index
    def open_index(*a, **kw):
        store = real_open(*a, **kw)
        store.conn = Stalling(store.conn)
        return store
    ing.open_index = open_index
    ing.EMBED_AT_ONCE = 1
    ing.ingest([sys.argv[1]], sys.argv[2], chunk_tokens=24, overlap=0, progress=False)
""")


def consistent(db: Path) -> list[str]:
    """The documents of the index, after checking each is whole: its chunk count, vectors and FTS rows."""
    conn = sqlite3.connect(db)
    docs = conn.execute("SELECT d.path, d.n_chunks, (SELECT count(*) FROM chunks c WHERE c.doc_id = d.id) "
                        "FROM documents d").fetchall()
    assert all(n == have for _, n, have in docs), docs
    n_chunks = conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
    assert n_chunks == sum(n for _, n, _ in docs)
    assert conn.execute("SELECT count(*) FROM chunks WHERE length(vector) != 384 * 4").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM chunks_fts").fetchone()[0] == n_chunks
    assert conn.execute("INSERT INTO chunks_fts(chunks_fts, rank) VALUES ('integrity-check', 1)") is not None
    conn.close()
    return sorted(Path(p).stem for p, _, _ in docs)


def test_sigkill_mid_ingest_leaves_whole_documents(tmp_path) -> None:
    write_corpus(tmp_path / "c")  # 5 documents of several 24-token chunks each
    db = tmp_path / "i.sqlite"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_INGEST, str(tmp_path / "c"), str(db)], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "MID"  # inside the 3rd document's transaction
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert consistent(db) == ["bread", "orbit"]  # the first two (sorted by path) whole, the third not at all
    out = index([tmp_path / "c"], db, chunk_tokens=24, overlap=0)
    assert (out["unchanged"], out["added"]) == (2, 3)
    assert consistent(db) == sorted(TOPICS)


def test_concurrent_readers_during_an_ingest(tmp_path, embedder) -> None:
    many = {f"doc{i:02d}": f"Document {i} is about topic number {i}. " * 6 for i in range(24)}
    write_corpus(tmp_path / "c", {"seed": "A seed document about seeds."})
    db = tmp_path / "i.sqlite"
    index([tmp_path / "c"], db)
    write_corpus(tmp_path / "c", many)
    stop, errors, seen = threading.Event(), [], []
    q = embedder.encode(["topic number"])[0]

    def reader() -> None:
        try:
            with open_index(str(db)) as store:
                while not stop.is_set():
                    with store.snapshot():  # a reader never sees half a document
                        counts = store.conn.execute(
                            "SELECT sum(n_chunks), (SELECT count(*) FROM chunks) FROM documents").fetchone()
                    assert counts[0] == counts[1], counts
                    hits = store.vector_search(q, 3)
                    store.bm25("topic number", 3)
                    seen.append(len(store.chunks([c for c, _ in hits])))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        import lmstack.rag.ingest as ing
        old, ing.EMBED_AT_ONCE = ing.EMBED_AT_ONCE, 1  # one commit per document: many interleavings
        out = index([tmp_path / "c"], db)
    finally:
        ing.EMBED_AT_ONCE = old
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert out["added"] == 24 and len(seen) > 0 and consistent(db) == sorted(["seed", *many])


# ---------------------------------------------------------------------------------------------- Milvus


def test_milvus_lite_backend_matches_the_exact_search(tmp_path, corpus_index, embedder) -> None:
    pytest.importorskip("milvus_lite")
    db, root = corpus_index
    milvus = f"milvus-lite:///{tmp_path / 'm.db'}"  # chosen by the URI, not by the .db ending
    index([root / "science"], milvus)
    index([root / "arts"], milvus)
    with open_index(milvus) as m, open_index(str(db)) as exact:
        assert m.vectors.name == "milvus" and m.vectors.count() == exact.stats()["chunks"]
        for query in ("How does a violin make sound?", "magma and ash"):
            q = embedder.encode([query])[0]
            got = [(Path(h.chunk.path).stem, round(h.score, 4)) for h in search(m, embedder, query, 4, "vector")]
            want = [(Path(h.chunk.path).stem, round(h.score, 4)) for h in search(exact, embedder, query, 4, "vector")]
            assert got == want
            filtered = m.vector_search(q, 10, Filters(source="arts"))
            assert {Path(r.path).stem for r in m.chunks([c for c, _ in filtered]).values()} == {"bread", "violin"}
        hybrid = search(m, embedder, "Moon gravity tides", 3, "hybrid")  # BM25 from SQLite FTS5, fused here
        assert Path(hybrid[0].chunk.path).stem == "tides" and hybrid[0].bm25_rank is not None
    (root / "arts" / "violin.txt").rename(tmp_path / "violin.txt")  # delete, prune: Milvus drops the vectors
    try:
        out = index([root / "arts"], milvus, prune=True)
        with open_index(milvus) as m:
            assert out["removed"] == 1 and m.vectors.count() == m.stats()["chunks"]
            assert m.conn.execute("SELECT count(*) FROM vector_outbox").fetchone()[0] == 0
    finally:
        (tmp_path / "violin.txt").rename(root / "arts" / "violin.txt")


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmstack", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_the_backend_is_chosen_explicitly(tmp_path) -> None:
    from lmstack.errors import LmstackError
    from lmstack.rag.store import index_uri, parse_uri

    write_corpus(tmp_path / "c", {"tides": TOPICS["tides"]})
    index([tmp_path / "c"], tmp_path / "notes.db")  # the natural name of an SQLite file stays SQLite
    with open_index(str(tmp_path / "notes.db")) as store:
        assert store.vectors.name == "exact" and store.meta["vector_backend"] == "exact"
    assert (tmp_path / "notes.db").read_bytes()[:16] == b"SQLite format 3\x00"
    assert not (tmp_path / "notes.db.sqlite").exists()
    assert index_uri("notes.db") == "notes.db" and index_uri("notes.db", "sqlite") == "notes.db"
    assert index_uri("notes.db", "milvus") == "milvus-lite:///notes.db"
    assert parse_uri("sqlite:///rel/n.sqlite") == (Path("rel/n.sqlite"), None)
    assert parse_uri("sqlite:////abs/n.sqlite") == (Path("/abs/n.sqlite"), None)
    path, milvus = parse_uri("milvus-lite:///rel/n.db")
    assert path == Path("rel/n.db.sqlite") and milvus["uri"] == str(Path("rel/n.db").absolute())
    assert parse_uri("milvus://db.example:19531/notes?meta=/m/x.sqlite") == (
        Path("/m/x.sqlite"), {"uri": "http://db.example:19531", "collection": "notes"})
    for bad, words in ((("milvus://h:1/c", "sqlite"), "is a milvus index, not sqlite"),
                       (("sqlite:///x", "milvus"), "is a sqlite index, not milvus"),
                       (("redis://x",), "unknown index scheme"), (("x", "faiss"), "backend must be one of"),
                       (("milvus://h:x/c",), "port is not a number"), (("milvus://h:1/a-b",), "collection name")):
        with pytest.raises(LmstackError, match=words):
            parse_uri(index_uri(*bad))
    # the sqlite index opened as Milvus, and the other way round: one line each, naming the fix
    with pytest.raises(LmstackError, match="without --backend milvus"):
        open_index(index_uri(str(tmp_path / "notes.db"), "milvus"))


def test_a_milvus_lite_index_is_searchable_from_the_next_process(tmp_path) -> None:
    pytest.importorskip("milvus_lite")
    write_corpus(tmp_path / "c", {k: TOPICS[k] for k in ("tides", "violin", "bread")})
    db = tmp_path / "notes.db"
    built = _cli("rag", "index", "--index", str(db), "--backend", "milvus", "--no-progress", str(tmp_path / "c"))
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "notes.db.sqlite").exists()
    found = _cli("rag", "search", "--index", str(db), "--backend", "milvus", "--mode", "vector", "--k", "2",
                 "--json", "Moon gravity tides")  # a new process: the collection starts "released"
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert Path(hits[0]["path"]).stem == "tides" and len(hits) == 2
    again = _cli("rag", "search", "--index", f"milvus-lite:///{db}", "--json", "violin strings")
    assert again.returncode == 0 and Path(json.loads(again.stdout)[0]["path"]).stem == "violin"
    # the same index named without its backend, or with another embedding model: one line, no traceback
    for args, words in ((("--index", str(db)), "milvus-lite:///"),
                        (("--index", f"milvus-lite:///{db}", "--embedding-model", "bert-base"), "minilm-l6")):
        wrong = _cli("rag", "search", *args, "violin")
        assert wrong.returncode != 0 and words in wrong.stderr and "Traceback" not in wrong.stderr
        assert len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr


@pytest.fixture
def milvus_server(tmp_path_factory) -> Iterator[int]:
    """A Milvus standalone server on loopback: PyPI's `milvus` wheel carries the server binary (`milvus run
    standalone`, embedded etcd, local storage) and starts it; -> its port."""
    milvus = pytest.importorskip("milvus")
    server = milvus.MilvusServer(wait_for_started=False)
    server.set_base_dir(str(tmp_path_factory.mktemp("milvus")))
    server.start()
    try:
        server.wait_started(timeout=180_000)  # ms
        yield server.listen_port
    finally:
        server.stop()


def test_a_milvus_server_index_is_searchable_from_the_next_process(tmp_path, milvus_server) -> None:
    from pymilvus import MilvusClient

    write_corpus(tmp_path / "c", {k: TOPICS[k] for k in ("tides", "violin", "bread")})
    uri = f"milvus://127.0.0.1:{milvus_server}/notes?meta={tmp_path / 'notes.sqlite'}"
    built = _cli("rag", "index", "--index", uri, "--no-progress", str(tmp_path / "c"))
    assert built.returncode == 0, built.stderr
    found = _cli("rag", "search", "--index", uri, "--mode", "vector", "--k", "2", "--json", "Moon gravity tides")
    assert found.returncode == 0, found.stderr  # a new process, a new connection
    hits = json.loads(found.stdout)
    assert Path(hits[0]["path"]).stem == "tides" and len(hits) == 2

    def in_server() -> int:  # the server's own count, through a client of its own
        client = MilvusClient(f"http://127.0.0.1:{milvus_server}")
        try:
            return client.query("notes", filter="", output_fields=["count(*)"])[0]["count(*)"]
        finally:
            client.close()

    with open_index(uri) as store:
        chunks = store.stats()["chunks"]
        assert store.vectors.name == "milvus" and in_server() == chunks == 3
    (tmp_path / "c" / "violin.txt").unlink()  # delete, prune: the server drops the document's vectors
    pruned = _cli("rag", "index", "--index", uri, "--prune", "--no-progress", str(tmp_path / "c"))
    assert pruned.returncode == 0, pruned.stderr
    assert in_server() == 2
    again = _cli("rag", "search", "--index", uri, "--mode", "vector", "--json", "violin strings")
    assert again.returncode == 0 and "violin" not in {Path(h["path"]).stem for h in json.loads(again.stdout)}


def test_an_unreachable_milvus_server_is_one_line(tmp_path) -> None:
    """The URI, the metadata file, and the connection failure as one line, with nothing listening."""
    pytest.importorskip("pymilvus")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_corpus(tmp_path / "c", {"tides": TOPICS["tides"]})
    uri = f"milvus://127.0.0.1:{port}/notes?meta={tmp_path / 'meta.sqlite'}"
    out = _cli("rag", "index", "--index", uri, "--no-progress", str(tmp_path / "c"), timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and f"127.0.0.1:{port}" in out.stderr, out.stderr
