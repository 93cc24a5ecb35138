"""NF4 (QLoRA's 4-bit NormalFloat) as an inference layer: the weight is an NF4Weight, dequantized per call.

There is no NF4 matmul kernel on CPU, so a call costs a dequantization of the whole weight; NF4 is the format
QLoRA trains on, kept here so a QLoRA base runs without a float copy. For speed use int4 (quant/int4.py).

Shapes: N out_features, K in_features.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.quant.nf4 import BLOCK, NF4_LEVELS, NF4Weight, blockwise_dequantize, unpack_nibbles

_STATE = ("codes", "absmax_codes", "absmax_scales", "absmax_offset")  # NF4Weight's buffers


def _persistent(weight: NF4Weight) -> NF4Weight:
    """NF4Weight keeps its buffers out of the state dict (QLoRA saves only adapters); an inference layer's
    checkpoint needs them."""
    for name in _STATE:
        weight.register_buffer(name, getattr(weight, name), persistent=True)
    return weight


class NF4Linear(nn.Module):
    """y = x W^T (+ b) with W stored as NF4 (64-value blocks, double-quantized constants)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # A placeholder of the right shape; from_float or a state dict fills it.
        self.weight = _persistent(NF4Weight(torch.zeros(out_features, in_features, device=device)))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> NF4Linear:
        N, K = linear.weight.shape
        layer = cls(K, N, bias=linear.bias is not None, device=linear.weight.device)
        layer.weight = _persistent(NF4Weight(linear.weight.detach().float()))
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().float().clone()
        return layer

    def dequantize(self, rows: Tensor | None = None, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        """W (or some of its rows) [R, K]. Rows are read block by block when K is a multiple of the block."""
        if rows is None or self.in_features % BLOCK:
            w = self.weight.dequantize(torch.float32)
            return (w if rows is None else w[rows]).to(dtype)
        K, per_row = self.in_features, self.in_features // BLOCK
        byte_idx = rows[:, None] * (K // 2) + torch.arange(K // 2, device=rows.device)  # [R, K/2]
        codes = unpack_nibbles(self.weight.codes[byte_idx].reshape(-1), rows.numel() * K)  # [R K]
        block_idx = (rows[:, None] * per_row + torch.arange(per_row, device=rows.device)).reshape(-1)  # [R K/64]
        absmax = self.weight.absmax()[block_idx]
        return blockwise_dequantize(codes, absmax, BLOCK, NF4_LEVELS).view(-1, K).to(dtype)

    def forward(self, x: Tensor) -> Tensor:  # [.., K] -> [.., N]
        return F.linear(x, self.weight.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def nbytes(self) -> int:
        return self.weight.nbytes()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


