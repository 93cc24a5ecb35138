"""`raft build`: oracle kept in a fraction p of examples (p takes effect), k distractors, shuffled documents,
quoting chain-of-thought answers ending in <ANSWER>:, a chat JSONL that the instruction readers accept."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.errors import LmstackError
from lmstack.rag import raft_build
from lmstack.rag.raft import ANSWER, BEGIN_QUOTE, END_QUOTE, final_answer, parse_question

from rag_helpers import TOPICS, write_corpus

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    ("Why does bread rise?", "yeast ferments sugar into carbon dioxide", "bread",
     "Bread rises because yeast ferments sugar into carbon dioxide."),
    ("What causes tides?", "mainly the Moon's gravity", "tides", "Tides are caused mainly by the Moon's gravity."),
    ("What is a violin bow strung with?", "horsehair and rosin", "violin",
     "The bow is strung with horsehair and rosin."),
    ("What rock does lava cool into?", "basalt", "volcano", None),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("raft")
    write_corpus(root / "docs", TOPICS)
    qa = root / "qa.jsonl"
    rows = [{"question": q, "answer": a, "doc": f"{d}.txt", **({"snippet": s} if s else {})}
            for q, a, d, s in QUESTIONS]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows * 50))  # 200 examples: enough to measure p
    return root


def build(corpus: Path, name: str, **kw) -> list[dict]:
    out = corpus / name
    kw.setdefault("chunk_tokens", 16)
    raft_build(corpus=str(corpus / "docs"), out=str(out), qa=str(corpus / "qa.jsonl"), progress=False, **kw)
    return [json.loads(line) for line in out.read_text().splitlines()]


def oracle_shown(example: dict, chunk_text: dict[str, str]) -> bool:
    user = example["messages"][1]["content"]
    return f"<DOCUMENT>{chunk_text[example['raft']['oracle']]}</DOCUMENT>" in user


def test_p_takes_effect_and_k_distractors(corpus) -> None:
    fractions = {}
    for p in (0.0, 0.5, 0.8, 1.0):
        examples = build(corpus, f"p{p}.jsonl", p=p, distractors=3, seed=1)
        assert len(examples) == 200
        texts = {}
        for e in examples:  # the chunk texts, read back from the documents shown
            user = e["messages"][1]["content"]
            for cid, text in zip(e["raft"]["documents"], re.findall(r"<DOCUMENT>(.*?)</DOCUMENT>", user, re.S)):
                texts[cid] = text
        for e in examples:
            docs = e["raft"]["documents"]
            assert len(docs) == 4 and len(set(docs)) == 4  # oracle + 3 distractors, or 4 distractors
            assert (e["raft"]["oracle"] in docs) == e["raft"]["oracle_included"]
            if e["raft"]["oracle_included"]:
                assert oracle_shown(e, texts)
        fractions[p] = sum(e["raft"]["oracle_included"] for e in examples) / len(examples)
    assert fractions[0.0] == 0.0 and fractions[1.0] == 1.0
    assert 0.4 <= fractions[0.5] <= 0.6 and 0.72 <= fractions[0.8] <= 0.88
    with_k = build(corpus, "k1.jsonl", p=1.0, distractors=1)
    assert {len(e["raft"]["documents"]) for e in with_k} == {2}


def test_documents_are_shuffled_and_answers_quote_the_oracle(corpus) -> None:
    examples = build(corpus, "shuffled.jsonl", p=1.0, distractors=4, seed=3)
    positions = {e["raft"]["documents"].index(e["raft"]["oracle"]) for e in examples}
    assert len(positions) == 5  # the oracle appears in every slot
    for e in examples:
        system, user, assistant = (m["content"] for m in e["messages"])
        assert [m["role"] for m in e["messages"]] == ["system", "user", "assistant"]
        assert BEGIN_QUOTE in system and user.endswith("Question: " + user.rsplit("Question: ", 1)[1])
        target = assistant
        quote = re.fullmatch(rf".*{BEGIN_QUOTE}(.*?){END_QUOTE}.*", target, re.S).group(1)
        oracle_doc = [d for d in re.findall(r"<DOCUMENT>(.*?)</DOCUMENT>", user, re.S)][
            e["raft"]["documents"].index(e["raft"]["oracle"])]
        assert quote and quote in " ".join(oracle_doc.split())  # the quote is copied from the oracle
        assert target.endswith(f"{ANSWER} {e['raft']['answer']}") and final_answer(target) == e["raft"]["answer"]
    bread = next(e for e in examples if "bread rise" in e["messages"][1]["content"])
    assert f"{BEGIN_QUOTE}Bread rises because yeast ferments sugar into carbon dioxide.{END_QUOTE}" in \
        bread["messages"][2]["content"]  # the QA file's snippet is the quote
    basalt = next(e for e in examples if "lava" in e["messages"][1]["content"])
    assert "basalt" in re.search(rf"{BEGIN_QUOTE}(.*?){END_QUOTE}", basalt["messages"][2]["content"]).group(1)


def test_short_target_is_the_rag_ask_prompt_with_the_oracle_statement(corpus) -> None:
    """target short: `rag ask`'s short-answer chat over evidence statements that include the oracle's quote,
    answered by the gold phrase; every example shows the oracle (p does not apply)."""
    from lmstack.rag.answer import SYSTEM_SHORT
    from lmstack.rag.grounding import overlap

    examples = build(corpus, "short.jsonl", p=0.0, distractors=2, seed=2, target="short", evidence=2, limit=8)
    assert len(examples) == 8 and all(e["raft"]["oracle_included"] for e in examples)
    for e in examples:
        system, user, assistant = (m["content"] for m in e["messages"])
        assert system == SYSTEM_SHORT and assistant == e["raft"]["answer"]
        statements = [line[2:] for line in user.split("\n\nQuestion: ")[0].splitlines()[1:]]
        assert user.startswith("Evidence:\n- ") and len(statements) <= 2
        snippet = next(s for q, a, d, s in QUESTIONS if a == assistant)
        if snippet:
            assert any(overlap(snippet, t) >= 0.7 for t in statements), (snippet, statements)
    with pytest.raises(LmstackError, match="target must be cot or short"):
        build(corpus, "bad.jsonl", target="long")


def test_without_the_oracle_no_overlapping_chunk_leaks_it(corpus, tmp_path) -> None:
    from lmstack.rag.embedding import get_embedder
    from lmstack.rag.raft import corpus_chunks

    # 24-token chunks repeating up to 11 tokens: neighbours share sentences, so a neighbour of the oracle
    # holds part of it and must not be a distractor
    chunks = corpus_chunks(str(corpus / "docs"), get_embedder("minilm-l6"), 24, 11)
    assert any(a.path == b.path and b.start < a.end for a, b in zip(chunks, chunks[1:]))
    examples = build(corpus, "p0.jsonl", p=0.0, distractors=3, chunk_tokens=24, overlap=11)
    for e in examples:
        user, target = e["messages"][1]["content"], e["messages"][2]["content"]
        assert e["raft"]["oracle"] not in e["raft"]["documents"]
        quote = re.search(rf"{BEGIN_QUOTE}(.*?){END_QUOTE}", target).group(1)
        assert quote not in " ".join(user.split())


def test_alpaca_format_and_the_instruction_readers(corpus) -> None:
    alpaca = build(corpus, "alpaca.jsonl", format="alpaca", distractors=2)
    assert set(alpaca[0]) == {"system", "instruction", "input", "output", "raft"}
    assert alpaca[0]["input"].count("<DOCUMENT>") == 3
    instruct = pytest.importorskip("lmstack.data.instruct")  # `lmstack finetune`'s readers (fine-tuning branch)
    for name, fmt in (("alpaca.jsonl", "alpaca"), ("p1.0.jsonl", "chat")):
        examples, detected = instruct.read_examples(corpus / name)
        assert detected == fmt and len(examples) == 200
        assert examples[0].messages[-1]["role"] == "assistant" and ANSWER in examples[0].messages[-1]["content"]


def test_bad_input_is_one_line_errors(corpus, tmp_path) -> None:
    with pytest.raises(LmstackError, match="p must be in"):
        build(corpus, "bad.jsonl", p=1.5)
    with pytest.raises(LmstackError, match="lower --distractors"):
        build(corpus, "bad.jsonl", distractors=50)
    bad_qa = tmp_path / "qa.jsonl"
    bad_qa.write_text('{"question": "q?", "answer": "a", "doc": "nowhere.txt"}\n')
    with pytest.raises(LmstackError, match=r"qa\.jsonl:1: document 'nowhere\.txt' is not in the corpus"):
        raft_build(corpus=str(corpus / "docs"), out=str(tmp_path / "o.jsonl"), qa=str(bad_qa), progress=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmstack", "raft", "build", "--corpus", str(corpus / "docs"),
                           "--out", str(tmp_path / "o.jsonl"), "--qa", str(corpus / "qa.jsonl"), "--p", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: p must be in [0, 1], not 2.0"


def test_final_answer() -> None:
    assert final_answer(f"... {END_QUOTE} so.\n{ANSWER} 4 bytes") == "4 bytes"
    assert final_answer(f"{ANSWER} between 0 and 1 <DOCUMENT>- Temperature = 1.") == "between 0 and 1"
    assert final_answer(f"{ANSWER} Paris\n<ANSWER>: Lyon") == "Paris"
    assert final_answer("No marker here.") == "No marker here."


def test_question_parsing() -> None:
    assert parse_question("Question: What is the Transformer architecture?\nAnswer: x") == \
        "What is the Transformer architecture?"
    assert parse_question("**Question 1:** Why do tides happen twice a day?") == "Why do tides happen twice a day?"
    assert parse_question("What is the answer to the question: what?") is None
    assert parse_question("No question here.") is None


@pytest.mark.slow
def test_generated_questions_with_smollm2(tmp_path) -> None:
    write_corpus(tmp_path / "docs", TOPICS)
    out = raft_build(corpus=str(tmp_path / "docs"), out=str(tmp_path / "gen.jsonl"), chunk_tokens=48,
                     distractors=2, limit=3, max_new_tokens=48, progress=False)
    assert out["questions_from"] == "smollm2-135m-instruct" and out["examples"] + out["unparsed_replies"] == 3
    assert out["examples"] >= 1
    for line in (tmp_path / "gen.jsonl").read_text().splitlines():
        e = json.loads(line)
        question = e["messages"][1]["content"].rsplit("Question: ", 1)[1]
        assert question.endswith("?") and ANSWER in e["messages"][2]["content"]
