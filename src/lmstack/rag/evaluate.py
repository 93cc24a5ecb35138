"""RAG evaluation: retrieval recall@k and MRR per mode, answer exact match / token F1, and faithfulness.

QA file: JSON lines {"question", "answer", "doc", "snippet"}. `doc` is the gold document (a file name or a
path suffix); `snippet` (optional) is text copied verbatim from it that supports the answer.

Relevance: a retrieved chunk is relevant when it comes from the gold document and, with a snippet, covers at
least half of the snippet's characters (the snippet is located in the document's extracted text, so chunk and
snippet are compared as character spans; whitespace may differ). Without a snippet, any chunk of the gold
document is relevant. recall@k = share of questions with a relevant chunk in the top k; MRR = mean of
1/rank of the first relevant chunk (0 when none is in the top k).

Answers (hybrid retrieval, then `rag_ask`'s answering): exact match and token F1 after SQuAD normalization
(lowercase, no punctuation, no articles), with [n] markers removed; "I don't know" counts as a wrong answer.

Faithfulness, for each answered question: the share of answer sentences supported by a chunk they cite. A
sentence cites the chunks of its own [n] markers, or, with none, every chunk the answer cites; an answer
citing nothing supports nothing. A sentence is supported when at least FAITHFUL_MIN_OVERLAP (70%) of its
content words (lowercased, stopwords removed, crude suffix stemming) occur in one cited chunk
(lmstack.rag.grounding, the check `rag_ask` itself applies before citing; bench/rag_answers.py also reports
faithfulness against any retrieved chunk, whatever the answer cites).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lmstack.checkpoints.registry import DEFAULT_MODEL
from lmstack.errors import LmstackError
from lmstack.evaluation.metrics import exact_match_score, normalize_answer, token_f1_score
from lmstack.io import atomic_write_json, require_path
from lmstack.rag.answer import IDK, cited_numbers, strip_citations
from lmstack.rag.extract import extract, json_lines
from lmstack.rag.retrieve import BM25_WEIGHT, MODES, VECTOR_WEIGHT, Hit
from lmstack.rag.grounding import SUPPORT_MIN, content_words

FAITHFUL_MIN_OVERLAP = SUPPORT_MIN  # 0.7, as the answer pipeline's check


# ---------------------------------------------------------------------------------------- QA file


def read_qa(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    qa_path = require_path(path, "QA file")
    items = []
    for number, item in json_lines(path, qa_path.read_text(encoding="utf-8")):
        if not isinstance(item, dict) or not all(isinstance(item.get(f), str) and item[f].strip()
                                                  for f in ("question", "answer", "doc")):
            raise LmstackError(f"{path}:{number}: need string fields question, answer and doc")
        if "snippet" in item and not isinstance(item["snippet"], str):
            raise LmstackError(f"{path}:{number}: snippet must be a string")
        items.append({**item, "line": number})
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise LmstackError(f"{path}: no questions")
    return items


# -------------------------------------------------------------------------------------- relevance


def _is_doc(path: str, doc: str) -> bool:
    return path == doc or path.endswith("/" + doc.lstrip("/"))


class Relevance:
    """Decides whether a chunk supports a QA item (see the module docstring); caches each document's text."""

    def __init__(self, qa_path: str) -> None:
        self.qa_path = qa_path
        self.texts: dict[str, str] = {}
        self.spans: dict[tuple[str, str], tuple[int, int]] = {}

    def snippet_span(self, path: str, snippet: str, line: int) -> tuple[int, int]:
        key = (path, snippet)
        if key not in self.spans:
            if path not in self.texts:
                p = Path(path)
                self.texts[path] = extract(p, p.read_bytes()).text
            text = self.texts[path]
            at = text.find(snippet)
            if at >= 0:
                self.spans[key] = (at, at + len(snippet))
            else:
                words = snippet.split()
                m = re.search(r"\s+".join(map(re.escape, words)), text) if words else None
                if m is None:
                    raise LmstackError(f"{self.qa_path}:{line}: snippet not found in {path}")
                self.spans[key] = (m.start(), m.end())
        return self.spans[key]

    def relevant(self, hit: Hit, item: dict[str, Any]) -> bool:
        c = hit.chunk
        if not _is_doc(c.path, item["doc"]):
            return False
        snippet = item.get("snippet")
        if not snippet:
            return True
        s, e = self.snippet_span(c.path, snippet, item["line"])
        return min(e, c.end) - max(s, c.start) >= (e - s) / 2


def first_relevant_rank(hits: list[Hit], item: dict[str, Any], relevance: Relevance) -> int | None:
    return next((r for r, h in enumerate(hits, start=1) if relevance.relevant(h, item)), None)


# ----------------------------------------------------------------------------------- answer metrics


def exact_match(prediction: str, reference: str) -> float:
    """SQuAD exact match (lmstack.evaluation.metrics) of the answer without its [n] citations."""
    return exact_match_score(strip_citations(prediction), strip_citations(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 without the [n] citations; an empty answer or reference scores 1 only if both are empty."""
    prediction, reference = strip_citations(prediction), strip_citations(reference)
    if not normalize_answer(prediction) or not normalize_answer(reference):
        return float(normalize_answer(prediction) == normalize_answer(reference))
    return token_f1_score(prediction, reference)


def faithfulness(answer: str, hits: list[Hit]) -> float | None:
    """Share of the answer's sentences supported by a cited chunk; None for "I don't know" (nothing claimed)."""
    from lmstack.rag.answer import answer_sentences

    if answer.strip() == IDK:
        return None
    sentences = answer_sentences(answer)
    all_cited = cited_numbers(answer, len(hits))
    if not sentences:
        return None
    supported = 0
    for sentence in sentences:
        cited = cited_numbers(sentence, len(hits)) or all_cited
        words = content_words(strip_citations(sentence))
        if not words:
            supported += 1  # nothing claimed
            continue
        if any(len(words & content_words(hits[n - 1].chunk.text)) / len(words) >= FAITHFUL_MIN_OVERLAP
               for n in cited):
            supported += 1
    return supported / len(sentences)


# -------------------------------------------------------------------------------------------- eval


def evaluate(qa: str, index: str, k: int = 5, modes: list[str] | None = None, generate: bool = True,
             limit: int | None = None, model: str = DEFAULT_MODEL, adapter: str | None = None,
             max_new_tokens: int = 64, min_score: float = 0.48, out: str | None = None,
             progress: bool = True, bm25_weight: float = BM25_WEIGHT,
             vector_weight: float = VECTOR_WEIGHT) -> dict[str, Any]:
    from tqdm import tqdm

    from lmstack.rag.answer import AnswerOptions, answer, answer_config, get_generator
    from lmstack.rag.embedding import get_embedder
    from lmstack.rag.retrieve import search
    from lmstack.rag.store import open_index

    modes = list(modes or MODES)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise LmstackError(f"unknown retrieval mode {bad[0]!r} (choose from {', '.join(MODES)})")
    if k < 1:
        raise LmstackError(f"k must be >= 1, not {k}")
    items = read_qa(qa, limit)
    relevance = Relevance(qa)
    per_question: list[dict[str, Any]] = []
    with open_index(index) as store:
        embedder = get_embedder(store.embedding_model)
        generator = None
        if generate:
            cfg = answer_config(max_new_tokens)
            generator = get_generator(model, adapter, "bfloat16")
        for item in tqdm(items, desc="rag eval", unit="q", disable=not progress):
            row: dict[str, Any] = {"question": item["question"], "reference": item["answer"], "doc": item["doc"]}
            qvec = embedder.encode([item["question"]])[0]  # [D], shared by the modes
            hits_by_mode = {}
            for mode in modes:
                hits = search(store, embedder, item["question"], k, mode, bm25_weight=bm25_weight,
                              vector_weight=vector_weight, query_vector=qvec)
                hits_by_mode[mode] = hits
                row[f"rank_{mode}"] = first_relevant_rank(hits, item, relevance)
            if generator is not None:
                hits = hits_by_mode.get("hybrid") or search(store, embedder, item["question"], k, "hybrid",
                                                            bm25_weight=bm25_weight, vector_weight=vector_weight,
                                                            query_vector=qvec)
                result = answer(item["question"], hits, lambda: generator, cfg, embedder,
                                AnswerOptions(min_score=min_score, short="model" if adapter else "span"))
                row.update(answer=result["answer"], refused=result["refused"],
                           exact_match=exact_match(result["answer"], item["answer"]),
                           f1=token_f1(result["answer"], item["answer"]),
                           faithfulness=faithfulness(result["answer"], hits),
                           citations_by=result["citations_by"])
            per_question.append(row)
    n = len(items)
    report: dict[str, Any] = {"qa": qa, "index": index, "k": k, "questions": n, "retrieval": {},
                              "hybrid_weights": {"bm25": bm25_weight, "vector": vector_weight}}
    for mode in modes:
        ranks = [row[f"rank_{mode}"] for row in per_question]
        report["retrieval"][mode] = {f"recall@{k}": round(sum(r is not None for r in ranks) / n, 4),
                                     "mrr": round(sum(1 / r for r in ranks if r) / n, 4)}
    if generate:
        faithful = [row["faithfulness"] for row in per_question if row["faithfulness"] is not None]
        report["answers"] = {
            "model": model, "adapter": adapter,
            "exact_match": round(sum(r["exact_match"] for r in per_question) / n, 4),
            "f1": round(sum(r["f1"] for r in per_question) / n, 4),
            "faithfulness": round(sum(faithful) / len(faithful), 4) if faithful else None,
            "answered": len(faithful), "idk_rate": round(sum(r["refused"] for r in per_question) / n, 4)}
    report["per_question"] = per_question
    if out is not None:
        atomic_write_json(out, report)
    return report
