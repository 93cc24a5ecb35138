"""LoRA (Hu et al., 2021) as a drop-in replacement for nn.Linear, and QLoRA's NF4 base weight (Dettmers et al., 2023).

    y = x W^T + b + scaling * dropout(x) A^T B^T,    A [r, in], B [out, r], scaling = alpha / r

`LoRALinear` keeps the base `weight` / `bias` keys, so base checkpoints load unchanged, and adds `lora_a`,
`lora_b`. A is kaiming-uniform and B zero (as in peft), so a fresh adapter leaves the model unchanged. With
`nf4=True` the frozen base weight is held as an `NF4Weight` and dequantized on the fly.

`apply_lora` swaps the targeted Linears in place and freezes everything else; `peft_state_dict` /
`load_peft_state_dict` move the adapter alone (for every PEFT method); `merge_lora` folds it into plain
Linears for export; and `disable_adapter(model)` turns every PEFT module off at once, which gives DPO and PPO
their reference model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.errors import LmstackError
from lmstack.quant import NF4Weight

# Short target names -> the Linear attribute names in lmstack's blocks (the same as HF Llama's).
TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
           "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


# ------------------------------------------------------------------------------------------- NF4 matmul


class _NF4Linear(torch.autograd.Function):
    """x W^T + b with W dequantized from NF4 in forward and again in backward, so no full-precision copy of W
    is kept alive for backward (QLoRA's memory saving). W and b are frozen: only x gets a gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: NF4Weight, bias: Tensor | None) -> Tensor:  # x [..., in] -> [..., out]
        ctx.weight, ctx.x_dtype = weight, x.dtype
        return F.linear(x, weight.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # grad [..., out] -> [..., in]
        return (grad @ ctx.weight.dequantize(grad.dtype)).to(ctx.x_dtype), None, None


# ------------------------------------------------------------------------------------------- the layer


class LoRALinear(nn.Module):
    """nn.Linear plus a low-rank update. `merged`: the update is folded into `weight`; `disabled`: base only."""

    peft_switch = True  # disable_adapter() turns this module off
    peft_weights = ("lora_a", "lora_b")  # what peft_state_dict saves

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int = 8,
                 alpha: float = 16.0, dropout: float = 0.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise LmstackError(f"LoRA rank must be >= 1, not {rank}")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha, self.scaling = rank, float(alpha), alpha / rank
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)  # [out, in]
        self.bias = (nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
                     if bias else None)
        # LoRA weights stay in float32 over a half-precision base (as peft's autocast_adapter_dtype does).
        lora_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=lora_dtype))  # [r, in]
        self.lora_b = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=lora_dtype))  # [out, r]
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.nf4: NF4Weight | None = None
        self.merged = False
        self.disabled = False
        if not self.weight.is_meta:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear (bias zero), for standalone use
            if self.bias is not None:
                nn.init.zeros_(self.bias)
            self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                    nf4: bool = False) -> LoRALinear:
        """Wrap an existing Linear: its weight and bias Parameters are adopted as they are (no copy)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, rank=rank, alpha=alpha,
                    dropout=dropout, device="meta", dtype=w.dtype)
        layer.weight, layer.bias = w, linear.bias
        lora_dtype = layer.lora_a.dtype
        layer.lora_a = nn.Parameter(torch.empty(rank, linear.in_features, device=w.device, dtype=lora_dtype))
        layer.lora_b = nn.Parameter(torch.empty(linear.out_features, rank, device=w.device, dtype=lora_dtype))
        layer.reset_lora_parameters()
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        if nf4:
            layer.quantize_base()
        return layer

    def reset_lora_parameters(self) -> None:
        """peft's default: A like nn.Linear (kaiming-uniform, a=sqrt(5)), B = 0, so the update starts at zero."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def quantize_base(self) -> None:
        """QLoRA: hold the frozen base weight in NF4 (about 4.13 bits per parameter) instead of `weight`."""
        if self.merged:
            raise LmstackError("unmerge the LoRA update before quantizing the base weight")
        if self.nf4 is None:
            self.nf4 = NF4Weight(self.weight.detach())
            self.weight = None  # the full-precision copy is freed; `weight` leaves the state dict

    def base_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The frozen base weight [out, in] (dequantized when held in NF4)."""
        if self.nf4 is not None:
            return self.nf4.dequantize(dtype)
        return self.weight if dtype is None else self.weight.to(dtype)

    def delta_weight(self) -> Tensor:
        """scaling * B @ A: [out, in], in the LoRA dtype."""
        return (self.lora_b @ self.lora_a) * self.scaling

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        if self.nf4 is not None:
            y = _NF4Linear.apply(x, self.nf4, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.merged:
            if self.disabled:
                raise LmstackError("a merged LoRA layer cannot be disabled; unmerge it first "
                                   "(disable_adapter(model) does that for you)")
            return y
        if self.disabled:
            return y
        h = self.lora_dropout(x)
        if not torch.is_autocast_enabled(h.device.type):  # under autocast the matmuls pick their own dtype
            h = h.to(self.lora_a.dtype)
        # scaling on the rank-r intermediate: r columns to multiply instead of out
        return y + F.linear(F.linear(h, self.lora_a) * self.scaling, self.lora_b).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scaling * B @ A; a second call does nothing."""
        if self.merged:
            return
        if self.nf4 is not None:
            raise LmstackError("cannot merge into an NF4 base weight in place (it would be re-quantized); "
                               "merge_lora(model) dequantizes and returns plain Linears")
        self.weight += self.delta_weight().to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - scaling * B @ A; a second call does nothing."""
        if not self.merged:
            return
        self.weight -= self.delta_weight().to(self.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha:g}{', nf4' if self.nf4 is not None else ''}")


# ----------------------------------------------------------------------------------------- model level


def resolve_targets(targets: str | Sequence[str]) -> list[str]:
    """"all-linear", "q,v" or ["q", "v"] (short or *_proj names) -> attribute names like ["q_proj", "v_proj"]."""
    if isinstance(targets, str):
        names = list(TARGETS) if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    else:
        names = list(targets)
    out = []
    for name in names:
        if name in TARGETS:
            out.append(TARGETS[name])
        elif name in TARGETS.values():
            out.append(name)
        else:
            raise LmstackError(f"unknown LoRA target {name!r}; valid targets: {', '.join(TARGETS)} "
                               "(or their *_proj names), or all-linear")
    if not out:
        raise LmstackError("no LoRA targets given; valid targets: " + ", ".join(TARGETS) + ", or all-linear")
    return list(dict.fromkeys(out))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: str | Sequence[str] = ("q", "k", "v", "o"), nf4: bool = False) -> nn.Module:
    """Replace the targeted Linears by LoRALinear (in place) and freeze every other parameter; returns `model`."""
    names = resolve_targets(targets)
    if lora_layers(model):
        raise LmstackError("the model already has LoRA layers")
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rpartition(".")[2] in names]
    if not found:
        raise LmstackError(f"the model has no Linear named {', '.join(names)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in found:
        _replace(model, name, LoRALinear.from_linear(linear, rank, alpha, dropout, nf4=nf4))
    return model


def lora_config(model: nn.Module) -> dict[str, object]:
    """rank, alpha, dropout, targets and nf4 of the model's LoRA layers (what a run records to re-apply them)."""
    layers = lora_layers(model)
    if not layers:
        raise LmstackError("the model has no LoRA layers")
    first = next(iter(layers.values()))
    short = {v: k for k, v in TARGETS.items()}
    found = {n.rpartition(".")[2] for n in layers}
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return {"rank": first.rank, "alpha": first.alpha, "dropout": dropout,
            "targets": [short[t] for t in TARGETS.values() if t in found], "nf4": first.nf4 is not None}


def check_state_dict(expected: dict[str, Tensor], state: dict[str, Tensor], source: str) -> None:
    """Refuse a key or shape mismatch between adapter tensors and what the model holds, naming the first."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        listed = lambda keys: ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")  # noqa: E731
        parts = ([f"missing {listed(missing)}"] if missing else []) + \
                ([f"unexpected {listed(unexpected)}"] if unexpected else [])
        raise LmstackError(f"{source}: adapter does not match the base model: {'; '.join(parts)}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise LmstackError(f"{source}: adapter does not match the base model: {key} is {list(tensor.shape)}, "
                               f"the model expects {list(expected[key].shape)}")


def peft_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The PEFT methods' own weights alone (LoRA's A and B, bottleneck adapters, virtual tokens, prefixes), keyed
    as in the model's state dict; what an adapter file holds. Every PEFT module names its weights in
    `peft_weights`, so this holds whether or not they require grad (a loaded adapter is frozen)."""
    out: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        for attr in getattr(module, "peft_weights", ()):
            part = getattr(module, attr, None)  # absent: e.g. a direct prefix has no MLP
            key = f"{name}.{attr}" if name else attr
            if isinstance(part, nn.Module):
                out.update({f"{key}.{k}": v for k, v in part.state_dict().items()})
            elif isinstance(part, Tensor):
                out[key] = part.detach()
    return out


@torch.no_grad()
def load_peft_state_dict(model: nn.Module, state: dict[str, Tensor], source: str = "adapter") -> None:
    """The inverse of peft_state_dict: copy a method's weights into a model the method was applied to, refusing
    any key or shape mismatch by name. Merged LoRA layers stay merged, with the new update."""
    expected = peft_state_dict(model)
    if not expected:
        raise LmstackError(f"{source}: the model has no PEFT layers: apply_lora first (or the adapter's method)")
    check_state_dict(expected, state, source)
    merged = [layer for layer in lora_layers(model).values() if layer.merged]
    for layer in merged:
        layer.unmerge()
    for key, tensor in expected.items():
        tensor.copy_(state[key])  # shares storage with the parameter
    for layer in merged:
        layer.merge()


@torch.no_grad()
def merge_lora(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding W + scaling * B @ A (NF4 bases are dequantized to
    `dtype`, default the dtype they were quantized from). Every parameter requires grad again, as after loading."""
    for name, layer in lora_layers(model).items():
        base = layer.base_weight(dtype)
        if layer.merged:  # the update is already in `weight`
            merged = base.clone()
        else:
            merged = base + layer.delta_weight().to(base.dtype)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(merged)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.detach().to(merged.dtype))
        _replace(model, name, linear)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------------- the reference model


def peft_modules(model: nn.Module) -> list[nn.Module]:
    """Every module that disable_adapter switches: LoRA layers, bottleneck adapters, prefix and prompt tuning."""
    return [m for m in model.modules() if getattr(m, "peft_switch", False)]


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes its base function (merged LoRA layers are unmerged meanwhile)."""
    modules = peft_modules(model)
    if not modules:
        raise LmstackError("the model has no adapter to disable (no LoRA, adapter, prefix or prompt module)")
    before = [m.disabled for m in modules]
    merged = [m for m in modules if isinstance(m, LoRALinear) and m.merged]
    for m in merged:
        m.unmerge()
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, state in zip(modules, before):
            m.disabled = state
        for m in merged:
            m.merge()
