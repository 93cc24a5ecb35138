"""Every verb against a table of bad inputs (issue 13, section 5): missing, empty, binary and latin-1 files, a
malformed line in the middle of a JSONL file, a folder where a file is expected, an unwritable output, negative,
zero, NaN and huge numbers, unknown config keys.

For every case: exit code 1 (bad input) or 2 (usage), exactly one `error:` line on stderr that names the input,
no traceback, and nothing new in the output location. In-process through typer's CliRunner, with the tiny
checkpoint from conftest.py; `serve` is covered by test_serve_fuzz.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmstack.cli import app

# Alpaca records with line 2 broken at column 37.
MID_JSONL = ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b", broken}\n'
             '{"instruction": "c", "output": "d"}\n')
OK_JSONL = '{"instruction": "say hi", "output": "hi"}\n{"instruction": "say bye", "output": "bye"}\n' * 4
QA_JSONL = '{"question": "what erupts?", "answer": "volcanoes", "doc": "a.txt"}\n'


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bad (and a few good) inputs, shared by every case; the cases must leave them unchanged."""
    root = tmp_path_factory.mktemp("fuzz-inputs")
    (root / "empty.txt").write_bytes(b"")
    (root / "empty.jsonl").write_bytes(b"")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (root / "binary.txt").write_bytes(b"\x00\x01\xff\xfe\x00 not text")
    (root / "latin1.txt").write_bytes("café olé\nnaïve\n".encode("latin-1"))
    (root / "latin1.jsonl").write_bytes('{"instruction": "café", "output": "olé"}\n'.encode("latin-1"))
    (root / "mid.jsonl").write_text(MID_JSONL)
    (root / "ok.jsonl").write_text(OK_JSONL)
    (root / "qa.jsonl").write_text(QA_JSONL)
    (root / "ok.txt").write_text("Volcanoes erupt when magma rises through the crust.\n")
    (root / "folder").mkdir()
    (root / "folder" / "a.txt").write_text("Lava flows cool into basalt rock.\n")
    (root / "emptydir").mkdir()
    (root / "unknown-top.yaml").write_text("model: tiny-gpt2\nshards: nowhere\nseq_lenn: 32\n")
    (root / "unknown-prepare.yaml").write_text("model: tiny-gpt2\nshards: nowhere\n"
                                               "prepare: {inputs: [a.txt], tokenizr: char}\n")
    (root / "max-stepz.yaml").write_text("model: tiny-gpt2\nshards: nowhere\ntrain: {max_stepz: 1}\n")
    (root / "max-steps-two.yaml").write_text("model: tiny-gpt2\nshards: nowhere\ntrain: {max_steps: two}\n")
    (root / "train-5.yaml").write_text("model: tiny-gpt2\nshards: nowhere\ntrain: 5\n")
    (root / "ft-unknown.yaml").write_text("rankk: 4\n")
    (root / "broken.yaml").write_text("model: [unclosed\n")
    (root / "task-hot.yaml").write_text("name: t\ntype: generate\ndataset: {path: ok.jsonl, fields: [instruction, "
                                        "output]}\nprompt: '{{ instruction }}'\ntarget: '{{ output }}'\n"
                                        "metrics: [exact_match]\ngeneration: {temperature: -1}\n")
    (root / "mid-text.jsonl").write_text(MID_JSONL.replace("instruction", "text"))
    (root / "zero-layers.json").write_text('{"family": "decoder", "n_layer": 0}\n')
    return root


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# (id, argv with {in} = the inputs folder, {out} = an empty output folder, {tiny} = the tiny checkpoint;
#  the text the error line must contain; stdin bytes or None)
CASES: list[tuple[str, list[str], str, bytes | None]] = [
    # generate / chat
    ("generate-latin1-prompt", ["generate", "--model", "{tiny}", "--prompt", "caf\udce9"], "--prompt", None),
    ("generate-missing-model", ["generate", "--model", "{in}/missing", "--prompt", "hi"], "missing", None),
    ("generate-empty-model", ["generate", "--model", "{in}/empty.txt", "--prompt", "hi"], "empty.txt", None),
    ("generate-binary-model", ["generate", "--model", "{in}/binary.bin", "--prompt", "hi"], "binary.bin", None),
    ("generate-folder-model", ["generate", "--model", "{in}/folder", "--prompt", "hi"], "folder", None),
    ("generate-zero-tokens", ["generate", "--model", "{tiny}", "--prompt", "hi", "--max-new-tokens", "0"],
     "max_new_tokens", None),
    ("generate-nan-temperature", ["generate", "--model", "{tiny}", "--prompt", "hi", "--temperature", "nan"],
     "temperature", None),
    ("generate-negative-top-k", ["generate", "--model", "{tiny}", "--prompt", "hi", "--top-k", "-3"], "top_k", None),
    ("generate-huge-top-p", ["generate", "--model", "{tiny}", "--prompt", "hi", "--top-p", "1e300"], "top_p", None),
    ("generate-not-a-number", ["generate", "--model", "{tiny}", "--prompt", "hi", "--max-new-tokens", "many"],
     "--max-new-tokens", None),
    ("chat-latin1-line", ["chat", "--model", "{tiny}", "--max-new-tokens", "2"], "input line 1", b"caf\xe9\n"),
    ("chat-negative-temperature", ["chat", "--model", "{tiny}", "--temperature", "-1"], "temperature", b"hi\n"),
    # models / convert
    ("models-show-missing", ["models", "show", "{in}/missing"], "missing", None),
    ("models-show-binary", ["models", "show", "{in}/binary.bin"], "binary.bin", None),
    ("convert-missing", ["convert", "{in}/missing", "{out}/x"], "missing", None),
    ("convert-empty", ["convert", "{in}/empty.txt", "{out}/x"], "empty.txt", None),
    ("convert-unwritable", ["convert", "{tiny}", "{in}/ok.txt/sub"], "ok.txt", None),
    # tokenizer train / data prepare
    ("tokenizer-missing", ["tokenizer", "train", "{in}/missing", "--out", "{out}/tok"], "missing", None),
    ("tokenizer-latin1", ["tokenizer", "train", "{in}/latin1.txt", "--out", "{out}/tok"], "latin1.txt:1", None),
    ("tokenizer-binary", ["tokenizer", "train", "{in}/binary.txt", "--out", "{out}/tok"], "binary.txt", None),
    ("tokenizer-empty", ["tokenizer", "train", "{in}/empty.txt", "--out", "{out}/tok"], "empty.txt", None),
    ("tokenizer-zero-vocab", ["tokenizer", "train", "{in}/ok.txt", "--out", "{out}/tok", "--vocab-size", "0"],
     "vocab_size", None),
    ("tokenizer-negative-sentinels", ["tokenizer", "train", "{in}/ok.txt", "--out", "{out}/tok", "--sentinels", "-3"],
     "sentinels", None),
    ("tokenizer-unwritable", ["tokenizer", "train", "{in}/ok.txt", "--out", "{in}/ok.txt/tok", "--kind", "char"],
     "ok.txt", None),
    ("prepare-latin1", ["data", "prepare", "{in}/latin1.txt", "--out", "{out}/d", "--tokenizer", "{tiny}"],
     "latin1.txt:1", None),
    ("prepare-mid-jsonl", ["data", "prepare", "{in}/mid-text.jsonl", "--out", "{out}/d", "--tokenizer", "{tiny}"],
     "mid-text.jsonl:2", None),
    ("prepare-missing", ["data", "prepare", "{in}/missing", "--out", "{out}/d", "--tokenizer", "{tiny}"],
     "missing", None),
    ("prepare-empty-folder", ["data", "prepare", "{in}/emptydir", "--out", "{out}/d", "--tokenizer", "{tiny}"],
     "emptydir", None),
    ("prepare-negative-min-chars", ["data", "prepare", "{in}/ok.txt", "--out", "{out}/d", "--tokenizer", "{tiny}",
                                    "--min-chars", "-4"], "min_chars", None),
    ("prepare-nan-val-fraction", ["data", "prepare", "{in}/ok.txt", "--out", "{out}/d", "--tokenizer", "{tiny}",
                                  "--val-fraction", "nan"], "val_fraction", None),
    ("prepare-missing-tokenizer", ["data", "prepare", "{in}/ok.txt", "--out", "{out}/d", "--tokenizer",
                                   "{in}/missing"], "missing", None),
    # plan
    ("plan-missing", ["plan", "--model", "{in}/missing.json"], "missing.json", None),
    ("plan-zero-layers", ["plan", "--model", "{in}/zero-layers.json"], "zero-layers.json", None),
    ("plan-broken-yaml", ["plan", "--model", "{in}/broken.yaml"], "broken.yaml", None),
    ("plan-zero-batch", ["plan", "--model", "tiny-gpt2", "--batch", "0"], "batch", None),
    ("plan-nan-mfu", ["plan", "--model", "tiny-gpt2", "--mfu", "nan"], "mfu", None),
    # pretrain
    ("pretrain-unknown-top-key", ["pretrain", "--config", "{in}/unknown-top.yaml", "--out", "{out}/r"],
     "seq_lenn", None),
    ("pretrain-unknown-prepare-key", ["pretrain", "--config", "{in}/unknown-prepare.yaml", "--out", "{out}/r"],
     "tokenizr", None),
    ("pretrain-max-stepz", ["pretrain", "--config", "{in}/max-stepz.yaml", "--out", "{out}/r"], "max_stepz", None),
    ("pretrain-max-steps-two", ["pretrain", "--config", "{in}/max-steps-two.yaml", "--out", "{out}/r"],
     "max_steps", None),
    ("pretrain-train-5", ["pretrain", "--config", "{in}/train-5.yaml", "--out", "{out}/r"], "train", None),
    ("pretrain-set-abc", ["pretrain", "--model", "tiny-gpt2", "--shards", "{in}/folder", "--out", "{out}/r",
                          "--set", "n_layer=abc"], "n_layer", None),
    ("pretrain-missing-shards", ["pretrain", "--model", "tiny-gpt2", "--shards", "{in}/missing", "--out", "{out}/r"],
     "missing", None),
    ("pretrain-broken-yaml", ["pretrain", "--config", "{in}/broken.yaml", "--out", "{out}/r"], "broken.yaml", None),
    # finetune / merge
    ("finetune-dropout-2", ["finetune", "--model", "{tiny}", "--data", "{in}/ok.jsonl", "--out", "{out}/f",
                            "--dropout", "2"], "dropout", None),
    ("finetune-negative-alpha", ["finetune", "--model", "{tiny}", "--data", "{in}/ok.jsonl", "--out", "{out}/f",
                                 "--alpha", "-8"], "alpha", None),
    ("finetune-nan-alpha", ["finetune", "--model", "{tiny}", "--data", "{in}/ok.jsonl", "--out", "{out}/f",
                            "--alpha", "nan"], "alpha", None),
    ("finetune-negative-limit", ["finetune", "--model", "{tiny}", "--data", "{in}/ok.jsonl", "--out", "{out}/f",
                                 "--limit", "-1"], "limit", None),
    ("finetune-zero-rank", ["finetune", "--model", "{tiny}", "--data", "{in}/ok.jsonl", "--out", "{out}/f",
                            "--rank", "0"], "rank", None),
    ("finetune-mid-jsonl", ["finetune", "--model", "{tiny}", "--data", "{in}/mid.jsonl", "--out", "{out}/f"],
     "mid.jsonl:2", None),
    ("finetune-latin1", ["finetune", "--model", "{tiny}", "--data", "{in}/latin1.jsonl", "--out", "{out}/f"],
     "latin1.jsonl:1", None),
    ("finetune-empty", ["finetune", "--model", "{tiny}", "--data", "{in}/empty.jsonl", "--out", "{out}/f"],
     "empty.jsonl", None),
    ("finetune-binary", ["finetune", "--model", "{tiny}", "--data", "{in}/binary.bin", "--out", "{out}/f"],
     "binary.bin", None),
    ("finetune-folder-data", ["finetune", "--model", "{tiny}", "--data", "{in}/folder", "--out", "{out}/f"],
     "folder: is a folder", None),
    ("finetune-missing-field", ["finetune", "--model", "{tiny}", "--data", "{in}/ok.jsonl", "--out", "{out}/f",
                                "--fields", "instruction=question"], "instruction=question", None),
    ("finetune-unknown-config-key", ["finetune", "--config", "{in}/ft-unknown.yaml", "--model", "{tiny}",
                                     "--data", "{in}/ok.jsonl", "--out", "{out}/f"], "rankk", None),
    ("finetune-huge-seq-len", ["finetune", "--model", "{tiny}", "--data", "{in}/ok.jsonl", "--out", "{out}/f",
                               "--max-seq-len", "100000000"], "max_seq_len", None),
    ("merge-missing-adapter", ["merge", "--adapter", "{in}/missing", "--out", "{out}/m"], "missing", None),
    ("merge-folder-without-adapter", ["merge", "--adapter", "{in}/folder", "--out", "{out}/m"], "folder", None),
    # eval
    ("eval-missing-task", ["eval", "--model", "{tiny}", "--tasks", "{in}/missing.yaml"], "missing.yaml", None),
    ("eval-negative-limit", ["eval", "--model", "{tiny}", "--tasks", "tinyshakespeare-ppl", "--limit", "-1"],
     "--limit", None),
    ("eval-zero-batch", ["eval", "--model", "{tiny}", "--tasks", "tinyshakespeare-ppl", "--batch-size", "0"],
     "--batch-size", None),
    ("eval-broken-task", ["eval", "--model", "{tiny}", "--tasks", "{in}/broken.yaml"], "broken.yaml", None),
    ("eval-bad-sampling-before-load", ["eval", "--model", "{in}/missing", "--tasks", "{in}/task-hot.yaml"],
     "temperature", None),
    # rag
    ("rag-index-zero-batch", ["rag", "index", "{in}/folder", "--index", "{out}/i.db", "--batch-size", "0"],
     "batch_size", None),
    ("rag-index-zero-chunk", ["rag", "index", "{in}/folder", "--index", "{out}/i.db", "--chunk-tokens", "0"],
     "chunk_tokens", None),
    ("rag-index-negative-chunk", ["rag", "index", "{in}/folder", "--index", "{out}/i.db", "--chunk-tokens", "-5"],
     "chunk_tokens", None),
    ("rag-index-negative-overlap", ["rag", "index", "{in}/folder", "--index", "{out}/i.db", "--overlap", "-1"],
     "overlap", None),
    ("rag-index-missing", ["rag", "index", "{in}/missing", "--index", "{out}/i.db"], "missing", None),
    ("rag-index-unwritable", ["rag", "index", "{in}/folder", "--index", "{in}/ok.txt/i.db"], "ok.txt", None),
    ("rag-search-empty-query", ["rag", "search", "", "--index", "{out}/i.db"], "query", None),
    ("rag-search-missing-index", ["rag", "search", "lava", "--index", "{in}/missing.db"], "missing.db", None),
    ("rag-ask-latin1-question", ["rag", "ask", "caf\udce9", "--index", "{out}/i.db"], "question", None),
    ("rag-ask-min-score-2", ["rag", "ask", "lava?", "--index", "{out}/i.db", "--min-score", "2"], "min_score", None),
    ("rag-ask-nan-min-score", ["rag", "ask", "lava?", "--index", "{out}/i.db", "--min-score", "nan"],
     "min_score", None),
    ("rag-ask-negative-temperature", ["rag", "ask", "lava?", "--index", "{out}/i.db", "--temperature", "-1"],
     "temperature", None),
    ("rag-ask-missing-index", ["rag", "ask", "lava?", "--index", "{in}/missing.db"], "missing.db", None),
    ("rag-eval-negative-limit", ["rag", "eval", "{in}/qa.jsonl", "--index", "{out}/i.db", "--limit", "-1"],
     "limit", None),
    ("rag-eval-missing-qa", ["rag", "eval", "{in}/missing.jsonl", "--index", "{in}/missing.db"], "missing", None),
    ("rag-eval-zero-k", ["rag", "eval", "{in}/qa.jsonl", "--index", "{in}/missing.db", "--k", "0"], "k", None),
    # embed
    ("embed-latin1", ["embed", "{in}/latin1.txt", "--out", "{out}/e.npy"], "latin1.txt:1", None),
    ("embed-missing", ["embed", "{in}/missing", "--out", "{out}/e.npy"], "missing", None),
    ("embed-folder", ["embed", "{in}/folder", "--out", "{out}/e.npy"], "folder", None),
    ("embed-empty", ["embed", "{in}/empty.txt", "--out", "{out}/e.npy"], "empty.txt", None),
    ("embed-mid-jsonl", ["embed", "{in}/mid-text.jsonl", "--out", "{out}/e.npy"], "mid-text.jsonl:2", None),
    ("embed-bad-suffix", ["embed", "{in}/ok.txt", "--out", "{out}/e.csv"], "e.csv", None),
    ("embed-zero-batch", ["embed", "{in}/ok.txt", "--out", "{out}/e.npy", "--batch-size", "0"], "batch_size", None),
    # raft build
    ("raft-negative-limit", ["raft", "build", "--corpus", "{in}/folder", "--out", "{out}/r.jsonl", "--qa",
                             "{in}/qa.jsonl", "--limit", "-2"], "limit", None),
    ("raft-missing-corpus", ["raft", "build", "--corpus", "{in}/missing", "--out", "{out}/r.jsonl"],
     "missing", None),
    ("raft-huge-p", ["raft", "build", "--corpus", "{in}/folder", "--out", "{out}/r.jsonl", "--p", "2"], "p ", None),
    ("raft-not-jsonl", ["raft", "build", "--corpus", "{in}/folder", "--out", "{out}/r.txt"], "r.txt", None),
]


@pytest.mark.parametrize("argv,needle,stdin", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(argv: list[str], needle: str, stdin: bytes | None,
                                                  inputs: Path, tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    before = _snapshot(inputs)
    args = [a.format(**{"in": inputs, "out": out, "tiny": tiny}) for a in argv]
    result = CliRunner().invoke(app, args, input=stdin)
    assert isinstance(result.exception, SystemExit) or result.exception is None, f"uncaught {result.exception!r}"
    assert result.exit_code in (1, 2), (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert needle in errors[0], (needle, errors[0])
    assert list(out.iterdir()) == [], "the output location must stay empty"
    assert _snapshot(inputs) == before, "the inputs must stay unchanged"
