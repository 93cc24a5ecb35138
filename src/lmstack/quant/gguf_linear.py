"""GGUFLinear: a linear layer that keeps a GGUF tensor's own Q4_0 / Q4_1 / Q8_0 blocks and computes in float32.

The int4 kernel of quant/int4.py is fast with bfloat16 activations only, and bf16 activations change greedy
tokens: on SmolLM2 a bf16 model gives the same 64 greedy tokens as the float32 one for under a third of 32 chat
prompts. This layer reads the file's blocks as they are (llama.cpp's bytes, 0.56-1.06 bytes a weight) and
computes x W^T with `torch.ops.lmstack.gguf_matmul` (kernels/gguf_matmul.cpp): float32 results of the dequantized
weight, up to the order of float32 sums for prefill and, for decode's few rows, up to activations rounded to
int16 per block of 32 (1.5e-5 of the block's largest value; llama.cpp rounds them to int8). Where the kernel
cannot be built, it dequantizes the weight and calls F.linear (float32 numbers, slower).

A block holds 32 consecutive values of a row:
- Q4_0, 18 bytes: d (fp16), qs[16]              w = (q - 8) d
- Q4_1, 20 bytes: d (fp16), m (fp16), qs[16]    w = q d + m
- Q8_0, 34 bytes: d (fp16), qs[32] int8         w = q d
In Q4 blocks, byte j of qs holds value j in its low nibble and value j + 16 in its high one.

Shapes: N out_features, K in_features, NB = K / 32 blocks a row, M rows of activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack import kernels
from lmstack.errors import LmstackError

BLOCK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
GGML_TYPE = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}  # the kernel's qtype argument


def gguf_fits(in_features: int, qtype: str) -> str | None:
    """None if this layer holds a [*, in_features] weight of `qtype`, else why not."""
    if qtype not in BLOCK_BYTES:
        return f"GGUF block type {qtype} is not one of {', '.join(BLOCK_BYTES)}"
    if in_features % BLOCK:
        return f"in_features {in_features} is not a multiple of {BLOCK}"
    return None


def dequantize_blocks(blocks: Tensor, qtype: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """blocks [R, NB * bytes] uint8 -> W [R, NB * 32] in `dtype`, computed in float32 as gguf.quants does."""
    R = blocks.shape[0]
    b = blocks.view(R, -1, BLOCK_BYTES[qtype])  # [R, NB, bytes]
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # [R, NB, 1]
    if qtype == "Q8_0":
        w = b[..., 2:].contiguous().view(torch.int8).float() * d  # [R, NB, 32]
    else:
        qs = b[..., -16:]  # [R, NB, 16]
        q = torch.cat([qs & 0xF, qs >> 4], dim=-1).float()  # [R, NB, 32]: values 0..15, then 16..31
        w = (q - 8) * d if qtype == "Q4_0" else q * d + b[..., 2:4].contiguous().view(torch.float16).float()
    return w.reshape(R, -1).to(dtype)


class GGUFLinear(nn.Module):
    """y = x W^T (+ b), W kept as GGUF blocks, computed in float32 (x of another dtype is cast and back)."""

    def __init__(self, in_features: int, out_features: int, qtype: str, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        why = gguf_fits(in_features, qtype)
        if why is not None:
            raise LmstackError(f"GGUFLinear {out_features}x{in_features}: {why}")
        self.in_features, self.out_features, self.qtype = in_features, out_features, qtype
        row_bytes = in_features // BLOCK * BLOCK_BYTES[qtype]
        self.register_buffer("blocks", torch.zeros(out_features, row_bytes, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_blocks(cls, blocks: Tensor, qtype: str, bias: Tensor | None = None) -> GGUFLinear:
        """blocks [N, NB, bytes] or [N, NB * bytes] uint8 (a GGUF tensor's bytes, rows in order) -> a layer."""
        N = blocks.shape[0]
        flat = blocks.reshape(N, -1)
        if flat.dtype != torch.uint8 or qtype not in BLOCK_BYTES or flat.shape[1] % BLOCK_BYTES[qtype]:
            raise LmstackError(f"GGUFLinear: {qtype} blocks must be uint8 rows of whole {BLOCK_BYTES.get(qtype)}-byte "
                               f"blocks, got {flat.dtype} {list(flat.shape)}")
        layer = cls(flat.shape[1] // BLOCK_BYTES[qtype] * BLOCK, N, qtype, bias=bias is not None, device="meta")
        layer.blocks = flat.contiguous()
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        return layer

    @classmethod
    def concat(cls, layers: list[GGUFLinear]) -> GGUFLinear:
        """One layer computing [y_1 | y_2 | ...] (fused q|k|v, gate|up): rows are independent, so the blocks
        simply follow each other."""
        first = layers[0]
        if any(m.in_features != first.in_features or m.qtype != first.qtype for m in layers):
            raise LmstackError("GGUFLinear.concat needs the same in_features and block type in every part")
        if len({m.bias is None for m in layers}) > 1:
            raise LmstackError("GGUFLinear.concat: some parts have a bias and some do not")
        bias = torch.cat([m.bias.detach() for m in layers]) if first.bias is not None else None
        return cls.from_blocks(torch.cat([m.blocks for m in layers]), first.qtype, bias)

    def dequantize(self, rows: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """W (or some of its rows) in `dtype`: [R, K]."""
        return dequantize_blocks(self.blocks if rows is None else self.blocks[rows], self.qtype, dtype)

    def forward(self, x: Tensor) -> Tensor:  # [.., K] -> [.., N]
        if x.device.type != "cpu":
            raise NotImplementedError("GGUFLinear runs on the CPU only")
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float().contiguous()  # [M, K]
        if kernels.gguf_matmul_ready() or (not torch.compiler.is_compiling() and kernels.gguf_matmul_available()):
            y = kernels.gguf_matmul(x2, self.blocks, GGML_TYPE[self.qtype])  # [M, N] float32
        else:
            y = F.linear(x2, self.dequantize())
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def nbytes(self) -> int:
        return self.blocks.numel()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"
