"""RAFT training data (Zhang et al., 2024, arXiv 2403.10131): questions over a corpus, each shown with its
oracle chunk and distractor chunks, answered by a chain of thought that quotes the oracle.

For every question:
  1. the oracle is the chunk that answers it: from a QA file, the chunk of the gold document that covers most
     of the `snippet` (else the chunk of that document most similar to the question); with generated
     questions, the chunk the question was written from;
  2. with probability `p` the documents are the oracle plus `distractors` random other chunks; otherwise
     `distractors + 1` random other chunks and no oracle (the paper's P%: the model also learns to answer when
     retrieval missed). Chunks overlapping the oracle's span are never distractors. The documents are shuffled;
  3. the target answer quotes the oracle sentence that best supports the answer (or the QA file's snippet)
     between ##begin_quote## and ##end_quote## and ends with `<ANSWER>: answer`. It is the same whether or not
     the oracle was shown, as in the paper.

Generated questions come from a chat model (`Generator`) in two calls per question: QGEN_PROMPT (the chunk, then
"write a question ... Question:") and AGEN_PROMPT (the chunk and the question: answer in one sentence); the
first line ending in "?" is the question, the first sentence of the second reply the answer. Replies without a
usable question (or answer) are skipped and counted. With a 135M model the questions are simple and the answers
often weak; a QA file (`qa`) gives reviewed questions.

Output: chat JSONL, `{"messages": [system, user, assistant], "raft": {...}}`, which `lmstack finetune` (the
instruction-data readers: the chat format) trains on as is, the loss on the assistant turn; `format="alpaca"`
writes `{"system", "instruction", "input", "output", "raft"}` instead. `raft` holds the oracle's id, whether
it was shown, and the ids of the documents in their shown order.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lmstack.checkpoints.registry import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL
from lmstack.errors import LmstackError
from lmstack.io import atomic_write_text

if TYPE_CHECKING:
    from lmstack.generation import GenerationConfig, Generator
    from lmstack.rag.embedding import Embedder

BEGIN_QUOTE, END_QUOTE, ANSWER = "##begin_quote##", "##end_quote##", "<ANSWER>:"
SYSTEM = ("Answer the question using the documents below; some of them are irrelevant. Quote the passage you "
          f"rely on between {BEGIN_QUOTE} and {END_QUOTE}, then give the final answer after {ANSWER}")
# Two short prompts work better than one with a small model: SmolLM2-135M writes a question after "Question:"
# reliably, but rarely keeps a two-line Question/Answer format.
QGEN_PROMPT = "{text}\n\nWrite a question about the text above, then answer it.\nQuestion:"
AGEN_PROMPT = "{text}\n\nAnswer this question in one short sentence, using only the text above.\nQuestion: {question}"


@dataclass
class CorpusChunk:
    id: str  # "relative/path#ord"
    path: str
    start: int  # character offsets into the document's extracted text
    end: int
    text: str


@dataclass
class RaftQuestion:
    question: str
    answer: str
    oracle: int  # index into the chunk list
    snippet: str | None = None


# --------------------------------------------------------------------------------------------- corpus


def corpus_chunks(corpus: str, embedder: Embedder, chunk_tokens: int, overlap: int,
                  field: str = "text") -> list[CorpusChunk]:
    """Every chunk of the supported files under `corpus`, chunked as `rag index` does; unreadable files are
    skipped with a warning."""
    from lmstack.rag.chunk import chunk_document
    from lmstack.rag.extract import ExtractError, extract
    from lmstack.rag.ingest import discover, warn

    files, roots = discover([corpus])
    base = roots[0] if roots[0].is_dir() else roots[0].parent
    chunks: list[CorpusChunk] = []
    for path in files:
        try:
            doc = extract(path, path.read_bytes(), field)
        except ExtractError as e:
            warn(f"skipping {e}")
            continue
        rel = str(path.relative_to(base))
        chunks += [CorpusChunk(f"{rel}#{c.ord}", str(path), c.start, c.end, c.text)
                   for c in chunk_document(doc, embedder.backend, chunk_tokens, overlap)]
    if len(chunks) < 2:
        raise LmstackError(f"{corpus}: RAFT needs at least 2 chunks (an oracle and a distractor), found {len(chunks)}")
    return chunks


def _is_doc(path: str, doc: str) -> bool:
    return path == doc or path.endswith("/" + doc.lstrip("/"))


def questions_from_qa(qa: str, chunks: list[CorpusChunk], embedder: Embedder) -> list[RaftQuestion]:
    """Questions of a QA file (the `rag eval` format) with their oracle chunks located in `chunks`."""
    from lmstack.rag.evaluate import Relevance, read_qa

    relevance = Relevance(qa)
    vectors: dict[int, Any] = {}  # chunk index -> [D], embedded once
    out = []
    for item in read_qa(qa):
        candidates = [i for i, c in enumerate(chunks) if _is_doc(c.path, item["doc"])]
        if not candidates:
            raise LmstackError(f"{qa}:{item['line']}: document {item['doc']!r} is not in the corpus")
        snippet = item.get("snippet") or None
        if snippet:
            s, e = relevance.snippet_span(chunks[candidates[0]].path, snippet, item["line"])
            oracle = max(candidates, key=lambda i: min(e, chunks[i].end) - max(s, chunks[i].start))
        else:
            missing = [i for i in candidates if i not in vectors]
            vectors.update(zip(missing, embedder.encode([chunks[i].text for i in missing])))
            question = embedder.encode([item["question"]])[0]  # [D]
            oracle = max(candidates, key=lambda i: float(vectors[i] @ question))
        out.append(RaftQuestion(item["question"], item["answer"], oracle, snippet))
    return out


def generate_questions(chunks: list[CorpusChunk], generator: Generator, cfg: GenerationConfig,
                       per_chunk: int = 1, progress: bool = True) -> tuple[list[RaftQuestion], int]:
    """Ask the model for `per_chunk` questions per chunk (sampled after the first, so they differ), then for
    each question's short answer from the chunk; returns the usable ones and how many replies were not."""
    import dataclasses

    from tqdm import tqdm

    out, failed = [], 0
    for i, chunk in enumerate(tqdm(chunks, desc="raft questions", unit="chunk", disable=not progress)):
        ids = generator.chat_prompt([{"role": "user", "content": QGEN_PROMPT.format(text=chunk.text)}])
        seen: set[str] = set()
        for attempt in range(per_chunk):
            run = cfg if attempt == 0 else dataclasses.replace(cfg, temperature=max(cfg.temperature, 0.7),
                                                              seed=(cfg.seed or 0) + attempt)
            question = parse_question(generator.generate(ids, run).text)
            if question is None or question.lower() in seen:
                failed += 1
                continue
            seen.add(question.lower())
            prompt = AGEN_PROMPT.format(text=chunk.text, question=question)
            reply = generator.generate(generator.chat_prompt([{"role": "user", "content": prompt}]), cfg).text
            answer = first_sentence(reply)
            if not answer:
                failed += 1
                continue
            out.append(RaftQuestion(question, answer, i))
    return out, failed


def parse_question(reply: str) -> str | None:
    """The first line of a reply that is a real question (ends with "?", not a meta-question about "the
    question"), without a "Question:" label."""
    for line in reply.replace("**", "").splitlines():
        line = re.sub(r"^\s*(?:question\s*\d*\s*[:.]\s*)+", "", line, flags=re.I).strip()
        if line.endswith("?") and len(line) > 12 and "the question" not in line.lower():
            return line
    return None


def first_sentence(reply: str) -> str:
    """The first sentence of an answer reply, without an "Answer:" label."""
    from lmstack.rag.chunk import sentence_spans

    text = re.sub(r"^\s*answer\s*:\s*", "", reply.replace("**", "").strip(), flags=re.I)
    spans = sentence_spans(text, 0, len(text))
    return " ".join(text[spans[0][0]:spans[0][1]].split()) if spans else ""


# -------------------------------------------------------------------------------------------- examples


def best_quote(oracle: str, question: str, answer: str, snippet: str | None) -> str:
    """The snippet when the oracle holds it, else the oracle sentence sharing the most content words with the
    answer (then the question)."""
    from lmstack.rag.chunk import sentence_spans
    from lmstack.rag.evaluate import content_words

    if snippet and " ".join(snippet.split()) in " ".join(oracle.split()):
        return " ".join(snippet.split())
    sentences = [" ".join(oracle[s:e].split()) for s, e in sentence_spans(oracle, 0, len(oracle))] or [oracle]
    a_words, q_words = content_words(answer), content_words(question)

    def score(sentence: str) -> tuple[int, int]:
        words = content_words(sentence)
        return len(words & a_words), len(words & q_words)

    return max(sentences, key=score)


def cot_answer(question: str, answer: str, quote: str) -> str:
    """The target: find the passage, quote it, reason to the answer, end with `<ANSWER>: answer`."""
    return (f"The question asks: {question} The documents contain the relevant passage: {BEGIN_QUOTE}{quote}"
            f"{END_QUOTE} Based on this passage, the answer is: {answer}\n{ANSWER} {answer}")


def short_example(q: RaftQuestion, chunks: list[CorpusChunk], shown: list[int], embedder: Embedder,
                  evidence: int, rng: random.Random) -> list[dict[str, str]]:
    """The chat of a `target="short"` example: `rag ask`'s short-answer prompt over the evidence statements of
    the shown chunks (the oracle's quote among them), and the gold answer."""
    from lmstack.rag.answer import select_evidence, short_messages
    from lmstack.rag.grounding import SUPPORT_MIN, overlap

    picked = select_evidence(q.question, [(chunks[i].text, None) for i in shown], embedder, evidence)
    texts = [e.text for e in picked]
    quote = best_quote(chunks[q.oracle].text, q.question, q.answer, q.snippet)
    if not any(overlap(quote, t) >= SUPPORT_MIN for t in texts):  # the model learns to copy, not to rank
        if len(texts) < evidence:
            texts.append(quote)
        else:
            texts[rng.randrange(len(texts))] = quote
    return short_messages(q.question, texts) + [{"role": "assistant", "content": q.answer}]


def build_example(q: RaftQuestion, chunks: list[CorpusChunk], distractors: int, p: float, rng: random.Random,
                  fmt: Literal["chat", "alpaca"] = "chat", target: Literal["cot", "short"] = "cot",
                  embedder: Embedder | None = None, evidence: int = 3) -> dict[str, Any]:
    """One RAFT example: the oracle (with probability p; always with target short) and distractors, shuffled,
    and the CoT answer (target cot) or the short answer over their evidence statements (target short)."""
    oracle = chunks[q.oracle]
    pool = [i for i, c in enumerate(chunks)
            if i != q.oracle and not (c.path == oracle.path and c.start < oracle.end and oracle.start < c.end)]
    with_oracle = target == "short" or rng.random() < p
    n_distractors = distractors if with_oracle else distractors + 1
    if len(pool) < n_distractors:
        raise LmstackError(f"the corpus has {len(pool)} chunks that can be distractors for {oracle.id}, "
                           f"{n_distractors} are needed; lower --distractors")
    shown = rng.sample(pool, n_distractors) + ([q.oracle] if with_oracle else [])
    rng.shuffle(shown)
    meta = {"oracle": oracle.id, "oracle_included": with_oracle, "documents": [chunks[i].id for i in shown],
            "answer": q.answer}
    if target == "short":
        if embedder is None:
            raise LmstackError("short RAFT examples need the embedder that ranks the evidence")
        messages = short_example(q, chunks, shown, embedder, evidence, rng)
        if fmt == "alpaca":
            return {"system": messages[0]["content"], "instruction": messages[1]["content"], "input": "",
                    "output": q.answer, "raft": meta}
        return {"messages": messages, "raft": meta}
    documents = "\n".join(f"<DOCUMENT>{chunks[i].text}</DOCUMENT>" for i in shown)
    answer = cot_answer(q.question, q.answer, best_quote(oracle.text, q.question, q.answer, q.snippet))
    if fmt == "alpaca":
        return {"system": SYSTEM, "instruction": q.question, "input": documents, "output": answer, "raft": meta}
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"{documents}\n\nQuestion: {q.question}"},
                         {"role": "assistant", "content": answer}], "raft": meta}


def final_answer(text: str) -> str:
    """What a RAFT-style reply answers: the line after the first `<ANSWER>:` (the whole reply without one).
    A briefly tuned model may run on past its answer (a new line, another <DOCUMENT>): that is not the answer."""
    if ANSWER not in text:
        return text.strip()
    answer = text.split(ANSWER, 1)[1].strip()
    return re.split(r"\n|<DOCUMENT>", answer, maxsplit=1)[0].strip()


# ------------------------------------------------------------------------------------------------ build


def build(corpus: str, out: str, qa: str | None = None, model: str = DEFAULT_MODEL,
          questions_per_chunk: int = 1, distractors: int = 4, p: float = 0.8, seed: int = 0,
          format: Literal["chat", "alpaca"] = "chat", chunk_tokens: int = 200, overlap: int = 0,
          limit: int | None = None, max_new_tokens: int = 96, embedding_model: str = DEFAULT_EMBEDDING_MODEL,
          field: str = "text", progress: bool = True, target: Literal["cot", "short"] = "cot",
          evidence: int = 3) -> dict[str, Any]:
    from lmstack.rag.embedding import get_embedder

    if not 0.0 <= p <= 1.0:
        raise LmstackError(f"p must be in [0, 1], not {p}")
    if distractors < 0:
        raise LmstackError(f"distractors must be >= 0, not {distractors}")
    if questions_per_chunk < 1:
        raise LmstackError(f"questions_per_chunk must be >= 1, not {questions_per_chunk}")
    if format not in ("chat", "alpaca"):
        raise LmstackError(f"format must be chat or alpaca, not {format!r}")
    if target not in ("cot", "short"):
        raise LmstackError(f"target must be cot or short, not {target!r}")
    if evidence < 1:
        raise LmstackError(f"evidence must be >= 1, not {evidence}")
    if Path(out).suffix != ".jsonl":
        raise LmstackError(f"{out}: the output must be a .jsonl file")
    embedder = get_embedder(embedding_model)
    if not 8 <= chunk_tokens <= embedder.max_text_tokens:
        raise LmstackError(f"chunk_tokens must be in [8, {embedder.max_text_tokens}], not {chunk_tokens}")
    if not 0 <= overlap < chunk_tokens // 2:
        raise LmstackError(f"overlap must be >= 0 and under half of chunk_tokens, not {overlap}")
    chunks = corpus_chunks(corpus, embedder, chunk_tokens, overlap, field)
    failed = 0
    if qa is not None:
        questions = questions_from_qa(qa, chunks, embedder)[:limit]
    else:
        from lmstack.generation import GenerationConfig
        from lmstack.rag.answer import get_generator

        cfg = GenerationConfig(max_new_tokens=max_new_tokens, seed=seed)
        cfg.validate()
        order = random.Random(seed).sample(range(len(chunks)), len(chunks))[:limit]  # a spread-out subset
        chosen = sorted(order)
        questions, failed = generate_questions([chunks[i] for i in chosen], get_generator(model),
                                               cfg,
                                               questions_per_chunk, progress)
        for q in questions:
            q.oracle = chosen[q.oracle]
    if not questions:
        raise LmstackError("no questions: the model's replies did not parse; give a QA file with --qa")
    rng = random.Random(seed)
    examples = [build_example(q, chunks, distractors, p, rng, format, target, embedder, evidence) for q in questions]
    atomic_write_text(out, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
    shown = sum(e["raft"]["oracle_included"] for e in examples)
    return {"out": out, "examples": len(examples), "format": format, "chunks": len(chunks),
            "oracle_included": shown, "oracle_fraction": round(shown / len(examples), 4),
            "distractors": distractors, "p": 1.0 if target == "short" else p, "target": target,
            "questions_from": "qa" if qa else model,
            "unparsed_replies": failed}
