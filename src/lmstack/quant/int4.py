"""Int4 weight-only linear layers on PyTorch's CPU int4 kernel (`aten._weight_int4pack_mm_for_cpu`).

A weight [N, K] is cut along K into groups of G values (32, 64 or 128). Each group has a bf16 scale s and zero z,
and each value is a 4-bit code q in 0..15 with

    w = (q - 8) * s + z                   (the kernel's convention, checked in tests/test_quant.py)

Asymmetric round-to-nearest PTQ sets s = (max - min) / 15 and z = min + 8 s per group. GGUF's Q4_1 blocks
(w = q d + m) map onto this with s = d, z = m + 8 d, and Q4_0 (w = (q - 8) d) with z = 0 (quant/gguf_pack.py).

The kernel wants its own packed layout, which depends on the CPU's vector width: rows in blocks of 64 with
AVX512, of 32 with AVX2 (kernel_block checks which, once). The state dict holds the blocks-of-64 layout
("blocked", written and read by plain torch ops here, so any CPU can use it): `qweight` [N, K/2] uint8 plus
`scales_and_zeros` [K/G, N, 2] bf16. Where this CPU's kernel uses that layout, loading adopts the bytes as they
are, memory map included; elsewhere it unpacks the codes and lets the kernel pack them (a permutation of
nibbles, never a requantization).

Speed (SmolLM2 shapes, 1 thread, contended machine): one row through the kernel is 2-4x faster than bf16
F.linear; many rows are about 2x slower (64 rows of 1536x576: 2.7 ms against 1.3 ms), but dequantizing the
weight to bf16 first costs more than that (about 10 ms), so prefill stays on the kernel too. The kernel is fast
with bf16 activations only: other dtypes are cast to bf16 and back (its float32 path is about 30x slower).

Shapes: N out_features, K in_features, G group size, M rows of activations.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor, nn

from lmstack.errors import LmstackError

GROUP_SIZES = (32, 64, 128)
PORTABLE_BLOCK = 64  # qweight packs rows in blocks of 64, as the AVX512 kernel does (kernel_rows)


def int4_fits(out_features: int, in_features: int, group_size: int) -> str | None:
    """None if the kernel takes this shape, else why not (the kernel needs N % 16 == 0 and K % G == 0)."""
    if group_size not in GROUP_SIZES:
        return f"int4 group size must be one of {GROUP_SIZES}, not {group_size}"
    if in_features % group_size:
        return f"in_features {in_features} is not a multiple of the group size {group_size}"
    if out_features % 16:
        return f"out_features {out_features} is not a multiple of 16"
    return None


def quantize_int4(weight: Tensor, group_size: int, bits: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric round-to-nearest: weight [N, K] -> (codes [N, K] uint8 in 0..15, scales, zeros [N, K/G] f32).

    bits < 4 (QAT's int2/int3, quant/qat.py) uses only codes 0..2^bits - 1 of the same int4 layout."""
    N, K = weight.shape
    levels = 2**bits - 1
    w = weight.detach().float().reshape(N, K // group_size, group_size)  # [N, K/G, G]
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [N, K/G]
    # Round scale and zero to bf16 first, so the codes are chosen against the values the kernel will use.
    scales = ((hi - lo) / levels).clamp(min=1e-8).to(torch.bfloat16).float()
    zeros = (lo + 8 * scales).to(torch.bfloat16).float()
    codes = torch.round((w - zeros[..., None]) / scales[..., None] + 8).clamp(0, levels)  # [N, K/G, G]
    return codes.to(torch.uint8).reshape(N, K), scales, zeros


def blocked_pack(codes: Tensor, block: int = PORTABLE_BLOCK) -> Tensor:
    """[N, K] codes 0..15 -> [N, K/2] uint8 in the blocked layout with blocks of `block` rows (see kernel_rows).

    Blocks of 64 are the portable `qweight` (the AVX512 kernel's own layout), written in plain torch ops so any
    CPU can write and read it."""
    codes = codes.to(torch.uint8)
    N, K = codes.shape
    n_full = N // block * block
    full = codes[:n_full].view(-1, 2, block // 2, K)  # [NB, 2, B/2, K]: low-nibble rows, high-nibble rows
    parts = [(full[:, 0] | (full[:, 1] << 4)).transpose(1, 2).reshape(-1)]  # [NB, K, B/2] bytes
    if N > n_full:  # a tail of n rows: [K, n/2] bytes, rows 2j low and 2j + 1 high
        tail = codes[n_full:]
        parts.append((tail[0::2] | (tail[1::2] << 4)).t().reshape(-1))
    return torch.cat(parts).view(N, K // 2)


def blocked_unpack(packed: Tensor, K: int, block: int = PORTABLE_BLOCK) -> Tensor:
    """Inverse of blocked_pack: [N, K/2] -> [N, K] uint8 (views and two shifts; no gather)."""
    N = packed.shape[0]
    n_full = N // block * block
    flat = packed.reshape(-1)
    full = flat[:n_full * K // 2].view(-1, K, block // 2)  # [NB, K, B/2]
    parts = [torch.cat([full & 0xF, full >> 4], dim=-1).transpose(1, 2).reshape(n_full, K)]
    if N > n_full:
        tail = flat[n_full * K // 2:].view(K, (N - n_full) // 2)  # [K, n/2]: rows 2j low, 2j + 1 high
        parts.append(torch.stack([tail & 0xF, tail >> 4], dim=-1).reshape(K, N - n_full).t())
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def kernel_pack(codes: Tensor) -> Tensor:
    """[N, K] codes -> the kernel's packed [N, K/2] uint8 (its layout depends on the CPU)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def kernel_rows(packed: Tensor, rows: Tensor, K: int) -> Tensor:
    """Codes of some rows of a kernel-packed weight: packed [N, K/2], rows [R] -> [R, K] uint8.

    The kernel's layout: rows come in blocks of B (64 with AVX512, 32 with AVX2) stored as [K, B/2] bytes whose
    low nibbles are rows 0..B/2-1 and high nibbles rows B/2..B-1; a tail block of n < B rows is [K, n/2] bytes
    holding rows 2j (low) and 2j + 1 (high). `kernel_block` finds B once by checking the kernel on a probe.
    """
    B = kernel_block()
    N = packed.shape[0]
    flat = packed.reshape(-1)
    block, r = rows // B, rows % B  # [R]
    size = torch.clamp(N - block * B, max=B)  # [R] rows in that block
    k = torch.arange(K, device=packed.device)  # [K]
    base = (block * B * K // 2)[:, None]  # [R, 1] byte offset of the block
    full = size == B
    col = torch.where(full, r % (B // 2), r // 2)[:, None]  # [R, 1] byte column within a K-row of the block
    width = torch.where(full, torch.full_like(size, B // 2), size // 2)[:, None]  # [R, 1] bytes per K-row
    high = torch.where(full, r >= B // 2, r % 2 == 1)[:, None]  # [R, 1] high nibble?
    byte = flat[base + k[None, :] * width + col]  # [R, K]
    return torch.where(high, byte >> 4, byte & 0xF)


def kernel_unpack(packed: Tensor, K: int) -> Tensor:
    """All codes of a kernel-packed weight: packed [N, K/2] -> [N, K] uint8."""
    return blocked_unpack(packed, K, kernel_block())


@lru_cache(maxsize=1)
def kernel_block() -> int:
    """The rows per block of this CPU's int4 kernel layout (64 or 32), checked against the kernel on a probe."""
    probe = torch.randint(0, 16, (64 + 48, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = kernel_pack(probe)
    for block in (64, 32):
        if torch.equal(packed, blocked_pack(probe, block)):
            return block
    raise NotImplementedError("this CPU's int4 kernel packs weights in a layout lmstack cannot read back "
                              "(blocks of 64 (AVX512) and 32 (AVX2) are known); int4 save and embedding lookups "
                              "need it")


def _kernel_is_portable() -> bool:
    """Whether the kernel's layout is the portable qweight's, so loading can adopt the bytes (memory map too)."""
    return kernel_block() == PORTABLE_BLOCK


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W stored as grouped asymmetric int4 codes, through the CPU int4 kernel."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 32, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        why = int4_fits(out_features, in_features, group_size)
        if why is not None:
            raise LmstackError(f"Int4Linear {out_features}x{in_features}: {why}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        N, K = out_features, in_features
        # Kernel layout, rebuilt from the portable state on load; the state dict never holds it.
        self.register_buffer("packed", torch.zeros(N, K // 2, dtype=torch.uint8, device=device), persistent=False)
        self.register_buffer("scales_and_zeros", torch.zeros(K // group_size, N, 2, dtype=torch.bfloat16,
                                                             device=device))  # [K/G, N, 2]
        self.bias = nn.Parameter(torch.zeros(N, device=device), requires_grad=False) if bias else None

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                   bias: Tensor | None = None) -> Int4Linear:
        """codes [N, K] 0..15, scales / zeros [N, K/G] (w = (q - 8) s + z) -> a layer (no requantization)."""
        N, K = codes.shape
        layer = cls(K, N, group_size, bias=bias is not None, device=codes.device)
        layer.packed = kernel_pack(codes)
        layer.scales_and_zeros.copy_(torch.stack([scales, zeros], dim=-1).transpose(0, 1))
        if bias is not None:
            layer.bias.data = bias.detach().float().clone()
        return layer

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        codes, scales, zeros = quantize_int4(linear.weight, group_size)
        return cls.from_codes(codes, scales, zeros, group_size, linear.bias)

    @classmethod
    def concat(cls, layers: list[Int4Linear]) -> Int4Linear:
        """One layer computing [y_1 | y_2 | ...] (fused q|k|v, gate|up): the codes and scales as they are.

        Rows are packed in independent blocks (kernel_block), so where every part has a whole number of blocks
        the packed bytes simply follow each other; otherwise the codes are unpacked and packed again."""
        first = layers[0]
        if any(m.in_features != first.in_features or m.group_size != first.group_size for m in layers):
            raise LmstackError("Int4Linear.concat needs the same in_features and group size in every part")
        if len({m.bias is None for m in layers}) > 1:
            raise LmstackError("Int4Linear.concat: some parts have a bias and some do not")
        N, K = sum(m.out_features for m in layers), first.in_features
        fused = cls(K, N, first.group_size, bias=first.bias is not None, device=first.packed.device)
        if all(m.out_features % kernel_block() == 0 for m in layers):
            fused.packed = torch.cat([m.packed.reshape(-1) for m in layers]).view(N, K // 2)
        else:
            fused.packed = kernel_pack(torch.cat([m.codes() for m in layers]))
        fused.scales_and_zeros = torch.cat([m.scales_and_zeros for m in layers], dim=1)  # [K/G, N, 2]
        if first.bias is not None:
            fused.bias.data = torch.cat([m.bias.detach() for m in layers])
        return fused

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # model.to(float32) must not widen the bf16 scales: the kernel reads them as bf16.
        scales_and_zeros = self.scales_and_zeros
        super()._apply(fn, recurse)
        self.scales_and_zeros = scales_and_zeros.to(device=self.scales_and_zeros.device, dtype=torch.bfloat16)
        return self

    # ------------------------------------------------------------------------- the portable state

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # [N, K/2] uint8, blocked: the kernel's own bytes where this CPU's kernel uses that layout
        destination[prefix + "qweight"] = self.packed if _kernel_is_portable() else blocked_pack(self.codes())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[override]
        key = prefix + "qweight"
        if key in state_dict:
            qweight = state_dict[key]
            expect = (self.out_features, self.in_features // 2)
            if qweight.dtype != torch.uint8 or tuple(qweight.shape) != expect:
                raise LmstackError(f"{key}: expected uint8 {list(expect)}, got {qweight.dtype} "
                                   f"{list(qweight.shape)} (corrupt or mismatched int4 tensor)")
            if not _kernel_is_portable():  # another CPU's kernel layout: unpack and let the kernel pack
                self.packed = kernel_pack(blocked_unpack(qweight, self.in_features))
            else:  # adopted as it is, a memory map staying one (the kernel reads unaligned bytes correctly:
                self.packed = qweight  # tests/test_quant.py checks offsets 0 and 12, unlike _weight_int8pack_mm)
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------------------------ reading

    def codes(self, rows: Tensor | None = None) -> Tensor:
        """The 4-bit codes of `rows` (default all): [R, K] uint8."""
        if rows is None:
            return kernel_unpack(self.packed, self.in_features)
        return kernel_rows(self.packed, rows, self.in_features)

    def dequantize(self, rows: Tensor | None = None, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        """W (or some of its rows) in `dtype`: [R, K], computed in float32 from the bf16 scales and zeros."""
        sz = self.scales_and_zeros if rows is None else self.scales_and_zeros[:, rows]  # [K/G, R, 2]
        codes = self.codes(rows)
        R = codes.shape[0]
        s, z = sz[..., 0].t().float()[..., None], sz[..., 1].t().float()[..., None]  # [R, K/G, 1]
        w = (codes.view(R, -1, self.group_size).float() - 8) * s + z  # [R, K/G, G]
        return w.reshape(R, self.in_features).to(dtype)

    def forward(self, x: Tensor) -> Tensor:  # [.., K] -> [.., N]
        if x.device.type != "cpu":
            raise NotImplementedError("Int4Linear runs on the CPU int4 kernel only")
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # [M, K]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_and_zeros.numel() * 2

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
