"""Checkpoints: one native format (safetensors + lmstack.json + tokenizer files) and importers into it.

    registry.py  named models, DEFAULT_MODEL / DEFAULT_EMBEDDING_MODEL, resolve(), detect_format()
    native.py    save_native / load_native_parts / read_safetensors
    load.py      load_model(name_or_path, adapter=None, dtype="auto"): the one loader; instantiate, auto_dtype
    hf.py        Hugging Face folders: Llama, Mistral, GPT-2, BERT in and out; T5 in
    gguf.py      GGUF files (llama.cpp) in
    inspect.py   `models list`, `models show`, `convert`

Every importer returns the same four things: a config, a state dict in lmstack's key names, a tokenizer and
metadata. The names below are re-exported lazily, so importing the registry's constants does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "registry": ("DEFAULT_EMBEDDING_MODEL", "DEFAULT_MODEL", "REGISTRY", "detect_format", "resolve"),
    "native": ("NATIVE_FORMAT", "load_native_parts", "read_safetensors", "save_native"),
    "load": ("LoadedModel", "auto_dtype", "instantiate", "load_model", "parse_dtype", "skip_init"),
    "inspect": ("ModelEntry", "convert", "list_models", "model_summary", "show_model"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lmstack.checkpoints' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lmstack.checkpoints.{_WHERE[name]}"), name)
