"""Small file helpers: atomic writes (temp file, fsync, rename) and clear errors for missing paths."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from lmstack.errors import LmstackError


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, fsync the file, then rename it over `path`; the old file survives any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def require_path(path: str | Path, what: str = "file") -> Path:
    path = Path(path)
    if not path.exists():
        raise LmstackError(f"{what} not found: {path}")
    return path


def read_json(path: str | Path) -> Any:
    path = require_path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmstackError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def json_records(path: str | Path, lines: Iterable[tuple[int, str]],
                 error: type[LmstackError] = LmstackError) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank numbered line of a JSONL file; invalid JSON raises `error`
    naming path:line and the column."""
    for number, line in lines:
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})") from None
