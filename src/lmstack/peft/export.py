"""LoRA adapters in Hugging Face peft's format: adapter_config.json + adapter_model.safetensors.

What `peft.PeftModel.from_pretrained(hf_model, dir)` loads, and what `PeftModel.save_pretrained` writes, for
Llama-architecture models (lmstack decoders with RoPE; HF Llama names). With P = base_model.model.model.:

  layers.{i}.attn.{q,k,v,o}_proj.lora_a      <-> P layers.{i}.self_attn.{q,k,v,o}_proj.lora_A.weight
  layers.{i}.mlp.{gate,up,down}_proj.lora_b  <-> P layers.{i}.mlp.{gate,up,down}_proj.lora_B.weight

Only plain LoRA maps onto lmstack's layer: one rank and alpha for every module, no bias training, no DoRA or
rsLoRA, every layer adapted. Anything else is refused by name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lmstack.checkpoints.native import read_safetensors
from lmstack.errors import LmstackError
from lmstack.io import atomic_write, atomic_write_json, read_json
from lmstack.peft.lora import TARGETS, apply_lora, load_peft_state_dict, lora_config, lora_layers, peft_state_dict

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model.model."
_LMSTACK_KEY = re.compile(r"^layers\.(\d+)\.(attn|mlp)\.(\w+_proj)\.lora_([ab])$")
_PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")


def _require_llama(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    if getattr(cfg, "family", None) != "decoder" or getattr(cfg, "positions", None) != "rope":
        raise LmstackError("peft adapter interop supports Llama-architecture decoders (RoPE, separate q/k/v)")


def to_peft_key(key: str) -> str:
    m = _LMSTACK_KEY.match(key)
    if m is None:
        raise LmstackError(f"no peft name for adapter tensor {key}")
    i, block, proj, ab = m.groups()
    return f"{_PREFIX}layers.{i}.{'self_attn' if block == 'attn' else 'mlp'}.{proj}.lora_{ab.upper()}.weight"


def from_peft_key(key: str, source: str) -> str:
    m = _PEFT_KEY.match(key)
    if m is None or m.group(3) not in TARGETS.values():
        raise LmstackError(f"{source}: tensor {key} is not a LoRA weight of a Llama projection")
    i, block, proj, ab = m.groups()
    return f"layers.{i}.{'attn' if block == 'self_attn' else 'mlp'}.{proj}.lora_{ab.lower()}"


def export_peft_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None) -> Path:
    """Write the model's LoRA adapter for peft: adapter_config.json + adapter_model.safetensors."""
    _require_llama(model)
    cfg = lora_config(model)  # an NF4 base changes nothing here: the adapter itself is full precision
    if any(layer.merged for layer in lora_layers(model).values()):
        raise LmstackError("unmerge the LoRA layers before exporting the adapter")
    weights = {to_peft_key(k): v.detach().cpu().contiguous() for k, v in peft_state_dict(model).items()}
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg["rank"], "lora_alpha": cfg["alpha"], "lora_dropout": cfg["dropout"],
        "target_modules": [TARGETS[t] for t in cfg["targets"]], "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "layers_pattern": None,
    }
    out = Path(out_dir)
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
    atomic_write_json(out / CONFIG_FILE, config)
    return out


def read_peft_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(lmstack LoRA settings for apply_lora, adapter tensors in lmstack key names) from a peft adapter folder."""
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    hf = read_json(cfg_path)
    if hf.get("peft_type") != "LORA":
        raise LmstackError(f"{cfg_path}: peft_type is {hf.get('peft_type')!r}; only LORA adapters import")
    refused = {"use_dora": "DoRA", "use_rslora": "rsLoRA scaling", "fan_in_fan_out": "fan_in_fan_out weights",
               "rank_pattern": "per-module ranks (rank_pattern)", "alpha_pattern": "per-module alphas (alpha_pattern)",
               "modules_to_save": "extra trained modules (modules_to_save)",
               "layers_to_transform": "adapting only some layers (layers_to_transform)"}
    for key, what in refused.items():
        if hf.get(key):
            raise LmstackError(f"{cfg_path}: {what} is not supported by lmstack's LoRA layer")
    if hf.get("bias", "none") != "none":
        raise LmstackError(f"{cfg_path}: bias={hf['bias']!r} (trained biases) is not supported; use bias='none'")
    targets = hf.get("target_modules")
    if targets == "all-linear":
        targets = list(TARGETS.values())
    if not isinstance(targets, list):
        raise LmstackError(f"{cfg_path}: target_modules must be a list of module names or 'all-linear', "
                           f"not {targets!r}")
    unknown = [t for t in targets if t not in TARGETS.values()]
    if unknown:
        raise LmstackError(f"{cfg_path}: target module {unknown[0]!r} has no lmstack LoRA equivalent "
                           f"(supported: {', '.join(TARGETS.values())})")
    for key in ("r", "lora_alpha"):
        if not isinstance(hf.get(key), (int, float)):
            raise LmstackError(f"{cfg_path}: missing or invalid {key!r}")
    settings = {"rank": int(hf["r"]), "alpha": float(hf["lora_alpha"]), "dropout": float(hf.get("lora_dropout", 0.0)),
                "targets": targets}
    weights_path = path / WEIGHTS_FILE
    raw = read_safetensors(weights_path)
    state = {from_peft_key(k, str(weights_path)): v for k, v in raw.items()}
    return settings, state


def import_peft_adapter(path: str | Path, model: nn.Module, nf4: bool = False) -> nn.Module:
    """Apply a peft LoRA adapter to an lmstack model (adding LoRA layers if it has none); returns `model`."""
    _require_llama(model)
    settings, state = read_peft_adapter(path)
    if not lora_layers(model):
        apply_lora(model, rank=settings["rank"], alpha=settings["alpha"], dropout=settings["dropout"],
                   targets=settings["targets"], nf4=nf4)
    else:
        have = lora_config(model)
        if (have["rank"], have["alpha"]) != (settings["rank"], settings["alpha"]):
            raise LmstackError(f"{path}: adapter has rank {settings['rank']}, alpha {settings['alpha']:g}; the model's "
                               f"LoRA layers have rank {have['rank']}, alpha {have['alpha']:g}")
    with torch.no_grad():
        load_peft_state_dict(model, state, source=str(Path(path) / WEIGHTS_FILE))
    return model
