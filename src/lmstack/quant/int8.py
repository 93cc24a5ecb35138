"""Int8 linear layers: weight-only per-channel int8, and W8A8 (int8 weights and per-token int8 activations).

Weight-only: W [N, K] is stored as int8 codes with one scale per output row (w = q s, s = absmax / 127) and
multiplied by `torch._weight_int8pack_mm`, which takes activations in their own dtype.

W8A8 (mode="w8a8"): each activation row is quantized too, by its own absmax (x = a t, t = absmax / 127), and the
product runs in integers through `torch._int_mm` (int8 x int8 -> int32, VNNI on this CPU): y = (a q^T) t s.
`_int_mm` takes any M and K on CPU (checked for M = 1, 2, 16, 17, 32 and K = 7, 100, 576: no padding needed). It
is fast with a column-major weight, so the codes are stored [N, K] and passed transposed ([K, N] column-major):
1536x576, one row, 1 thread: 19 us against 51 us with a row-major weight and 116 us for bf16 F.linear.

Shapes: N out_features, K in_features, M rows of activations.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmstack.errors import LmstackError

MODES = ("weight", "w8a8")


def quantize_int8_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row absmax: [R, K] float -> (codes [R, K] int8, scales [R] float32)."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=-1) / 127).clamp(min=1e-8)  # [R]
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with int8 weights and per-row scales; mode "w8a8" quantizes the activations too."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, mode: str = "weight",
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise LmstackError(f"Int8Linear mode must be one of {MODES}, not {mode!r}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, device=device))  # [N] float32
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, mode: str = "weight") -> Int8Linear:
        N, K = linear.weight.shape
        layer = cls(K, N, bias=linear.bias is not None, mode=mode, device=linear.weight.device)
        layer.qweight, layer.scales = quantize_int8_rows(linear.weight)
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().float().clone()
        return layer

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        scales = self.scales
        super()._apply(fn, recurse)
        # Scales stay float32 whatever dtype the model is cast to: re-move the original values (casting them to
        # bf16 and back would round them).
        self.scales = scales.to(device=self.scales.device, dtype=torch.float32)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[override]
        key = prefix + "qweight"
        if key in state_dict and state_dict[key].dtype != torch.int8:
            raise LmstackError(f"{key}: expected int8, got {state_dict[key].dtype} (corrupt or mismatched tensor)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # `_weight_int8pack_mm` crashes (SIGSEGV) on a weight that is not 64-byte aligned, which a tensor adopted
        # from a safetensors file (aligned to 8) usually is: copy it then.
        if self.qweight.device.type == "cpu" and self.qweight.data_ptr() % 64:
            self.qweight = self.qweight.clone()

    def dequantize(self, rows: Tensor | None = None, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        """W (or some of its rows) [R, K] in `dtype`."""
        q, s = (self.qweight, self.scales) if rows is None else (self.qweight[rows], self.scales[rows])
        return (q.float() * s[:, None]).to(dtype)

    def forward(self, x: Tensor) -> Tensor:  # [.., K] -> [.., N]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, K]
        if self.mode == "w8a8":
            t = (x2.float().abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-8)  # [M, 1] per-token scale
            a = torch.round(x2.float() / t).clamp(-127, 127).to(torch.int8)  # [M, K]
            y = (torch._int_mm(a, self.qweight.t()).float() * t * self.scales).to(x.dtype)  # [M, N]
        else:
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scales.to(x.dtype))  # [M, N]
        y = y.view(*shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 4

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"
