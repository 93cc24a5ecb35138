"""Is a claim supported by a passage? Word-overlap grounding, shared by RAG answering, RAG evaluation and the
output rails (a guardrail checks a model's answer against its retrieved sources with the same functions).

A claim (one sentence) is supported by a passage when at least `min_overlap` of the claim's content words
occur in the passage. Content words: lowercased \\w+ tokens, stopwords removed, a crude suffix stem ("models"
-> "model", "trained" -> "train") so inflections match. Word overlap, not embedding similarity: the answer
pipeline picks evidence by MiniLM similarity, and the check must not be that same signal. It is an entailment
proxy: it catches invented content words (names, numbers, expansions of an acronym), not negation.

    from lmstack.rag.grounding import support, supported_sentences
    score, best = support("LoRA inserts low-rank matrices.", [chunk_a, chunk_b])   # (0.8, 1)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lmstack.rag.chunk import sentence_spans

SUPPORT_MIN = 0.7  # share of a claim's content words that must occur in one passage
REPEAT_NGRAM = 8  # an answer "repeats" when some n-gram of this many words occurs twice

STOPWORDS = frozenset("""a an and are as at be been being but by can could do does did for from had has have how
i if in into is it its itself of on or our so such than that the their them then there these they this those to
was we were what when where which while who whom why will with would you your also may might must should about
each other any all both more most some very just not no""".split())
_CITATION = re.compile(r"\s*\[\d+(?:\s*,\s*\d+)*\]")


def content_words(text: str) -> set[str]:
    """The claim-bearing words of `text`: lowercased, stopwords dropped, crude suffix stem."""
    words = re.findall(r"\w+", _CITATION.sub("", text).lower())
    return {re.sub(r"(ing|ed|es|s)$", "", w) if len(w) > 4 else w for w in words if w not in STOPWORDS}


def sentences(text: str) -> list[str]:
    """`text` split into sentences (the chunker's splitter: ., !, ? and line breaks end a sentence)."""
    return [text[s:e].strip() for s, e in sentence_spans(text, 0, len(text)) if text[s:e].strip()]


def overlap(claim: str, passage: str | set[str]) -> float:
    """Share of the claim's content words found in the passage (a text or its content words); 1.0 when the
    claim has none (it claims nothing)."""
    words = content_words(claim)
    if not words:
        return 1.0
    passage_words = passage if isinstance(passage, set) else content_words(passage)
    return len(words & passage_words) / len(words)


def support(claim: str, passages: Sequence[str]) -> tuple[float, int | None]:
    """(best overlap, index of the passage giving it) over `passages`; (0.0, None) with no passages."""
    best, at = 0.0, None
    for i, passage in enumerate(passages):
        score = overlap(claim, passage)
        if at is None or score > best:
            best, at = score, i
    return best, at


def supported_sentences(answer: str, passages: Sequence[str], min_overlap: float = SUPPORT_MIN
                        ) -> list[tuple[str, float, int | None]]:
    """Each sentence of `answer` with its best support (overlap, passage index or None when under
    `min_overlap`)."""
    words = [content_words(p) for p in passages]
    out = []
    for sentence in sentences(answer):
        score, at = support(sentence, words)  # type: ignore[arg-type]
        out.append((sentence, score, at if score >= min_overlap else None))
    return out


def faithfulness(answer: str, passages: Sequence[str], min_overlap: float = SUPPORT_MIN) -> float | None:
    """Share of the answer's sentences supported by some passage; None for an empty answer."""
    rows = supported_sentences(answer, passages, min_overlap)
    return sum(at is not None for _, _, at in rows) / len(rows) if rows else None


def repeated_ngram(text: str, n: int = REPEAT_NGRAM) -> bool:
    """Whether some run of n words (lowercased \\w+ tokens, punctuation ignored) occurs twice in `text` (a
    looping answer)."""
    tokens = re.findall(r"\w+", _CITATION.sub("", text).lower())
    seen: set[tuple[str, ...]] = set()
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        if gram in seen:
            return True
        seen.add(gram)
    return False
