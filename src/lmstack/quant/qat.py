"""Quantization-aware training: fake-quant modules with a straight-through estimator, and their conversion to the
real packed layers.

    prepare_qat_(model, "int4-g32")   every nn.Linear -> FakeQuantLinear, the token embedding -> FakeQuantEmbedding
    ... train as usual (the float weights are the parameters; the forward sees their quantized values) ...
    convert_qat_(model, fuse=True)    FakeQuant* -> Int4Linear / Int8Linear / QuantEmbedding (quant/quantize.py),
                                      q|k|v and gate|up fused first, as `lmstack quantize` does

The forward quantizes the float weight with the real layers' own functions (`quantize_int4`, `quantize_int8_rows`)
and computes with the dequantized values; the backward passes the gradient straight through to the float weight
(w_q = Q(w), dL/dw := dL/dw_q). Conversion quantizes the same weight with the same functions, so the packed layer
holds exactly the codes, scales and zeros the last forward used: the converted model's logits equal the fake-quant
model's up to the int4 kernel's bf16 arithmetic.

Schemes: int8 (per output channel, symmetric), int4-gG (groups of G = 32, 64, 128 along the input, asymmetric),
and int3-gG / int2-gG: the same grouped format with only 2^bits codes. There is no 3- or 2-bit kernel, so those
convert to Int4Linear (4 bits of storage, the accuracy of 3 or 2): they show what QAT recovers at a width where
post-training quantization fails, not a smaller file.

A shape the int4 kernel cannot take (see int4_fits) falls back to int8 for that layer, as quantize_ does, and
says so. The modules keep nn.Linear's and nn.Embedding's `weight` / `bias` keys, so checkpoints (and the
trainer's resumable state) load into a prepared model unchanged.

Shapes: N out_features, K in_features, G group size, V vocabulary, C embedding width.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.errors import LmstackError
from lmstack.models.blocks import MLP, Block, TiedHead
from lmstack.quant.int4 import GROUP_SIZES, Int4Linear, int4_fits, quantize_int4
from lmstack.quant.int8 import quantize_int8_rows
from lmstack.quant.quantize import LayerChoice, QuantEmbedding, _parent, fuse_projections_, quantized_linear

log = logging.getLogger(__name__)

QAT_SCHEMES = ("int8",) + tuple(f"int{b}-g{g}" for b in (4, 3, 2) for g in GROUP_SIZES)


@dataclass(frozen=True)
class QatFormat:
    """One layer's fake-quant format: 8 bits per channel, or 2-4 bits in groups of `group_size`."""
    bits: int
    group_size: int | None = None  # None: per output channel (int8)

    @property
    def name(self) -> str:
        return "int8" if self.bits == 8 else f"int{self.bits}-g{self.group_size}"


def parse_qat_scheme(scheme: str) -> QatFormat:
    match = re.fullmatch(r"int([234])-g(\d+)", scheme)
    if scheme == "int8":
        return QatFormat(8)
    if match is None or int(match[2]) not in GROUP_SIZES:
        raise LmstackError(f"unknown QAT scheme {scheme!r}; known: {', '.join(QAT_SCHEMES)}")
    return QatFormat(int(match[1]), int(match[2]))


def layer_format(fmt: QatFormat, out_features: int, in_features: int) -> tuple[QatFormat, str]:
    """The format a [out, in] weight gets under `fmt`, and why it is not `fmt` ("" when it is)."""
    if fmt.group_size is not None:
        why = int4_fits(out_features, in_features, fmt.group_size)
        if why is not None:
            return QatFormat(8), why  # int8 takes every shape
    return fmt, ""


def fake_quantize(weight: Tensor, fmt: QatFormat) -> Tensor:
    """Q(weight): [R, K] -> [R, K] in weight's dtype, the values the packed layer will hold (computed in float32
    from the same codes, scales and zeros), with no gradient."""
    if fmt.bits == 8:
        codes, scales = quantize_int8_rows(weight)  # [R, K] int8, [R]
        w = codes.float() * scales[:, None]
    else:
        R, K = weight.shape
        codes, scales, zeros = quantize_int4(weight, fmt.group_size, fmt.bits)  # [R, K], [R, K/G] x 2
        w = (codes.view(R, -1, fmt.group_size).float() - 8) * scales[..., None] + zeros[..., None]  # [R, K/G, G]
        w = w.reshape(R, K)
    return w.to(weight.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward Q(w); backward the identity (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, weight: Tensor, fmt: QatFormat) -> Tensor:  # type: ignore[override]
        return fake_quantize(weight, fmt)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def ste_quantize(weight: Tensor, fmt: QatFormat) -> Tensor:
    return _StraightThrough.apply(weight, fmt)


class FakeQuantLinear(nn.Module):
    """A Linear whose forward uses its weight's quantized values; the float weight is what trains."""

    def __init__(self, linear: nn.Linear, fmt: QatFormat) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fmt = linear.in_features, linear.out_features, fmt
        self.weight = linear.weight  # [N, K], the same Parameter (the optimizer sees no new tensor)
        self.bias = linear.bias  # [N] or None; biases stay in float, as in the packed layers

    def forward(self, x: Tensor) -> Tensor:  # [.., K] -> [.., N]
        return F.linear(x, ste_quantize(self.weight, self.fmt), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qat={self.fmt.name}"


class FakeQuantEmbedding(nn.Module):
    """A token embedding whose rows (and, for a tied head, whose projection) use the table's quantized values.
    Rows quantize independently (groups run along C), so a lookup quantizes only the rows it reads."""

    def __init__(self, embedding: nn.Embedding, fmt: QatFormat) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.fmt = embedding.num_embeddings, embedding.embedding_dim, fmt
        self.weight = embedding.weight  # [V, C]

    def forward(self, ids: Tensor) -> Tensor:  # [..] -> [.., C]
        rows = F.embedding(ids.reshape(-1), self.weight)  # [n, C]
        return ste_quantize(rows, self.fmt).view(*ids.shape, self.embedding_dim)

    def project(self, x: Tensor) -> Tensor:  # [.., C] -> [.., V], what a tied head calls
        return F.linear(x, ste_quantize(self.weight, self.fmt))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qat={self.fmt.name}"


def prepare_qat_(model: nn.Module, scheme: str, *, embedding_scheme: str | None = None,
                 skip: tuple[str, ...] = ()) -> list[LayerChoice]:
    """Swap every nn.Linear (blocks, head) and the token embedding (tied or not) for fake-quant modules, in place.

    Args:
        model: a decoder (anything with `tok_emb` and `lm_head`) or any module of Linears.
        scheme: one of QAT_SCHEMES.
        embedding_scheme: the token embedding's (and tied head's) scheme; default `scheme`. "none" leaves the
            embedding in float.
        skip: module names to leave in float.

    Returns:
        One LayerChoice per module (`used` is the format it trains with; fallbacks are also logged).
    """
    fmt = parse_qat_scheme(scheme)
    emb_fmt = None if embedding_scheme == "none" else parse_qat_scheme(embedding_scheme or scheme)
    if any(isinstance(m, (FakeQuantLinear, FakeQuantEmbedding)) for m in model.modules()):
        raise LmstackError("prepare_qat_: the model already has fake-quant modules")
    report: list[LayerChoice] = []
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and name not in skip]
    for name, linear in targets:
        used, why = layer_format(fmt, linear.out_features, linear.in_features)
        parent, attr = _parent(model, name)
        setattr(parent, attr, FakeQuantLinear(linear, used))
        report.append(LayerChoice(name, scheme, used.name, why))
    emb = getattr(model, "tok_emb", None)
    if emb_fmt is not None and type(emb) is nn.Embedding and "tok_emb" not in skip:
        used, why = layer_format(emb_fmt, emb.num_embeddings, emb.embedding_dim)
        model.tok_emb = FakeQuantEmbedding(emb, used)
        tied = isinstance(getattr(model, "lm_head", None), TiedHead)
        report.append(LayerChoice("tok_emb" + (" (and the tied lm_head)" if tied else ""), emb_fmt.name,
                                  used.name, why))
    for choice in report:
        if choice.used != choice.scheme:
            log.warning("QAT: %s trains as %s instead of %s: %s", choice.name, choice.used, choice.scheme,
                        choice.reason)
    return report


def _packed(weight: Tensor, bias: Tensor | None, fmt: QatFormat) -> nn.Module:
    """The real layer holding Q(weight): the same functions on the same values as fake_quantize. The int4 kernel
    is CPU-only, so the packed layer is built on the CPU."""
    weight = weight.detach().cpu()
    bias = bias.detach().cpu() if bias is not None else None
    if fmt.bits in (8, 4):
        return quantized_linear(weight, bias, fmt.name)  # Int8Linear.from_float / Int4Linear.from_float
    codes, scales, zeros = quantize_int4(weight, fmt.group_size, fmt.bits)  # codes 0..2^bits - 1 of int4
    return Int4Linear.from_codes(codes, scales, zeros, fmt.group_size, bias)


def _fuse_fake_(model: nn.Module) -> bool:
    """fuse_projections_ over fake-quant q/k/v and gate/up: exact, because both formats quantize each output row
    on its own (int8 per row, int4 groups along the input), so the fused weight gets the rows' own codes. Only
    when each group shares one format; returns whether it fused."""
    groups: list[tuple[nn.Module, str, list[nn.Module]]] = []  # (owner, fused attribute, members)
    for block in (m for m in model.modules() if isinstance(m, Block)):
        if block.attn.qkv_proj is None:
            groups.append((block.attn, "qkv_proj", [block.attn.q_proj, block.attn.k_proj, block.attn.v_proj]))
        if isinstance(block.mlp, MLP) and block.mlp.gate_proj is not None and block.mlp.gate_up_proj is None:
            groups.append((block.mlp, "gate_up_proj", [block.mlp.gate_proj, block.mlp.up_proj]))
    fmts = [{m.fmt if isinstance(m, FakeQuantLinear) else None for m in members} for _, _, members in groups]
    if not groups or any(len(f) != 1 or None in f for f in fmts):
        log.warning("QAT: not fusing q|k|v and gate|up (they are not all fake-quant modules of one format each)")
        return False
    members = {id(m) for _, _, group in groups for m in group}
    for name, module in list(model.named_modules()):
        if id(module) in members:  # back to a plain Linear on the same Parameters, which fuse_projections_ takes
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight, plain.bias = module.weight, module.bias
            parent, attr = _parent(model, name)
            setattr(parent, attr, plain)
    fuse_projections_(model)
    for (owner, attr, _), fmt in zip(groups, fmts):
        setattr(owner, attr, FakeQuantLinear(getattr(owner, attr), next(iter(fmt))))
    return True


@torch.no_grad()
def convert_qat_(model: nn.Module, fuse: bool = False) -> int:
    """Replace each fake-quant module by the packed layer it simulated (Int4Linear, Int8Linear, QuantEmbedding);
    returns how many were converted. Float parts of the model stay where they are; packed layers are on the CPU.

    fuse: first fuse each block's q|k|v and gate|up (as `lmstack quantize` does for inference speed); the packed
    values are the same (see _fuse_fake_)."""
    if fuse:
        _fuse_fake_(model)
    n = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            new: nn.Module = _packed(module.weight, module.bias, module.fmt)
        elif isinstance(module, FakeQuantEmbedding):
            new = QuantEmbedding(_packed(module.weight, None, module.fmt), module.weight.dtype)
        else:
            continue
        parent, attr = _parent(model, name)
        setattr(parent, attr, new)
        n += 1
    if n == 0:
        raise LmstackError("convert_qat_: the model has no fake-quant modules (call prepare_qat_ first)")
    return n


def qat_scheme_of(model: nn.Module) -> dict[str, str]:
    """{module name: format} of a prepared model's fake-quant modules."""
    return {name: m.fmt.name for name, m in model.named_modules()
            if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding))}
