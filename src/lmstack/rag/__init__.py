"""Retrieval-augmented generation: `rag index`, `rag search`, `rag ask`, `rag eval` and `embed` as typed verbs.

    from lmstack.rag import rag_index, rag_ask
    rag_index(["notes/"], index="notes.sqlite")
    out = rag_ask("What does LoRA train?", index="notes.sqlite", on_text=print)
    out["answer"], out["citations"]          # [{n, source, location, score, similarity}]

Pipeline: extract.py (files -> text + blocks) -> chunk.py (token chunks) -> embedding.py (MiniLM vectors) ->
store.py (SQLite: documents, chunks, vectors, FTS5; milvus_store.py for Milvus) -> retrieve.py (BM25, exact
vector, hybrid score fusion) -> answer.py (prompt, generation, citations) -> evaluate.py (recall@k, MRR, EM/F1,
faithfulness). This module imports nothing heavy, so the CLI can read these signatures cheaply.
"""


from collections.abc import Callable
from typing import Any, Literal, TextIO

from lmstack.checkpoints.registry import DEFAULT_EMBEDDING_MODEL
from lmstack.checkpoints.registry import DEFAULT_MODEL as DEFAULT_ANSWER_MODEL


def rag_index(paths: list[str], *, index: str, backend: Literal["sqlite", "milvus"] | None = None,
              embedding_model: str = DEFAULT_EMBEDDING_MODEL,
              source: str | None = None, field: str = "text", chunk_tokens: int | None = None,
              overlap: int | None = None, prune: bool = False, batch_size: int = 32,
              progress: bool = True) -> dict[str, Any]:
    """Add .txt, .md, .html, .pdf and .jsonl files (folders recursively) to a RAG index, incrementally.

    Unchanged files (same SHA-256) are skipped, changed files are replaced, unreadable files are skipped with
    a warning. Returns counts (added, updated, unchanged, removed, chunks, skipped) and chunks_per_s.

    Args:
        paths: Files or folders to index.
        index: The index: a path (SQLite), or a URI (see backend).
        backend: Where the vectors live: sqlite (the default for a path) or milvus (Milvus Lite in the given
            file). A URI chooses instead: sqlite:///PATH, milvus-lite:///PATH, milvus://HOST:PORT/COLLECTION.
        embedding_model: The sentence encoder (registry name or path); fixed when the index is created.
        source: A label stored with these documents, for filtering (default: the folder or file name given).
        field: The text field of .jsonl records.
        chunk_tokens: Most tokens per chunk (default 200); fixed when the index is created.
        overlap: Tokens of whole sentences repeated between neighbouring chunks (default 32).
        prune: Remove indexed documents under the given folders whose files are gone.
        batch_size: Texts per embedding batch.
        progress: Show a progress bar on stderr.
    """
    from lmstack.rag.ingest import ingest
    from lmstack.rag.store import index_uri
    return ingest(paths, index_uri(index, backend), embedding_model, source, field, chunk_tokens, overlap, prune,
                  batch_size, progress)


def _check(query: str | None = None, min_score: float | None = None, limit: int | None = None) -> None:
    """Refuse values that would silently do something else: an empty query, a similarity threshold no cosine
    reaches (every answer "I don't know"), a negative --limit (a slice from the end)."""
    from lmstack.errors import LmstackError
    if query is not None and not query.strip():
        raise LmstackError("the query is empty; give the text to search for")
    if min_score is not None and not -1.0 <= min_score <= 1.0:  # `not` so that NaN is refused too
        raise LmstackError(f"min_score is a cosine similarity, in [-1, 1], not {min_score}")
    if limit is not None and limit < 1:
        raise LmstackError(f"limit must be >= 1, not {limit}")


def _filters(source: str | None, path_prefix: str | None, since: str | None, until: str | None,
             date_field: str) -> Any:
    from lmstack.rag.store import Filters, parse_date
    return Filters(source=source, path_prefix=path_prefix, since=parse_date(since, "since"),
                   until=parse_date(until, "until"), date_field=date_field)  # type: ignore[arg-type]


def _open_for_query(index: str, backend: str | None, embedding_model: str | None) -> tuple[Any, Any]:
    """The index and its embedder; a different `embedding_model` than the index's is refused."""
    from lmstack.rag.embedding import get_embedder
    from lmstack.rag.store import index_uri, open_index
    store = open_index(index_uri(index, backend))
    try:
        if embedding_model is not None:
            store.check_model(embedding_model)
        embedder = get_embedder(store.embedding_model)
        store.check_model(embedder.name, embedder.dim)
    except BaseException:
        store.close()
        raise
    return store, embedder


def rag_search(query: str, *, index: str, backend: Literal["sqlite", "milvus"] | None = None, k: int = 5,
               mode: Literal["hybrid", "bm25", "vector"] = "hybrid",
               bm25_weight: float = 0.3, vector_weight: float = 0.7, source: str | None = None,
               path_prefix: str | None = None, since: str | None = None, until: str | None = None,
               date_field: Literal["ingested", "mtime"] = "ingested",
               embedding_model: str | None = None) -> list[dict[str, Any]]:
    """Retrieve the k best chunks for a query (no generation), with their scores and locations.

    Args:
        query: The question or search text.
        index: The index (see `rag index`).
        backend: Where the vectors live: sqlite (the default for a path) or milvus (Milvus Lite in the given
            file). A URI chooses instead: sqlite:///PATH, milvus-lite:///PATH, milvus://HOST:PORT/COLLECTION.
        k: How many chunks to return.
        mode: hybrid (a weighted sum of the BM25 and cosine scores), bm25 or vector.
        bm25_weight: Weight of the BM25 score (over the query's best) in hybrid mode.
        vector_weight: Weight of the cosine similarity in hybrid mode.
        source: Only documents ingested with this source label.
        path_prefix: Only documents whose path starts with this.
        since: Only documents dated on or after this ISO date (see date_field).
        until: Only documents dated on or before this ISO date.
        date_field: Which date since/until read: ingested (ingest time) or mtime (file modification time).
        embedding_model: Must be the index's model when given (a mismatch is refused).
    """
    from lmstack.rag.retrieve import search
    _check(query=query)
    filters = _filters(source, path_prefix, since, until, date_field)
    store, embedder = _open_for_query(index, backend, embedding_model)
    with store:
        hits = search(store, embedder, query, k, mode, filters, bm25_weight, vector_weight)
        return [{"n": n, **h.to_dict()} for n, h in enumerate(hits, start=1)]


def rag_ask(question: str, *, index: str, backend: Literal["sqlite", "milvus"] | None = None,
            model: str = DEFAULT_ANSWER_MODEL, adapter: str | None = None,
            k: int = 5, mode: Literal["hybrid", "bm25", "vector"] = "hybrid", stream: bool = True,
            evidence: int = 3, quote: bool = True, max_sentences: int = 2,
            short: Literal["model", "span", "off"] | None = None,
            max_new_tokens: int = 64,
            temperature: float = 0.0, repetition_penalty: float = 1.1, seed: int | None = None,
            min_score: float = 0.48, check_names: bool = True, bm25_weight: float = 0.3,
            vector_weight: float = 0.7, source: str | None = None, path_prefix: str | None = None,
            since: str | None = None, until: str | None = None,
            date_field: Literal["ingested", "mtime"] = "ingested",
            embedding_model: str | None = None, dtype: Literal["auto", "float32", "bfloat16"] = "auto",
            on_text: Callable[[str], None] | None = None, output: TextIO | None = None) -> dict[str, Any]:
    """Answer a question from the indexed documents in a few words (or, with short off, one or two sentences)
    citing them as [n]; "I don't know" when they do not help.

    The answer comes from the retrieved statement that best matches the question, and cites its chunk (see
    rag/answer.py); with short off, each sentence the model writes must be supported by a retrieved chunk
    (word overlap), which it then cites. Returns {question, answer,
    citations: [{n, source, location, score, similarity}], retrieved: [chunks with scores], evidence, refused,
    reason, citations_by}.

    Args:
        question: The question.
        index: The index (see `rag index`).
        backend: Where the vectors live: sqlite (the default for a path) or milvus (Milvus Lite in the given
            file). A URI chooses instead: sqlite:///PATH, milvus-lite:///PATH, milvus://HOST:PORT/COLLECTION.
        model: The answering chat model (registry name, GGUF file or model folder).
        adapter: A PEFT adapter folder to apply to the model (e.g. one trained on `raft build` data).
        k: How many chunks to retrieve.
        mode: hybrid (a weighted sum of the BM25 and cosine scores), bm25 or vector.
        stream: Stream the answer, sentence by sentence, as it is generated and checked.
        evidence: How many of the retrieved sentences the model sees; 0 shows it the whole chunks.
        quote: Drop answer sentences the sources do not support; quote the best evidence when none is left.
        max_sentences: Stop the answer after this many sentences.
        short: Answer in a few words from the evidence statements: model = a span the model copies from one
            of them (the default with an adapter, e.g. one trained on `raft build --target short` data); span =
            the best statement's words that the question does not restate (the default without an adapter: no
            model is loaded); off = one or two sentences, each checked against the sources.
        max_new_tokens: The most tokens the model writes.
        temperature: Sampling temperature; 0 means greedy decoding.
        repetition_penalty: Penalty on tokens already in the prompt or answer (1 = none).
        seed: Random seed for sampling.
        min_score: Answer "I don't know" without loading the model when the best cosine similarity of the
            question and an evidence sentence (a chunk, with evidence 0) is below this.
        check_names: Answer "I don't know" when the question names something (a capitalized word, an acronym,
            a term with digits, a lower-case compound such as grouped-query) that no retrieved chunk mentions.
        bm25_weight: Weight of the BM25 score (over the query's best) in hybrid mode.
        vector_weight: Weight of the cosine similarity in hybrid mode.
        source: Only documents ingested with this source label.
        path_prefix: Only documents whose path starts with this.
        since: Only documents dated on or after this ISO date (see date_field).
        until: Only documents dated on or before this ISO date.
        date_field: Which date since/until read: ingested (ingest time) or mtime (file modification time).
        embedding_model: Must be the index's model when given (a mismatch is refused).
        dtype: Compute dtype of the answering model: auto (bfloat16 where the CPU has native bf16), float32 or
            bfloat16.
        on_text: Called with each piece of the answer as it is produced (with stream).
        output: Where to print the answer and its cited sources (the CLI passes stdout; None prints nothing).
    """
    from lmstack.rag.answer import AnswerOptions, answer, answer_config, get_generator, print_result
    from lmstack.rag.retrieve import search

    _check(query=question, min_score=min_score)
    if evidence < 0 or max_sentences < 1:
        from lmstack.errors import LmstackError
        raise LmstackError(f"evidence must be >= 0 and max_sentences >= 1 (got {evidence}, {max_sentences})")
    cfg = answer_config(max_new_tokens, temperature, repetition_penalty, seed)
    options = AnswerOptions(min_score=min_score, evidence=evidence, quote=quote, max_sentences=max_sentences,
                            short=short or ("model" if adapter else "span"), check_names=check_names)
    filters = _filters(source, path_prefix, since, until, date_field)
    store, embedder = _open_for_query(index, backend, embedding_model)
    with store:
        hits = search(store, embedder, question, k, mode, filters, bm25_weight, vector_weight)
    streamed = False

    def emit(piece: str) -> None:
        nonlocal streamed
        streamed = True
        if on_text is not None:
            on_text(piece)
        if output is not None:
            output.write(piece)
            output.flush()

    result = answer(question, hits, lambda: get_generator(model, adapter, dtype), cfg, embedder, options,
                    on_text=emit if stream and (on_text or output) else None)
    if output is not None:
        print_result(result, output, streamed)
    return result


def rag_eval(qa: str, *, index: str, backend: Literal["sqlite", "milvus"] | None = None, k: int = 5,
             modes: list[str] | None = None, generate: bool = True,
             limit: int | None = None, model: str = DEFAULT_ANSWER_MODEL, adapter: str | None = None,
             max_new_tokens: int = 64, min_score: float = 0.48, out: str | None = None,
             progress: bool = True, bm25_weight: float = 0.3, vector_weight: float = 0.7) -> dict[str, Any]:
    """Evaluate retrieval (recall@k, MRR per mode) and answers (exact match, token F1, faithfulness).

    The QA file has one JSON object per line: {"question", "answer", "doc", "snippet"}, where doc names the
    gold document (file name or path suffix) and snippet is optional verbatim supporting text from it.

    Args:
        qa: The QA file (.jsonl).
        index: The index (see `rag index`) holding the gold documents.
        backend: Where the vectors live: sqlite (the default for a path) or milvus (Milvus Lite in the given
            file). A URI chooses instead: sqlite:///PATH, milvus-lite:///PATH, milvus://HOST:PORT/COLLECTION.
        k: Retrieval depth for recall@k and MRR, and the chunks shown to the model.
        modes: Retrieval modes to compare (bm25, vector, hybrid); repeat the option; default all three.
        generate: Also generate answers and score them (slow); --no-generate scores retrieval only.
        limit: Use only the first N questions.
        model: The answering chat model.
        adapter: A PEFT adapter folder to apply to the model.
        max_new_tokens: The most tokens per answer.
        min_score: The "I don't know" similarity threshold, as in `rag ask`.
        out: Also write the report, with per-question rows, to this JSON file.
        progress: Show a progress bar on stderr.
        bm25_weight: Weight of the BM25 score (over the query's best) in hybrid mode, as in `rag ask`.
        vector_weight: Weight of the cosine similarity in hybrid mode, as in `rag ask`.
    """
    from lmstack.rag.evaluate import evaluate
    from lmstack.rag.store import index_uri
    _check(min_score=min_score, limit=limit)
    return evaluate(qa, index_uri(index, backend), k, modes, generate, limit, model, adapter, max_new_tokens,
                    min_score, out, progress, bm25_weight, vector_weight)


def embed(input: str, *, out: str, model: str = DEFAULT_EMBEDDING_MODEL, batch_size: int = 32,
          field: str | None = None) -> dict[str, Any]:
    """Embed a file of texts (one per line, or a field of each JSON line) into a .npy or .safetensors matrix.

    Row i is the embedding of text i (float32, L2-normalized). Returns n, dim, seconds and sentences_per_s.

    Args:
        input: A text file with one text per line, or a .jsonl file.
        out: The output file: .npy, or .safetensors (tensor "embeddings").
        model: The sentence encoder (registry name or path).
        batch_size: Texts per batch.
        field: Read this string field of each JSON line (default "text" for .jsonl files).
    """
    from lmstack.rag.embedding import embed_file
    return embed_file(input, out, model, batch_size, field)


def raft_build(*, corpus: str, out: str, qa: str | None = None, model: str = DEFAULT_ANSWER_MODEL,
               questions_per_chunk: int = 1, distractors: int = 4, p: float = 0.8, seed: int = 0,
               format: Literal["chat", "alpaca"] = "chat", chunk_tokens: int = 200, overlap: int = 0,
               limit: int | None = None, max_new_tokens: int = 96,
               embedding_model: str = DEFAULT_EMBEDDING_MODEL, field: str = "text",
               target: Literal["cot", "short"] = "cot", evidence: int = 3,
               progress: bool = True) -> dict[str, Any]:
    """Build a RAFT fine-tuning set: questions with oracle + distractor chunks and quoting CoT answers.

    Each example shows the oracle chunk with probability p plus `distractors` other chunks (else distractors+1
    other chunks), shuffled; the target quotes the oracle between ##begin_quote## and ##end_quote## and ends
    with `<ANSWER>: ...`. Output: chat JSONL {"messages": [...], "raft": {...}} that `lmstack finetune` reads.

    Args:
        corpus: The folder (or file) of documents: .txt, .md, .html, .pdf, .jsonl.
        out: The output .jsonl file.
        qa: Take questions from this QA file ({"question", "answer", "doc", "snippet"} lines) instead of
            generating them with the model.
        model: The chat model that writes questions and answers when no QA file is given.
        questions_per_chunk: Questions generated per chunk (without --qa).
        distractors: Distractor chunks per example (k).
        p: Fraction of examples that include the oracle chunk.
        seed: Random seed for the choice of distractors, the oracle coin and the shuffle.
        format: chat (messages) or alpaca (system/instruction/input/output).
        chunk_tokens: Most tokens per chunk (MiniLM tokenizer).
        overlap: Tokens repeated between neighbouring chunks.
        limit: Use at most this many questions (with --qa) or chunks (generating).
        max_new_tokens: The most tokens per generated question/answer reply.
        embedding_model: The tokenizer for chunking and the encoder that locates oracles without a snippet.
        field: The text field of .jsonl documents.
        target: cot (quote the oracle, reason, then `<ANSWER>:`) or short (`rag ask`'s short-answer prompt
            over the evidence statements of the shown chunks, answered by the gold phrase: an adapter trained
            on it is what `rag ask --adapter` copies answers with; every example shows the oracle).
        evidence: With target short, the evidence statements per example (as `rag ask --evidence`).
        progress: Show a progress bar on stderr.
    """
    from lmstack.rag.raft import build
    _check(limit=limit)
    return build(corpus, out, qa, model, questions_per_chunk, distractors, p, seed, format, chunk_tokens, overlap,
                 limit, max_new_tokens, embedding_model, field, progress, target, evidence)


__all__ = ["rag_index", "rag_search", "rag_ask", "rag_eval", "embed", "raft_build"]
