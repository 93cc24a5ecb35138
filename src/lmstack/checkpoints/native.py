"""The native format: model.safetensors + lmstack.json (config and metadata) + the tokenizer files.

Anything about how the weights are stored (a quantization scheme, the source file's quant types) goes into
lmstack.json's `metadata`, never into a file name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmstack.config import ModelConfig, config_from_dict, config_to_dict
from lmstack.errors import LmstackError
from lmstack.io import atomic_write, atomic_write_json, read_json
from lmstack.tokenizer import Tokenizer

NATIVE_FORMAT = "lmstack-native-v1"


def save_native(model: nn.Module, tokenizer: Tokenizer | None, out_dir: str | Path,
                metadata: dict[str, Any] | None = None, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model.safetensors, lmstack.json (config + metadata) and the tokenizer files, each atomically.

    `state` replaces model.state_dict(), e.g. the full tensors gathered from an FSDP-sharded model.
    A quantized model (quant.quantize_) writes its portable packed tensors, and the scheme of every quantized
    module goes to metadata["quantization"], which `load_model` rebuilds the modules from.
    """
    from lmstack.quant.state import quantization_metadata
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = dict(metadata or {})
    metadata.pop("quantization", None)  # a stale scheme (from the loaded source) must not outlive the modules
    quantization = quantization_metadata(model)
    if quantization["modules"] or quantization["fused"]:
        metadata["quantization"] = quantization
    state = {k: v.detach().contiguous().cpu() for k, v in (state or model.state_dict()).items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": NATIVE_FORMAT}))
    if tokenizer is not None:
        tokenizer.save(out)
    atomic_write_json(out / "lmstack.json", {"format": NATIVE_FORMAT, "config": config_to_dict(model.config),
                                             "metadata": metadata})
    return out


def load_native_parts(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer | None, dict]:
    """(config, state dict, tokenizer or None, metadata) of a native folder."""
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
