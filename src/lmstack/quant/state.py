"""How a quantized model is saved and rebuilt.

`quantized_state_dict(model)` returns the model's state dict (quantized layers write their portable packed
tensors: int4 codes as blocked nibbles with bf16 scales and zeros, int8 codes with float32 scales, NF4 codes
with their double-quantized constants) and a metadata dict naming each quantized module's format. The scheme
lives in that metadata, never in a file name (design note 6).

`rebuild_quantized_(model, state, metadata)` takes an unquantized skeleton of the same config (built on the meta
device or not), swaps in empty quantized modules as the metadata says, checks every tensor's dtype and shape
against them (one line per problem, naming the key), and adopts the packed tensors: no dequantize-requantize
round trip (int4 codes are adopted as they are where this CPU's kernel reads the blocked layout, else
repacked, a permutation).

The checkpoint format is not this module's business: `checkpoints.save_native` writes `state` to
model.safetensors and the metadata into lmstack.json's metadata["quantization"]; `checkpoints.load_model` calls
`rebuild_quantized_` with them (the GGUF importer builds the same state and metadata from Q4 blocks).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor, nn

from lmstack.errors import LmstackError
from lmstack.models.blocks import TiedHead
from lmstack.quant.gguf_linear import GGUFLinear
from lmstack.quant.int4 import Int4Linear
from lmstack.quant.int8 import Int8Linear
from lmstack.quant.nf4_linear import NF4Linear
from lmstack.quant.quantize import QUANTIZED, QuantEmbedding, format_of, fuse_projections_, is_fused

FORMAT = "lmstack.quant/2"  # 2: int4 qweight in the blocked layout (quant/int4.py)


def _spec(module: nn.Module) -> dict[str, Any]:
    return {"format": format_of(module), "in_features": module.in_features, "out_features": module.out_features,
            "bias": getattr(module, "bias", None) is not None}


def quantization_metadata(model: nn.Module) -> dict[str, Any]:
    """{"format", "fused", "modules": {name: {"format", "in_features", "out_features", "bias"[, "embedding"]}}}."""
    modules: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantEmbedding):
            modules[name] = {**_spec(module.table), "embedding": True, "dtype": str(module.dtype_probe.dtype)}
        elif isinstance(module, QUANTIZED) and not name.endswith(".table"):
            modules[name] = _spec(module)
    return {"format": FORMAT, "fused": is_fused(model), "modules": modules}


def quantized_state_dict(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(packed tensors and the rest of the state, metadata). Tensors are contiguous, ready for safetensors."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return state, quantization_metadata(model)


def _empty(spec: dict[str, Any]) -> nn.Module:
    fmt, K, N, bias = spec["format"], spec["in_features"], spec["out_features"], spec["bias"]
    if fmt.startswith("int4-g"):
        return Int4Linear(K, N, int(fmt.removeprefix("int4-g")), bias=bias)
    if fmt in ("int8", "w8a8"):
        return Int8Linear(K, N, bias=bias, mode="weight" if fmt == "int8" else "w8a8")
    if fmt.startswith("int8-g"):
        return Int8Linear(K, N, bias=bias, group_size=int(fmt.removeprefix("int8-g")))
    if fmt == "nf4":
        return NF4Linear(K, N, bias=bias)
    if fmt.startswith("gguf-") and fmt.removeprefix("gguf-").upper() in ("Q4_0", "Q4_1", "Q8_0"):
        return GGUFLinear(K, N, fmt.removeprefix("gguf-").upper(), bias=bias)
    raise LmstackError(f"quantization metadata names an unknown format {fmt!r}")


def parse_metadata(metadata: dict[str, Any] | str) -> dict[str, Any]:
    meta = json.loads(metadata) if isinstance(metadata, str) else metadata
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("modules"), dict):
        raise LmstackError(f"quantization metadata is not {FORMAT} (got {str(meta)[:80]!r})")
    return meta


def rebuild_quantized_(model: nn.Module, state: dict[str, Tensor], metadata: dict[str, Any] | str) -> nn.Module:
    """Make the unquantized skeleton `model` the quantized model that `state` and `metadata` describe."""
    meta = parse_metadata(metadata)
    if meta.get("fused"):
        fuse_projections_(model)
    for name, spec in meta["modules"].items():
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, attr)
        except AttributeError:
            raise LmstackError(f"quantization metadata names module {name!r}, which this model does not have") from None
        shape = (spec["out_features"], spec["in_features"])
        have = (old.num_embeddings, old.embedding_dim) if spec.get("embedding") else tuple(old.weight.shape)
        if tuple(have) != shape:
            raise LmstackError(f"{name}: the checkpoint's quantized module is {list(shape)}, the model's "
                               f"{list(have)}")
        with torch.device("meta"):  # placeholders: load_state_dict(assign=True) adopts the checkpoint's tensors
            new = _empty(spec)
        if spec.get("embedding"):  # its dtype probe is not in the state: made on the CPU
            new = QuantEmbedding(new, getattr(torch, spec["dtype"].removeprefix("torch.")))
        setattr(parent, attr, new)
    _check_tensors(model, state)
    model.load_state_dict(state, strict=True, assign=True)  # adopt the tensors (mmapped ones stay mmapped)
    if isinstance(getattr(model, "lm_head", None), TiedHead) and not isinstance(model.tok_emb, (nn.Embedding,
                                                                                            QuantEmbedding)):
        raise LmstackError("the tied head's embedding was not rebuilt")
    return model


def _check_tensors(model: nn.Module, state: dict[str, Tensor]) -> None:
    """One line for the first missing, unexpected, mistyped or misshapen tensor."""
    expected = _expected_tensors(model)
    for key, want in expected.items():
        if key not in state:
            raise LmstackError(f"quantized checkpoint is missing tensor {key!r}")
        got = state[key]
        if want.dtype != got.dtype and not (want.is_floating_point() and got.is_floating_point()
                                            and key.rpartition(".")[2] in ("weight", "bias")):
            raise LmstackError(f"tensor {key!r} is {got.dtype}, expected {want.dtype} (corrupt or mismatched "
                               "packed tensor)")
        if tuple(got.shape) != tuple(want.shape):
            raise LmstackError(f"tensor {key!r} has shape {list(got.shape)}, expected {list(want.shape)} "
                               "(corrupt or mismatched packed tensor)")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise LmstackError(f"quantized checkpoint has unexpected tensor {extra[0]!r}")


def _expected_tensors(model: nn.Module) -> dict[str, Tensor]:
    """What model.state_dict() would hold, by dtype and shape, without packing any int4 weight to get it."""
    expected: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        for key, param in module.named_parameters(prefix=name, recurse=False):
            expected[key] = param
        for key, buffer in module.named_buffers(prefix=name, recurse=False):
            if key.rpartition(".")[2] not in module._non_persistent_buffers_set:
                expected[key] = buffer
        if isinstance(module, Int4Linear):
            expected[prefix + "qweight"] = torch.empty(module.out_features, module.in_features // 2,
                                                       dtype=torch.uint8, device="meta")
    return expected
