"""Regressions from the hardening pass (issue 13): each test reproduces a failure a newcomer or a fuzzing pass
found, so it cannot come back."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmstack.errors import LmstackError


# ------------------------------------------------------------------------------- eval comparison chart


def test_comparison_chart_never_draws_a_negative_axis_for_zero_scores():
    pytest.importorskip("matplotlib")
    from lmstack.evaluation.report import chart_figure
    from lmstack.evaluation.runner import TaskResult

    results = {m: {"qa": TaskResult("qa", "generate", {"exact_match": 0.0, "f1": 0.0}, {"n": 3})}
               for m in ("a", "b")}
    fig = chart_figure(results)
    for ax in fig.axes[:2]:
        low, high = ax.get_ylim()
        assert low == 0 and high > 0


# ------------------------------------------------------------------------------------- atomic writes


def _killed_writer(dest, folder: bool = False) -> None:
    """Start a process that begins an atomic write of `dest`, SIGKILL it mid-write, and wait for it."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    marker = Path(str(dest) + ".started")
    writer = "atomic_write_dir" if folder else "atomic_write"
    body = ("lambda t: (open(os.path.join(t, 'w.bin') if FOLDER else t, 'wb').write(b'x' * 4096), "
            "open(MARK, 'w').close(), time.sleep(60))")
    code = (f"import os, time\nfrom lmstack.io import {writer}\nFOLDER, MARK = {folder}, {str(marker)!r}\n"
            f"{writer}({str(dest)!r}, {body})\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 60
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    marker.unlink()


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_atomic_write_leaves_a_temp_the_next_write_removes(tmp_path):
    from lmstack.io import atomic_write, atomic_write_text, temp_path

    dest = tmp_path / "model.safetensors"
    _killed_writer(dest)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model.safetensors.tmp-")  # named after its destination
    (tmp_path / ".model.safetensors.ab12cd34.tmp").write_bytes(b"x")  # what earlier versions (mkstemp) left
    other = temp_path(tmp_path / "other.json", pid=_dead_pid())  # another destination's: not ours to judge
    other.write_bytes(b"x")
    atomic_write(dest, lambda tmp: open(tmp, "wb").write(b"new"))
    assert dest.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "model.safetensors"]
    atomic_write_text(tmp_path / "other.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "other.json"]


def test_a_live_writers_temp_is_left_alone(tmp_path):
    import os

    from lmstack.io import atomic_write_text, temp_path

    parent = os.getppid()  # alive for the whole test
    theirs = temp_path(tmp_path / "a.txt", pid=parent)
    theirs.write_text("in progress")
    atomic_write_text(tmp_path / "a.txt", "mine")
    assert theirs.exists() and (tmp_path / "a.txt").read_text() == "mine"


def test_a_killed_folder_write_is_cleaned_by_the_next_one(tmp_path):
    from lmstack.io import atomic_write_dir

    dest = tmp_path / "adapter"
    _killed_writer(dest, folder=True)
    assert [p.name for p in tmp_path.iterdir()][0].startswith(".adapter.tmp-")
    atomic_write_dir(dest, lambda d: (d / "w.bin").write_bytes(b"ok"))
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"] and (dest / "w.bin").read_bytes() == b"ok"


def test_written_files_and_folders_follow_the_umask(tmp_path):
    import os

    import torch

    from lmstack.io import atomic_write, atomic_write_dir
    from lmstack.training.state import save_checkpoint

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "w.bin", lambda tmp: open(tmp, "wb").write(b"x"))
        atomic_write_dir(tmp_path / "adapter", lambda d: (d / "a.json").write_text("{}"))
        ckpt = save_checkpoint(tmp_path / "ckpt", 3, {"w": torch.zeros(2)}, {"state": {}}, {"config": {}}, 2)
    finally:
        os.umask(old)
    assert (tmp_path / "w.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
    assert ckpt.stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in ckpt.iterdir()} == {0o644}


def test_write_errors_name_the_destination_not_the_temp(tmp_path):
    import errno

    from lmstack.io import atomic_write

    def full_disk(tmp: str) -> None:
        open(tmp, "wb").write(b"x")
        raise OSError(errno.ENOSPC, "No space left on device", tmp)

    dest = tmp_path / "model.safetensors"
    with pytest.raises(OSError) as e:
        atomic_write(dest, full_disk)
    assert e.value.filename == str(dest) and ".tmp" not in str(e.value) and "No space left" in str(e.value)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ section 2-4: errors, silent behaviour, messages


def test_rag_index_skips_binary_and_latin1_text_with_a_warning(tmp_path, capsys):
    from lmstack.rag.ingest import ingest

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "good.txt").write_text("Volcanoes erupt when magma rises through the crust.\n")
    (folder / "latin1.txt").write_bytes("Le café est à côté.\n".encode("latin-1"))
    (folder / "binary.txt").write_bytes(b"\x7fELF\x02\x01\x00\x00\xff\xfe")
    out = ingest([str(folder)], str(tmp_path / "i.db"), progress=False)
    assert out["added"] == 1
    reasons = {Path(s["path"]).name: s["reason"] for s in out["skipped"]}
    assert "latin1.txt:1: not valid UTF-8 (byte 0xe9" in reasons["latin1.txt"]
    assert "binary.txt:1: a binary file" in reasons["binary.txt"]
    assert capsys.readouterr().err.count("warning: skipping") == 2


def test_rag_index_shows_embedding_progress_and_commits_each_document(tmp_path, monkeypatch, capsys):
    """A kill during embedding keeps the documents already written (each is committed after its embedding)."""
    from lmstack.rag.ingest import ingest
    from lmstack.rag.store import Store, open_index

    folder = tmp_path / "docs"
    folder.mkdir()
    for k in range(3):
        (folder / f"d{k}.txt").write_text(f"Document {k} is about topic number {k}.\n")
    writes = []
    real = Store.write_document

    def write_then_die(self, *args, **kwargs):
        if len(writes) == 2:
            raise KeyboardInterrupt  # a kill after two documents were embedded and written
        writes.append(real(self, *args, **kwargs))
        return writes[-1]

    monkeypatch.setattr(Store, "write_document", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        ingest([str(folder)], str(tmp_path / "i.db"), progress=True)
    assert "embedding" in capsys.readouterr().err  # the second bar: chunks embedded
    monkeypatch.undo()
    with open_index(str(tmp_path / "i.db")) as store:
        assert store.stats()["documents"] == 2


def test_chat_reports_a_non_utf8_line_and_goes_on(tiny):
    from cli_helpers import run_cli

    result = run_cli("chat", "--model", tiny, "--max-new-tokens", "3", input=b"caf\xe9\nhello\n")
    assert result.exit_code == 1  # one failed turn
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: input line 1 is not valid UTF-8 (byte 0xe9 at character 4)"]
    assert result.stdout.endswith("\n")  # the second line was answered (its reply ends with a newline)


def test_a_model_folder_without_tokenizer_is_named(tiny, tmp_path):
    import shutil

    from cli_helpers import assert_one_line_error, run_cli

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("lmstack.json", "model.safetensors"):
        shutil.copy(tiny / name, bare / name)
    line = assert_one_line_error(run_cli("generate", "--model", bare, "--prompt", "hi"), "tokenizer.json")
    assert str(bare) in line and "token ids" not in line


def test_no_chat_template_does_not_mention_a_chat_flag():
    from cli_helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(LmstackError) as info:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "drop --chat" not in str(info.value) and "no chat template" in str(info.value)


def test_json_errors_give_the_real_column(tmp_path):
    from lmstack.io import read_json

    bad = tmp_path / "c.json"
    bad.write_text('{"family": "decoder", "n_layer": 2, "n_head": 4, "d_model": 64,, "x": 1}')
    with pytest.raises(LmstackError, match=r"c.json:1: invalid JSON \(.* at column 64\)"):
        read_json(bad)


def test_usage_errors_are_one_line_with_exit_code_2():
    from cli_helpers import run_cli

    result = run_cli("rag", "index", "docs", "--index", "i.db", "--batch-size", "many")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: Invalid value for '--batch-size': Input should be a valid integer, unable to parse string as an "
        "integer (see `lmstack rag index --help`)"]


def test_finetune_help_says_where_the_required_values_come_from():
    from cli_helpers import run_cli

    result = run_cli("finetune", "--help")
    text = " ".join(result.stdout.split())
    assert "--model, --data (or `tasks:`) and --out are required, from the flags or the config" in text
    assert "[required]" not in text
