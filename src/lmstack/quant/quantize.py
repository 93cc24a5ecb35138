"""quantize_(model, scheme): swap every Linear of the blocks, the head and the token embedding for a quantized
one; fuse_projections_(model): one q|k|v and one gate|up matmul per block, for inference.

Both transform a model in place by swapping modules (design note 6): nothing else in the model changes, and
`model.head()` picks the quantized head up wherever logits are computed. A tied head (`models.blocks.TiedHead`)
calls `tok_emb.project(x)`, so one QuantEmbedding serves the lookup (dequantizing only the rows it reads) and
the head (the quantized matmul) from one packed table.

A scheme that does not fit a layer's shape falls back, for that layer only, to the next-best format
(int4 -> int8 -> unquantized) and the returned report (also logged) says which and why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmstack.checkpoints.gguf import release_pages
from lmstack.errors import LmstackError
from lmstack.models.blocks import MLP, Block, TiedHead
from lmstack.quant.gguf_linear import GGUFLinear
from lmstack.quant.int4 import Int4Linear, int4_fits
from lmstack.quant.int8 import Int8Linear
from lmstack.quant.nf4_linear import NF4Linear

log = logging.getLogger(__name__)

SCHEMES = ("int4-g32", "int4-g64", "int4-g128", "int8", "w8a8", "nf4")
QUANTIZED = (Int4Linear, Int8Linear, NF4Linear, GGUFLinear)


@dataclass
class LayerChoice:
    """What quantize_ did to one module."""
    name: str
    scheme: str  # requested
    used: str  # the format it got: a scheme, or "unquantized"
    reason: str = ""  # why it fell back, when used != scheme


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise LmstackError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    return scheme


def choose_format(scheme: str, out_features: int, in_features: int) -> tuple[str, str]:
    """The format a [out, in] weight gets under `scheme`, and why it is not `scheme` ("" when it is). Also takes
    int8-g<g>, the format a GGUF's Q8_0 table is kept in (not a quantize_ scheme)."""
    if scheme.startswith("int8-g"):
        group = int(scheme.removeprefix("int8-g"))
        if in_features % group:
            return "int8", f"in_features {in_features} is not a multiple of {group}"
        return scheme, ""
    check_scheme(scheme)
    if scheme.startswith("int4-g"):
        why = int4_fits(out_features, in_features, int(scheme.removeprefix("int4-g")))
        if why is not None:
            return "int8", why  # int8 takes every shape
    return scheme, ""


def quantized_linear(weight: Tensor, bias: Tensor | None, fmt: str) -> nn.Module:
    """A quantized layer of format `fmt` (a scheme) holding `weight` [N, K] (and `bias` [N])."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    if fmt.startswith("int4-g"):
        return Int4Linear.from_float(linear, int(fmt.removeprefix("int4-g")))
    if fmt in ("int8", "w8a8"):
        return Int8Linear.from_float(linear, mode="weight" if fmt == "int8" else "w8a8")
    if fmt.startswith("int8-g"):  # not a quantize_ scheme: the format a GGUF's Q8_0 table is kept in
        return Int8Linear.from_float(linear, group_size=int(fmt.removeprefix("int8-g")))
    if fmt == "nf4":
        return NF4Linear.from_float(linear)
    raise LmstackError(f"unknown quantized format {fmt!r}")


def format_of(module: nn.Module) -> str:
    """The scheme name of a quantized layer."""
    if isinstance(module, Int4Linear):
        return f"int4-g{module.group_size}"
    if isinstance(module, Int8Linear):
        if module.group_size:
            return f"int8-g{module.group_size}"
        return "int8" if module.mode == "weight" else "w8a8"
    if isinstance(module, NF4Linear):
        return "nf4"
    if isinstance(module, GGUFLinear):  # a GGUF file's blocks kept as they are (not a quantize_ scheme)
        return f"gguf-{module.qtype.lower()}"
    raise LmstackError(f"{type(module).__name__} is not a quantized layer")


class QuantEmbedding(nn.Module):
    """A token embedding stored as a quantized [V, C] table: lookups dequantize only the rows they read, and
    `project(x)` (what a tied head calls) is the quantized matmul x T^T over the same table."""

    def __init__(self, table: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        # Follows model.to(dtype), so lookups come back in the model's compute dtype.
        self.register_buffer("dtype_probe", torch.empty(0, dtype=dtype), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:  # [..] -> [.., C]
        rows = self.table.dequantize(ids.reshape(-1), dtype=self.dtype_probe.dtype)  # [n, C]
        return rows.view(*ids.shape, self.embedding_dim)

    def project(self, x: Tensor) -> Tensor:  # [.., C] -> [.., V]
        return self.table(x)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def quantize_(model: nn.Module, scheme: str, *, embedding_scheme: str | None = None,
              skip: tuple[str, ...] = ()) -> list[LayerChoice]:
    """Quantize `model` in place: every nn.Linear (blocks, head) and the token embedding (tied or not).

    Args:
        model: a decoder (anything with `tok_emb` and `lm_head`) or any module of Linears.
        scheme: one of SCHEMES.
        embedding_scheme: the token embedding's scheme (with a tied head, the head's too); default `scheme`.
            On SmolLM2 an int4 head costs most of int4's perplexity and greedy agreement; int8 keeps it (as
            llama.cpp's Q8_0 token_embd does).
        skip: module names to leave unquantized.

    Returns:
        One LayerChoice per module considered, fallbacks included (they are also logged).
    """
    check_scheme(scheme)
    embedding_scheme = check_scheme(embedding_scheme or scheme)
    where = next((p.device for p in model.parameters()), torch.device("cpu"))
    if where.type != "cpu" and "int4" in scheme + embedding_scheme:
        raise LmstackError(f"int4 runs on torch's CPU int4 kernel only, and this model is on {where.type}; "
                           "on a GPU use int8 or nf4")
    report: list[LayerChoice] = []
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and name not in skip]
    for name, linear in targets:
        fmt, why = choose_format(scheme, *linear.weight.shape)
        parent, attr = _parent(model, name)
        setattr(parent, attr, quantized_linear(linear.weight, linear.bias, fmt))
        report.append(LayerChoice(name, scheme, fmt, why))
    emb = getattr(model, "tok_emb", None)
    if type(emb) is nn.Embedding and "tok_emb" not in skip:
        fmt, why = choose_format(embedding_scheme, *emb.weight.shape)
        model.tok_emb = QuantEmbedding(quantized_linear(emb.weight, None, fmt), emb.weight.dtype)
        tied = isinstance(getattr(model, "lm_head", None), TiedHead)
        report.append(LayerChoice("tok_emb" + (" (and the tied lm_head)" if tied else ""), embedding_scheme, fmt,
                                  why))
    for choice in report:
        if choice.used != choice.scheme:
            log.warning("quantize: %s gets %s instead of %s: %s", choice.name, choice.used, choice.scheme,
                        choice.reason)
    return report


# ------------------------------------------------------------------------------------------ fusing


def _fuse(linears: list[nn.Module], what: str) -> nn.Module:
    if all(type(m) is Int4Linear for m in linears):  # int4 kept packed from a GGUF: the codes as they are
        return Int4Linear.concat(linears)
    if all(type(m) is GGUFLinear for m in linears):  # a GGUF's blocks: rows follow each other
        fused = GGUFLinear.concat(linears)
        for m in linears:  # the parts' memory-mapped file pages, now copied, leave the resident set
            release_pages(m.blocks)
        return fused
    if not all(type(m) is nn.Linear for m in linears):
        kinds = sorted({type(m).__name__ for m in linears})
        raise LmstackError(f"fuse_projections_ fuses plain Linears ({what} are {', '.join(kinds)}): fuse before "
                           "quantize_ or LoRA")
    if len({m.bias is None for m in linears}) > 1:
        raise LmstackError(f"cannot fuse {what}: some have a bias and some do not")
    first = linears[0]
    fused = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None,
                      device="meta")
    fused.weight = nn.Parameter(torch.cat([m.weight.detach() for m in linears]), requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    return fused


def fuse_projections_(model: nn.Module) -> int:
    """Fuse each block's self-attention q, k, v into one `qkv_proj` and a gated MLP's gate, up into one
    `gate_up_proj` (an inference-time transform; checkpoints and LoRA keep them separate). Returns how many
    modules were fused. Plain Linears, or Int4Linears (a GGUF's Q4 weights, kept packed) with one group size.
    Call it before quantize_, so each fused matmul is quantized as one."""
    n = 0
    for block in (m for m in model.modules() if isinstance(m, Block)):
        attn = block.attn  # self-attention only: cross-attention reads k, v from the encoder memory
        if attn.qkv_proj is None:
            attn.qkv_proj = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], "q, k, v")
            attn.q_proj = attn.k_proj = attn.v_proj = None
            n += 1
        mlp = block.mlp
        if isinstance(mlp, MLP) and mlp.gate_proj is not None and mlp.gate_up_proj is None:
            mlp.gate_up_proj = _fuse([mlp.gate_proj, mlp.up_proj], "gate, up")
            mlp.gate_proj = mlp.up_proj = None
            n += 1
    return n


def fusable(model: nn.Module) -> bool:
    """Whether fuse_projections_ would fuse something and can: some block still has separate plain Linears."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    linears = [p for b in blocks for p in (b.attn.q_proj, b.attn.k_proj, b.attn.v_proj) if p is not None]
    linears += [p for b in blocks if isinstance(b.mlp, MLP) for p in (b.mlp.gate_proj, b.mlp.up_proj)
                if p is not None]
    return bool(linears) and (all(type(p) is nn.Linear for p in linears)
                              or (all(type(p) is Int4Linear for p in linears)
                                  and len({(p.in_features, p.group_size) for p in linears}) == 1)
                              or (all(type(p) is GGUFLinear for p in linears)
                                  and len({(p.in_features, p.qtype) for p in linears}) == 1))


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, Block) and m.attn.qkv_proj is not None for m in model.modules())
