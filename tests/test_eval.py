"""`lmstack eval`: metrics against their reference libraries and the course notes' worked examples, task files,
few-shot determinism, bad input, and the verb end to end on a tiny random model (fast, no real model)."""

from __future__ import annotations

import builtins
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lmstack.checkpoints import load_model
from lmstack.cli import app
from lmstack.errors import LmstackError
from lmstack.evaluation import metrics as M
from lmstack.evaluation.scoring import Scorer, perplexity_windows
from lmstack.evaluation.tasks import build_prompt, fewshot_examples, known_tasks, load_task, read_rows
from cli_helpers import assert_one_line_error

torch.set_num_threads(2)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ------------------------------------------------------------------------------------------ metrics


def test_rouge_course_notes_example() -> None:
    """Note 003: reference "It is cold outside", output "It is very cold outside"."""
    s = M.rouge_scores("It is very cold outside", "It is cold outside")
    assert s["rouge1"]["recall"] == pytest.approx(1.0) and s["rouge1"]["precision"] == pytest.approx(0.8)
    assert s["rouge1"]["f1"] == pytest.approx(0.89, abs=0.005)
    assert s["rouge2"]["recall"] == pytest.approx(0.67, abs=0.005) and s["rouge2"]["precision"] == pytest.approx(0.5)
    assert s["rouge2"]["f1"] == pytest.approx(0.57, abs=0.005)
    # The notes' ROUGE-L (R 0.5, P 0.4, F1 0.44) counts the longest common *substring* "cold outside"; rouge-score
    # uses the longest common *subsequence* "It is cold outside" (4 tokens): R 4/4, P 4/5, F1 0.89.
    assert s["rougeL"]["recall"] == pytest.approx(1.0) and s["rougeL"]["precision"] == pytest.approx(0.8)
    assert s["rougeL"]["f1"] == pytest.approx(8 / 9)
    assert M.rouge(["It is very cold outside"], ["It is cold outside"])["rouge2"] == pytest.approx(s["rouge2"]["f1"])


def test_sacrebleu_scores_and_signature() -> None:
    import sacrebleu
    hyps = ["The cat sat on the mat.", "A dog runs in the park"]
    refs = ["The cat sat on the mat.", "A dog is running in a park"]
    got = M.compute("bleu", hyps, refs)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert got["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert M.compute("chrf", hyps, refs)["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert M.compute("ter", hyps, refs)["ter"] == pytest.approx(sacrebleu.corpus_ter(hyps, [refs]).score)


def test_squad_exact_match_and_f1() -> None:
    assert M.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert M.exact_match_score("the eiffel tower.", "Eiffel Tower") == 1.0
    assert M.exact_match_score("Eiffel", "Eiffel Tower") == 0.0
    # pred {eiffel}, ref {eiffel, tower}: P 1, R 0.5 -> F1 2/3
    assert M.token_f1_score("Eiffel", "the Eiffel Tower") == pytest.approx(2 / 3)
    assert M.token_f1_score("Paris", "London") == 0.0
    assert M.compute("f1", ["a b", "c"], ["a b", "d"]) == {"f1": pytest.approx(0.5)}


def test_classification_matches_sklearn() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    y = ["pos", "neg", "neu", "pos", "pos", "neg", "neu", "neu"]
    p = ["pos", "neg", "pos", "pos", "neg", "neg", "neu", "pos"]
    got = M.classification(p, y)
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(y, p))
    for avg in ("macro", "micro"):
        assert got[f"precision_{avg}"] == pytest.approx(sk.precision_score(y, p, average=avg, zero_division=0))
        assert got[f"recall_{avg}"] == pytest.approx(sk.recall_score(y, p, average=avg, zero_division=0))
        assert got[f"f1_{avg}"] == pytest.approx(sk.f1_score(y, p, average=avg, zero_division=0))


def test_multiple_choice_acc_norm_divides_by_length() -> None:
    # Raw log-likelihood prefers the short choice; per character the long one is better.
    pred, pred_norm = M.multiple_choice_predictions([-4.0, -6.0], [" no", " a much longer answer"])
    assert (pred, pred_norm) == (0, 1)


@pytest.mark.parametrize("text, want", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("The answer is 42. Then 7 more", "7"),
    ("so she pays $3.50 and gets 18.00", "18"),
    ("#### -5", "-5"),
    ("no numbers here", ""),
])
def test_gsm8k_extraction(text: str, want: str) -> None:
    assert M.extract_gsm8k(text) == want


def test_regex_extraction() -> None:
    assert M.extract_regex(r"answer is (\w+)")("I think the answer is B, surely") == "B"
    with pytest.raises(LmstackError, match="bad answer_regex"):
        M.extract_regex("(unclosed")


# ----------------------------------------------------------------------------------- tasks and data


def test_builtin_tasks_load() -> None:
    assert set(known_tasks()) >= {"gsm8k", "gsm8k-8shot", "multi30k-en-de", "multi30k-en-fr",
                                  "tinyshakespeare-ppl", "hh-rlhf-harmless", "course-quiz"}
    for name in known_tasks():
        spec = load_task(name, DATA)
        assert spec.name == name


def test_course_quiz_transcription() -> None:
    spec = load_task("course-quiz", DATA)
    rows = read_rows(spec)
    assert len(rows) == 17  # 4 warm-up + 13 exit questions with a single given answer
    by_id = {r.fields["id"]: r.fields for r in rows}
    assert by_id["warm-up-q3"]["answer"] == "E" and len(by_id["warm-up-q3"]["choices"]) == 5
    assert by_id["exit-q11"]["choices"][2] == "BLEU" and by_id["exit-q11"]["answer"] == "C"
    assert by_id["exit-q14"]["choices"] == ["True", "False"] and by_id["exit-q14"]["answer"] == "B"


@pytest.mark.skipif(not (DATA / "gsm8k" / "train.jsonl").exists(), reason="needs ../shared/data")
def test_fewshot_prompts_are_deterministic_for_a_seed() -> None:
    spec = load_task("gsm8k-8shot", DATA)
    rows = read_rows(spec)[:3]
    pool = read_rows(spec, spec.fewshot.path)

    def prompts(seed: int) -> list[str]:
        return [build_prompt(spec, r, fewshot_examples(spec, pool, i, 8, seed, False)) for i, r in enumerate(rows)]

    first, again, other = prompts(1234), prompts(1234), prompts(7)
    assert first == again and first != other
    assert all(p.count("Question:") == 9 and p.count("####") == 8 for p in first)
    assert first[0].endswith("Question: " + rows[0].fields["question"] + "\nAnswer:")
    # An example's shots do not depend on which other examples are evaluated (--limit).
    assert build_prompt(spec, rows[2], fewshot_examples(spec, pool, 2, 8, 1234, False)) == first[2]


def test_hh_rlhf_rows_split_into_context_and_replies() -> None:
    spec = load_task("hh-rlhf-harmless", DATA)
    row = read_rows(spec)[0].fields
    assert row["context"].endswith("\n\nAssistant:") and row["gold"] == 0
    chosen, rejected = row["choices"]
    assert chosen != rejected


def test_perplexity_windows_follow_the_transformers_guide() -> None:
    ids = list(range(10))
    windows = perplexity_windows(ids, max_length=4, stride=2)
    # begin 0: [0..3] scores 1,2,3; begin 2: [2..5] scores 4,5; begin 4: [4..7] 6,7; begin 6: [6..9] 8,9.
    assert [(w.context, w.continuation, w.weight) for w in windows] == [
        ([0], [1, 2, 3], 3), ([2, 3], [4, 5], 1), ([4, 5], [6, 7], 1), ([6, 7], [8, 9], 1)]
    with pytest.raises(LmstackError, match="stride"):
        perplexity_windows(ids, 4, 5)


# ----------------------------------------------------------------------------------------- bad input


def write_task(tmp_path: Path, text: str, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_unknown_task_lists_known() -> None:
    with pytest.raises(LmstackError, match=r"unknown task 'nope' \(known: course-quiz, gsm8k"):
        load_task("nope")


def test_unknown_metric_lists_known(tmp_path: Path) -> None:
    f = write_task(tmp_path, "type: generate\ndataset: {path: d.jsonl}\nprompt: x\ntarget: y\nmetrics: [blue]\n")
    with pytest.raises(LmstackError, match=r"t.yaml: unknown metric 'blue' \(known: acc, acc_norm, bleu"):
        load_task(str(f))


@pytest.mark.parametrize("text, key", [
    ("type: generate\ndataset: {path: d.jsonl}\ntarget: y\nmetrics: [exact_match]\n", "prompt"),
    ("type: generate\nprompt: x\ntarget: y\nmetrics: [exact_match]\n", "dataset"),
    ("type: generate\ndataset: {format: jsonl}\nprompt: x\ntarget: y\nmetrics: [exact_match]\n", "dataset.path"),
    ("type: multiple_choice\ndataset: {path: d.jsonl}\nprompt: x\ngold: g\nmetrics: [acc]\n", "choices"),
    ("dataset: {path: d.jsonl}\nprompt: x\nmetrics: [acc]\n", "type"),
])
def test_task_file_missing_key_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    f = write_task(tmp_path, text)
    with pytest.raises(LmstackError, match=f"t.yaml: missing key '{key}'"):
        load_task(str(f))


def test_dataset_row_missing_keys_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"q": "a", "a": "1"}\n{"q": "b"}\n', encoding="utf-8")
    f = write_task(tmp_path, "type: generate\ndataset: {path: d.jsonl, fields: [q, a]}\nprompt: '{{ q }}'\n"
                             "target: '{{ a }}'\nmetrics: [exact_match]\n")
    with pytest.raises(LmstackError, match=r"d.jsonl:2: row is missing key\(s\) 'a'"):
        read_rows(load_task(str(f)))


def test_missing_metric_library_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args, **kwargs):
        if name.startswith("sacrebleu"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    import importlib
    monkeypatch.setattr(importlib, "import_module", lambda name: fake_import(name))
    with pytest.raises(LmstackError, match=r"metric library 'sacrebleu' is not installed: pip install sacrebleu"):
        M.compute("bleu", ["a"], ["a"])


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--model", "x", "--tasks", "nope"])
    assert_one_line_error(result, "unknown task 'nope'", "known: course-quiz")
    result = runner.invoke(app, ["eval", "--model", "a", "--model", "b", "--adapter", "x", "--tasks", "gsm8k"])
    assert_one_line_error(result, "1 --adapter value(s) for 2 --model value(s)")


# ------------------------------------------------------------------------ end to end on a tiny model


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tasks")
    rows = [{"q": "what is the capital of france?", "choices": ["paris", "the lazy dog", "hello"], "gold": 0},
            {"q": "the quick brown fox jumps over", "choices": ["a small model", "the lazy dog"], "gold": "B"},
            {"q": "hello world, how are", "choices": ["you today?", "fox"], "gold": 0}]
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (d / "mc.yaml").write_text("name: tiny-mc\ntype: multiple_choice\ndataset: {path: mc.jsonl}\n"
                               "prompt: 'Q: {{ q }}\\nA:'\nchoices: choices\ngold: gold\nmetrics: [acc, acc_norm]\n"
                               "fewshot: {num: 1, seed: 3}\n", encoding="utf-8")
    (d / "gen.yaml").write_text("name: tiny-gen\ntype: generate\ndataset: {path: mc.jsonl}\nprompt: '{{ q }}'\n"
                                "target: '{{ choices[0] }}'\nmetrics: [exact_match, f1, rouge, bleu]\n"
                                "generation: {max_new_tokens: 4, stop: ['?']}\n", encoding="utf-8")
    (d / "text.txt").write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 12), encoding="utf-8")
    (d / "ppl.yaml").write_text("name: tiny-ppl\ntype: perplexity\ndataset: {path: text.txt, format: text}\n"
                                "window: 32\nstride: 16\nmetrics: [perplexity]\n", encoding="utf-8")
    (d / "ll.yaml").write_text("name: tiny-ll\ntype: loglikelihood\ndataset: {path: mc.jsonl}\nprompt: '{{ q }}'\n"
                               "target: '{{ choices[0] }}'\nmetrics: [acc, perplexity]\n", encoding="utf-8")
    return d


def test_eval_cli_end_to_end(tiny: Path, tiny_tasks: Path, tmp_path: Path) -> None:
    tasks = ",".join(str(tiny_tasks / f) for f in ("mc.yaml", "gen.yaml", "ppl.yaml", "ll.yaml"))
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny), "--tasks", tasks, "--out", str(out),
                                      "--json", "--no-progress", "--seed", "5", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(summary) == {"tiny-mc", "tiny-gen", "tiny-ppl", "tiny-ll"}
    assert set(summary["tiny-mc"]) == {"acc", "acc_norm"}
    assert {"exact_match", "f1", "rouge1", "rougeL", "bleu"} <= set(summary["tiny-gen"])
    assert summary["tiny-ppl"]["perplexity"] > 1

    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == summary
    mc = saved["models"][str(tiny)]["tiny-mc"]
    assert len(mc["examples"]) == 3 and mc["info"]["num_fewshot"] == 1
    assert mc["examples"][1]["gold"] == 1 and len(mc["examples"][1]["loglikelihoods"]) == 2
    assert saved["models"][str(tiny)]["tiny-gen"]["info"]["bleu_signature"].startswith("nrefs:1")
    report = (out / "report.md").read_text()
    assert "| tiny-mc | acc |" in report and "what is the capital of france?" in report
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The multiple-choice numbers are the scorer's: recompute one row by hand, unbatched.
    loaded = load_model(str(tiny), dtype="float32")
    scorer = Scorer(loaded.model, loaded.tokenizer, batch_size=1, progress=False)
    ex = mc["examples"][2]
    direct = [scorer.score_text([(ex["prompt"], " " + c)])[0].logprob for c in ex["choices"]]
    assert direct == pytest.approx(ex["loglikelihoods"], abs=1e-4)

    # Same seed, same numbers; the text table prints the sacreBLEU signature.
    again = CliRunner().invoke(app, ["eval", "--model", str(tiny), "--tasks", tasks, "--json", "--no-progress",
                                     "--seed", "5", "--dtype", "float32"])
    assert json.loads(again.stdout) == summary
    table = CliRunner().invoke(app, ["eval", "--model", str(tiny), "--tasks", str(tiny_tasks / "gen.yaml"),
                                     "--no-progress", "--limit", "2"])
    assert "tiny-gen bleu signature: nrefs:1|case:mixed" in table.stdout


def test_eval_two_models_with_adapter_side_by_side(tiny: Path, tiny_tasks: Path, tmp_path: Path) -> None:
    from lmstack.peft.methods import PeftSpec, apply_method, save_adapter
    loaded = load_model(str(tiny), dtype="float32")
    spec = PeftSpec(method="lora", rank=4, targets=["q", "v"])
    model = apply_method(loaded.model, spec)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.5)  # a LoRA that changes the outputs
    adapter = save_adapter(model, spec, tmp_path / "lora", base_model=str(tiny))
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny), "--model", str(tiny), "--adapter", "none",
                                      "--adapter", str(adapter), "--tasks", str(tiny_tasks / "ll.yaml"),
                                      "--out", str(out), "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    base, tuned = summary[str(tiny)], summary[f"{tiny}+lora"]
    assert not math.isclose(base["tiny-ll"]["perplexity"], tuned["tiny-ll"]["perplexity"])
    assert (out / "comparison.png").stat().st_size > 1000


def test_metric_that_a_task_type_cannot_compute(tmp_path: Path) -> None:
    f = write_task(tmp_path, "type: perplexity\ndataset: {path: x.txt}\nmetrics: [bleu]\n")
    with pytest.raises(LmstackError, match=r"metric 'bleu' does not apply to a perplexity task"):
        load_task(str(f))


def test_translation_task_on_a_seq2seq_model_uses_the_bare_source(tiny_tasks: Path, tmp_path: Path) -> None:
    from lmstack.checkpoints import save_native
    from lmstack.config import from_name
    from lmstack.models import build_model
    from cli_helpers import tiny_tokenizer
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = from_name("tiny-t5", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    t5 = save_native(build_model(cfg).eval(), tok, tmp_path / "t5")
    (tmp_path / "src.txt").write_text("hello world\nthe lazy dog\n", encoding="utf-8")
    (tmp_path / "tgt.txt").write_text("hallo welt\nder faule hund\n", encoding="utf-8")
    (tmp_path / "mt.yaml").write_text(
        "name: tiny-mt\ntype: generate\ndataset: {format: pairs, source: src.txt, path: tgt.txt}\n"
        "prompt: 'English: {{ source }}\\nGerman:'\nseq2seq_prompt: '{{ source }}'\ntarget: '{{ target }}'\n"
        "metrics: [bleu, chrf]\ngeneration: {max_new_tokens: 5}\n", encoding="utf-8")
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["eval", "--model", str(t5), "--tasks", str(tmp_path / "mt.yaml"), "--out",
                                      str(out), "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["tiny-mt"]) == {"bleu", "chrf"}
    examples = json.loads((out / "results.json").read_text())["models"][str(t5)]["tiny-mt"]["examples"]
    assert [e["prompt"] for e in examples] == ["hello world", "the lazy dog"]
    assert [e["reference"] for e in examples] == ["hallo welt", "der faule hund"]


@pytest.mark.parametrize("text, needle", [
    ("type: generate\ndataset: {path: d.jsonl}\npromt: x\ntarget: y\nmetrics: [f1]\n", "unknown key 'promt'"),
    ("type: perplexity\ndataset: {path: d.txt, fromat: text}\nmetrics: [perplexity]\n", "unknown key 'dataset.fromat'"),
    ("type: perplexity\ndataset: {path: d.txt}\nstride: half\nmetrics: [perplexity]\n", "'stride' must be an integer"),
    ("type: shout\ndataset: {path: d.txt}\nmetrics: [perplexity]\n", "unknown task type 'shout' (known: generate"),
])
def test_task_file_typos_are_named(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(LmstackError) as e:
        load_task(str(write_task(tmp_path, text)))
    assert needle in str(e.value) and "t.yaml" in str(e.value)
