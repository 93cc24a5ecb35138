"""Chunking by tokens of the embedding model's tokenizer, with overlap, aware of the document's structure.

The unit is a sentence (a line in a code block); a chunk is a run of whole sentences of at most `max_tokens`
tokens (special tokens not counted), and `text[start:end]` of the document, so its character offsets are exact.
Rules, in order:
  1. A chunk never spans two sections (a Markdown/HTML heading starts one, and so does a PDF page or a JSONL
     record); a chunk that holds only headings runs on into the next section, so a heading is not left alone.
  2. A sentence is split only when it alone is longer than `max_tokens` (at a word start where possible).
  3. A chunk that is at least half full ends before a paragraph that would not fit whole.
  4. The next chunk in the same section repeats the last whole sentences of the previous one, up to
     `overlap` tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer

    from lmstack.rag.extract import Document

_ABBREVIATIONS = {"e.g", "i.e", "etc", "vs", "dr", "mr", "mrs", "ms", "fig", "al", "cf", "no", "vol", "approx"}
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)")
_LIST_LINE = re.compile(r"\n(?=[ \t]*(?:[-*+•►▶✓]|\d+[.)])\s)")


@dataclass
class Chunk:
    ord: int  # position in the document
    start: int  # character offsets into Document.text
    end: int
    text: str
    n_tokens: int
    heading: str | None
    page: int | None
    line: int | None  # JSONL record line, or the line the chunk starts on for .txt/.md


@dataclass
class _Unit:
    start: int
    end: int
    tokens: int
    section: int
    block: int
    para_start: bool
    is_heading: bool


def sentence_spans(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Sentences of text[start:end] as (start, end) offsets: after . ! ? (not after a short abbreviation) and
    at line breaks that start a list item; trimmed of whitespace."""
    body = text[start:end]
    cuts = {0, len(body)}
    for m in _SENTENCE_END.finditer(body):
        word = re.search(r"([\w.]+)[.!?][\"')\]]*$", body[max(0, m.start() - 12):m.end()])
        if not (word and body[m.start()] == "." and word.group(1).lower() in _ABBREVIATIONS):
            cuts.add(m.end())
    cuts.update(m.start() for m in _LIST_LINE.finditer(body))
    spans = []
    ordered = sorted(cuts)
    for a, b in zip(ordered, ordered[1:]):
        piece = body[a:b]
        s, e = a + len(piece) - len(piece.lstrip()), b - (len(piece) - len(piece.rstrip()))
        if e > s:
            spans.append((start + s, start + e))
    return spans


def _split_long(backend: HFTokenizer, text: str, start: int, end: int, max_tokens: int) -> list[tuple[int, int, int]]:
    """Cut one over-long sentence into pieces of <= max_tokens tokens: (start, end, tokens), preferring to
    cut where a word starts (not inside a word's sub-word pieces)."""
    offsets = backend.encode(text[start:end], add_special_tokens=False).offsets
    pieces, i = [], 0
    while i < len(offsets):
        j = min(i + max_tokens, len(offsets))
        if j < len(offsets):
            word_starts = [t for t in range(i + max_tokens // 2, j) if offsets[t][0] > offsets[t - 1][1]]
            j = word_starts[-1] if word_starts else j
        pieces.append((start + offsets[i][0], start + offsets[j - 1][1], j - i))
        i = j
    return pieces


def _units(doc: Document, backend: HFTokenizer, max_tokens: int) -> list[_Unit]:
    spans: list[tuple[int, int, int, int, bool, bool]] = []  # start, end, section, block, para_start, heading
    section, prev_page = 0, None
    for b, block in enumerate(doc.blocks):
        if block.kind in ("heading", "record") or (block.page != prev_page and b > 0):
            section += 1
        prev_page = block.page
        if block.kind == "heading":
            found = [(block.start, block.end)]
        elif block.kind == "code":  # lines, not sentences
            found = [(block.start + m.start(), block.start + m.end())
                     for m in re.finditer(r"[^\n]*\S[^\n]*", doc.text[block.start:block.end])]
        else:
            found = sentence_spans(doc.text, block.start, block.end)
        spans += [(s, e, section, b, i == 0, block.kind == "heading") for i, (s, e) in enumerate(found)]
    counts = [len(enc.ids) for enc in backend.encode_batch([doc.text[s:e] for s, e, *_ in spans],
                                                           add_special_tokens=False)]
    units = []
    for (s, e, sec, b, para, head), n in zip(spans, counts):
        if n <= max_tokens:
            units.append(_Unit(s, e, n, sec, b, para, head))
        else:
            for i, (ps, pe, pn) in enumerate(_split_long(backend, doc.text, s, e, max_tokens)):
                units.append(_Unit(ps, pe, pn, sec, b, para and i == 0, head))
    return units


def chunk_document(doc: Document, backend: HFTokenizer, max_tokens: int = 200, overlap: int = 32) -> list[Chunk]:
    """Split `doc` into chunks of at most `max_tokens` tokens of `backend` (an HF tokenizers.Tokenizer)."""
    if max_tokens < 8:
        raise ValueError(f"max_tokens must be >= 8, not {max_tokens}")
    if not 0 <= overlap < max_tokens // 2:
        raise ValueError(f"overlap must be in [0, max_tokens / 2), not {overlap}")
    units = _units(doc, backend, max_tokens)
    block_tokens: dict[int, int] = {}
    for u in units:
        block_tokens[u.block] = block_tokens.get(u.block, 0) + u.tokens

    chunks: list[Chunk] = []
    cur: list[_Unit] = []
    fresh = 0  # units in `cur` that no earlier chunk holds

    def emit() -> None:
        first = next((u for u in cur if not u.is_heading), cur[-1])
        block = doc.blocks[first.block]
        start, end = cur[0].start, cur[-1].end
        line = block.line if block.line is not None else (doc.line_of(start) if doc.kind in ("text", "markdown")
                                                          else None)
        chunks.append(Chunk(len(chunks), start, end, doc.text[start:end], sum(u.tokens for u in cur),
                            block.heading, block.page, line))

    def tail_for(u: _Unit) -> list[_Unit]:
        """The last sentences of `cur` to repeat before `u`: at most `overlap` tokens, and room left for u."""
        tail: list[_Unit] = []
        total = 0
        for prev in reversed(cur):
            if total + prev.tokens > overlap or prev.is_heading:
                break
            tail.insert(0, prev)
            total += prev.tokens
        while tail and total + u.tokens > max_tokens:
            total -= tail.pop(0).tokens
        return tail

    for u in units:
        tokens = sum(x.tokens for x in cur)
        if cur and u.section != cur[-1].section and not all(x.is_heading for x in cur):
            emit()
            cur, fresh = [], 0
        elif cur and (tokens + u.tokens > max_tokens or
                      (u.para_start and tokens >= max_tokens // 2 and tokens + block_tokens[u.block] > max_tokens)):
            emit()
            cur, fresh = tail_for(u), 0
        cur.append(u)
        fresh += 1
    if cur and fresh:
        emit()
    return chunks
