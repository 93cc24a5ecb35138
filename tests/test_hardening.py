"""Regressions from the hardening pass (issue 13): each test reproduces a failure a newcomer or a fuzzing pass
found, so it cannot come back."""

from __future__ import annotations

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
