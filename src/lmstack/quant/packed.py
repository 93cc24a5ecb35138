"""Dense float linears in oneDNN's prepacked weight layout, for CPU inference (no quantization: same numbers).

`F.linear` on a plain row-major bf16 weight makes oneDNN reorder the weight into its blocked layout on every
call, and for one row of activations that reorder costs as much as the product. Reordering once at load time
(`torch.ops.mkldnn._reorder_linear_weight`, the layout torch.compile's CPU freezing pass uses) and calling
`torch.ops.mkldnn._linear_pointwise` gives bit-identical outputs without the per-call reorder. The switch is a
module swap: nothing process-wide changes, so other threads and other models are untouched.

Measured on this CPU (2 threads, SmolLM2-135M's 120 fused block linears): one bf16 row 21.9 ms -> 13.5 ms, and
the 49152x576 head 3.8 -> 2.7 ms. docs/benchmarks.md has the whole-model figures.

A packed weight is an opaque oneDNN tensor: it cannot be trained, moved or viewed in place. `PackedLinear` is
for inference only; its `state_dict` holds the plain weight again, so a packed model still saves and copies.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.errors import LmstackError
from lmstack.models.blocks import TiedHead

# float32 is left to MKL's sgemm: packed fp32 measured no faster for one row and slower for a 100-token prefill.
PACKABLE_DTYPES = (torch.bfloat16,)


def packing_available() -> bool:
    """oneDNN is compiled in (every x86 CPU wheel), the prepacked-linear ops are registered, and this CPU has
    oneDNN's bf16 path (AVX512-BW/VL/DQ or AVX-NE-CONVERT; an AVX2-only CPU has not)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """y = x W^T (+ b), W held in oneDNN's blocked layout. Build it with `PackedLinear.from_linear`."""

    def __init__(self, weight: Tensor, bias: Tensor | None, tied: bool = False) -> None:  # weight [N, K]
        super().__init__()
        self.tied = tied  # a copy of a tied embedding table: the checkpoint keeps it under the embedding's key
        if weight.device.type != "cpu" or weight.dtype not in PACKABLE_DTYPES:
            raise LmstackError(f"PackedLinear takes a bfloat16 CPU weight, not {weight.dtype} on {weight.device}")
        self.out_features, self.in_features = weight.shape
        # A plain attribute, not a buffer: Module._apply (.to, .half) cannot convert an opaque tensor.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)  # batch-size hint: decode
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    @property
    def weight(self) -> Tensor:  # [N, K], a plain copy (for saving or inspection; forward never builds it)
        return self.packed.to_dense()

    def forward(self, x: Tensor) -> Tensor:  # [..., K] -> [..., N]
        if x.dtype != self.packed.dtype:
            raise LmstackError(f"PackedLinear holds {self.packed.dtype} weights but got {x.dtype} input")
        if torch.is_grad_enabled() and x.requires_grad:
            return F.linear(x, self.weight, self.bias)  # oneDNN's op has no weight gradient path; stay exact
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if not self.tied:
            destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        probe = fn(torch.empty(0, dtype=self.packed.dtype))
        if probe.device.type != "cpu" or probe.dtype != self.packed.dtype:
            raise LmstackError("a PackedLinear stays a CPU module in its dtype: load the model again without "
                               "packing to move or cast it")
        return super()._apply(fn, recurse)

    def __deepcopy__(self, memo: dict) -> PackedLinear:
        bias = None if self.bias is None else copy.deepcopy(self.bias.detach(), memo)
        return PackedLinear(self.weight, bias, self.tied)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"dtype={self.packed.dtype}"


def _packable(weight: Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in PACKABLE_DTYPES


def packs(module: nn.Module | None) -> bool:
    """Whether pack_linears_ would pack this module (a plain bf16 CPU Linear, with oneDNN present)."""
    return type(module) is nn.Linear and _packable(module.weight) and packing_available()


def pack_linears_(model: nn.Module, tied_head: bool = True, blocks: bool = True) -> int:
    """Swap every plain bfloat16 CPU `nn.Linear` in `model` for a `PackedLinear`; returns how many.

    `tied_head`: a `TiedHead` over a plain embedding table gets a packed copy of the table (the head is the
    largest matmul of a small model; the copy costs vocab x dim more memory, 57 MB for SmolLM2-135M). Other
    modules (LoRA, quantized) keep their own kernels. A no-op where oneDNN is missing.
    `blocks=False` packs the head (`lm_head`) only: a torch.compiled decode step traces the blocks, and cannot
    trace an opaque oneDNN weight, while the head runs outside the compiled graph."""
    if not packing_available():
        return 0
    head = getattr(model, "lm_head", None)
    swaps = [(parent, name, PackedLinear.from_linear(child)) for parent in model.modules()
             for name, child in parent.named_children() if packs(child) and (blocks or child is head)]
    if tied_head:
        swaps += [(parent, name, PackedLinear(child.weight, None, tied=True)) for parent in model.modules()
                  for name, child in parent.named_children()
                  if isinstance(child, TiedHead) and type(child.embedding) is nn.Embedding
                  and _packable(child.weight)]
    for parent, name, packed in swaps:
        setattr(parent, name, packed)
    return len(swaps)
