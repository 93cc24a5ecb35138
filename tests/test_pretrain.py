"""`lmstack pretrain` end to end: tokenizer, shards, the four objectives, YAML configs, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmstack import commands
from lmstack.checkpoints import load_model
from lmstack.errors import LmstackError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TEXT = SHARED / "tinyshakespeare" / "input.txt"
FAST = dict(max_steps=4, batch_size=4, eval_every=2, eval_batches=2, progress=False, warmup_steps=1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT.read_text()[:60_000])
    tok = commands.tokenizer_train([str(corpus)], out=str(root / "tok"), kind="bpe", vocab_size=400, sentinels=20)
    commands.data_prepare([str(corpus)], out=str(root / "shards"), tokenizer=str(tok), val_fraction=0.2)
    return root / "shards"


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective,model", [("causal", "tiny-llama"), ("causal", "tiny-gpt2"),
                                             ("mlm", "tiny-bert"), ("span", "tiny-t5")])
def test_objectives_train_and_save(objective, model, shards, tmp_path):
    result = commands.pretrain(objective=objective, model=model, shards=str(shards), out=str(tmp_path),
                               seq_len=32, **FAST)
    assert result["step"] == 4
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["val_loss"] > 0 and r["tokens_per_s"] > 0 for r in records)
    loaded = load_model(str(tmp_path / "final"))
    assert loaded.config.family == {"causal": "decoder", "mlm": "encoder", "span": "seq2seq"}[objective]
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size == loaded.config.vocab_size


def test_seq2seq_pairs_from_a_yaml_config(tmp_path):
    src = tmp_path / "src.txt"
    tgt = tmp_path / "tgt.txt"
    lines_en = (SHARED / "multi30k" / "train.en").read_text().splitlines()[:300]
    lines_de = (SHARED / "multi30k" / "train.de").read_text().splitlines()[:300]
    src.write_text("\n".join(lines_en) + "\n")
    tgt.write_text("\n".join(lines_de) + "\n")
    tok = commands.tokenizer_train([str(src), str(tgt)], out=str(tmp_path / "tok"), vocab_size=500, doc_split="line")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""
objective: seq2seq
model: tiny-transformer
tokenizer: {tok}
seq_len: 48
pairs: {{train: [{src}, {tgt}], val: [{src}, {tgt}], limit: 300}}
train: {{max_steps: 6, batch_size: 8, eval_every: 3, eval_batches: 2, warmup_steps: 1, lr: 0.003}}
""")
    result = commands.pretrain(config=str(cfg), out=str(tmp_path / "run"), max_steps=4, progress=False)
    assert result["step"] == 4  # the command line overrides the file
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [3, 4]
    assert records[-1]["val_loss"] < records[0]["val_loss"] + 0.5


def test_bad_configs_give_one_line_errors(shards, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective: causal\nmodel: [unclosed\n")
    with pytest.raises(LmstackError, match=r"bad.yaml:\d+: invalid YAML"):
        commands.pretrain(config=str(bad), out=str(tmp_path / "x"))
    with pytest.raises(LmstackError, match="trains a decoder model; preset 'tiny-bert' is a encoder"):
        commands.pretrain(objective="causal", model="tiny-bert", shards=str(shards), out=str(tmp_path / "y"), **FAST)
    with pytest.raises(LmstackError, match="unknown preset 'nope'; known presets:"):
        commands.pretrain(model="nope", shards=str(shards), out=str(tmp_path / "z"), **FAST)
    with pytest.raises(LmstackError, match="pretrain needs --shards"):
        commands.pretrain(model="tiny-gpt2", out=str(tmp_path / "w"))
    with pytest.raises(LmstackError, match="unknown LlamaConfig|unknown DecoderConfig field"):
        commands.pretrain(model="tiny-gpt2", shards=str(shards), out=str(tmp_path / "v"), set=["n_layers=3"], **FAST)


def test_resume_with_a_different_model_config_names_the_key(shards, tmp_path):
    commands.pretrain(model="tiny-gpt2", shards=str(shards), out=str(tmp_path), seq_len=32, **FAST)
    with pytest.raises(LmstackError, match="differs in model_config"):
        commands.pretrain(model="tiny-gpt2", shards=str(shards), out=str(tmp_path), seq_len=32,
                          set=["n_layer=3"], **{**FAST, "max_steps": 6})


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
    assert load_model(str(tmp_path / "final")).model(torch.tensor([[1, 2, 3]])).shape[-1] > 0


def test_pretrain_resume_is_announced_and_all_corrupt_checkpoints_stop_it(shards, tmp_path, capsys):
    commands.pretrain(model="tiny-gpt2", shards=str(shards), out=str(tmp_path), seq_len=32, **FAST)
    commands.pretrain(model="tiny-gpt2", shards=str(shards), out=str(tmp_path), seq_len=32,
                      **{**FAST, "max_steps": 6})
    assert "resuming from step 4 (checkpoint " in capsys.readouterr().err
    for weights in (tmp_path / "checkpoints").glob("step_*/model.safetensors"):
        weights.write_bytes(b"corrupt")
    with pytest.raises(LmstackError, match=r"step_000004, step_000006 are all incomplete or corrupt.*--no-resume"):
        commands.pretrain(model="tiny-gpt2", shards=str(shards), out=str(tmp_path), seq_len=32,
                          **{**FAST, "max_steps": 6})
    commands.pretrain(model="tiny-gpt2", shards=str(shards), out=str(tmp_path), seq_len=32, resume=False,
                      **{**FAST, "max_steps": 6})
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4, 6]  # started over, each step once
