"""`lmstack models list`, `lmstack models show` and `lmstack convert`, and the summary they print.

Heavy modules (torch, the importers) are imported inside the functions, so `lmstack --help` starts fast. No
`from __future__ import annotations` here: the CLI reads these signatures' annotations as real types.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lmstack.errors import LmstackError

if TYPE_CHECKING:
    from lmstack.checkpoints.load import LoadedModel

DType = Literal["float32", "bfloat16"]


def model_summary(loaded: "LoadedModel") -> dict[str, Any]:
    """What `lmstack models show` prints."""
    from lmstack.config import config_to_dict

    cfg = loaded.config
    from lmstack.models.blocks import count_weights
    n_params = count_weights(loaded.model)  # quantized layers hold theirs in buffers: counted too
    out = {"source": loaded.source, "family": cfg.family, "config": config_to_dict(cfg), "parameters": n_params,
           "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", "")}
    out.update({k: v for k, v in loaded.metadata.items() if k != "quantization"})  # storage says it shortly
    formats = storage_formats(loaded.model)
    if len(formats) > 1:  # mixed storage (a quantized model): name each tensor's format; else "dtype" says it
        for fmt, names in formats.items():
            out[f"storage {fmt}"] = ", ".join(names)
    if loaded.tokenizer is not None:
        out["tokenizer"] = {"vocab_size": loaded.tokenizer.vocab_size, "bos": loaded.tokenizer.bos_token,
                            "eos": loaded.tokenizer.eos_token, "hash": loaded.tokenizer.hash()}
        out["chat_template"] = loaded.tokenizer.chat_template
    return out


def storage_formats(model: Any) -> dict[str, list[str]]:
    """How each tensor is stored: {format: [module or tensor names, layer numbers folded into "*"]}, e.g.
    {"int4-g32": ["layers.*.attn.qkv_proj", ...], "int8": ["tok_emb (and the tied lm_head)"], "bfloat16": [...]}."""
    import re

    from lmstack.models.blocks import TiedHead
    from lmstack.quant.quantize import QUANTIZED, QuantEmbedding, format_of
    formats: dict[str, list[str]] = {}

    def add(fmt: str, name: str) -> None:
        name = re.sub(r"(^|\.)\d+(\.|$)", r"\1*\2", name)
        if name not in formats.setdefault(fmt, []):
            formats[fmt].append(name)

    tied = isinstance(getattr(model, "lm_head", None), TiedHead)
    quantized: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(q + ".") for q in quantized):
            continue  # inside a quantized module: its packed tensors were named with it
        if isinstance(module, QuantEmbedding) or isinstance(module, QUANTIZED):
            quantized.append(name)
            fmt = format_of(module.table if isinstance(module, QuantEmbedding) else module)
            add(fmt, name + (" (and the tied lm_head)" if tied and name == "tok_emb" else ""))
            continue
        for pname, param in module.named_parameters(recurse=False):
            add(str(param.dtype).removeprefix("torch."), f"{name}.{pname}" if name else pname)
    return formats


# -------------------------------------------------------------------------------------------- models


@dataclass
class ModelEntry:
    """One row of `lmstack models list`."""

    name: str
    kind: Literal["model", "preset"]
    description: str
    installed: bool  # weights are on this machine (presets have none: always False)
    path: str | None = None


def list_models() -> list[ModelEntry]:
    """Registry models (with weights, from installed packages) and config presets (architectures, no weights)."""
    from lmstack.checkpoints.registry import REGISTRY
    from lmstack.config import PRESETS, from_name
    entries = []
    for name, (description, locate) in REGISTRY.items():
        path = locate()
        installed = path is not None and path.exists()
        entries.append(ModelEntry(name, "model", description, installed, str(path) if installed else None))
    for name in PRESETS:
        cfg = from_name(name)  # a dataclass: cheap, and it fills in the defaults
        layers = getattr(cfg, "n_layer", None) or f"{cfg.n_encoder_layer}+{cfg.n_decoder_layer}"
        entries.append(ModelEntry(name, "preset", f"{cfg.family} config: {layers} layers, d_model {cfg.d_model}, "
                                                  f"vocab {cfg.vocab_size}", installed=False))
    return entries


def show_model(name: str) -> dict[str, Any]:
    """Describe a model: architecture, parameter count, layers, heads, context, dtype or quant types, tokenizer.

    Args:
        name: A registry name, a path to a checkpoint, or a config preset (shown without weights).
    """
    from lmstack.checkpoints.registry import REGISTRY
    from lmstack.config import PRESETS
    if name in PRESETS and name not in REGISTRY and not Path(name).exists():
        return _preset_summary(name)
    from lmstack.checkpoints.load import load_model
    return model_summary(load_model(name))


def _preset_summary(name: str) -> dict[str, Any]:
    import torch

    from lmstack.checkpoints.load import LoadedModel
    from lmstack.config import from_name
    from lmstack.models import build_model
    config = from_name(name)
    with torch.device("meta"):  # count parameters without allocating them
        model = build_model(config)
    summary = model_summary(LoadedModel(model=model, tokenizer=None, config=config, source=f"preset {name}"))
    summary["dtype"] = "none (a preset has no weights)"
    return summary


# ------------------------------------------------------------------------------------------- convert


def convert(src: str, dst: str, *, to: Literal["native", "hf"] = "native", dtype: DType = "float32",
            quant: Literal["dequantize", "keep-float", "keep", "keep-int8", "keep-q8", "blocks"] = "dequantize"
            ) -> Path:
    """Convert a checkpoint (registry name, GGUF, HF or native folder) into a native or an HF folder.

    Args:
        src: What to convert: a registry name, a GGUF file, an HF folder or a native folder.
        dst: The output folder (created; files in it are replaced atomically).
        to: Output format: native (lmstack safetensors + JSON) or hf (a transformers folder).
        dtype: dtype of the saved weights (quantized GGUF weights are dequantized to it unless kept).
        quant: GGUF Q4_0 / Q4_1 weights: dequantize, or keep them packed for the int4 kernel with the token
            embedding and tied head as bf16 (keep-float), int4-g32 (keep), int8 (keep-int8) or the file's Q8_0
            (keep-q8, int8 in groups of 32); or keep every Q4_0 / Q4_1 / Q8_0 tensor's own blocks, computed in
            float32 (blocks). A kept native checkpoint loads in about a second.
    """
    from lmstack.checkpoints.load import load_model
    from lmstack.checkpoints.native import save_native
    out = Path(dst)
    if out.exists() and not out.is_dir():
        raise LmstackError(f"{dst}: exists and is not a folder")
    loaded = load_model(src, dtype=dtype, quant=quant)
    if to == "native":
        metadata = {**loaded.metadata, "converted_from": loaded.source}
        return save_native(loaded.model, loaded.tokenizer, out, metadata=metadata)
    if "quantization" in loaded.metadata:
        raise LmstackError("an HF export needs float weights: convert with --quant dequantize")
    from lmstack.checkpoints.hf import export_hf
    export_hf(loaded.model, loaded.tokenizer, out)
    return out
