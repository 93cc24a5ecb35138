"""RAG answers on the course notes with SmolLM2: the `rag ask --json` contract, "I don't know" under the
score threshold, citations, and `rag eval` (recall@k, MRR, EM, F1, faithfulness)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.rag import rag_ask, rag_eval
from lmstack.rag.answer import (IDK, cited_numbers, is_refusal, print_result, question_names, strip_citations,
                                unmentioned_names)
from lmstack.rag.grounding import faithfulness as grounded_share
from lmstack.rag.grounding import overlap, repeated_ngram, support, supported_sentences
from lmstack.rag.evaluate import exact_match, faithfulness, token_f1
from lmstack.rag.ingest import ingest
from lmstack.rag.retrieve import Hit
from lmstack.rag.store import ChunkRow

ROOT = Path(__file__).resolve().parents[1]
NOTES = ROOT.parent / "shared" / "data" / "course-notes"
QA = ROOT / "tests" / "data" / "course_notes_qa.jsonl"
# Two of the five notes keep the index small (about 30 chunks); the QA rows below come from them.
SUBSET = ("000_677e061d84fd6afc.txt", "003_342bd825bd5048d9.txt")


@pytest.fixture(scope="module")
def notes_index(tmp_path_factory):
    if not NOTES.is_dir():
        pytest.skip(f"course notes not found at {NOTES}")
    db = tmp_path_factory.mktemp("notes") / "notes.sqlite"
    ingest([str(NOTES / name) for name in SUBSET], str(db), progress=False)
    return db


def test_qa_file_has_40_questions_with_gold_snippets() -> None:
    rows = [json.loads(line) for line in QA.read_text().splitlines() if line.strip()]
    assert len(rows) >= 40 and len({r["question"] for r in rows}) == len(rows)
    docs = {p.name: p for p in NOTES.glob("*.txt")} if NOTES.is_dir() else {}
    for r in rows:
        assert r["question"].endswith("?") and r["answer"] and r["doc"].endswith(".txt")
        if docs:
            text = " ".join(docs[r["doc"]].read_text().split())
            assert " ".join(r["snippet"].split()) in text, r
    assert not any(r["question"].startswith("Question ") for r in rows)  # not the quiz of note 002


@pytest.mark.slow
def test_rag_ask_json_contract_with_smollm2(notes_index) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmstack", "rag", "ask", "--index", str(notes_index),
                           "How many bytes does one 32-bit float parameter take?", "--max-new-tokens", "48",
                           "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"answer", "citations", "retrieved"} <= set(out)
    assert isinstance(out["answer"], str) and out["answer"] and not out["refused"]
    assert len(out["retrieved"]) == 5 and [r["n"] for r in out["retrieved"]] == [1, 2, 3, 4, 5]
    assert all({"text", "path", "location", "score", "similarity"} <= set(r) for r in out["retrieved"])
    assert [r["score"] for r in out["retrieved"]] == sorted((r["score"] for r in out["retrieved"]), reverse=True)
    assert any("4 byte" in r["text"] for r in out["retrieved"][:3])  # the gold chunk is retrieved high
    assert out["citations"] and out["citations_by"] in ("span", "model", "pipeline", "quote"), out["answer"]
    assert "4" in out["answer"] and len(out["answer"]) < 300 and not repeated_ngram(out["answer"])
    assert grounded_share(out["answer"], [r["text"] for r in out["retrieved"]]) == 1.0  # every sentence supported
    assert out["evidence"] and {"n", "text", "score"} <= set(out["evidence"][0])
    by_n = {r["n"]: r for r in out["retrieved"]}
    for c in out["citations"]:
        assert set(c) >= {"n", "source", "location", "score"}
        assert f"[{c['n']}]" in out["answer"]
        assert (c["source"], c["location"], c["score"]) == (by_n[c["n"]]["path"], by_n[c["n"]]["location"],
                                                          by_n[c["n"]]["score"])


@pytest.mark.slow
def test_rag_ask_with_an_adapter_copies_its_answer_from_the_evidence(notes_index, tmp_path, monkeypatch) -> None:
    """An adapter is used, not silently ignored: with one, the default short mode loads the model with it and
    the answer is a span copied from a cited evidence statement."""
    import lmstack.rag.answer as answer_mod
    from lmstack.checkpoints import load_model
    from lmstack.checkpoints.registry import DEFAULT_MODEL
    from lmstack.peft.methods import PeftSpec, apply_method, save_adapter

    spec = PeftSpec(method="lora", rank=4, alpha=8.0)
    base = load_model(DEFAULT_MODEL, dtype="float32").model
    save_adapter(apply_method(base, spec), spec, tmp_path / "adapter", DEFAULT_MODEL)
    loads = []
    real = answer_mod.get_generator

    def recording(model, adapter=None, dtype="float32"):
        loads.append(adapter)
        return real(model, adapter, dtype)

    monkeypatch.setattr(answer_mod, "get_generator", recording)
    out = rag_ask("How many bytes does one 32-bit float parameter take?", index=str(notes_index),
                  adapter=str(tmp_path / "adapter"), stream=False)
    assert loads == [str(tmp_path / "adapter")] and not out["refused"]
    assert out["citations_by"] in ("model", "span") and len(out["citations"]) == 1
    n = out["citations"][0]["n"]
    span = " ".join(strip_citations(out["answer"]).split()).lower()
    assert any(e["n"] == n and span in " ".join(e["text"].split()).lower() for e in out["evidence"]), out


def test_off_topic_question_is_i_dont_know_without_loading_the_model(notes_index, monkeypatch) -> None:
    import lmstack.rag.answer as answer_mod

    def no_model(*a, **kw):
        raise AssertionError("the answering model must not load under the threshold")

    monkeypatch.setattr(answer_mod, "get_generator", no_model)
    out = rag_ask("What is the capital of Peru?", index=str(notes_index), check_names=False)
    assert out["answer"] == IDK and out["refused"] and out["citations"] == []
    assert out["best_similarity"] < 0.3 and "min_score" in out["reason"] and len(out["retrieved"]) == 5
    on_topic = rag_ask("How many bytes does one 32-bit float parameter take?", index=str(notes_index),
                       min_score=0.99)
    assert on_topic["answer"] == IDK and on_topic["refused"]


def test_question_names_and_the_ones_no_passage_mentions() -> None:
    assert question_names("What does a GAN's generator do in 1.58-bit LLMs?") == ["GAN", "1.58-bit", "LLMs"]
    assert question_names("Who won the 2018 FIFA World Cup?") == ["FIFA", "World", "Cup"]
    assert question_names("What is the melting point of tungsten?") == []  # lower case, no digits: not a name
    passages = ["GANs pit a generator against a discriminator.", "LLMs with weights of 1.58 bits."]
    assert unmentioned_names("What does a GAN's generator do in 1.58-bit LLMs?", passages) == []
    assert unmentioned_names("Which LLMs does Tokyo's lab train?", passages) == ["Tokyo"]
    assert unmentioned_names("Is AN a GAN?", passages) == ["AN"]  # the start of a word, not any substring
    assert unmentioned_names("What is FlashAttention-3?", passages + ["attention"]) == ["FlashAttention-3"]
    # a lower-case compound is a term of art: all its parts, in order, joined by a hyphen, a space or nothing
    assert question_names("Why does fine-tuning help?") == ["fine-tuning"]
    assert unmentioned_names("Why does fine-tuning help?", ["Fine Tuning adapts a model."]) == []
    assert unmentioned_names("Does a decoder-only model mask?", ["decoderonly models"]) == []
    assert unmentioned_names("What does grouped-query attention share?", ["rows grouped by query"]) == ["grouped-query"]


def test_a_name_no_retrieved_chunk_mentions_is_i_dont_know(notes_index, monkeypatch) -> None:
    import lmstack.rag.answer as answer_mod

    def no_model(*a, **kw):
        raise AssertionError("the name check refuses before any model loads")

    monkeypatch.setattr(answer_mod, "get_generator", no_model)
    question = "How much GPU memory does Kubernetes need to train a 1B parameter model?"
    out = rag_ask(question, index=str(notes_index), min_score=0.0)  # only the name check can refuse
    assert out["answer"] == IDK and out["refused"] and out["reason"] == "the sources never mention 'Kubernetes'"
    answered = rag_ask(question, index=str(notes_index), min_score=0.0, check_names=False)  # a span, no model
    assert not answered["refused"] and answered["citations"]


def test_refusals_citations_and_answer_metrics() -> None:
    assert is_refusal("I don't know the answer.") and is_refusal("The sources do not contain this.")
    assert not is_refusal("LoRA trains two low-rank matrices [1].")
    assert cited_numbers("A [2]. B [1, 3] and [9].", 3) == [2, 1, 3]
    assert strip_citations("Paris [1] is big [2, 3].") == "Paris is big."
    # SQuAD normalization: case, punctuation and articles do not matter
    assert exact_match("The ReLU [1].", "relu") == 1.0 and exact_match("ReLU units", "ReLU") == 0.0
    assert token_f1("two linear layers", "two linear layers with a ReLU activation") == pytest.approx(
        2 * 1.0 * 0.5 / 1.5)  # "a" is dropped: 3 of 6 reference tokens
    assert token_f1("", "x") == 0.0


def _hit(text: str) -> Hit:
    row = ChunkRow(1, 1, 0, text, None, None, 1, 0, len(text), 10, "/d.txt", "d", None, "text")
    return Hit(row, 1.0, 0.5)


def test_faithfulness_counts_sentences_supported_by_their_cited_chunk() -> None:
    hits = [_hit("QLoRA quantizes the LoRA adapter weights to 4-bit precision."),
            _hit("Beam search keeps several candidate sequences.")]
    assert faithfulness("QLoRA quantizes adapter weights to 4-bit [1].", hits) == 1.0
    # the right claim cites the wrong chunk: unsupported
    assert faithfulness("QLoRA quantizes adapter weights to 4-bit [2].", hits) == 0.0
    # one supported sentence of two; a sentence without [n] is checked against every cited chunk
    assert faithfulness("Beam search keeps several candidate sequences [2]. Bananas are yellow fruit.", hits) == 0.5
    assert faithfulness("QLoRA quantizes adapter weights.", hits) == 0.0  # cites nothing: supports nothing
    assert faithfulness(IDK, hits) is None


@pytest.mark.slow
def test_rag_eval_reports_all_modes_and_answer_metrics(notes_index, tmp_path) -> None:
    rows = [json.loads(line) for line in QA.read_text().splitlines()]
    subset = tmp_path / "qa.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for r in rows if r["doc"] in SUBSET))
    n = sum(r["doc"] in SUBSET for r in rows)
    report = rag_eval(str(subset), index=str(notes_index), generate=False, progress=False,
                      out=str(tmp_path / "report.json"))
    assert report["questions"] == n and set(report["retrieval"]) == {"bm25", "vector", "hybrid"}
    for mode, m in report["retrieval"].items():
        ranks = [row[f"rank_{mode}"] for row in report["per_question"]]
        assert m["recall@5"] == pytest.approx(sum(r is not None for r in ranks) / n, abs=1e-4)
        assert m["mrr"] == pytest.approx(sum(1 / r for r in ranks if r) / n, abs=1e-4)
        assert m["recall@5"] >= 0.6  # the gold chunk is usually in the top 5
    assert json.loads((tmp_path / "report.json").read_text())["questions"] == n
    lexical = rag_eval(str(subset), index=str(notes_index), generate=False, progress=False, modes=["bm25", "hybrid"],
                       bm25_weight=1.0, vector_weight=0.0)  # the weights reach the search: hybrid is BM25's order
    assert lexical["hybrid_weights"] == {"bm25": 1.0, "vector": 0.0}
    assert all(row["rank_hybrid"] == row["rank_bm25"] for row in lexical["per_question"] if row["rank_bm25"])
    answered = rag_eval(str(subset), index=str(notes_index), limit=2, modes=["hybrid"], max_new_tokens=32,
                        progress=False)
    a = answered["answers"]
    assert answered["questions"] == 2 and set(answered["retrieval"]) == {"hybrid"}
    assert 0 <= a["exact_match"] <= a["f1"] <= 1 and a["idk_rate"] <= 1
    assert a["faithfulness"] is None or 0 <= a["faithfulness"] <= 1
    for row in answered["per_question"]:
        assert row["f1"] == pytest.approx(token_f1(row["answer"], row["reference"]))


@pytest.mark.slow
def test_rag_ask_prints_the_answer_once_then_its_sources(notes_index) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmstack", "rag", "ask", "--index", str(notes_index),
                           "How many bytes does one 32-bit float parameter take?"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    answer, _, sources = proc.stdout.partition("\nSources:\n")
    answer = answer.strip()
    assert answer and "\n" not in answer and sources.strip().startswith("[")  # one answer line, then sources
    first = answer.split(" [")[0]
    assert proc.stdout.count(first) == 1, proc.stdout


def test_print_result_writes_the_answer_once() -> None:
    import io

    result = {"answer": "Four bytes [1].", "citations": [{"n": 1, "source": "/n.txt", "location": "line 3"}]}
    streamed, whole = io.StringIO(), io.StringIO()
    streamed.write(result["answer"])  # what streaming wrote
    print_result(result, streamed, streamed=True)
    print_result(result, whole, streamed=False)
    assert streamed.getvalue() == whole.getvalue() == "Four bytes [1].\n\nSources:\n[1] /n.txt (line 3)\n"


def test_grounding_by_word_overlap() -> None:
    chunks = ["LoRA stands for Low-Rank Adaptation. It trains two small matrices A and B.",
              "Beam search keeps track of multiple probable sequences."]
    assert overlap("LoRA trains two small matrices.", chunks[0]) == 1.0
    # the invented expansion: only "LoRA" and "stands" are in the chunk
    assert overlap("LoRA stands for Linear Model Recurrent Transformer.", chunks[0]) == pytest.approx(2 / 6)
    assert overlap("It is.", chunks[0]) == 1.0  # claims nothing
    assert support("Beam search keeps several sequences [1].", chunks) == (pytest.approx(4 / 5), 1)
    rows = supported_sentences("LoRA trains small matrices. Bananas are yellow.", chunks)
    assert [(at is not None) for _, _, at in rows] == [True, False]
    assert grounded_share("LoRA trains small matrices. Bananas are yellow.", chunks) == 0.5
    assert grounded_share("", chunks) is None


def test_repetition_is_a_repeated_8_gram() -> None:
    loop = "It is a type of neural network that uses a linear model to process data. "
    assert repeated_ngram(loop * 2) and not repeated_ngram(loop)
    assert not repeated_ngram("one two three four five six seven eight one two three four five six seven nine")
    assert repeated_ngram("One two three four five six seven eight [1]. one two three four five six seven eight")


def test_headings_quiz_questions_and_their_options_are_not_evidence() -> None:
    from lmstack.rag.answer import evidence_candidates, is_heading

    assert is_heading("Steps in a Transformer Decoder", None) and is_heading("Types of attention:", None)
    assert is_heading("**Fine tuning**", "Fine tuning")  # the chunk's own heading
    assert not is_heading("Beam Search: Keep track of multiple probable sequences.", None)
    text = ("Decoder only – Autoregressive models\nThey predict the next token from the previous ones.\n"
            "Question 12: Which of the following best describes how LoRA works?")
    assert evidence_candidates([(text, None)]) == [
        (1, "They predict the next token from the previous ones.", "Decoder only – Autoregressive models")]
    # no heading, no quiz question; the statement keeps the title line above it, and the chunk's heading
    assert evidence_candidates([("Scaling\n" + text, "Notes")])[0][2] == "Notes Decoder only – Autoregressive models"
    quiz = (text + "\n- A. LoRA trains a smaller, distilled version of the pre-trained LLM.\n"
            "B) LoRA freezes the weights and trains two low-rank matrices.\n"
            "A LoRA adapter is small enough to ship with each task.")  # an article "A" is no option
    assert [s for _, s, _ in evidence_candidates([(quiz, None)])] == [
        "They predict the next token from the previous ones.", "A LoRA adapter is small enough to ship with each task."]


def test_evidence_ranking_favours_the_line_that_keeps_the_questions_phrase() -> None:
    import torch

    from lmstack.rag.answer import select_evidence, shared_phrase

    q = "What does setting a low k in top-k sampling lead to?"
    assert shared_phrase(q, "Setting a low k (e.g., 10) limits the choices") == 4 / 6  # "setting a low k"
    assert shared_phrase("What is it?", "What is it?") == 0.0  # stopwords alone are no phrase
    assert shared_phrase(q, q) == 1.0  # capped at six words

    class Flat:  # every statement equally similar to the question
        def encode(self, texts: list[str]) -> torch.Tensor:
            return torch.ones(len(texts), 4) / 2

    on_topic = "Top-k sampling picks from the k most probable words at each step."
    answer = "Setting a low k will limit the choices, leading to more coherent but less diverse outputs."
    picked = select_evidence(q, [(on_topic, None), (answer, None)], Flat(), 2)
    assert [(e.n, e.text) for e in picked] == [(2, answer), (1, on_topic)]  # the phrase outweighs one rank
    assert select_evidence(q, [(on_topic, None), (answer, None)], Flat(), 1, phrase=0.0)[0].n == 1


def test_evidence_ranking_reads_a_statement_under_its_headings() -> None:
    import torch

    from lmstack.rag.answer import select_evidence

    vocab = ["decoder", "encoder", "training", "objective", "masked", "next"]

    class Words:  # bag of words over `vocab`
        def encode(self, texts: list[str]) -> torch.Tensor:
            rows = torch.tensor([[float(w in t.lower()) for w in vocab] for t in texts])
            return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-6)

    q = "What is the training objective of decoder models?"
    encoder = "Encoder models\nThe training objective is to predict the masked tokens."
    decoder = "Decoder models\nThe training objective is to predict the next token."
    picked = select_evidence(q, [(encoder, None), (decoder, None)], Words(), 2, phrase=0.0)
    assert [e.n for e in picked] == [2, 1]  # the statements alone tie: the heading "Decoder models" decides
    assert picked[0].score == picked[1].score  # Evidence.score stays the statement's own cosine (the gate's)


def test_the_similarity_gate_reads_the_best_cosine_of_the_statements_shown() -> None:
    import torch

    from lmstack.rag.answer import AnswerOptions, answer, answer_config

    q = "What does setting a low k in top-k sampling lead to?"
    phrase = "Setting a low k limits the choices to a few likely words."  # ranked first: the question's phrase
    close = "Top-k sampling keeps only the k most probable next words."  # the higher cosine

    class Embedder:  # cosine 0.4 for `phrase`, 0.6 for `close`
        def encode(self, texts: list[str]) -> torch.Tensor:
            rows = {q: [1.0, 0.0], phrase: [0.4, 0.9165], close: [0.6, 0.8]}
            return torch.tensor([rows[t] for t in texts])

    def no_model() -> None:
        raise AssertionError("span answers load no model")

    hits = [_hit(phrase), _hit(close)]
    out = answer(q, hits, no_model, answer_config(), Embedder(), AnswerOptions(min_score=0.5))
    assert [e["text"] for e in out["evidence"]][:2] == [phrase, close] and not out["refused"], out
    assert answer(q, hits, no_model, answer_config(), Embedder(), AnswerOptions(min_score=0.7))["refused"]


def test_short_span_is_what_the_question_does_not_restate() -> None:
    from lmstack.rag.answer import short_span

    q = "Which two models are given as well known examples of decoder-based autoregressive models?"
    assert short_span(q, "Well known examples of decoder-based autoregressive models are GPT and BLOOM") == \
        "GPT and BLOOM"
    # the asked noun right after the answer stays with it; "refers to" introduces the answer
    assert short_span("How many bytes does one 32-bit float parameter take?",
                      "1 parameter = 4 bytes (32-bit float)") == "4 bytes"
    assert short_span("What is a soft prompt?", "A soft prompt refers to a set of trainable tokens.") == \
        "set of trainable tokens"
    assert short_span("What is LoRA?", "LoRA") == "LoRA"  # nothing new: the statement itself


def test_short_answer_is_a_copied_span_that_says_more_than_the_question() -> None:
    from lmstack.rag.answer import Evidence, answer_config, short_answer

    class Fake:  # the model's reply is fixed: what matters is what the pipeline asks and keeps
        def __init__(self, reply: str) -> None:
            self.reply = reply

        def chat_prompt(self, messages):
            assert "- Well known examples" in messages[-1]["content"]  # every statement is shown
            return [1, 2, 3]

        def generate(self, ids, cfg):
            assert cfg.max_new_tokens <= 24 and cfg.repetition_penalty == 1.0  # it must copy the evidence
            assert cfg.copy_from == [e.text for e in evidence]  # copy mode: a span of a statement
            return type("R", (), {"text": self.reply})()

    q = "Which two models are given as well known examples of decoder-based autoregressive models?"
    evidence = [Evidence(2, "Well known examples of decoder-based autoregressive models are GPT and BLOOM", 0.8),
                Evidence(4, "Encoder models such as BERT read the whole input.", 0.6)]
    cfg = answer_config()
    assert short_answer(q, evidence, Fake("GPT and BLOOM"), cfg) == ("GPT and BLOOM", evidence[0], "model")
    # the span cites the statement it was copied from
    assert short_answer(q, evidence, Fake("BERT."), cfg) == ("BERT", evidence[1], "model")
    # a copy of the question's own words says nothing: the best statement's span instead
    assert short_answer(q, evidence, Fake("autoregressive models"), cfg) == ("GPT and BLOOM", evidence[0], "span")
    assert short_answer(q, evidence, None, cfg) == ("GPT and BLOOM", evidence[0], "span")