"""GGUF Q4_0 / Q4_1 blocks -> the int4 kernel's codes, scales and zeros, without requantizing.

A GGUF block holds 32 consecutive values of a row (so a group of 32 for the kernel):
- Q4_0, 18 bytes: d (fp16), qs[16]; w = (q - 8) d                    -> scale d, zero 0
- Q4_1, 20 bytes: d (fp16), m (fp16), qs[16]; w = q d + m             -> scale d, zero m + 8 d
  since the kernel computes (q - 8) s + z.
In qs, byte j holds value j in its low nibble and value j + 16 in its high nibble. The codes are kept as they
are; the only loss is rounding d and m + 8 d from fp16 (or float32) to the kernel's bf16.

Shapes: N rows, K columns, NB = K / 32 blocks per row.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lmstack.errors import LmstackError
from lmstack.quant.int4 import Int4Linear, blocked_pack

BLOCK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}


def q4_blocks(raw: np.ndarray | bytes, qtype: str, shape: tuple[int, int]) -> Tensor:
    """Raw Q4_0 / Q4_1 bytes of a [N, K] tensor -> its blocks [N, NB, bytes] uint8 (a view, no copy)."""
    if qtype not in BLOCK_BYTES:
        raise LmstackError(f"only Q4_0 and Q4_1 repack into int4 without requantizing, not {qtype}")
    N, K = shape
    if K % BLOCK:
        raise LmstackError(f"a {qtype} tensor's rows must be whole blocks of {BLOCK}, got K = {K}")
    size = BLOCK_BYTES[qtype]
    # bytes are copied into a bytearray: torch will not share a read-only buffer
    data = np.frombuffer(bytearray(raw), dtype=np.uint8) if isinstance(raw, (bytes, bytearray)) else raw.reshape(-1)
    if data.size != N * K // BLOCK * size:
        raise LmstackError(f"{qtype} tensor of shape {[N, K]} needs {N * K // BLOCK * size} bytes, got {data.size}")
    return torch.from_numpy(data).view(N, K // BLOCK, size)


def block_scales(blocks: Tensor, qtype: str) -> tuple[Tensor, Tensor]:
    """blocks [N, NB, bytes] -> the kernel's (scales, zeros) [N, NB] float32: d, and m + 8 d (Q4_1) or 0."""
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()  # [N, NB]
    if qtype == "Q4_0":
        return d, torch.zeros_like(d)
    m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
    return d, m + 8 * d


def gguf_q4_to_codes(raw: np.ndarray | bytes, qtype: str, shape: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Raw Q4_0 / Q4_1 bytes of a [N, K] tensor -> (codes [N, K] uint8, scales [N, NB] f32, zeros [N, NB] f32)."""
    blocks = q4_blocks(raw, qtype, shape)
    return (_codes(blocks).reshape(shape), *block_scales(blocks, qtype))


def _codes(blocks: Tensor) -> Tensor:
    """blocks [N, NB, bytes] -> their codes [N, NB, 32] uint8: values 0..15 (low nibbles), then 16..31."""
    qs = blocks[..., blocks.shape[-1] - 16:]  # [N, NB, 16]
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def q4_blocks_to_int4(blocks: Tensor, qtype: str) -> tuple[Tensor, Tensor, Tensor]:
    """blocks [N, NB, bytes] -> (qweight [N, K/2] uint8 in int4.blocked_pack's layout, scales, zeros [N, NB]).

    Straight from the block bytes to the blocked layout, without an [N, K] array of codes (half the time of
    gguf_q4_to_codes + blocked_pack on SmolLM2's 210 tensors). The blocked layout stores rows in blocks of 64 as
    [K, 32] bytes: row i in the low nibble, row 32 + i in the high one. A GGUF byte j of block b holds columns
    32 b + j (low) and 32 b + 16 + j (high) of one row.
    """
    N, NB, size = blocks.shape
    if N % 64:  # tails pack in pairs of rows: through the codes
        return blocked_pack(_codes(blocks).reshape(N, NB * BLOCK)), *block_scales(blocks, qtype)
    qs = blocks[..., size - 16:].reshape(N // 64, 2, 32, NB, 16)  # row 64 r + 32 h + i
    lo, hi = qs[:, 0], qs[:, 1]  # [R, 32, NB, 16]: the rows bound for the low and the high nibbles
    # [R, 32 (i), NB (b), 2 (columns 32 b + j, then 32 b + 16 + j), 16 (j)]
    out = torch.stack([(lo & 0xF) | (hi << 4), (lo >> 4) | (hi & 0xF0)], dim=3)
    # .contiguous(): for one block of rows and K = 64, reshape can return a transposed view instead of a copy
    return out.permute(0, 2, 3, 4, 1).reshape(N, NB * 16).contiguous(), *block_scales(blocks, qtype)


def int4_from_gguf(raw: np.ndarray | bytes, qtype: str, shape: tuple[int, int],
                   bias: Tensor | None = None) -> Int4Linear:
    """An Int4Linear (groups of 32) holding a GGUF Q4_0 / Q4_1 tensor's own codes."""
    codes, scales, zeros = gguf_q4_to_codes(raw, qtype, shape)
    return Int4Linear.from_codes(codes, scales, zeros, BLOCK, bias)
