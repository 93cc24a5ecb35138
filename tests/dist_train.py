"""Run by test_distributed.py under torchrun (or plainly for the single-process baseline)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import RandomTokens  # noqa: E402

from lmstack.config import from_name  # noqa: E402
from lmstack.models.decoder import Decoder  # noqa: E402
from lmstack.training import distributed  # noqa: E402
from lmstack.training.objectives import causal_lm  # noqa: E402
from lmstack.training.trainer import TrainConfig, Trainer  # noqa: E402

strategy, out, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
device = distributed.init(strategy)
torch.manual_seed(0)
model = Decoder(from_name("tiny-llama", n_layer=2, d_model=32, d_ff=64, n_head=2, n_kv_head=1))
wrapped = distributed.wrap(model, strategy)
cfg = TrainConfig(out_dir=out, max_steps=max_steps, batch_size=8, micro_batch_size=2, lr=3e-3, min_lr=3e-4,
                  warmup_steps=2, eval_every=3, save_every=3, eval_batches=4, log_every=1, progress=False,
                  peak_flops=1e9, keep_last=5)
Trainer(wrapped, causal_lm, RandomTokens(seq_len=16), cfg, state_model=model).fit()
distributed.shutdown()
