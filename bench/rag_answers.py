"""RAG answer quality on the course notes: one row per pipeline setting, one table in docs/benchmarks.md.

    python bench/rag_answers.py --label "evidence + quote" [--split test] [--set evidence=3 --set quote=true]
                                [--latency 5] [--index /tmp/notes.sqlite]

Each run answers the questions of one split with `rag_ask(question, index=..., dtype="bfloat16", **--set)` in this
process and adds (or replaces) the row `--label` in bench/rag_answers.rows.json, then rewrites the table from
all stored rows. The baseline row was made by running this script with PYTHONPATH pointing at a copy of the
pipeline before the changes (`git show 9f45d9d:src/...`).

--train-adapter DIR trains the adapter that `rag ask --adapter` answers with (by copying a span of the evidence):
`raft build --target short` over the dev questions, then `lmstack finetune` with LoRA (FINETUNE below); the test
questions are never trained on.

Questions: tests/data/course_notes_qa_more.jsonl, split "dev" (tuning), "test" (held out until rows 4-5, whose
failures were then read), "test2" (held out: 24 questions written afterwards from lines of the notes drawn at
random, seed 20261202, and only answered by finished pipelines, until the evidence ranking of row 12 was tuned on
dev, test and test2), "test3" (held out: 24 more, from lines drawn with seed 20261204, written before row 11 was
run; lines stating nothing, such as formulas, quiz options and example prompts, skipped; its answers were read,
and showed the similarity gate reading the first statement's cosine) or "test4" (held out: 24 more, seed 20261205,
the same way, written before the gate read the best cosine of the statements shown, and answered once after)
or "test5" (held out: 24 more, seed 20261206, the same way, written before rows 18-24 were run; its failures
were read after row 25) or "test6" (held out: 24 more, seed 20261207, the same way, written before the evidence
pool of row 29 was first run; questions repeating a tuning question skipped) or "test7" (held out: 24 more, seed
20261208, the same way, written before the hybrid score fusion of rows 47-58 was run on it) or "test8" (held out:
24 more, seed 20261209, written after rows 47-58, before rows 59-60, with the pipeline unchanged) or "test9" (held
out: 24 more, seed 20261210, written after rows 61-62, before rows 63-64);
an `"answer": null` question is not answerable from the notes. --split dev also adds the 47 questions of
tests/data/course_notes_qa.jsonl.

Measures (answerable = gold answer given):
- EM / F1: SQuAD exact match and token F1 of the answer (citations stripped) against the gold, over the
  answerable questions; an "I don't know" scores 0.
- citation precision: over the citations of answered answerable questions, the share whose chunk contains
  the evidence (the gold note, covering at least half of the gold snippet: rag/evaluate.py's relevance).
- faithfulness: over answered questions, the share of answer sentences supported by a retrieved chunk
  (rag/grounding.py: >= 70% of the sentence's content words in one chunk).
- repetition: the share of answers holding a repeated 8-gram of tokens.
- unanswerable refused / answerable refused: the share of "I don't know" in each group.
- p50 `rag ask` s (--latency N): a fresh `python -m lmstack rag ask` process per question on the first N
  questions of the split, model load included (wall clock of the whole process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTES = ROOT.parent / "shared" / "data" / "course-notes"
QA_MORE = ROOT / "tests" / "data" / "course_notes_qa_more.jsonl"
QA_ORIG = ROOT / "tests" / "data" / "course_notes_qa.jsonl"
ROWS = Path(__file__).with_name("rag_answers.rows.json")
TITLE = "RAG answers: grounded, short, cited (course notes)"


def questions(split: str) -> list[dict[str, Any]]:
    items = [json.loads(line) for line in QA_MORE.read_text().splitlines() if line.strip()]
    items = [{**q, "line": n} for n, q in enumerate(items, start=1) if q["split"] == split]
    if split == "dev":
        items += [{**json.loads(line), "line": n, "split": "dev"}
                  for n, line in enumerate(QA_ORIG.read_text().splitlines(), start=1) if line.strip()]
    return items


def interleave(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Answerable and unanswerable questions mixed in their proportion, so that --limit keeps both."""
    answerable = [q for q in items if q["answer"] is not None]
    unanswerable = [q for q in items if q["answer"] is None]
    step = max(1, round(len(answerable) / max(1, len(unanswerable))))
    out: list[dict[str, Any]] = []
    for i in range(0, max(len(answerable), 1), step):
        out += answerable[i:i + step] + unanswerable[i // step:i // step + 1]
    return out + unanswerable[len(range(0, max(len(answerable), 1), step)):]


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def cites_evidence(citation_n: int, result: dict[str, Any], item: dict[str, Any], relevance: Any) -> bool:
    """Whether the retrieved chunk numbered `citation_n` holds the gold evidence."""
    chunk = next(r for r in result["retrieved"] if r["n"] == citation_n)
    if not (chunk["path"] == item["doc"] or chunk["path"].endswith("/" + item["doc"])):
        return False
    s, e = relevance.snippet_span(chunk["path"], item["snippet"], item["line"])
    return min(e, chunk["end"]) - max(s, chunk["start"]) >= (e - s) / 2


def quality(index: str, items: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    from lmstack.rag import rag_ask
    from lmstack.rag.evaluate import Relevance, exact_match, token_f1
    from lmstack.rag.grounding import faithfulness, repeated_ngram

    relevance = Relevance(str(QA_MORE))
    em, f1, cited, cited_ok, faithful, repeats, refused_ans, refused_unans, per = [], [], 0, 0, [], 0, 0, 0, []
    for i, item in enumerate(items, start=1):
        t0 = time.perf_counter()
        result = rag_ask(item["question"], index=index, stream=False, dtype="bfloat16", **settings)
        seconds = time.perf_counter() - t0
        text, refused = result["answer"], result["refused"]
        if item["answer"] is None:
            refused_unans += refused
        else:
            refused_ans += refused
            em.append(0.0 if refused else exact_match(text, item["answer"]))
            f1.append(0.0 if refused else token_f1(text, item["answer"]))
            if not refused:
                for c in result["citations"]:
                    cited += 1
                    cited_ok += cites_evidence(c["n"], result, item, relevance)
        if not refused:
            score = faithfulness(text, [r["text"] for r in result["retrieved"]])
            if score is not None:
                faithful.append(score)
            repeats += repeated_ngram(text)
        per.append({"question": item["question"], "gold": item["answer"], "answer": text, "refused": refused,
                    "citations": [c["n"] for c in result["citations"]], "seconds": round(seconds, 2)})
        print(f"[{i}/{len(items)}] {seconds:5.1f}s {item['question'][:60]!r} -> {text[:100]!r}", flush=True)
    answerable = sum(q["answer"] is not None for q in items)
    return {"n": len(items), "answerable": answerable, "em": statistics.mean(em), "f1": statistics.mean(f1),
            "citation_precision": cited_ok / cited if cited else None,
            "faithfulness": statistics.mean(faithful) if faithful else None,
            "repetition": repeats / len(items),
            "unanswerable_refused": refused_unans / (len(items) - answerable) if len(items) > answerable else None,
            "answerable_refused": refused_ans / answerable,
            "in_process_p50_s": statistics.median(p["seconds"] for p in per), "per_question": per}


FINETUNE = ["--method", "lora", "--rank", "16", "--alpha", "32", "--targets", "all-linear", "--lr", "5e-4",
            "--batch-size", "4", "--max-steps", "96", "--dtype", "float32"]


def train_adapter(out: Path, splits: list[str]) -> str:
    """A short-answer adapter from the answerable questions of `splits` only (never test4-9): `raft build
    --target short` twice (seeds 0 and 1: other distractors), then `lmstack finetune` (LoRA) on both sets; -> the
    adapter folder."""
    from lmstack.rag import raft_build

    out.mkdir(parents=True, exist_ok=True)
    qa = out / "train_qa.jsonl"
    qa.write_text("".join(json.dumps({k: q[k] for k in ("question", "answer", "doc", "snippet")}) + "\n"
                          for split in splits for q in questions(split) if q["answer"] is not None))
    sets = []
    for seed in (0, 1):
        path = out / f"raft_short{seed}.jsonl"
        raft_build(corpus=str(NOTES), out=str(path), qa=str(qa), target="short", seed=seed, progress=False)
        sets.append(path.read_text())
    (out / "raft_short.jsonl").write_text("".join(sets))
    cmd = [sys.executable, "-m", "lmstack", "finetune", "--model", "smollm2-135m-instruct", "--data",
           str(out / "raft_short.jsonl"), "--out", str(out / "adapter"), *FINETUNE]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, env=os.environ)
    return str(out / "adapter")


def cli_option(key: str, value: Any) -> list[str]:
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + key.replace("_", "-")]
    return [flag, str(value)]


def latency(index: str, items: list[dict[str, Any]], settings: dict[str, Any], n: int) -> float:
    """p50 wall seconds of a fresh `lmstack rag ask` process (imports and model loads included)."""
    times = []
    for item in items[:n]:
        cmd = [sys.executable, "-m", "lmstack", "rag", "ask", "--index", index, "--dtype", "bfloat16",
               *[a for k, v in settings.items() for a in cli_option(k, v)], item["question"]]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=os.environ)
        times.append(time.perf_counter() - t0)
        print(f"latency {times[-1]:.1f}s", flush=True)
    return statistics.median(times)


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: dict[str, dict[str, Any]]) -> str:
    rows = dict(sorted(rows.items(), key=lambda kv: int(kv[0].split()[0])))  # labels start with the row number
    lines = ["| row | split (n) | EM | F1 | citation precision | faithfulness | repetition | unanswerable refused "
             "| answerable refused | p50 `rag ask` s (fresh process) | in-process p50 s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['split']} ({r['n']}) | {fmt(r['em'])} | {fmt(r['f1'])} | "
                     f"{fmt(r['citation_precision'])} | {fmt(r['faithfulness'])} | {fmt(r['repetition'])} | "
                     f"{fmt(r['unanswerable_refused'])} | {fmt(r['answerable_refused'])} | "
                     f"{fmt(r.get('latency_p50_s'), 1)} | {fmt(r['in_process_p50_s'], 1)} |")
    notes = [f"- **{label}**: `{r['settings']}`{' — ' + r['note'] if r.get('note') else ''}"
             for label, r in rows.items()]
    return "\n".join(lines + [""] + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--split", choices=["dev", "test", "test2", "test3", "test4", "test5", "test6", "test7",
                                            "test8", "test9"], default="test9")
    parser.add_argument("--set", action="append", default=[], help="a rag_ask keyword: key=value (JSON value)")
    parser.add_argument("--latency", type=int, default=0, help="time N fresh `rag ask` processes")
    parser.add_argument("--index", default=None, help="a course-notes index (built in a temporary folder if absent)")
    parser.add_argument("--note", default="")
    parser.add_argument("--limit", type=int, default=None, help="the first N questions (answerable and not, mixed)")
    parser.add_argument("--contended", action="store_true", help="label this row's times as contended")
    parser.add_argument("--train-adapter", metavar="DIR", default=None,
                        help="first train a short-answer LoRA adapter on the --train-splits questions into DIR, then "
                             "answer with it")
    parser.add_argument("--train-splits", nargs="+", choices=["dev", "test", "test2", "test3"], default=["dev"])
    args = parser.parse_args()
    settings = dict(kv.split("=", 1) for kv in args.set)
    settings = {k: parse_value(v) for k, v in settings.items()}
    if args.train_adapter:
        settings["adapter"] = train_adapter(Path(args.train_adapter), args.train_splits)
    index = args.index or str(Path(tempfile.mkdtemp(prefix="rag_answers.")) / "notes.sqlite")
    if not Path(index).exists():
        from lmstack.rag import rag_index
        rag_index([str(NOTES)], index=index, progress=False)
    items = interleave(questions(args.split))[:args.limit]
    split = args.split + (f", first {len(items)}" if args.limit else "")
    row = {"split": split, "settings": settings, "note": args.note, "contended": args.contended,
           **quality(index, items, settings)}
    if args.latency:
        row["latency_p50_s"] = latency(index, items, settings, args.latency)
    rows = json.loads(ROWS.read_text()) if ROWS.exists() else {}
    rows[args.label] = row
    ROWS.write_text(json.dumps(rows, indent=1) + "\n")
    render(rows)


def render(rows: dict[str, dict[str, Any]]) -> None:
    """Print the table of all rows and record it in docs/benchmarks.md."""
    contended = [label.split()[0] for label, r in sorted(rows.items()) if r.get("contended")]
    body = table(rows) + (f"\n\nRows {', '.join(contended)}: times taken while other jobs shared the 2 cores "
                          "(load average 5-12), contended." if contended else "")
    print(body)
    body += ("\n\nEach row: `--label LABEL --split SPLIT --set KEY=VALUE ...` (`--latency 3` for the fresh-process "
             "column); row 5: `--train-adapter DIR` instead of an adapter setting; row 10: the adapter of "
             "`--train-adapter DIR --train-splits dev test`, trained once and answered with "
             "`--set adapter=DIR/adapter`; row 13: `--train-adapter DIR --train-splits dev test test2`; row 24: "
             "`--train-adapter DIR --train-splits dev test test2 test3`, and the same for rows 55 and 63, whose "
             "adapters rows 56-58, 60, 62 and 65-69 answer with `--set adapter=DIR/adapter`.")
    record(TITLE, body, "python bench/rag_answers.py --label LABEL --split SPLIT [--set KEY=VALUE ...] [--latency 3]")


if __name__ == "__main__":
    main()
