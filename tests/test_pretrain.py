"""`lmstack pretrain` end to end: tokenizer, shards, the four objectives, YAML configs, torchrun."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmstack.data.prepare import prepare_data
from lmstack.data.tokenizer_train import train_tokenizer
from lmstack.training.pretrain import pretrain
from lmstack.training.trainer import TrainOptions
from lmstack.checkpoints import load_model
from lmstack.errors import LmstackError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TEXT = SHARED / "tinyshakespeare" / "input.txt"
FAST = TrainOptions(max_steps=4, batch_size=4, eval_every=2, eval_batches=2, progress=False, warmup_steps=1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT.read_text()[:60_000])
    tok = train_tokenizer([str(corpus)], out=str(root / "tok"), kind="bpe", vocab_size=400, sentinels=20)
    prepare_data([str(corpus)], out=str(root / "shards"), tokenizer=str(tok), val_fraction=0.2)
    return root / "shards"


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective,model", [("causal", "tiny-llama"), ("causal", "tiny-gpt2"),
                                             ("mlm", "tiny-bert"), ("span", "tiny-t5")])
def test_objectives_train_and_save(objective, model, shards, tmp_path):
    result = pretrain(objective=objective, model=model, shards=str(shards), out=str(tmp_path), seq_len=32,
                      train=FAST)
    assert result.step == 4
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["val_loss"] > 0 and r["tokens_per_s"] > 0 for r in records)
    loaded = load_model(str(tmp_path / "final"), dtype="float32")
    assert loaded.config.family == {"causal": "decoder", "mlm": "encoder", "span": "seq2seq"}[objective]
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size == loaded.config.vocab_size


def test_seq2seq_pairs_from_a_yaml_config(tmp_path):
    src = tmp_path / "src.txt"
    tgt = tmp_path / "tgt.txt"
    lines_en = (SHARED / "multi30k" / "train.en").read_text().splitlines()[:300]
    lines_de = (SHARED / "multi30k" / "train.de").read_text().splitlines()[:300]
    src.write_text("\n".join(lines_en) + "\n")
    tgt.write_text("\n".join(lines_de) + "\n")
    tok = train_tokenizer([str(src), str(tgt)], out=str(tmp_path / "tok"), vocab_size=500, doc_split="line")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
objective: seq2seq
model: tiny-transformer
tokenizer: {tok}
seq_len: 48
pairs: {{train: [{src}, {tgt}], val: [{src}, {tgt}], limit: 300}}
train: {{max_steps: 6, batch_size: 8, eval_every: 3, eval_batches: 2, warmup_steps: 1, lr: 0.003}}
""")
    result = pretrain(config=str(cfg), out=str(tmp_path / "run"), train=TrainOptions(max_steps=4, progress=False))
    assert result.step == 4  # the command line overrides the file
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [3, 4]
    assert records[-1]["val_loss"] < records[0]["val_loss"] + 0.5


def test_bad_configs_give_one_line_errors(shards, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective: causal\nmodel: [unclosed\n")
    with pytest.raises(LmstackError, match=r"bad.yaml:\d+: invalid YAML"):
        pretrain(config=str(bad), out=str(tmp_path / "x"))
    with pytest.raises(LmstackError, match="trains a decoder model; preset 'tiny-bert' is a encoder"):
        pretrain(objective="causal", model="tiny-bert", shards=str(shards), out=str(tmp_path / "y"), train=FAST)
    with pytest.raises(LmstackError, match="unknown preset 'nope'; known presets:"):
        pretrain(model="nope", shards=str(shards), out=str(tmp_path / "z"), train=FAST)
    with pytest.raises(LmstackError, match="pretrain needs --shards"):
        pretrain(model="tiny-gpt2", out=str(tmp_path / "w"))
    with pytest.raises(LmstackError, match="unknown LlamaConfig|unknown DecoderConfig field"):
        pretrain(model="tiny-gpt2", shards=str(shards), out=str(tmp_path / "v"), set=["n_layers=3"], train=FAST)


def test_resume_with_a_different_model_config_names_the_key(shards, tmp_path):
    pretrain(model="tiny-gpt2", shards=str(shards), out=str(tmp_path), seq_len=32, train=FAST)
    with pytest.raises(LmstackError, match="differs in model_config"):
        pretrain(model="tiny-gpt2", shards=str(shards), out=str(tmp_path), seq_len=32,
                 set=["n_layer=3"], train=dataclasses.replace(FAST, max_steps=6))


@pytest.mark.parametrize("text,message", [
    ("train: {max_stepz: 1}", "bad.yaml: train.max_stepz: unknown key (did you mean max_steps?)"),
    ("train: {max_steps: two}", "bad.yaml: train.max_steps: expected an integer, got 'two'"),
    ("train: 5", "bad.yaml: train: expected a mapping of keys, got 5"),
    ("seq_lenn: 32", "bad.yaml: seq_lenn: unknown key (did you mean seq_len?)"),
    ("prepare: {inputs: [a.txt], tokenizr: char}", "bad.yaml: prepare.tokenizr: unknown key (did you mean tokenizer?)"),
    ("prepare: {tokenizer: char}", "bad.yaml: prepare: missing required key 'inputs'"),
    ("objective: causl", "bad.yaml: objective: expected one of causal, mlm, span, seq2seq, got 'causl'"),
])
def test_config_keys_and_types_are_checked(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: tiny-gpt2\nshards: nowhere\n{text}\n")
    with pytest.raises(LmstackError) as info:
        pretrain(config=str(bad), out=str(tmp_path / "x"))
    assert str(info.value) == f"{bad}: {message.removeprefix('bad.yaml: ')}"


def test_model_overrides_are_typed(shards, tmp_path):
    with pytest.raises(LmstackError, match=r"--set: model_overrides.n_layer: expected an integer, got 'abc'"):
        pretrain(model="tiny-gpt2", shards=str(shards), out=str(tmp_path), set=["n_layer=abc"], train=FAST)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: tiny-gpt2\nshards: {shards}\nmodel_overrides: {{dropout: high}}\n")
    with pytest.raises(LmstackError, match=rf"^{cfg}: model_overrides.dropout: expected a number, got 'high'"):
        pretrain(config=str(cfg), out=str(tmp_path), train=FAST)


def test_cli_expands_the_trainer_options_and_the_data_root(shards, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lmstack.cli import app

    monkeypatch.setenv("LMSTACK_DATA", str(shards.parent))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: tiny-gpt2\nshards: ${data}/shards\nseq_len: 32\n"
                   "train: {max_steps: 9, batch_size: 4, eval_every: 2, eval_batches: 1, warmup_steps: 1}\n")
    result = CliRunner().invoke(app, ["pretrain", "--config", str(cfg), "--out", str(tmp_path / "run"),
                                      "--max-steps", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["step"] == 2  # --max-steps beats the file's 9; ${data} is LMSTACK_DATA
    result = CliRunner().invoke(app, ["pretrain", "--config", str(cfg), "--out", str(tmp_path / "run2"),
                                      "--data-root", str(tmp_path / "elsewhere"), "--max-steps", "2"])
    assert result.exit_code == 1 and "elsewhere" in result.stderr, result.output


@pytest.mark.slow
def test_torchrun_fsdp_through_the_cli(shards, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
           "--rdzv_endpoint=127.0.0.1:0", "-m", "lmstack", "pretrain", "--strategy", "fsdp", "--model",
           "tiny-llama", "--shards", str(shards), "--out", str(tmp_path), "--seq-len", "32", "--max-steps", "4",
           "--batch-size", "4", "--eval-every", "2", "--eval-batches", "2", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4]
    assert load_model(str(tmp_path / "final"), dtype="float32").model(torch.tensor([[1, 2, 3]])).shape[-1] > 0


def test_pretrain_resume_is_announced_and_all_corrupt_checkpoints_stop_it(shards, tmp_path, capsys):
    pretrain(model="tiny-gpt2", shards=str(shards), out=str(tmp_path), seq_len=32, train=FAST)
    pretrain(model="tiny-gpt2", shards=str(shards), out=str(tmp_path), seq_len=32,
             train=dataclasses.replace(FAST, max_steps=6))
    assert "resuming from step 4 (checkpoint " in capsys.readouterr().err
    for weights in (tmp_path / "checkpoints").glob("step_*/model.safetensors"):
        weights.write_bytes(b"corrupt")
    with pytest.raises(LmstackError, match=r"step_000004, step_000006 are all incomplete or corrupt.*--no-resume"):
        pretrain(model="tiny-gpt2", shards=str(shards), out=str(tmp_path), seq_len=32,
                 train=dataclasses.replace(FAST, max_steps=6))
    pretrain(model="tiny-gpt2", shards=str(shards), out=str(tmp_path), seq_len=32, resume=False,
             train=dataclasses.replace(FAST, max_steps=6))
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4, 6]  # started over, each step once
