"""The preference log behind `POST /v1/feedback`: one JSON line per rating or pairwise choice, fsynced before the
reply, the data `lmstack align` reads."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


class FeedbackLog:
    """An append-only JSONL file; records from concurrent requests never interleave."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line)  # one write of one line in append mode: records never interleave
                os.fsync(fd)
            finally:
                os.close(fd)
