"""Fixtures shared by several test modules. Plain helpers live in modules beside the tests (cli_helpers.py,
train_helpers.py, rag_helpers.py), importable by name because pyproject.toml puts tests/ on pytest's pythonpath.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli_helpers import tiny_tokenizer
from lmstack.checkpoints import save_native
from lmstack.config import from_name
from lmstack.models import build_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A native checkpoint of a random 2-layer Llama (context 128) with a ChatML tokenizer."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = build_model(from_name("tiny-llama", vocab_size=tok.vocab_size)).eval()
    return save_native(model, tok, tmp_path_factory.mktemp("tiny") / "ckpt")
