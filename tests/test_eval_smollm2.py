"""`lmstack eval` on the real SmolLM2-135M-Instruct against reference implementations, on a few examples:

- strided perplexity = transformers' "Perplexity of fixed-length models" loop (the HF model from the same GGUF);
- multiple-choice log-likelihoods = lm-evaluation-harness' HF backend on a tiny local task;
- the lm-eval adapter (`--model lmstack`): loglikelihood, loglikelihood_rolling and generate_until agree with the
  HF backend through lm-eval itself, and `python -m lmstack.evaluation.harness` runs a local task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmstack.checkpoints import resolve
from lmstack.evaluation.runner import EvalModel, RunOptions, load_eval_model, run_task
from lmstack.evaluation.tasks import load_task

pytestmark = pytest.mark.slow
torch.set_num_threads(2)
lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt")
FALLBACK = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
            "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n") * 6
MC_ROWS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Berlin", "a banana"], "gold": 0},
    {"question": "Which animal barks?", "choices": ["a cat", "a dog"], "gold": 1},
    {"question": "What colour is the sky on a clear day?", "choices": ["green", "blue", "red", "plaid"], "gold": 1},
]
GEN_ROWS = [{"question": "What is 2 plus 3?", "answer": "5"}, {"question": "Name a primary colour.", "answer": "red"}]
PPL_ROWS = [{"text": FALLBACK[:300]}, {"text": "The quick brown fox jumps over the lazy dog. " * 4}]


@pytest.fixture(scope="module")
def ours() -> EvalModel:
    return load_eval_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def hf():
    path = resolve("smollm2-135m-instruct")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lm-eval task files over local JSONL (no hub)."""
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, rows in (("mc", MC_ROWS), ("gen", GEN_ROWS), ("ppl", PPL_ROWS)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (d / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + head.format(path=d / "mc.jsonl") + "output_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{gold}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")
    (d / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + head.format(path=d / "gen.jsonl") + "output_type: generate_until\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n", encoding="utf-8")
    (d / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\n" + head.format(path=d / "ppl.jsonl") + "output_type: loglikelihood_rolling\n"
        "doc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n",
        encoding="utf-8")
    return d


def _samples(lm, task: str, include: Path) -> tuple[dict, list]:
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=str(include), include_defaults=False)  # only the local tasks: fast
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager,
                                  log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out["results"][task], samples


# ------------------------------------------------------------------------------------------ perplexity


def transformers_guide_perplexity(model, ids: torch.Tensor, max_length: int, stride: int) -> float:
    """The loop of transformers' "Perplexity of fixed-length models" guide, verbatim in substance."""
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return float(torch.exp(torch.tensor(nll_sum / n_tokens)))


def test_perplexity_matches_transformers(ours: EvalModel, hf, tmp_path: Path) -> None:
    text = TEXT.read_text(encoding="utf-8")[:900] if TEXT.exists() else FALLBACK[:900]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    (tmp_path / "ppl.yaml").write_text("name: ppl\ntype: perplexity\ndataset: {path: text.txt, format: text}\n"
                                       "window: 128\nstride: 512\nmetrics: [perplexity]\n", encoding="utf-8")
    result = run_task(ours, load_task(str(tmp_path / "ppl.yaml")), RunOptions(stride=64, batch_size=4,
                                                                                progress=False))
    assert result.info["window"] == 128 and result.info["stride"] == 64 and len(result.examples) >= 3
    ids = torch.tensor([ours.tokenizer.encode(text)])
    assert ids.tolist()[0] == hf[1](text)["input_ids"]  # same tokens on both sides
    want = transformers_guide_perplexity(hf[0], ids, 128, 64)
    got = result.metrics["perplexity"]
    assert got == pytest.approx(want, rel=0.005)


# ------------------------------------------------------------------------------------- multiple choice


def test_multiple_choice_loglikelihoods_match_lm_eval_hf(ours: EvalModel, hf, local_tasks: Path,
                                                         tmp_path: Path) -> None:
    from lm_eval.models.huggingface import HFLM
    from lmstack.evaluation.harness import LmstackLM
    ref_results, ref = _samples(HFLM(pretrained=hf[0], tokenizer=hf[1], batch_size=4), "tiny_mc", local_tasks)
    want = [[r[0] for r in s["filtered_resps"]] for s in ref]  # per doc, per choice log-likelihood

    # lmstack's own multiple-choice task on the same rows.
    spec_file = tmp_path / "mc.yaml"
    spec_file.write_text(f"name: lmstack-mc\ntype: multiple_choice\ndataset: {{path: {local_tasks / 'mc.jsonl'}}}\n"
                         "prompt: \"Question: {{ question }}\\nAnswer:\"\nchoices: choices\ngold: gold\n"
                         "metrics: [acc, acc_norm]\n", encoding="utf-8")
    native = run_task(ours, load_task(str(spec_file)), RunOptions(batch_size=3, progress=False))
    got = [ex["loglikelihoods"] for ex in native.examples]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=2e-3)
    assert native.metrics["acc"] == pytest.approx(ref_results["acc,none"])
    assert native.metrics["acc_norm"] == pytest.approx(ref_results["acc_norm,none"])

    # The lm-eval adapter through lm-eval itself.
    lm_results, mine = _samples(LmstackLM(pretrained=ours, batch_size=2), "tiny_mc", local_tasks)
    for s, w in zip(mine, want, strict=True):
        assert [r[0] for r in s["filtered_resps"]] == pytest.approx(w, abs=2e-3)
    assert lm_results["acc,none"] == ref_results["acc,none"]


def test_lm_eval_adapter_generate_and_rolling(ours: EvalModel, hf, local_tasks: Path) -> None:
    from lm_eval.models.huggingface import HFLM
    from lmstack.evaluation.harness import LmstackLM
    # A 48-token context splits the rolling documents into several windows.
    ref_lm = HFLM(pretrained=hf[0], tokenizer=hf[1], batch_size=2, max_length=48)
    my_lm = LmstackLM(pretrained=ours, batch_size=2, max_length=48)
    assert my_lm.prefix_token_id == ref_lm.prefix_token_id
    _, ref_gen = _samples(ref_lm, "tiny_gen", local_tasks)
    _, my_gen = _samples(my_lm, "tiny_gen", local_tasks)
    assert [s["resps"] for s in my_gen] == [s["resps"] for s in ref_gen]
    ref_res, ref_ppl = _samples(ref_lm, "tiny_ppl", local_tasks)
    my_res, my_ppl = _samples(my_lm, "tiny_ppl", local_tasks)
    assert len(my_lm.tok_encode(PPL_ROWS[0]["text"])) > 48  # more than one window
    for a, b in zip(my_ppl, ref_ppl, strict=True):
        assert a["filtered_resps"][0] == pytest.approx(b["filtered_resps"][0], abs=1e-2)
    assert my_res["word_perplexity,none"] == pytest.approx(ref_res["word_perplexity,none"], rel=1e-3)


def test_lm_eval_cli_runs_a_local_task_with_model_lmstack(local_tasks: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "lmstack.evaluation.harness", "run", "--model", "lmstack",
                          "--model_args", "pretrained=smollm2-135m-instruct", "--batch_size", "4", "--tasks", "tiny_mc",
                          "--include_path", str(local_tasks), "--limit", "2"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "tiny_mc" in run.stdout and "acc" in run.stdout
