"""Int8 linear layers: weight-only per-channel int8, and W8A8 (int8 weights and per-token int8 activations).

Weight-only: W [N, K] is stored as int8 codes with one scale per output row (w = q s, s = absmax / 127) and
multiplied by `torch._weight_int8pack_mm`, which takes activations in their own dtype.

W8A8 (mode="w8a8"): each activation row is quantized too, by its own absmax (x = a t, t = absmax / 127), and the
product runs in integers through `torch._int_mm` (int8 x int8 -> int32, VNNI on this CPU): y = (a q^T) t s.
`_int_mm` takes any M and K on CPU (checked for M = 1, 2, 16, 17, 32 and K = 7, 100, 576: no padding needed). It
is fast with a column-major weight, so the codes are stored [N, K] and passed transposed ([K, N] column-major):
1536x576, one row, 1 thread: 19 us against 51 us with a row-major weight and 116 us for bf16 F.linear.

Grouped weight-only (group_size=32, format "int8-g32"): one scale per 32 weights of a row, which is GGUF's Q8_0
(SmolLM2's token_embd) kept exactly. No aten kernel takes group scales, so a torch.compiled step gets one fused
loop that reads each int8 code once and scales it in registers (SmolLM2's 49152x576 tied head, one row: about
2.0 ms against 3.1 ms for the oneDNN-packed bf16 head, reading half the bytes); other calls dequantize a chunk of
rows at a time and multiply in the activations' dtype (eagerly, one row: 23 ms, so the eager default keeps the
packed bf16 head instead).

Shapes: N out_features, K in_features, M rows of activations, g group size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmstack.errors import LmstackError

MODES = ("weight", "w8a8")
EAGER_CHUNK = 2048  # rows a grouped matmul dequantizes at a time (2048x576: 5 MB in float32, 2 MB in bf16)
# Up to this many activation rows a traced grouped matmul is one fused loop, which reads the codes once per row:
# SmolLM2's head took 2.0, 4.2 and 8.0 ms for 1, 2 and 4 rows, against 6.1-6.9 ms dequantizing chunks.
FUSED_MAX_ROWS = 3


def quantize_int8_rows(weight: Tensor, group_size: int = 0) -> tuple[Tensor, Tensor]:
    """Symmetric absmax per row (group_size 0) or per `group_size` weights of a row: [R, K] float ->
    (codes [R, K] int8, scales [R] or [R, K/g] float32). A Q8_0 block's values q d (|q| <= 127, the largest
    127) come back as the same q and d."""
    w = weight.detach().float()
    if group_size:
        R, K = w.shape
        groups = w.view(R, K // group_size, group_size)  # [R, K/g, g]
        scales = (groups.abs().amax(dim=-1) / 127).clamp(min=1e-8)  # [R, K/g]
        codes = torch.round(groups / scales[..., None]).clamp(-127, 127).to(torch.int8)
        return codes.view(R, K), scales
    scales = (w.abs().amax(dim=-1) / 127).clamp(min=1e-8)  # [R]
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with int8 weights and per-row scales (or per `group_size` weights of a row, weight-only);
    mode "w8a8" quantizes the activations too."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, mode: str = "weight",
                 device: torch.device | str | None = None, group_size: int = 0) -> None:
        super().__init__()
        if mode not in MODES:
            raise LmstackError(f"Int8Linear mode must be one of {MODES}, not {mode!r}")
        if group_size and (mode != "weight" or in_features % group_size):
            raise LmstackError(f"int8 groups of {group_size} need weight-only mode and in_features divisible by "
                               f"it (got {mode}, {in_features})")
        self.in_features, self.out_features, self.mode, self.group_size = in_features, out_features, mode, group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        scale_shape = (out_features, in_features // group_size) if group_size else (out_features,)
        self.register_buffer("scales", torch.ones(scale_shape, device=device))  # [N] or [N, K/g] float32
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear, mode: str = "weight", group_size: int = 0) -> Int8Linear:
        N, K = linear.weight.shape
        layer = cls(K, N, bias=linear.bias is not None, mode=mode, device=linear.weight.device,
                    group_size=group_size)
        layer.qweight, layer.scales = quantize_int8_rows(linear.weight, group_size)
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

    def dequantize(self, rows: Tensor | slice | None = None, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        """W (or some of its rows) [R, K] in `dtype`."""
        q, s = (self.qweight, self.scales) if rows is None else (self.qweight[rows], self.scales[rows])
        if self.group_size:
            R, K = q.shape
            return (q.view(R, K // self.group_size, self.group_size).float() * s[..., None]).view(R, K).to(dtype)
        return (q.float() * s[:, None]).to(dtype)

    def _grouped_mm(self, x: Tensor) -> Tensor:  # [M, K] -> [M, N] in x's dtype
        if torch.compiler.is_compiling() and x.shape[0] <= FUSED_MAX_ROWS:
            M, (N, K), g = x.shape[0], self.qweight.shape, self.group_size
            w = self.qweight.view(N, K // g, g).float() * self.scales[..., None]  # [N, K/g, g], fused: never stored
            return (x.float().view(M, 1, K // g, g) * w).sum((-1, -2)).to(x.dtype)
        return torch.cat([x @ self.dequantize(slice(i, i + EAGER_CHUNK), x.dtype).t()
                          for i in range(0, self.out_features, EAGER_CHUNK)], dim=-1)

    def forward(self, x: Tensor) -> Tensor:  # [.., K] -> [.., N]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [M, K]
        if self.mode == "w8a8":
            t = (x2.float().abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-8)  # [M, 1] per-token scale
            a = torch.round(x2.float() / t).clamp(-127, 127).to(torch.int8)  # [M, K]
            M = a.shape[0]
            if a.is_cuda and M <= 16:  # the CUDA kernel wants more than 16 rows; a decode step has one
                a = torch.cat([a, a.new_zeros(17 - M, a.shape[1])])  # [17, K]
            y = (torch._int_mm(a, self.qweight.t())[:M].float() * t * self.scales).to(x.dtype)  # [M, N]
        elif self.group_size:
            y = self._grouped_mm(x2)  # [M, N]
        else:
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scales.to(x.dtype))  # [M, N]
        y = y.view(*shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 4

    def extra_repr(self) -> str:
        groups = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{groups}"
