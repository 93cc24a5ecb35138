"""4-bit NormalFloat (NF4) with double quantization, the storage format of QLoRA (Dettmers et al., 2023).

A weight is cut into blocks of 64 values. Each block is scaled by its absolute maximum into [-1, 1] and every
value is rounded to the nearest of the 16 NF4 levels; two 4-bit codes are packed per byte. The per-block absmax
constants are quantized again ("double quantization"): the mean is subtracted, then blocks of 256 constants are
scaled by their own fp32 absmax and rounded to the nearest of the 256 levels of the signed 8-bit dynamic data
type (Dettmers, 2015), which is what the paper calls 8-bit floats and what bitsandbytes uses. Storage per
parameter: 4 + 8/64 + 32/(64*256) bits, about 4.127.

The layout follows bitsandbytes' `quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)`: the
flattened tensor is blocked row-major and the first of each pair of codes is the high nibble. Everything is
vectorized over blocks; there are no Python loops over data.

Shapes: N elements, NB = ceil(N / 64) blocks, NB2 = ceil(NB / 256) second-level blocks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

BLOCK = 64  # values per first-level block (QLoRA)
BLOCK2 = 256  # absmax constants per second-level block (QLoRA)

# The NF4 data type: quantiles of N(0, 1) normalized to [-1, 1], with an exact zero and 8 positive / 7 negative
# levels. Published constants from Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023),
# Appendix E ("NormalFloat 4-bit data type"), in float32 as printed there.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
ZERO_CODE = 7  # NF4_LEVELS[7] == 0.0


def dynamic_map() -> Tensor:
    """The signed 8-bit dynamic data type of Dettmers (2015), 256 sorted levels in [-1, 1] (float32).

    Each level is sign * 10**e * f, with exponents e = -6..0 and, for exponent e, 2**(e + 6) fractions f at the
    midpoints of an even grid on [0.1, 1]; plus 0 and 1. Small magnitudes get fine resolution, which suits the
    mean-centred absmax constants. Computed in float32 like bitsandbytes' `create_dynamic_map()`, so the levels
    agree to the bit.
    """
    levels: list[Tensor] = []
    for i in range(7):  # 7 exponent levels, a 7-element loop over the code book, not over data
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0 * 10.0 ** (i - 6)
        levels += [means, -means]
    return torch.cat(levels + [torch.tensor([0.0, 1.0])]).sort().values  # [256]


DYNAMIC_LEVELS = dynamic_map()


def _nearest(scaled: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest level for each value of `scaled` (levels sorted; a tie goes to the lower level)."""
    bounds = (levels[:-1] + levels[1:]) / 2  # [L - 1] decision boundaries
    return torch.bucketize(scaled, bounds.to(scaled.device))


def blockwise_absmax_quantize(x: Tensor, block: int, levels: Tensor) -> tuple[Tensor, Tensor]:
    """x [N] float32 -> (codes [N] int64, absmax [ceil(N / block)] float32); the last block may be short."""
    n = x.numel()
    n_blocks = math.ceil(n / block)
    padded = torch.zeros(n_blocks * block, dtype=torch.float32, device=x.device)
    padded[:n] = x  # zero padding leaves every block's absmax unchanged
    blocks = padded.view(n_blocks, block)
    absmax = blocks.abs().amax(dim=1)  # [NB]
    # Multiplying by the reciprocal (not dividing) matches bitsandbytes to the last bit.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    return _nearest(scaled.view(-1)[:n], levels), absmax


def blockwise_dequantize(codes: Tensor, absmax: Tensor, block: int, levels: Tensor) -> Tensor:
    """codes [N] (any integer dtype), absmax [NB] -> values [N] float32."""
    n = codes.numel()
    values = levels.to(codes.device)[codes.long()]  # [N]
    pad = absmax.numel() * block - n
    values = torch.nn.functional.pad(values, (0, pad)).view(-1, block) * absmax[:, None]
    return values.view(-1)[:n]


def pack_nibbles(codes: Tensor, pad_code: int = 0) -> Tensor:
    """[N] codes in 0..15 -> [ceil(N / 2)] uint8, the first code of each pair in the high nibble."""
    codes = codes.to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), pad_code)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: Tensor, n: int) -> Tensor:
    """Inverse of pack_nibbles: [ceil(n / 2)] uint8 -> [n] uint8."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:n]


class NF4Weight(nn.Module):
    """A frozen tensor stored as NF4 with double-quantized absmax constants.

    A module with non-persistent buffers, so `.to(device)` moves it with the model but the state dict of the
    model keeps only its trainable (adapter) weights.
    """

    def __init__(self, tensor: Tensor) -> None:
        super().__init__()
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype  # the dtype it was quantized from, the default for dequantize()
        x = tensor.detach().reshape(-1).float()
        codes, absmax = blockwise_absmax_quantize(x, BLOCK, NF4_LEVELS)  # [N], [NB]
        # Double quantization: centre the constants, then 8-bit dynamic codes with one fp32 scale per 256.
        offset = absmax.mean()
        absmax_codes, absmax_scales = blockwise_absmax_quantize(absmax - offset, BLOCK2, DYNAMIC_LEVELS)
        # An odd tail is padded with the code of 0.0, as bitsandbytes pads with a zero value.
        self.register_buffer("codes", pack_nibbles(codes, ZERO_CODE), persistent=False)  # [ceil(N / 2)] uint8
        self.register_buffer("absmax_codes", absmax_codes.to(torch.uint8), persistent=False)  # [NB] uint8
        self.register_buffer("absmax_scales", absmax_scales, persistent=False)  # [NB2] float32
        self.register_buffer("absmax_offset", offset, persistent=False)  # [] float32

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # model.to(bfloat16) would round the float32 constants too: let them follow the device, not the dtype.
        scales, offset = self.absmax_scales, self.absmax_offset
        super()._apply(fn, recurse)
        self.absmax_scales, self.absmax_offset = scales.to(self.codes.device), offset.to(self.codes.device)
        return self

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def absmax(self) -> Tensor:
        """The first-level constants after double quantization: [NB] float32."""
        return blockwise_dequantize(self.absmax_codes, self.absmax_scales, BLOCK2, DYNAMIC_LEVELS) + self.absmax_offset

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The tensor in `dtype` (default: the dtype it was quantized from), computed in float32."""
        codes = unpack_nibbles(self.codes, self.numel)
        values = blockwise_dequantize(codes, self.absmax(), BLOCK, NF4_LEVELS)
        return values.view(self.shape).to(dtype or self.dtype)

    def nbytes(self) -> int:
        """Bytes of storage: packed codes, 8-bit constants, their fp32 scales and the offset."""
        return sum(t.numel() * t.element_size()
                   for t in (self.codes, self.absmax_codes, self.absmax_scales, self.absmax_offset))

    def bits_per_parameter(self) -> float:
        return 8.0 * self.nbytes() / self.numel

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, {self.bits_per_parameter():.3f} bits/param"
