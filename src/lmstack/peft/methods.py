"""One entry point per fine-tuning method, and one adapter file format for all of them.

An adapter folder holds `adapter.safetensors` (only the method's own weights) and `adapter.json` (the method,
its settings, and the base model it was trained on). `load_adapter` re-applies the method to a freshly loaded
base and loads the weights, checking every shape, so a run's output is usable by generate, chat, eval and serve.
A full fine-tune writes a whole native checkpoint instead.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from lmstack.errors import LmstackError
from lmstack.io import atomic_write, atomic_write_json, read_json

METHODS = ("full", "lora", "qlora", "prompt", "prefix", "adapter")
ADAPTER_FORMAT = "lmstack-adapter-v1"


@dataclass
class PeftSpec:
    """Settings of every method; each method reads its own fields."""

    method: str = "lora"
    rank: int = 8  # lora / qlora
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])
    n_virtual: int = 20  # prompt tuning
    prompt_init: str | None = None  # text whose embeddings start the virtual tokens
    prefix_len: int = 20  # prefix tuning
    prefix_hidden: int | None = None  # MLP reparameterization width (None = direct prefixes)
    bottleneck: int = 64  # Houlsby adapters

    def validate(self) -> None:
        if self.method not in METHODS:
            raise LmstackError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.rank < 1 or self.n_virtual < 1 or self.prefix_len < 1 or self.bottleneck < 1:
            raise LmstackError("rank, n_virtual, prefix_len and bottleneck must be >= 1")
        if not math.isfinite(self.alpha) or self.alpha <= 0:  # the update's scale, alpha / rank
            raise LmstackError(f"alpha must be a finite number > 0, not {self.alpha}")
        if not 0 <= self.dropout < 1:  # `not` so that NaN is refused too
            raise LmstackError(f"dropout must be in [0, 1), not {self.dropout}")


def apply_method(model: nn.Module, spec: PeftSpec, tokenizer: Any = None) -> nn.Module:
    """Make `model` trainable by `spec.method`; returns the model to train (prompt tuning wraps it)."""
    from lmstack.peft import PromptTuned, apply_bottleneck, apply_lora, apply_prefix_tuning

    spec.validate()
    if spec.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if spec.method in ("lora", "qlora"):
        return apply_lora(model, rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout, targets=spec.targets,
                          nf4=spec.method == "qlora")
    if spec.method == "prompt":
        init = tokenizer.encode(spec.prompt_init, add_special_tokens=False) if spec.prompt_init and tokenizer else None
        return PromptTuned(model, spec.n_virtual, init_ids=init)
    if spec.method == "prefix":
        return apply_prefix_tuning(model, spec.prefix_len, hidden=spec.prefix_hidden)
    return apply_bottleneck(model, bottleneck=spec.bottleneck)  # "adapter": Houlsby's bottleneck adapters


def save_adapter(model: nn.Module, spec: PeftSpec, out_dir: str | Path, base_model: str,
                 extra: dict[str, Any] | None = None) -> Path:
    from lmstack.peft.lora import peft_state_dict

    out = Path(out_dir)
    weights = {k: v.contiguous().cpu() for k, v in peft_state_dict(model).items()}
    atomic_write(out / "adapter.safetensors", lambda tmp: save_file(weights, tmp))
    atomic_write_json(out / "adapter.json", {"format": ADAPTER_FORMAT, "base_model": base_model,
                                             "peft": dataclasses.asdict(spec), **(extra or {})})
    return out


def read_adapter_spec(path: str | Path) -> tuple[PeftSpec, dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise LmstackError(f"adapter not found: {path}")
    if (path / "adapter_config.json").exists() and not (path / "adapter.json").exists():
        return PeftSpec(method="peft-lora"), {"format": "peft"}
    info = read_json(path / "adapter.json")
    if info.get("format") != ADAPTER_FORMAT:
        raise LmstackError(f"{path / 'adapter.json'}: not an lmstack adapter (format {info.get('format')!r})")
    known = {f.name for f in dataclasses.fields(PeftSpec)}
    return PeftSpec(**{k: v for k, v in info["peft"].items() if k in known}), info


def load_adapter(model: nn.Module, path: str | Path, tokenizer: Any = None) -> nn.Module:
    """Apply the adapter in `path` (lmstack or Hugging Face peft format) to `model`, unmerged; returns the model
    to run. A mismatched base gives one line naming the first mismatched tensor and both shapes."""
    from lmstack.checkpoints.native import read_safetensors
    from lmstack.peft import import_peft_adapter, load_peft_state_dict

    path = Path(path)
    spec, _ = read_adapter_spec(path)
    if spec.method == "peft-lora":
        return import_peft_adapter(path, model).eval()
    if spec.method == "full":
        raise LmstackError(f"{path} is a full fine-tune; load it as a model (--model {path})")
    spec_no_init = dataclasses.replace(spec, prompt_init=None)  # the weights below replace any init
    model = apply_method(model, spec_no_init, tokenizer)
    state = read_safetensors(path / "adapter.safetensors")
    load_peft_state_dict(model, state, source=str(path))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
