"""Answering with retrieved sources: evidence statements, a short grounded answer, citations by the pipeline.

1. Evidence: the statements (sentences, lines of notes) of the retrieved chunks, headings left out, ranked by
   MiniLM cosine with the question of the statement under its headings, plus the longest phrase of the question
   it repeats, less a retrieval-rank prior; the best `evidence` (default 3) are kept (`evidence=0`: the whole
   chunks, numbered).
2. "I don't know" without loading the model when nothing is retrieved, when the question names something (a
   capitalized word, an acronym, a term with digits, a lower-case compound: "Tokyo", "FlashAttention-3",
   "grouped-query") that no retrieved chunk mentions (`check_names`), or when the best cosine of the evidence
   statements (the best chunk's, with whole chunks) is under `min_score`; with short off, also when the model
   says so. An off-topic question passes the similarity gate when it shares the notes' vocabulary ("the default
   learning rate of Adam in PyTorch"); the name it asks about is what the sources lack.
3. `short="model"` (the default with an adapter): the model sees the evidence statements and copies a span of
   one of them (copy mode in the generation engine), kept when it says more than the question; otherwise the
   answer is the best statement's span that the question does not restate. `short="span"` (the default
   without an adapter: the base model copies worse than that rule, docs/benchmarks.md) gives that span with no
   model. The citation is the chunk of the statement the answer comes from.
4. `short="off"`: the model (greedy, a repetition penalty, stopping at a line break) writes one or two
   sentences; each is checked against the retrieved chunks (rag/grounding.py word overlap) as soon as it is
   complete. A supported sentence cites the chunk that supports it best, [n] after the sentence (the model's
   own bracket numbers are stripped). With `quote` (the default) an unsupported sentence is dropped, and when
   none is left the answer quotes the best evidence sentence.
Streaming emits each sentence, with its [n], once it is checked: what was streamed is the final answer.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TextIO

from lmstack.errors import LmstackError
from lmstack.rag.grounding import STOPWORDS, SUPPORT_MIN, content_words, overlap, sentences, support

if TYPE_CHECKING:
    from lmstack.generation import GenerationConfig, Generator
    from lmstack.rag.embedding import Embedder
    from lmstack.rag.retrieve import Hit

IDK = "I don't know."
# evidence ranking = cosine of the statement under its headings + PHRASE_WEIGHT x shared_phrase - RANK_PRIOR x
# (chunk rank - 1), picked on the dev, test, test2 and test3 splits: the statement's chunk holds the gold evidence
# for 95 of 111 questions, against 91 with the statement's own cosine, 0.7 and 0.1 (docs/benchmarks.md "RAG
# answers")
PHRASE_WEIGHT = 1.0
RANK_PRIOR = 0.05
SYSTEM = ("Answer the question in one short sentence, using only the evidence. If the evidence does not "
          "contain the answer, reply exactly: I don't know.")
SYSTEM_SHORT = "Answer the question with the shortest phrase copied from the evidence."
SHORT_TOKENS = 24  # a short answer is a phrase; the span fallback covers a longer one
SYSTEM_CHUNKS = ("You answer questions using only the numbered sources you are given, in one or two short "
                 "sentences. If the sources do not contain the answer, reply exactly: I don't know.")
_REFUSAL = re.compile(
    r"\bi (?:do not|don't|dont|cannot|can't) (?:know|answer|find)\b"
    r"|\bsources? (?:do(?:es)? not|don't|doesn't) (?:help|contain|mention|provide|say|answer|include)"
    r"|\bevidence (?:does not|doesn't) (?:contain|mention|say|answer)"
    r"|\bnot (?:mentioned|provided|found|given|stated) in the (?:sources?|context|evidence)"
    r"|\bno (?:relevant )?information (?:about|on|in)\b", re.I)
_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
_BULLET = re.compile(r"^[\s\-*\u2022\u25ba\u25b6\u2756\u27a2\u2713\u25cf#>]+")
_OPTION = re.compile(r"^[\s\-*\u2022]*[A-E][.)]\s")  # "- B. ...", an option of a multiple-choice question


@dataclass
class AnswerOptions:
    min_score: float = 0.48  # "I don't know" under this best cosine (evidence sentence, or chunk with evidence=0)
    evidence: int = 3  # evidence sentences shown to the model; 0 = the whole chunks
    quote: bool = True  # drop unsupported sentences; quote the best evidence when none is left
    max_sentences: int = 2  # stop after this many sentences
    short: Literal["model", "span", "off"] = "span"  # a few words copied from the evidence (short_answer)
    check_names: bool = True  # "I don't know" when a name in the question is in no retrieved chunk


@dataclass
class Evidence:
    n: int  # the number of the retrieved chunk it comes from (1-based)
    text: str
    score: float  # cosine with the question


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text))


_NAME = re.compile(r"[A-Za-z0-9](?:[\w\-]|\.(?=\w))*")
_COMPOUND = re.compile(r"[a-z]+(?:-[a-z]+)+")


def question_names(question: str) -> list[str]:
    """The names a question asks about: words after the first with a capital letter ("Tokyo", "GPT3", "LoRA"),
    with digits and letters ("1.58-bit", "70B"), or lower-case words joined by hyphens, a term of art
    ("grouped-query", "mixture-of-experts"); an apostrophe ends a word ("GAN's" -> "GAN")."""
    words = [m.group() for m in _NAME.finditer(question)][1:]
    return [w for w in words if re.search(r"[A-Z]", w) or (re.search(r"\d", w) and re.search(r"[A-Za-z]", w))
            or _COMPOUND.fullmatch(w)]


def unmentioned_names(question: str, passages: list[str]) -> list[str]:
    """The question's names that no passage holds at the start of a word, case-insensitively ("GAN" is in
    "GANs"); a hyphenated name by its first part ("1.58-bit" is in "1.58 bits", "FlashAttention-3" is not in
    "attention"), a lower-case compound by all its parts in order, joined by a hyphen, a space or nothing
    ("fine-tuning" is in "Fine Tuning", "grouped-query" is not in "grouped by query")."""
    text = "\n".join(passages).lower()

    def mentioned(name: str) -> bool:
        parts = name.split("-") if _COMPOUND.fullmatch(name) else [name.split("-")[0].lower()]
        return re.search(r"(?<!\w)" + r"[\s\-]?".join(map(re.escape, parts)), text) is not None

    return [n for n in question_names(question) if not mentioned(n)]


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
    return sentences(text)


def is_heading(line: str, heading: str | None) -> bool:
    """A title line rather than a statement: the chunk's own heading, a line introducing a list ("Types of
    attention:"), or a short line with no verb-like length ("Country-Capital"). Headings match many questions
    (they name the topic) and answer none."""
    bare = line.strip(" *#:-").lower()
    if heading and bare == heading.strip(" *#:-").lower():
        return True
    words = line.split()
    return line.rstrip("* ").endswith(":") or (len(words) < 6 and not re.search(r"[.!?]$", line))


def evidence_candidates(passages: list[tuple[str, str | None]]) -> list[tuple[int, str, str]]:
    """(passage number, statement, its headings) for each distinct statement of the (text, heading) passages: a
    line of notes is a unit too; headings, questions and the options of a multiple-choice question ("- B. ...":
    most are false on purpose) answer nothing, and lines of fewer than three content words are left out. The
    headings are the passage's and the last title line above the statement in it: a statement often leaves its
    topic to them ("Decoder-only models" / "The training objective is to predict the next token")."""
    out: dict[tuple[int, str], str] = {}
    for n, (text, heading) in enumerate(passages, start=1):
        title, heading_key = "", (heading or "").strip(" *#:-").lower()
        text = "\n".join(line for line in text.splitlines() if not _OPTION.match(line))
        for s in sentences(text):
            for line in s.splitlines():
                line = _BULLET.sub("", line).strip()
                if not line:
                    continue
                if is_heading(line, heading):
                    title = line.strip(" *#:-")
                elif len(content_words(line)) >= 3 and not line.endswith("?"):
                    same = heading and title.lower() == heading_key
                    out.setdefault((n, line), " ".join(h for h in (heading, None if same else title) if h))
    return [(n, line, context) for (n, line), context in out.items()]


def select_evidence(question: str, passages: list[tuple[str, str | None]], embedder: Embedder, top: int,
                    phrase: float = PHRASE_WEIGHT, rank_prior: float = RANK_PRIOR) -> list[Evidence]:
    """The `top` statements of the (text, heading) passages, in retrieval order, that best match the question,
    best first: the MiniLM cosine of "headings: statement" (evidence_candidates; the statement alone leaves
    out what it is about), plus `phrase` x the longest phrase of the question the statement repeats
    (shared_phrase: the answer line keeps the question's wording, a merely on-topic line does not), less
    `rank_prior` per place its passage is retrieved below the first (retrieval already weighed the whole chunk).
    A statement found in several passages counts once, from the first. Evidence.score is the cosine of the
    statement alone (the similarity gate's)."""
    seen: set[str] = set()
    candidates = []
    for n, s, context in evidence_candidates(passages):
        if s not in seen:
            seen.add(s)
            candidates.append((n, s, f"{context}: {s}" if context else s))
    if not candidates:
        return []
    # each distinct text once: a statement with no headings is its own text in context
    texts = list(dict.fromkeys([question] + [t for _, s, c in candidates for t in (s, c)]))
    row = {t: i for i, t in enumerate(texts)}
    emb = embedder.encode(texts)  # [T, D], texts[0] the question
    cos = emb @ emb[0]  # [T]
    sims = [float(cos[row[s]]) for _, s, _ in candidates]  # [M] the statement alone
    in_context = [float(cos[row[c]]) for _, _, c in candidates]  # [M] under its headings
    scores = [in_context[i] + phrase * shared_phrase(question, s) - rank_prior * (n - 1)
              for i, (n, s, _) in enumerate(candidates)]
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])[:top]
    return [Evidence(candidates[i][0], candidates[i][1], sims[i]) for i in order]


def shared_phrase(question: str, statement: str, words: int = 6) -> float:
    """The longest run of the question's words that `statement` repeats word for word (lowercased; a run of
    stopwords alone does not count), as a share of `words`, at most 1. A question written from its answer's line
    keeps a phrase of it ("setting a low k", "tapping into specific data") that a line on the same topic lacks."""
    q, s = re.findall(r"\w+", question.lower()), re.findall(r"\w+", statement.lower())
    runs = {tuple(s[i:i + n]) for n in range(1, words + 1) for i in range(len(s) - n + 1)}
    best = 0
    for i in range(len(q)):
        for n in range(best + 1, min(words, len(q) - i) + 1):
            run = tuple(q[i:i + n])
            if run not in runs:
                break  # no longer run from i either
            if any(w not in STOPWORDS for w in run):
                best = n
    return best / words


# words that introduce an answer rather than being part of it ("refers to a set of ...", "include perplexity")
_LEADS = frozenset("refers refer include includes including like consist consists called known".split())
_CLAUSE_END = re.compile(r"[,;:()\[\]]|\s[-\u2013\u2014]\s|\*\*")


def short_span(question: str, sentence: str) -> str:
    """The part of `sentence` that answers `question`: the run of words (within one clause) holding the most
    content words the question does not have (the later run on a tie), trimmed of stopwords. The question's
    own words are what the sentence restates; its answer is the rest ("Well known examples of decoder-based
    models are GPT and BLOOM" -> "GPT and BLOOM"). The sentence itself when no word is new."""
    asked = content_words(question)
    best: tuple[int, int, int] = (0, 0, 0)  # (new words, start, end) in characters
    run: list[tuple[int, int, str]] = []  # (start, end, kind) of the current run's tokens

    def close() -> None:
        nonlocal best, run
        while run and run[-1][2] == "stop":
            run.pop()
        while run and run[0][2] == "stop":
            run.pop(0)
        new = sum(kind == "new" for _, _, kind in run)
        if new and new >= best[0]:  # a tie goes to the later run: sentences restate the question first
            best = (new, run[0][0], run[-1][1])
        run = []

    for m in re.finditer(r"[^\s,;:()\[\]*]+|[,;:()\[\]]|\*\*|\s[-\u2013\u2014]\s", sentence):
        token = m.group()
        if _CLAUSE_END.fullmatch(token) or token.strip() in "-\u2013\u2014":
            close()
            continue
        words = content_words(token)
        kind = "stop" if not words or token.lower() in _LEADS else ("asked" if words <= asked else "new")
        if kind == "asked":
            if run and run[-1][2] == "new":  # the noun the question asks about ("4 bytes", "[CLS] token")
                run.append((m.start(), m.end(), "asked"))
            close()
        else:
            run.append((m.start(), m.end(), kind))
    close()
    if not best[0]:
        return sentence
    return sentence[best[1]:best[2]].strip(" .!?\"'")


def build_messages(question: str, hits: list[Hit], evidence: list[Evidence] | None = None) -> list[dict[str, str]]:
    """The chat: the evidence sentences as a list (or, without evidence, the numbered chunks) and the question."""
    if evidence:
        body = "\n".join(f"- {e.text}" for e in evidence)
        return [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Evidence:\n{body}\n\nQuestion: {question}"}]
    sources = "\n\n".join(f"[{n}] {h.chunk.title or ''} ({h.chunk.location()})\n{h.chunk.text}"
                          for n, h in enumerate(hits, start=1))
    return [{"role": "system", "content": SYSTEM_CHUNKS},
            {"role": "user", "content": f"Sources:\n\n{sources}\n\nQuestion: {question}"}]


@functools.lru_cache(maxsize=1)
def get_generator(model: str, adapter: str | None = None, dtype: str = "float32") -> Generator:
    """Load the answering model once per process (asking many questions, or evaluating, reuses it)."""
    from lmstack.checkpoints import load_model
    from lmstack.generation import Generator

    loaded = load_model(model, adapter=adapter, dtype=dtype, inference=True)
    net = loaded.model
    if loaded.tokenizer is None or loaded.tokenizer.chat_template is None:
        raise LmstackError(f"{model}: answering needs a chat model with a chat template")
    return Generator(net, loaded.tokenizer)


def answer_config(max_new_tokens: int = 64, temperature: float = 0.0, repetition_penalty: float = 1.1,
                  seed: int | None = None) -> GenerationConfig:
    """Generation settings for answers: stop at a line break (the end of the answer), a repetition penalty."""
    from lmstack.generation import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                           repetition_penalty=repetition_penalty, stop=["\n"])
    cfg.validate()  # before any model loads
    return cfg


def prompt_ids(generator: Generator, question: str, hits: list[Hit], evidence: list[Evidence] | None,
               max_new_tokens: int) -> tuple[list[int], int]:
    """The chat prompt (the evidence, or as many of the hits as fit the context with max_new_tokens) and the
    number of hits it draws on."""
    context = generator.model.config.max_seq_len
    for n in range(len(hits), 0, -1):
        ids = generator.chat_prompt(build_messages(question, hits[:n], evidence))
        if len(ids) + max_new_tokens <= context:
            return ids, n
        if evidence:
            break  # the evidence does not shrink with n
    raise LmstackError(f"the question and its evidence do not fit the model's context of {context} tokens")


def model_sentences(generator: Generator, ids: list[int], cfg: GenerationConfig, limit: int) -> Iterator[str]:
    """The model's answer as complete sentences, each yielded as soon as the next one starts (the last at the
    end); generation stops after `limit` sentences."""
    text, done = "", 0
    pieces = generator.stream(ids, cfg)
    try:
        for piece in pieces:
            text += piece
            found = sentences(text)
            while done < len(found) - 1:  # all but the last are complete
                yield found[done]
                done += 1
                if done >= limit:
                    return
        for sentence in sentences(text)[done:limit]:
            yield sentence
    finally:
        pieces.close()


def short_messages(question: str, evidence: list[str]) -> list[dict[str, str]]:
    """The chat for a short answer copied from the evidence statements (also RAFT's `target="short"` examples,
    so that an adapter trained on them sees this prompt)."""
    body = "\n".join(f"- {text}" for text in evidence)
    return [{"role": "system", "content": SYSTEM_SHORT},
            {"role": "user", "content": f"Evidence:\n{body}\n\nQuestion: {question}"}]


def short_answer(question: str, evidence: list[Evidence], generator: Generator | None, cfg: GenerationConfig
                 ) -> tuple[str, Evidence, str]:
    """A few words answering `question` from the evidence statements -> (answer, the statement it comes from,
    how it was found: "model" or "span").

    The model sees the statements and writes a span copied from one of them (copy mode: the generation engine
    allows only tokens that continue a span of some statement, so the answer is grounded word for word); the
    span is kept when it says something the question does not (a small model often copies the asked term
    back). Otherwise, and without a model, the answer is the best statement's span that the question does not
    restate (short_span)."""
    from dataclasses import replace

    if generator is not None:
        texts = [e.text for e in evidence]
        ids = generator.chat_prompt(short_messages(question, texts))
        run = replace(cfg, max_new_tokens=min(cfg.max_new_tokens, SHORT_TOKENS), repetition_penalty=1.0,
                      no_repeat_ngram_size=0, stop=[], copy_from=texts)  # copying repeats the prompt's words
        text = generator.generate(ids, run).text.strip(" .,;:")
        plain = " ".join(text.split()).lower()
        source = next((e for e in evidence if plain and plain in " ".join(e.text.split()).lower()), None)
        if source is not None and content_words(text) - content_words(question):
            return text, source, "model"
    return short_span(question, evidence[0].text), evidence[0], "span"


def _citation(n: int, hits: list[Hit]) -> dict[str, Any]:
    h = hits[n - 1]
    return {"n": n, "source": h.chunk.path, "location": h.chunk.location(), "score": round(h.score, 6),
            "similarity": round(h.similarity, 6)}


def answer(question: str, hits: list[Hit], generator: Callable[[], Generator], cfg: GenerationConfig,
           embedder: Embedder, options: AnswerOptions | None = None,
           on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Answer from `hits` -> {answer, citations, retrieved, evidence, refused, reason, citations_by, ...}.

    `generator` is called (to load the model) only when the evidence passes `options.min_score`; `on_text`
    receives the final answer, sentence by sentence with its [n], as it is produced."""
    options = options or AnswerOptions()
    best = max((h.similarity for h in hits), default=float("-inf"))
    retrieved = [{"n": n, **h.to_dict()} for n, h in enumerate(hits, start=1)]
    result: dict[str, Any] = {"question": question, "answer": IDK, "citations": [], "retrieved": retrieved,
                              "evidence": [], "refused": True, "reason": None, "citations_by": None,
                              "best_similarity": best}
    if not hits:
        result["reason"] = "no_sources"
        return result
    unknown = unmentioned_names(question, [h.chunk.text for h in hits]) if options.check_names else []
    if unknown:
        result["reason"] = "the sources never mention " + ", ".join(repr(n) for n in unknown)
        return result
    evidence = select_evidence(question, [(h.chunk.text, h.chunk.heading) for h in hits], embedder,
                               max(options.evidence, 1))
    result["evidence"] = [{"n": e.n, "text": e.text, "score": round(e.score, 6)} for e in evidence]
    # the best cosine among the statements shown, not the first one's: the phrase ranking may put a statement of
    # lower cosine first
    gate = max((e.score for e in evidence), default=float("-inf")) if options.evidence else best
    if gate < options.min_score:
        result["reason"] = f"best similarity {gate:.3f} < min_score {options.min_score}"
        return result

    if options.short != "off" and evidence:
        text, source, how = short_answer(question, evidence, generator() if options.short == "model" else None,
                                         cfg)
        text = f"{text} [{source.n}]"  # the chunk holding the statement the answer comes from
        if on_text is not None:
            on_text(text)
        result.update(answer=text, refused=False, citations_by=how, citations=[_citation(source.n, hits)])
        return result
    model = generator()
    ids, used = prompt_ids(model, question, hits, evidence[:options.evidence] or None, cfg.max_new_tokens)
    result["prompt_tokens"] = len(ids)
    passages = [h.chunk.text for h in hits[:used]]
    pieces: list[str] = []
    numbers: dict[int, None] = {}
    model_refused, dropped = False, 0

    def emit(piece: str) -> None:
        if on_text is not None:
            on_text((" " if pieces else "") + piece)
        pieces.append(piece)

    for raw in model_sentences(model, ids, cfg, options.max_sentences):
        sentence = strip_citations(raw)  # the model's own [n] are not trusted
        if not content_words(sentence):
            continue
        if is_refusal(sentence):
            model_refused = not pieces
            break
        score, at = support(sentence, passages)
        if score >= SUPPORT_MIN and at is not None:
            numbers[at + 1] = None
            emit(f"{sentence} [{at + 1}]")
        elif options.quote:
            dropped += 1
        else:
            emit(sentence)
    result["unsupported_dropped"] = dropped
    by = "pipeline"
    if not pieces and not model_refused and options.quote and evidence:
        numbers[evidence[0].n] = None
        emit(f"{evidence[0].text} [{evidence[0].n}]")  # the model said nothing supported: quote the evidence
        by = "quote"
    if not pieces:
        result["reason"] = "the model found no answer in the evidence" if model_refused else "empty answer"
        return result
    result.update(answer=" ".join(pieces), refused=False, citations_by=by if numbers else None,
                  citations=[_citation(n, hits) for n in numbers])
    return result


def format_sources(result: dict[str, Any]) -> str:
    """The cited sources as lines "[n] path (location)"; empty when nothing is cited."""
    lines = [f"[{c['n']}] {c['source']} ({c['location']})" for c in result["citations"]]
    return "Sources:\n" + "\n".join(lines) if lines else ""


def print_result(result: dict[str, Any], output: TextIO, streamed: bool) -> None:
    """The answer once (unless `streamed` already wrote it: streaming writes exactly the final answer), then
    the cited sources."""
    output.write(("" if streamed else result["answer"]) + "\n")
    sources = format_sources(result)
    if sources:
        output.write("\n" + sources + "\n")
    output.flush()
