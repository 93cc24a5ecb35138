"""GPTQ (Frantar et al., 2022): int4 weights chosen against calibration activations instead of rounded alone.

Round to nearest minimizes each weight's own error. GPTQ minimizes the layer's output error on calibration
inputs X: it quantizes a weight matrix one input column at a time and spreads each column's rounding error over
the columns not yet quantized, weighted by the inverse Hessian H = 2 X^T X of that layer's inputs (the optimal
brain surgeon update). Columns are processed in blocks of 128 so that the update of the rest of the matrix is
one matmul per block. The groups' scale and zero (the int4 kernel's w = (q - 8) s + z) are set from the updated
weights when the first column of a group is reached.

Layers are calibrated in order, each on the activations of the already quantized layers before it, so later
layers correct for the earlier layers' errors. Used by `lmstack quantize --calibrate N` for the int4 schemes.

Shapes: N output features, K input features, G group size, R calibration rows (tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmstack.errors import LmstackError
from lmstack.quant.int4 import Int4Linear, quantize_int4
from lmstack.quant.quantize import LayerChoice, _parent, choose_format, quantized_linear

BLOCK = 128  # columns per lazy-batch update; a multiple of every int4 group size
DAMP = 0.01  # added to H's diagonal, times its mean: keeps the Cholesky factorization stable


def gptq_int4(weight: Tensor, hessian: Tensor, group_size: int, damp: float = DAMP
              ) -> tuple[Tensor, Tensor, Tensor]:
    """weight [N, K], hessian [K, K] (X^T X of the layer's inputs, any positive scale) -> (codes [N, K] uint8 in
    0..15, scales [N, K/G], zeros [N, K/G] float32), the layout of quantize_int4 and Int4Linear.from_codes.
    With a diagonal Hessian no error spreads, and the result is quantize_int4's."""
    N, K = weight.shape
    if K % group_size or BLOCK % group_size:
        raise LmstackError(f"GPTQ needs in_features ({K}) and {BLOCK} to be multiples of the group size {group_size}")
    W = weight.detach().float().clone()  # [N, K], updated as columns are quantized
    H = hessian.detach().float().clone()  # [K, K]
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(K, device=H.device)
    # The upper Cholesky factor of H^-1: row i holds what column i's error does to the columns after it.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # [K, K]
    codes = torch.empty(N, K, dtype=torch.uint8, device=W.device)
    scales = torch.empty(N, K // group_size, device=W.device)
    zeros = torch.empty_like(scales)
    for b0 in range(0, K, BLOCK):
        b1 = min(b0 + BLOCK, K)
        block = W[:, b0:b1]  # [N, B] a view: updated in place
        err = torch.zeros_like(block)  # [N, B] each column's scaled rounding error
        hinv = Hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group_size == 0:  # the group's scale and zero, from its columns as updated so far
                _, s, z = quantize_int4(block[:, i:i + group_size], group_size)
                scales[:, col // group_size], zeros[:, col // group_size] = s[:, 0], z[:, 0]
            s, z = scales[:, col // group_size], zeros[:, col // group_size]  # [N]
            w = block[:, i]
            q = torch.round((w - z) / s + 8).clamp(0, 15)
            codes[:, col] = q.to(torch.uint8)
            e = (w - ((q - 8) * s + z)) / hinv[i, i]  # [N]
            block[:, i:] -= e[:, None] * hinv[i, i:][None, :]
            err[:, i] = e
        W[:, b1:] -= err @ Hinv[b0:b1, b1:]
    return codes, scales, zeros


class _Stop(Exception):
    """Raised after the layer being calibrated: the layers after it need not run."""


def gptq_(model: nn.Module, calibration: Tensor, scheme: str) -> list[LayerChoice]:
    """Quantize every nn.Linear in `model.layers` in place with GPTQ under int4 `scheme`, layer after layer, on
    `calibration` token ids [B, T]. A shape int4 does not fit falls back as quantize_ does (round to nearest);
    the head and embedding are left to quantize_. -> one LayerChoice per Linear."""
    if not scheme.startswith("int4-g"):
        raise LmstackError(f"GPTQ calibrates the int4 schemes, not {scheme!r}")
    group = int(scheme.removeprefix("int4-g"))
    layers = getattr(model, "layers", None)
    if layers is None:
        raise LmstackError(f"GPTQ needs a decoder with `layers`, not {type(model).__name__}")
    report: list[LayerChoice] = []
    for index, layer in enumerate(layers):
        linears = {name: m for name, m in layer.named_modules() if type(m) is nn.Linear}
        hessians = {name: torch.zeros(m.in_features, m.in_features, device=m.weight.device)
                    for name, m in linears.items()}
        rows = {name: 0 for name in linears}

        def collect(name: str):  # noqa: ANN202 - a forward pre-hook
            def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).float()  # [R, K]
                hessians[name] += x.T @ x
                rows[name] += x.shape[0]
            return hook

        def stop(module: nn.Module, args: tuple, output: Tensor) -> None:
            raise _Stop

        handles = [m.register_forward_pre_hook(collect(name)) for name, m in linears.items()]
        handles.append(layer.register_forward_hook(stop))
        try:
            with torch.inference_mode():
                model(calibration)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        for name, linear in linears.items():
            fmt, why = choose_format(scheme, linear.out_features, linear.in_features)
            if fmt == scheme and rows[name]:
                codes, s, z = gptq_int4(linear.weight, hessians[name] / rows[name], group)
                new: nn.Module = Int4Linear.from_codes(codes, s, z, group, linear.bias)
            else:
                new = quantized_linear(linear.weight, linear.bias, fmt)
            parent, attr = _parent(layer, name)
            setattr(parent, attr, new)
            report.append(LayerChoice(f"layers.{index}.{name}", scheme, fmt, why))
    return report
