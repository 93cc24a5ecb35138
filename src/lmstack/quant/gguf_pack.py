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
from lmstack.quant.int4 import Int4Linear

BLOCK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}


def gguf_q4_to_codes(raw: np.ndarray | bytes, qtype: str, shape: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Raw Q4_0 / Q4_1 bytes of a [N, K] tensor -> (codes [N, K] uint8, scales [N, NB] f32, zeros [N, NB] f32)."""
    if qtype not in BLOCK_BYTES:
        raise LmstackError(f"only Q4_0 and Q4_1 repack into int4 without requantizing, not {qtype}")
    N, K = shape
    if K % BLOCK:
        raise LmstackError(f"a {qtype} tensor's rows must be whole blocks of {BLOCK}, got K = {K}")
    size = BLOCK_BYTES[qtype]
    data = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray)) else raw.reshape(-1)
    if data.size != N * K // BLOCK * size:
        raise LmstackError(f"{qtype} tensor of shape {[N, K]} needs {N * K // BLOCK * size} bytes, got {data.size}")
    blocks = data.reshape(N, K // BLOCK, size)  # [N, NB, bytes]
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, NB]
    if qtype == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zeros = m + 8 * d
    else:
        zeros = np.zeros_like(d)
    qs = blocks[..., size - 16:]  # [N, NB, 16]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # [N, NB, 32]: values 0..15, then 16..31
    return (torch.from_numpy(codes.reshape(N, K)), torch.from_numpy(d), torch.from_numpy(zeros))


def int4_from_gguf(raw: np.ndarray | bytes, qtype: str, shape: tuple[int, int],
                   bias: Tensor | None = None) -> Int4Linear:
    """An Int4Linear (groups of 32) holding a GGUF Q4_0 / Q4_1 tensor's own codes."""
    codes, scales, zeros = gguf_q4_to_codes(raw, qtype, shape)
    return Int4Linear.from_codes(codes, scales, zeros, BLOCK, bias)
