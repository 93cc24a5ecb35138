"""The one loader, `load_model(name_or_path, adapter=None, dtype="auto")`: generate, chat, eval, rag, serve, merge.

    name or path --registry.resolve--> file/folder --detect_format--> native | gguf | hf importer
        --> (config, state dict in lmstack keys, tokenizer, metadata) --instantiate--> model in eval mode
        [--adapter DIR: the PEFT method re-applied, unmerged, with its weights]

`dtype="auto"` is bfloat16 where it runs natively (a CUDA device, or a CPU with AVX512-BF16 or AMX) and float32
elsewhere; `LoadedModel.dtype` says which was chosen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lmstack.checkpoints.native import load_native_parts
from lmstack.checkpoints.registry import detect_format, resolve
from lmstack.config import ModelConfig
from lmstack.errors import LmstackError
from lmstack.models import build_model
from lmstack.models.blocks import Block
from lmstack.tokenizer import Tokenizer

CPUINFO = Path("/proc/cpuinfo")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # either one: bf16 matmuls run natively


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer | None
    config: ModelConfig
    source: str  # the path it came from (+ the adapter, when one is applied)
    metadata: dict[str, Any] = field(default_factory=dict)  # e.g. quant types of the source file
    dtype: str = "float32"  # the compute dtype ("auto" resolved), for the verbs to report
    weights: str = "float32"  # how the weights are stored: the dtype, or e.g. "int4-g32 + bfloat16" when packed


# ------------------------------------------------------------------------------------------ dtype


def cpu_has_native_bf16(cpuinfo: str | Path = CPUINFO) -> bool:
    """True when the CPU flags name AVX512-BF16 or AMX-BF16. `cpuinfo` is /proc/cpuinfo's text or a path to it;
    a missing file (not Linux) counts as no."""
    if isinstance(cpuinfo, Path):
        try:
            cpuinfo = cpuinfo.read_text(errors="replace")
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":  # every core lists the same flags: the first line decides
            return any(flag in value.split() for flag in BF16_CPU_FLAGS)
    return False


def auto_dtype(device: str | torch.device = "cpu", cpuinfo: str | Path = CPUINFO) -> torch.dtype:
    """bfloat16 on CUDA or on a CPU with native bf16, float32 otherwise."""
    kind = torch.device(device).type
    if kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16(cpuinfo)):
        return torch.bfloat16
    return torch.float32


def resolve_device(name: str) -> str:
    """A device name ("auto", "cpu", "cuda", "cuda:N") as torch names it: auto is the GPU when torch sees one."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        raise LmstackError(f"unknown device {name!r}; use auto, cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise LmstackError(f"device {name!r}: torch sees no CUDA GPU here (torch {torch.__version__}); use cpu")
    if kind not in ("cpu", "cuda"):
        raise LmstackError(f"unknown device {name!r}; use auto, cpu or cuda")
    return name


def parse_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype name ("auto", "float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16") as a torch dtype."""
    if name == "auto":
        return auto_dtype(device)
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise LmstackError(f"unknown dtype {name!r}; use auto, float32 or bfloat16")
    return table[name]


# ------------------------------------------------------------------------------------------ loading


QUANT_MODES = ("dequantize", "keep", "keep-int8", "keep-float", "keep-q8", "blocks")
# the Q8_0 table's target
EMBEDDING_SCHEMES = {"keep": "int4-g32", "keep-int8": "int8", "keep-float": "none", "keep-q8": "int8-g32"}


def load_model(name_or_path: str | None, adapter: str | Path | None = None, dtype: torch.dtype | str = "auto",
               device: str = "cpu", quant: str = "auto", inference: bool = False,
               compile: bool = False) -> LoadedModel:
    """Load any supported checkpoint into an lmstack model in eval mode.

    `adapter`: a PEFT output folder (lmstack's adapter.json or Hugging Face peft's adapter_config.json), applied
    unmerged. With an adapter and no `name_or_path`, the base model is the one the adapter names.
    `quant` (GGUF files): "dequantize" (every tensor to `dtype`), or keep the Q4_0 / Q4_1 linears packed for the
    int4 kernel with the Q8_0 token embedding and tied head as "keep-float" (bf16), "keep-q8" (the file's own
    Q8_0 codes and scales, int8-g32: half keep-float's bytes, the fastest head when compiled), "keep-int8"
    (per-row int8) or "keep" (int4-g32: the fastest eager head, +6% perplexity on SmolLM2); or "blocks": every
    Q4_0 / Q4_1 / Q8_0 linear and token embedding keeps the file's own blocks and computes in float32
    (quant.gguf_linear: the float32 model's outputs at llama.cpp's bytes; decode rounds activations to int16 per
    block of 32), the model float32.
    "auto", when `dtype` is "auto" and resolves to bfloat16 on the CPU (the int4 kernel runs bf16 activations),
    is keep-q8 with `compile` and keep-float without (eager, the oneDNN-packed bf16 head is faster than the
    grouped int8 one); when it resolves to float32 (a CPU without native bf16), an `inference` load is "blocks"
    where the kernel builds; otherwise dequantize, so an explicit --dtype float32 still gives the float model.
    A native quantized checkpoint always loads packed.
    `inference`: the model will only run forward (generate, chat, serve, eval, rag): keep bf16 CPU linears in
    oneDNN's prepacked layout (lmstack.quant.packed), and fuse each block's q|k|v and gate|up where they stay
    unpacked (int4, float32). The outputs are the same; training such a model is not supported.
    `compile` (with `inference`): the decode step will be torch.compiled, which cannot trace oneDNN-packed
    weights, so nothing in the blocks is packed (every block's q|k|v and gate|up are fused instead); a bf16
    head is packed and runs after the compiled graph.
    """
    if quant not in QUANT_MODES and quant != "auto":
        raise LmstackError(f"unknown quant mode {quant!r}; use auto or one of {', '.join(QUANT_MODES)}")
    asked_auto = dtype == "auto"
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype, device)
    if quant == "auto":
        on_cpu = torch.device(device).type == "cpu"
        if asked_auto and on_cpu and dtype == torch.bfloat16:
            quant = "keep-q8" if compile else "keep-float"
        elif asked_auto and on_cpu and inference and adapter is None:
            quant = "auto-blocks"  # a GGUF's blocks where lmstack's float32 kernel builds (below)
        else:
            quant = "dequantize"
    if adapter is not None:
        return _for_inference(_load_with_adapter(name_or_path, str(adapter), dtype, device), inference,
                              compile)
    if not name_or_path:
        raise LmstackError("no model given: pass a registry name or a checkpoint path")
    path = resolve(name_or_path)
    fmt = detect_format(path)
    if fmt == "native":
        config, state, tokenizer, metadata = load_native_parts(path)
    elif fmt == "gguf":
        from lmstack.checkpoints.gguf import load_gguf
        if quant == "auto-blocks":
            from lmstack import kernels
            quant = "blocks" if kernels.gguf_matmul_available() else "dequantize"
        if quant == "blocks":
            dtype = torch.float32  # what GGUFLinear computes in
        config, state, tokenizer, metadata = load_gguf(path, keep=quant not in ("dequantize", "blocks"),
                                                       embedding_scheme=EMBEDDING_SCHEMES.get(quant, "none"),
                                                       dtype=dtype, blocks=quant == "blocks")
    else:
        from lmstack.checkpoints.hf import load_hf
        config, state, tokenizer, metadata = load_hf(path)
    model = instantiate(config, state, dtype=dtype, device=device, source=str(path),
                        quantization=metadata.get("quantization"))
    loaded = LoadedModel(model=model, tokenizer=tokenizer, config=config, source=str(path), metadata=metadata,
                         dtype=str(dtype).removeprefix("torch."), weights=_weights(metadata, dtype))
    return _for_inference(loaded, inference, compile)


def _weights(metadata: dict[str, Any], dtype: torch.dtype) -> str:
    quantization = metadata.get("quantization")
    name = str(dtype).removeprefix("torch.")
    if not quantization:
        return name
    formats = sorted({spec["format"] for spec in quantization.get("modules", {}).values()})
    return " + ".join([*formats, name])


def _for_inference(loaded: LoadedModel, inference: bool, compile: bool = False) -> LoadedModel:
    if inference:
        from lmstack.quant.packed import pack_linears_, packs
        from lmstack.quant.quantize import fusable, fuse_projections_
        model = loaded.model
        # Packed projections decode as fast fused or not (measured on SmolLM2), and fusing them would copy every
        # q/k/v/gate/up weight once more at load: fuse only what stays unpacked (int4 kept from a GGUF, float32).
        first_q = next((m.attn.q_proj for m in model.modules() if isinstance(m, Block)), None)
        if fusable(model) and (compile or not packs(first_q)):
            fuse_projections_(model)
        pack_linears_(model, blocks=not compile)
    return loaded


def _load_with_adapter(model: str | None, adapter: str, dtype: torch.dtype, device: str) -> LoadedModel:
    from lmstack.peft.methods import load_adapter, read_adapter_spec

    _, info = read_adapter_spec(adapter)
    base = model or info.get("base_model")
    if not base:
        raise LmstackError(f"{adapter}: the adapter does not name its base model; pass --model")
    loaded = load_model(str(base), dtype=dtype, device=device)
    loaded.model = load_adapter(loaded.model, adapter, loaded.tokenizer)
    loaded.source = f"{loaded.source} + adapter {adapter}"
    return loaded


def instantiate(config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, device: str = "cpu",
                source: str = "checkpoint", quantization: dict[str, Any] | None = None) -> nn.Module:
    """Build the model on the meta device, then adopt the checkpoint's tensors (no double allocation).

    `quantization` (a quantized checkpoint's metadata, quant.state's format): the quantized modules are rebuilt
    as it says and adopt the packed tensors as they are (no dequantize-requantize round trip); float tensors
    (norms, biases, unquantized layers) take `dtype`.
    """
    with torch.device("meta"), skip_init():
        model = build_model(config)
    if quantization is not None:
        return _instantiate_quantized(model, state, quantization, dtype, device, source)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise LmstackError(f"{source}: checkpoint does not match the {config.family} config: {'; '.join(parts)}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise LmstackError(f"{source}: {key} has shape {tuple(tensor.shape)}, the config expects "
                               f"{tuple(expected[key].shape)}")
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    # Non-persistent buffers (RoPE tables) were made on meta: every model class rebuilds its own.
    with torch.device(device):
        model.reset_buffers()
    return model.eval()


def _instantiate_quantized(model: nn.Module, state: dict[str, torch.Tensor], quantization: dict[str, Any],
                           dtype: torch.dtype, device: str, source: str) -> nn.Module:
    from lmstack.quant.state import rebuild_quantized_
    if torch.device(device).type != "cpu":
        raise LmstackError(f"{source}: quantized checkpoints run on the CPU kernels only (device {device!r})")
    try:
        rebuild_quantized_(model, state, quantization)
    except LmstackError as e:
        raise LmstackError(f"{source}: {e}") from None
    model.to(dtype)  # float tensors only; quantized layers keep their codes and scale dtypes
    with torch.device(device):
        model.reset_buffers()
    return model.eval()


# The in-place fills that random initialisation ends in, and nn.init's public functions (which reach the mode
# first, through handle_torch_function, before any fill runs).
_INIT_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    [getattr(nn.init, name) for name in ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_",
                                        "xavier_uniform_", "xavier_normal_", "trunc_normal_", "zeros_", "ones_",
                                        "constant_", "orthogonal_", "eye_", "dirac_", "sparse_")]
    + [getattr(torch.Tensor, name) for name in ("normal_", "uniform_", "random_", "zero_", "fill_",
                                               "exponential_", "bernoulli_", "cauchy_", "log_normal_",
                                               "geometric_")])


class _SkipInit(TorchFunctionMode):
    """Returns the tensor unchanged for every random or constant initialisation call."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        if func in _INIT_FUNCTIONS:
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Skip weight initialisation while a skeleton is built: the checkpoint overwrites every weight anyway, and
    normal_ on the meta device goes through torch._refs, which imports torch._dynamo (seconds).

    A torch function mode, not a patch of torch.nn.init: modes live on the calling thread's stack, so a server's
    other threads keep initialising normally while one of them loads a model."""
    with _SkipInit():
        yield
