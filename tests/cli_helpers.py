"""Helpers shared by the CLI-facing tests (test_cli, test_eval, test_finetune): a tiny ChatML tokenizer, running
`lmstack` in-process or as a subprocess, and the one-line-error check. The `tiny` checkpoint fixture built from
them is in conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from typer.testing import CliRunner

from lmstack.cli import app
from lmstack.tokenizer import Tokenizer

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
          "a small model for a small test", "what is the capital of france? paris is."] * 20
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}


def tiny_tokenizer() -> Tokenizer:
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    return Tokenizer(backend, bos_token="<|im_start|>", eos_token="<|endoftext|>", chat_template=CHATML,
                     extra_stop_tokens=["<|im_end|>"])


def run_cli(*args: str, input: str | None = None):
    """In-process `lmstack ARGS`; stdout and stderr are kept apart."""
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def run_module(*args: str, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m lmstack ARGS` in a subprocess: the real entry point, exit code and streams."""
    return subprocess.run([sys.executable, "-m", "lmstack", *map(str, args)], input=input, capture_output=True,
                          text=True, env=ENV, timeout=timeout)


def assert_one_line_error(result, *needles: str) -> str:
    """Exit code 1, exactly one line on stderr starting with `error:`, no traceback."""
    stderr = result.stderr
    code = result.returncode if isinstance(result, subprocess.CompletedProcess) else result.exit_code
    if not isinstance(result, subprocess.CompletedProcess):
        assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    assert code == 1, (code, stderr)
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
