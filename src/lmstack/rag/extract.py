"""Text extraction for RAG: .txt, .md, .html, .pdf and .jsonl files -> a `Document` of text plus blocks.

A block is a span of the extracted text (a heading, a paragraph, a code fence, a JSONL record) with the heading
path it sits under and its page. Chunking (`lmstack.rag.chunk`) reads the blocks to keep chunks inside one
section and to prefer paragraph ends. Offsets are character offsets into `Document.text`: for .txt and .md that
is the file itself, for .html, .pdf and .jsonl it is the extracted text (blocks joined by blank lines).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Literal

from lmstack.errors import LmstackError
from lmstack.io import decode_utf8, json_records

SUFFIXES = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".html": "html",
            ".htm": "html", ".pdf": "pdf", ".jsonl": "jsonl"}
BlockKind = Literal["heading", "paragraph", "code", "record"]


class ExtractError(LmstackError):
    """A file that cannot be read as its type (corrupt PDF, invalid JSONL line): ingest skips it with a warning."""


@dataclass
class Block:
    start: int  # character offsets into Document.text
    end: int
    kind: BlockKind
    heading: str | None = None  # heading path, "Intro > Setup"; for a heading block, its own path
    page: int | None = None  # 1-based PDF page
    line: int | None = None  # 1-based JSONL line of a record


@dataclass
class Document:
    path: Path
    kind: str  # a value of SUFFIXES
    title: str
    text: str
    blocks: list[Block] = field(default_factory=list)

    def line_of(self, offset: int) -> int:
        """1-based line of a character offset (meaningful for .txt and .md, whose text is the file)."""
        return self.text.count("\n", 0, offset) + 1


def kind_of(path: Path) -> str | None:
    return SUFFIXES.get(path.suffix.lower())


def extract(path: Path, data: bytes, jsonl_field: str = "text") -> Document:
    """Parse the bytes of `path` by its suffix; raises ExtractError naming the file when they cannot be read."""
    kind = kind_of(path)
    if kind == "pdf":
        return _pdf(path, data)
    text = _decode(path, data)
    if kind == "markdown":
        return _markdown(path, text)
    if kind == "html":
        return _html(path, text)
    if kind == "jsonl":
        return _jsonl(path, text, jsonl_field)
    if kind == "text":
        return Document(path, kind, path.stem, text, _paragraphs(text, 0, len(text)))
    raise ExtractError(f"{path}: unsupported file type {path.suffix!r} (supported: {', '.join(sorted(SUFFIXES))})")


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text; a binary or latin-1 file is an ExtractError (skipped with a warning), never mojibake."""
    if b"\0" in data:  # valid UTF-8 may hold NUL, but no text document does
        line = data.count(b"\n", 0, data.index(b"\0")) + 1
        raise ExtractError(f"{path}:{line}: a binary file, not text (NUL byte)")
    try:
        return decode_utf8(data, path)
    except LmstackError as e:
        raise ExtractError(str(e)) from None


# ------------------------------------------------------------------------------------------ plain text


def _paragraphs(text: str, start: int, end: int, **attrs: object) -> list[Block]:
    """Blank-line separated paragraphs of text[start:end], trimmed of surrounding whitespace."""
    blocks, pos = [], start
    for gap in [*re.finditer(r"\n[^\S\n]*\n\s*", text[start:end]), None]:
        stop = start + gap.start() if gap else end
        body = text[pos:stop]
        s, e = pos + len(body) - len(body.lstrip()), stop - (len(body) - len(body.rstrip()))
        if e > s:
            blocks.append(Block(s, e, "paragraph", **attrs))  # type: ignore[arg-type]
        pos = start + gap.end() if gap else end
    return blocks


# ------------------------------------------------------------------------------------------- markdown

_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _markdown(path: Path, text: str) -> Document:
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    blocks: list[Block] = []
    stack: list[tuple[int, str]] = []  # (level, title) of the open headings
    para_start: int | None = None  # line index where the open paragraph starts

    def path_of() -> str | None:
        return " > ".join(t for _, t in stack) or None

    def close_paragraph(upto: int) -> None:
        nonlocal para_start
        if para_start is not None:
            s, e = offsets[para_start], offsets[upto]
            body = text[s:e]
            s += len(body) - len(body.lstrip())
            e -= len(body) - len(body.rstrip())
            if e > s:
                blocks.append(Block(s, e, "paragraph", path_of()))
        para_start = None

    def heading(level: int, title: str, s: int, e: int) -> None:
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title.strip()))
        blocks.append(Block(s, e, "heading", path_of()))

    i = 0
    while i < len(lines):
        line = lines[i].rstrip("\r\n")
        fence = _FENCE.match(line)
        if fence:  # a code fence is one block, up to the closing fence (or the end of the file)
            close_paragraph(i)
            j = i + 1
            while j < len(lines) and not lines[j].lstrip().startswith(fence.group(1)):
                j += 1
            j = min(j + 1, len(lines))
            blocks.append(Block(offsets[i], offsets[j] - (len(lines[j - 1]) - len(lines[j - 1].rstrip())),
                                "code", path_of()))
            i = j
            continue
        atx = _ATX.match(line)
        if atx:
            close_paragraph(i)
            heading(len(atx.group(1)), atx.group(2), offsets[i], offsets[i] + len(line))
        elif _SETEXT.match(line) and para_start == i - 1 and para_start is not None:
            para_start = None  # the previous single line was a setext heading's title
            title = lines[i - 1].strip()
            heading(1 if line.strip()[0] == "=" else 2, title, offsets[i - 1], offsets[i] + len(line))
        elif not line.strip():
            close_paragraph(i)
        elif para_start is None:
            para_start = i
        i += 1
    close_paragraph(len(lines))
    first = next((b.heading for b in blocks if b.kind == "heading"), None)
    return Document(path, "markdown", first.split(" > ")[0] if first else path.stem, text, blocks)


# ----------------------------------------------------------------------------------------------- html

_BLOCK_TAGS = {"p", "div", "li", "ul", "ol", "pre", "br", "tr", "table", "section", "article", "blockquote",
               "header", "footer", "main", "nav", "aside", "dd", "dt", "dl", "figure", "figcaption", "hr",
               "form", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6", "title", "body"}
_SKIP_TAGS = {"script", "style", "noscript", "template", "svg", "head"}


class _HTMLText(HTMLParser):
    """Collects (kind, level, text) blocks: a block tag ends the current run of text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, int, str]] = []
        self.title: str | None = None
        self.parts: list[str] = []
        self.skip = 0  # depth inside skipped tags
        self.pre = 0
        self.level = 0  # heading level of the open <hN>, 0 outside headings
        self.in_title = False

    def flush(self) -> None:
        raw = "".join(self.parts)
        text = raw.strip("\n") if self.pre else " ".join(raw.split())
        if text.strip():
            kind = "heading" if self.level else ("code" if self.pre else "paragraph")
            self.blocks.append((kind, self.level, text))
        self.parts = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self.in_title = True
        if tag in _SKIP_TAGS:
            self.skip += 1
        elif tag in _BLOCK_TAGS:
            self.flush()
            if tag == "pre":
                self.pre += 1
            if re.fullmatch(r"h[1-6]", tag):
                self.level = int(tag[1])

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        if tag in _SKIP_TAGS:
            self.skip = max(0, self.skip - 1)
        elif tag in _BLOCK_TAGS:
            self.flush()
            if tag == "pre":
                self.pre = max(0, self.pre - 1)
            if re.fullmatch(r"h[1-6]", tag):
                self.level = 0

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title = ((self.title or "") + data).strip() or None
        elif not self.skip:
            self.parts.append(data)


def _html(path: Path, source: str) -> Document:
    parser = _HTMLText()
    parser.feed(source)
    parser.close()
    parser.flush()
    text, blocks, stack = "", [], []
    for kind, level, body in parser.blocks:
        if text:
            text += "\n\n"
        if kind == "heading":
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, body))
        heading = " > ".join(t for _, t in stack) or None
        blocks.append(Block(len(text), len(text) + len(body), kind, heading))  # type: ignore[arg-type]
        text += body
    first_h = next((b.heading for b in blocks if b.kind == "heading"), None)
    title = parser.title or (first_h.split(" > ")[0] if first_h else path.stem)
    return Document(path, "html", title, text, blocks)


# ------------------------------------------------------------------------------------------------ pdf


def _pdf(path: Path, data: bytes) -> Document:
    try:
        import io

        from pypdf import PdfReader
    except ImportError:
        raise LmstackError("reading PDF files needs pypdf: pip install 'lmstack[rag]'") from None
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ExtractError(f"{path}: encrypted PDF")
        pages = [page.extract_text() or "" for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or path.stem
    except ExtractError:
        raise
    except Exception as e:  # pypdf raises many types for damaged files; all mean "cannot read this file"
        detail = str(e).splitlines()[0] if str(e) else "damaged file"
        raise ExtractError(f"{path}: cannot read PDF ({type(e).__name__}: {detail})") from None
    text, blocks = "", []
    for number, page_text in enumerate(pages, start=1):
        if not page_text.strip():
            continue
        if text:
            text += "\n\n"
        blocks += _paragraphs(text + page_text, len(text), len(text) + len(page_text), page=number)
        text += page_text
    if not blocks:
        raise ExtractError(f"{path}: the PDF has no extractable text (scanned images?)")
    return Document(path, "pdf", str(title), text, blocks)


# ---------------------------------------------------------------------------------------------- jsonl


def json_lines(path: Path | str, text: str,
               error: type[LmstackError] = LmstackError) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed value) for each non-blank line; `error` names path:line of invalid JSON."""
    return json_records(path, enumerate(text.splitlines(), start=1), error)


def string_field(record: Any, field_name: str, where: str, error: type[LmstackError] = LmstackError) -> str:
    value = record.get(field_name) if isinstance(record, dict) else None
    if not isinstance(value, str):
        raise error(f"{where}: no string field {field_name!r} (choose one with --field)")
    return value


def _jsonl(path: Path, source: str, field_name: str) -> Document:
    text, blocks = "", []
    for number, record in json_lines(path, source, ExtractError):
        value = string_field(record, field_name, f"{path}:{number}", ExtractError)
        if not value.strip():
            continue
        if text:
            text += "\n\n"
        blocks.append(Block(len(text), len(text) + len(value), "record", line=number))
        text += value
    return Document(path, "jsonl", path.stem, text, blocks)
