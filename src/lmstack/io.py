"""Small file helpers: atomic writes (temp file, fsync, rename) and clear errors for missing paths.

Every atomic write of DEST goes through a temp beside it named `.DEST.tmp-PID`, so the temp of an interrupted
write (a killed process, a full disk) is recognisable: the next write to the same place removes the temps of
processes that are gone. Temps get the mode any new file gets (the umask), so the result does too.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from lmstack.errors import LmstackError

TEMP_MARK = ".tmp-"
STALE_AFTER_S = 24 * 3600  # a temp this old is stale even if its PID now belongs to another process
# `.NAME.abcd1234.tmp`: the mkstemp names earlier versions used, whose writer cannot be told from its name
_LEGACY_TEMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


def temp_path(path: str | Path, pid: int | None = None) -> Path:
    """The temp an atomic write of `path` uses in process `pid` (default: this one): `.NAME.tmp-PID` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid() if pid is None else pid}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete the temps that interrupted writes to `path` left beside it; `path`'s name may be a glob
    ("step_*"). A temp is stale when its process is gone, is this process (a write that failed earlier), or is
    older than a day; another live process's temp is left alone. Returns what was removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for entry in path.parent.iterdir():
        name = entry.name
        if not name.startswith("."):
            continue
        dest, mark, pid = name[1:].rpartition(TEMP_MARK)
        if mark and pid.isdigit():
            stale = int(pid) == os.getpid() or not _pid_alive(int(pid))
        elif (legacy := _LEGACY_TEMP.match(name)) is not None:
            dest, stale = legacy["name"], True
        else:
            continue
        if not fnmatch.fnmatchcase(dest, path.name):
            continue
        try:
            stale = stale or time.time() - entry.lstat().st_mtime > STALE_AFTER_S
            if not stale:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except FileNotFoundError:  # another process cleaned it first
            continue
    return removed


def _named(e: OSError, path: Path) -> OSError:
    """The same error (OSError picks the subclass from errno), naming the destination instead of the temp."""
    return OSError(e.errno or errno.EIO, e.strerror or str(e), str(path))


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask's set-and-restore races with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_default_modes(path: Path) -> None:
    """The modes open() and mkdir() give under the umask; some writers (safetensors' save_file) make 0600."""
    mask = _umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder, so a rename into it is durable) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, fsync the file, then rename it over `path`; the old file survives any failure.

    Errors name `path`, never the temp."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        write(str(tmp))
        _give_default_modes(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _named(e, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_dir(path: str | Path, write: Callable[[Path], None]) -> None:
    """Build the folder `path` with `write(tmp_folder)`, then rename it into place (replacing an old folder);
    a failure or a kill never leaves a half-written folder at `path`. Errors name `path`."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp.mkdir()
        write(tmp)
        _give_default_modes(tmp)
        fsync_path(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _named(e, path) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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


def require_file(path: str | Path, what: str = "file") -> Path:
    """`path`, which must exist and be a file: a folder is named as such, not reported as missing."""
    path = require_path(path, what)
    if path.is_dir():
        raise LmstackError(f"{path}: is a folder; expected a {what}")
    return path


def decode_utf8(data: bytes, path: str | Path) -> str:
    """`data` decoded as UTF-8; invalid bytes are a LmstackError naming path:line and the byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LmstackError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}: {e.reason}); "
                           "convert the file to UTF-8") from None


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of an existing file (a missing file, a folder or bad bytes are one-line errors)."""
    path = require_file(path, what)
    return decode_utf8(path.read_bytes(), path)


def check_utf8(text: str, what: str) -> str:
    """`text` unchanged, or a LmstackError when it holds bytes that were not UTF-8 (Python keeps them from argv
    and surrogate-escaped streams as lone surrogates U+DC80..U+DCFF, which no tokenizer accepts)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise LmstackError(f"{what} is not valid UTF-8 ({byte} at character {e.start + 1})") from None
    return text


def read_json(path: str | Path) -> Any:
    path = require_path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmstackError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


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
