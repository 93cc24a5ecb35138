"""Answering with retrieved sources: numbered-source prompt, streamed generation, [n] citations, "I don't know".

The answer is "I don't know" (and the model is not run) when no chunk is retrieved or the best cosine
similarity between the question and a retrieved chunk is under `min_score`; it is also "I don't know" when the
model says the sources do not help (checked on the first characters before anything is streamed, and on the
whole answer at the end).

Citations are the [n] markers the model writes (n in 1..k). A small model often writes none: then each
answer sentence is attributed to the retrieved chunk whose sentences are most similar to it (MiniLM cosine
>= ATTRIBUTION_MIN), the marker is appended to the sentence, and `citations_by` says "attribution" instead
of "model".
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from lmstack.errors import LmstackError
from lmstack.rag.chunk import sentence_spans

if TYPE_CHECKING:
    from lmstack.generation import GenerationConfig, Generator
    from lmstack.rag.embedding import Embedder
    from lmstack.rag.retrieve import Hit

IDK = "I don't know."
ATTRIBUTION_MIN = 0.5
SYSTEM = ("You answer questions using only the numbered sources you are given. After each sentence, cite the "
          "sources it comes from by number in square brackets, like [1]. If the sources do not contain the "
          "answer, reply exactly: I don't know.")
_REFUSAL = re.compile(
    r"\bi (?:do not|don't|dont|cannot|can't) (?:know|answer|find)\b"
    r"|\bsources? (?:do(?:es)? not|don't|doesn't) (?:help|contain|mention|provide|say|answer|include)"
    r"|\bnot (?:mentioned|provided|found|given|stated) in the (?:sources?|context)"
    r"|\bno (?:relevant )?information (?:about|on|in)\b", re.I)
_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text))


def build_messages(question: str, hits: list[Hit]) -> list[dict[str, str]]:
    sources = "\n\n".join(f"[{n}] {h.chunk.title or ''} ({h.chunk.location()})\n{h.chunk.text}"
                          for n, h in enumerate(hits, start=1))
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Sources:\n\n{sources}\n\nQuestion: {question}"}]


def cited_numbers(text: str, n_sources: int) -> list[int]:
    """The distinct source numbers cited as [n] or [n, m] in `text`, in order of first citation."""
    found: dict[int, None] = {}
    for group in _CITATION.findall(text):
        for n in map(int, group.split(",")):
            if 1 <= n <= n_sources:
                found[n] = None
    return list(found)


def strip_citations(text: str) -> str:
    return re.sub(r"\s*" + _CITATION.pattern, "", text).strip()


def answer_sentences(text: str) -> list[str]:
    return [text[s:e] for s, e in sentence_spans(text, 0, len(text))]


def attribute(answer: str, hits: list[Hit], embedder: Embedder) -> str:
    """Append [n] to each answer sentence for the source holding its most similar sentence (cosine >=
    ATTRIBUTION_MIN); sentences that match no source stay unmarked."""
    sentences = answer_sentences(answer)
    if not sentences or not hits:
        return answer
    source_sents = [(n, s) for n, h in enumerate(hits, start=1) for s in answer_sentences(h.chunk.text)]
    emb = embedder.encode(sentences + [s for _, s in source_sents])  # [S + M, D]
    sims = emb[:len(sentences)] @ emb[len(sentences):].T  # [S, M]
    out = []
    for i, sentence in enumerate(sentences):
        j = int(np.argmax(sims[i])) if sims.shape[1] else -1
        out.append(f"{sentence} [{source_sents[j][0]}]" if j >= 0 and sims[i, j] >= ATTRIBUTION_MIN else sentence)
    return " ".join(out)


@functools.lru_cache(maxsize=1)
def get_generator(model: str, adapter: str | None = None, dtype: str = "float32") -> Generator:
    """Load the answering model once per process (asking many questions, or evaluating, reuses it)."""
    from lmstack.checkpoints import load_model
    from lmstack.generation import Generator

    loaded = load_model(model, adapter=adapter, dtype=dtype)
    net = loaded.model
    if loaded.tokenizer is None or loaded.tokenizer.chat_template is None:
        raise LmstackError(f"{model}: answering needs a chat model with a chat template")
    return Generator(net, loaded.tokenizer)


def prompt_ids(generator: Generator, question: str, hits: list[Hit], max_new_tokens: int) -> tuple[list[int], int]:
    """The chat prompt with as many of the hits as fit the context (prompt + max_new_tokens); and that count."""
    context = generator.model.config.max_seq_len
    for n in range(len(hits), 0, -1):
        ids = generator.chat_prompt(build_messages(question, hits[:n]))
        if len(ids) + max_new_tokens <= context:
            return ids, n
    raise LmstackError(f"the question alone does not fit the model's context of {context} tokens")


def generate_answer(generator: Generator, ids: list[int], cfg: GenerationConfig,
                    on_text: Callable[[str], None] | None) -> tuple[str, bool]:
    """Run the model; pieces reach `on_text` once the first 24 characters show it is not refusing.
    Returns (text, refused)."""
    text, started = "", on_text is None
    pieces = generator.stream(ids, cfg)
    for piece in pieces:
        text += piece
        if not started:
            if is_refusal(text):
                pieces.close()  # stop generating: the answer is "I don't know" whatever follows
                return text, True
            if len(text) >= 24:
                started = True
                on_text(text)  # type: ignore[misc]
        elif on_text is not None:
            on_text(piece)
    if not started and on_text is not None and text and not is_refusal(text):
        on_text(text)
    return text.strip(), is_refusal(text)


def answer(question: str, hits: list[Hit], generator: Generator, cfg: GenerationConfig, embedder: Embedder,
           min_score: float = 0.3, on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Answer from `hits` -> {answer, citations, retrieved, refused, reason, citations_by, ...}."""
    best = max((h.similarity for h in hits), default=float("-inf"))
    retrieved = [{"n": n, **h.to_dict()} for n, h in enumerate(hits, start=1)]
    result: dict[str, Any] = {"question": question, "answer": IDK, "citations": [], "retrieved": retrieved,
                              "refused": True, "reason": None, "citations_by": None, "best_similarity": best}
    if not hits:
        result["reason"] = "no_sources"
        return result
    if best < min_score:
        result["reason"] = f"best similarity {best:.3f} < min_score {min_score}"
        return result
    ids, used = prompt_ids(generator, question, hits, cfg.max_new_tokens)
    text, refused = generate_answer(generator, ids, cfg, on_text)
    result["prompt_tokens"] = len(ids)
    if refused or not text:
        result["reason"] = "the model found no answer in the sources" if refused else "empty answer"
        return result
    numbers = cited_numbers(text, used)
    by = "model"
    if not numbers:
        text = attribute(text, hits[:used], embedder)
        numbers, by = cited_numbers(text, used), "attribution"
    result.update(answer=text, refused=False, citations_by=by if numbers else None, citations=[
        {"n": n, "source": hits[n - 1].chunk.path, "location": hits[n - 1].chunk.location(),
         "score": round(hits[n - 1].score, 6), "similarity": round(hits[n - 1].similarity, 6)} for n in numbers])
    return result


def format_sources(result: dict[str, Any]) -> str:
    """The cited sources as lines "[n] path (location)"; empty when nothing is cited."""
    lines = [f"[{c['n']}] {c['source']} ({c['location']})" for c in result["citations"]]
    return "Sources:\n" + "\n".join(lines) if lines else ""


def print_result(result: dict[str, Any], output: TextIO, streamed: bool) -> None:
    """After streaming (`streamed`: some answer text was already written) or instead of it: the final answer
    when it differs from what was streamed, then the cited sources."""
    if not streamed:
        output.write(result["answer"] + "\n")
    elif result["refused"] or result["citations_by"] == "attribution":
        output.write("\n" + result["answer"] + "\n")  # what the answer became: "I don't know" or with [n]
    else:
        output.write("\n")
    sources = format_sources(result)
    if sources:
        output.write("\n" + sources + "\n")
    output.flush()
