"""Several LoRA adapters over one base model, chosen per batch row (as S-LoRA / punica serve them).

Each adapter folder is loaded with the library's own `load_adapter` onto a copy of the model that shares
every base tensor (so its format, target and shape checks are the ones training and `generate` use); its
low-rank factors are then moved into `MultiLoRALinear` layers wrapped around the base model's Linears:

    y[rows of adapter a] = x W^T + b + scaling_a * x A_a^T B_a^T

A batch mixes requests for the base model and for any adapters; `AdapterRouter.set_rows` says which adapter
each row of the next forward uses (0 = the base model).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from lmstack.errors import LmstackError
from lmstack.peft.lora import LoRALinear, lora_layers

# QLoRA adapters were trained over an NF4 base; the served base is full precision, so they are refused here.
LORA_METHODS = ("lora", "peft-lora")


class AdapterRouter:
    """The row -> adapter assignment of the forward about to run, shared by every MultiLoRALinear."""

    def __init__(self) -> None:
        self.groups: dict[int, Tensor] = {}  # adapter index -> rows [n] (base rows are not listed)
        self.all_rows: int | None = None  # the adapter every row uses, when they agree

    def set_rows(self, adapters: list[int], device: torch.device) -> None:
        self.groups, self.all_rows = {}, adapters[0] if len(set(adapters)) == 1 else None
        for a in set(adapters) - {0}:
            self.groups[a] = torch.tensor([i for i, x in enumerate(adapters) if x == a], device=device)


class MultiLoRALinear(nn.Module):
    """A base Linear plus any number of LoRA updates, each applied to the rows the router gives it."""

    def __init__(self, base: nn.Linear, router: AdapterRouter) -> None:
        super().__init__()
        self.base, self.router = base, router
        self.factors: dict[int, tuple[Tensor, Tensor, float]] = {}  # adapter -> A [r, in], B [out, r], scaling

    def add(self, index: int, layer: LoRALinear) -> None:
        self.factors[index] = (layer.lora_a.detach(), layer.lora_b.detach(), layer.scaling)

    def _delta(self, x: Tensor, index: int) -> Tensor:  # x [n, T, in] -> [n, T, out]
        a, b, scaling = self.factors[index]
        return (x.to(a.dtype) @ a.t() @ b.t()) * scaling

    def forward(self, x: Tensor) -> Tensor:  # [B, T, in] -> [B, T, out]
        y = self.base(x)
        router = self.router
        if router.all_rows is not None:  # one adapter (or none) for the whole batch: no gather
            if router.all_rows in self.factors:
                y = y + self._delta(x, router.all_rows).to(y.dtype)
            return y
        for index, rows in router.groups.items():
            if index in self.factors:
                y = y.index_add(0, rows, self._delta(x.index_select(0, rows), index).to(y.dtype))
        return y


def _sharing_copy(model: nn.Module) -> nn.Module:
    """A structural copy of `model` whose parameters and buffers are the original tensors (no weight copy)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def attach_adapters(model: nn.Module, adapters: dict[str, Path], tokenizer: object) -> AdapterRouter:
    """Wrap the targeted Linears of `model` (in place) and load every adapter; adapter i + 1 is adapters' i-th."""
    from lmstack.peft.methods import load_adapter, read_adapter_spec

    loaded: list[tuple[str, dict[str, LoRALinear]]] = []
    for name, path in adapters.items():  # every copy is made from the unwrapped model
        spec, _ = read_adapter_spec(path)
        if spec.method not in LORA_METHODS:
            raise LmstackError(f"adapter {name!r} ({path}) is a {spec.method} adapter; serve runs LoRA adapters "
                               f"({', '.join(LORA_METHODS)}) side by side on one base model")
        loaded.append((name, lora_layers(load_adapter(_sharing_copy(model), path, tokenizer))))
    router = AdapterRouter()
    wrapped: dict[str, MultiLoRALinear] = {}
    for index, (name, layers) in enumerate(loaded, start=1):
        for layer_name, layer in layers.items():
            if layer_name not in wrapped:
                base = model.get_submodule(layer_name)
                if not isinstance(base, nn.Linear):
                    raise LmstackError(f"adapter {name!r}: {layer_name} is not a Linear in the base model")
                wrapped[layer_name] = MultiLoRALinear(base, router)
                parent, _, child = layer_name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, wrapped[layer_name])
            wrapped[layer_name].add(index, layer)
    return router
