"""DDP and FSDP2 on CPU with gloo and 2 processes match the single-process run at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmstack.config import from_name
from lmstack.models.decoder import Decoder

SCRIPT = str(Path(__file__).parent / "dist_train.py")
pytestmark = pytest.mark.slow


def run(strategy: str, out: Path, max_steps: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if strategy == "single":
        cmd = [sys.executable, SCRIPT, strategy, str(out), str(max_steps)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
               "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", SCRIPT, strategy, str(out), str(max_steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> list[dict]:
    return run("single", tmp_path_factory.mktemp("single"), 6)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_matches_single_process(strategy, single, tmp_path):
    multi = run(strategy, tmp_path, 6)
    assert [r["step"] for r in multi] == [r["step"] for r in single] == [3, 6]
    for a, b in zip(single, multi):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)


def test_fsdp_checkpoint_loads_in_one_process_and_resumes(tmp_path, single):
    multi = run("fsdp", tmp_path, 3)
    weights = load_file(str(tmp_path / "checkpoints" / "step_000003" / "model.safetensors"))
    model = Decoder(from_name("tiny-llama", n_layer=2, d_model=32, d_ff=64, n_head=2, n_kv_head=1))
    model.load_state_dict(weights, strict=True)  # full, unsharded tensors
    assert all(torch.isfinite(v).all() for v in weights.values())
    resumed = run("fsdp", tmp_path, 6)  # same out dir: resumes from step 3 under FSDP
    assert [r["step"] for r in resumed] == [3, 6]
    assert resumed[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=1e-4)
    assert multi[0]["val_loss"] == pytest.approx(single[0]["val_loss"], rel=1e-4)
