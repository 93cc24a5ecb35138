"""The one trainer: accumulation, schedule, eval/logging, exact resume, NaN, corrupt checkpoints, full disk."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lmstack.config import from_name
from lmstack.errors import LmstackError
from lmstack.models.decoder import Decoder
from lmstack.training import state as ckpt
from lmstack.training.objectives import causal_lm
from lmstack.training.optim import lr_at, param_groups
from lmstack.training.trainer import LossOutput, TrainConfig, Trainer

from train_helpers import RandomTokens

torch.set_num_threads(1)


def tiny_model(seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(from_name("tiny-llama", n_layer=1, d_model=32, d_ff=64, n_head=2, n_kv_head=1))


def config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp_path / "run"), max_steps=12, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                eval_every=4, eval_batches=2, log_every=2, progress=False, peak_flops=1e9)
    return TrainConfig(**{**base, **kw})


def test_accumulation_gives_the_same_gradient(tmp_path):
    data = RandomTokens(seq_len=12)
    grads = {}
    for micro in (8, 32):
        model = tiny_model()
        trainer = Trainer(model, causal_lm, data, config(tmp_path, batch_size=32, micro_batch_size=micro))
        loss, tokens = trainer.accumulate_gradients(step=3)
        grads[micro] = ([p.grad.clone() for p in trainer.params], loss, tokens)
    assert grads[8][2] == grads[32][2] == 32 * 12
    assert grads[8][1] == pytest.approx(grads[32][1], rel=1e-6)
    for a, b in zip(grads[8][0], grads[32][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_weight_decay_only_on_matrices():
    groups = param_groups(tiny_model(), 0.1)
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def test_warmup_then_cosine():
    assert lr_at(0, 1.0, 0.1, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 0.1, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 0.1, 10, 100) == pytest.approx(0.55)
    assert lr_at(100, 1.0, 0.1, 10, 100) == pytest.approx(0.1)
    assert lr_at(500, 1.0, 0.1, 10, 100) == pytest.approx(0.1)


def test_fit_learns_logs_and_plots(tmp_path):
    cfg = config(tmp_path, max_steps=40, eval_every=10)
    result = Trainer(tiny_model(), causal_lm, RandomTokens(seq_len=16), cfg).fit()
    out = Path(cfg.out_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    for key in ("step", "train_loss", "val_loss", "tokens_per_s", "elapsed_s"):
        assert key in records[0]
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.3
    assert records[-1]["val_loss"] < math.log(256)
    assert (out / "loss.png").stat().st_size > 1000
    assert list((out / "tensorboard").iterdir())
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_000030", "step_000040"]
    assert result.stop_reason == "max_steps" and result.step == 40


def test_bf16_autocast_trains(tmp_path):
    cfg = config(tmp_path, precision="bf16", max_steps=8)
    result = Trainer(tiny_model(), causal_lm, RandomTokens(seq_len=16), cfg).fit()
    assert math.isfinite(result.train_loss)


def test_max_tokens_and_early_stopping(tmp_path):
    r = Trainer(tiny_model(), causal_lm, RandomTokens(seq_len=16), config(tmp_path, max_tokens=8 * 16 * 5)).fit()
    assert r.stop_reason == "max_tokens" and r.step == 5
    # lr so small that val never improves past the first eval -> patience runs out
    cfg = config(tmp_path / "b", lr=1e-9, min_lr=1e-9, max_steps=100, eval_every=2, early_stopping_patience=2)
    r = Trainer(tiny_model(), causal_lm, RandomTokens(seq_len=16), cfg).fit()
    assert r.stop_reason == "early_stopping" and r.step < 100


def test_max_time_stops_with_a_checkpoint(tmp_path):
    cfg = config(tmp_path, max_steps=10_000, max_time=0.5, eval_every=10_000)
    r = Trainer(tiny_model(), causal_lm, RandomTokens(seq_len=16), cfg).fit()
    assert r.stop_reason == "max_time" and r.step < 10_000
    assert ckpt.latest_checkpoint(Path(cfg.out_dir) / "checkpoints").step == r.step


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def poisoned(model, batch):
        out = causal_lm(model, batch)
        if not model.training:
            return out
        poisoned.calls += 1
        return LossOutput(out.loss_sum * (float("nan") if poisoned.calls > 6 else 1.0), out.n_targets, out.n_tokens)
    poisoned.calls = 0
    cfg = config(tmp_path, max_steps=20)
    with pytest.raises(LmstackError, match=r"loss is nan at step 6.*step_000004"):
        Trainer(tiny_model(), poisoned, RandomTokens(seq_len=16), cfg).fit()
    assert ckpt.latest_checkpoint(Path(cfg.out_dir) / "checkpoints").step == 4


def test_resume_with_a_different_config_names_the_keys(tmp_path):
    Trainer(tiny_model(), causal_lm, RandomTokens(seq_len=16), config(tmp_path, max_steps=4)).fit()
    with pytest.raises(LmstackError, match=r"differs in lr .*weight_decay"):
        Trainer(tiny_model(), causal_lm, RandomTokens(seq_len=16),
                config(tmp_path, max_steps=8, lr=1e-2, weight_decay=0.0)).fit()


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    cfg = config(tmp_path, max_steps=8)
    Trainer(tiny_model(), causal_lm, RandomTokens(seq_len=16), cfg).fit()
    root = Path(cfg.out_dir) / "checkpoints"
    weights = root / "step_000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    trainer = Trainer(tiny_model(), causal_lm, RandomTokens(seq_len=16), config(tmp_path, max_steps=8))
    assert trainer.resume() and trainer.step == 4
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step_000008" in err and "fails its checksum" in err


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = config(tmp_path, max_steps=8)
    trainer = Trainer(tiny_model(), causal_lm, RandomTokens(seq_len=16), cfg)
    real_save = ckpt.save_file

    def full_disk(tensors, path, *a, **k):
        if "step_000008" in str(path):
            Path(path).write_bytes(b"x" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *a, **k)
    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(LmstackError, match=r"step 8 \(No space left on device\); .*step_000004 is intact"):
        trainer.fit()
    root = Path(cfg.out_dir) / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step_000004"]
    assert ckpt.verify(root / "step_000004") is None


RUN_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from train_helpers import RandomTokens
    from test_trainer import tiny_model, config
    from lmstack.training.objectives import causal_lm
    from lmstack.training.trainer import Trainer
    from pathlib import Path
    torch.set_num_threads(1)
    cfg = config(Path({tmp!r}), max_steps=30, eval_every=5, save_every=5, keep_last=10, warmup_steps=3)
    Trainer(tiny_model(), causal_lm, RandomTokens(seq_len=16), cfg).fit()
""")


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": tests + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def script(tmp: Path) -> list[str]:
        return [sys.executable, "-c", RUN_SCRIPT.format(tests=tests, tmp=str(tmp))]

    subprocess.run(script(tmp_path / "a"), check=True, env=env, timeout=300)
    killed = subprocess.Popen(script(tmp_path / "b"), env=env)
    root = tmp_path / "b" / "run" / "checkpoints"
    deadline = time.time() + 240
    while not (root / "step_000010" / "state.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    subprocess.run(script(tmp_path / "b"), check=True, env=env, timeout=300)

    def metrics(tmp: Path) -> list[dict]:
        return [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [5, 10, 15, 20, 25, 30]
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-6, abs=1e-7)
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-6, abs=1e-7)


# ------------------------------------------------------------------------------- resume (issue 13)


def test_resume_says_where_it_resumes_from(tmp_path, capsys):
    Trainer(tiny_model(), causal_lm, RandomTokens(seq_len=16), config(tmp_path, max_steps=8)).fit()
    capsys.readouterr()
    Trainer(tiny_model(), causal_lm, RandomTokens(seq_len=16), config(tmp_path, max_steps=12)).fit()
    path = Path(tmp_path / "run" / "checkpoints" / "step_000008")
    assert f"resuming from step 8 (checkpoint {path})" in capsys.readouterr().err


def test_every_checkpoint_corrupt_stops_unless_asked_to_start_over(tmp_path):
    cfg = config(tmp_path, max_steps=8)
    Trainer(tiny_model(), causal_lm, RandomTokens(seq_len=16), cfg).fit()
    out = Path(cfg.out_dir)
    for weights in (out / "checkpoints").glob("step_*/model.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(LmstackError, match=r"step_000004.*step_000008.*resume") as e:
        Trainer(tiny_model(), causal_lm, RandomTokens(seq_len=16), config(tmp_path, max_steps=8)).fit()
    assert "\n" not in str(e.value)
    assert (out / "metrics.jsonl").read_text() == metrics  # nothing was touched
    Trainer(tiny_model(), causal_lm, RandomTokens(seq_len=16), config(tmp_path, max_steps=8)).fit(resume=False)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8]  # started over: the old steps are not there twice
    assert ckpt.latest_checkpoint(out / "checkpoints").step == 8


def test_resume_mismatch_names_only_the_nested_keys_that_differ(tmp_path):
    run = {"train": {"lr": 1e-3, "batch_size": 8, "warmup_steps": 2, "seed": 1}, "model": "tiny-llama"}
    cfg = config(tmp_path, max_steps=4)
    Trainer(tiny_model(), causal_lm, RandomTokens(seq_len=16), cfg, run_config=run).fit()
    changed = {**run, "train": {**run["train"], "lr": 2e-3}}
    with pytest.raises(LmstackError) as e:
        Trainer(tiny_model(), causal_lm, RandomTokens(seq_len=16), config(tmp_path, max_steps=8),
                run_config=changed).fit()
    assert "train.lr (0.001 -> 0.002)" in str(e.value)
    assert "batch_size" not in str(e.value) and "warmup_steps" not in str(e.value)


# ------------------------------------------------------------------------------ MFU and the peak (issue 13)


def test_peak_flops_is_measured_once_per_machine_and_dtype_then_read_back(tmp_path, monkeypatch):
    from lmstack.training import flops

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(flops.PEAK_FLOPS_ENV, raising=False)
    calls = []
    monkeypatch.setattr(flops, "measure_peak_flops", lambda dtype, device="cpu": calls.append(dtype) or 5e10)
    first = flops.peak_flops(torch.float32, "cpu")
    assert (first.flops, first.source) == (5e10, "measured") and calls == [torch.float32]
    cached = json.loads((tmp_path / "cache" / "lmstack" / "peak_flops.json").read_text())
    assert list(cached.values()) == [5e10] and "float32" in next(iter(cached))
    again = flops.peak_flops(torch.float32, "cpu")
    assert again.flops == 5e10 and "peak_flops.json" in again.source and calls == [torch.float32]
    flops.peak_flops(torch.bfloat16, "cpu")  # another dtype is another entry
    assert calls == [torch.float32, torch.bfloat16]
    monkeypatch.setenv(flops.PEAK_FLOPS_ENV, "2.5e11")
    assert flops.peak_flops(torch.float32, "cpu").flops == 2.5e11
    monkeypatch.setenv(flops.PEAK_FLOPS_ENV, "fast")
    with pytest.raises(LmstackError, match=flops.PEAK_FLOPS_ENV):
        flops.peak_flops(torch.float32, "cpu")


def test_mfu_above_one_is_never_shown_without_a_warning(tmp_path, capsys):
    cfg = config(tmp_path, max_steps=8, peak_flops=1.0)  # a peak far below what any step achieves
    Trainer(tiny_model(), causal_lm, RandomTokens(seq_len=16), cfg).fit()
    err = capsys.readouterr().err
    assert err.count("warning: MFU") == 1 and "peak" in err and "too low" in err
    records = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mfu"] > 1 and "too low" in r["mfu_warning"] for r in records)
