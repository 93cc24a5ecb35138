"""Hand-written CPU kernels, built on first use with the C++ compiler that torch.compile needs anyway.

`decode_attention` (decode_attention.cpp): one-query attention over a bfloat16 (or float16) KV cache, for the
compiled CPU decode step. Inductor turns the same computation written in torch ops into loops that reapply RoPE to
the query for every cache slot, divide by the softmax sum for every slot and head, and cover the whole cache pool:
about 110 us a layer for SmolLM2 over a 768-slot pool, a quarter of a decode step. The kernel skips masked slots and
spreads even a batch of one over the threads.

It is registered as `torch.ops.lmstack.decode_attention`, so a torch.compiled graph calls it as an opaque
operator (the C++ wrapper calls it through the dispatcher, without Python). The build is cached (under
TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions, in lmstack/) under a name that hashes the sources, the torch
version and this CPU's feature flags, since it is compiled for the machine it runs on; a process that finds it
loads it in milliseconds. Where no compiler works,
`decode_attention_available()` is False and callers keep their torch-ops path.

`gguf_matmul` (gguf_matmul.cpp): x W^T in float32 with W kept as a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks
(quant/gguf_linear.py says why). PyTorch's int4 CPU kernel is fast with bfloat16 activations only, which change
greedy tokens; this one reads the same bytes as llama.cpp and keeps the float32 model's numbers (decode rounds
activations to int16 per block of 32 for integer dot products, 256 times finer than llama.cpp's int8). Without
it, GGUFLinear dequantizes and calls F.linear.

Both live in one extension, built once.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)
_SOURCES = [Path(__file__).with_name(name) for name in ("decode_attention.cpp", "gguf_matmul.cpp")]
_state: dict[str, bool] = {}  # "built"; and per kernel, whether callers use it (a benchmark may switch one off)
HEAD_DIMS = (16, 32, 64, 128)  # the head dims decode_attention is compiled for


def _cpu_flags() -> str:
    """This CPU's feature flags (what the build's instruction set depends on), "" where /proc is missing."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def _build() -> bool:
    """Load the extension, building it first where no build for these sources, torch and CPU exists."""
    key = hashlib.sha256(b"".join(p.read_bytes() for p in _SOURCES) + torch.__version__.encode()
                         + _cpu_flags().encode()).hexdigest()
    name = f"lmstack_kernels_{key[:12]}"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    built = root / "lmstack" / name / f"{name}.so"
    try:
        if built.exists():  # a few ms, against seconds for the builder's own up-to-date check
            torch.ops.load_library(str(built))
        else:
            from torch._inductor.cpu_vec_isa import pick_vec_isa
            from torch.utils import cpp_extension
            isa = pick_vec_isa()  # the vector ISA inductor compiles its kernels for on this CPU, with its flags
            flags = ["-O3", "-fopenmp", *isa.build_arch_flags().split(), *(f"-D{m}" for m in isa.build_macro())]
            built.parent.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(name=name, sources=[str(p) for p in _SOURCES], is_python_module=False,
                               extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=str(built.parent),
                               verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: the torch-ops path stays
        log.warning("lmstack: the C++ kernels did not build (%s); using torch ops", exc)
        return False

    @torch.library.register_fake("lmstack::decode_attention")
    def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("lmstack::gguf_matmul")
    def _(x: Tensor, blocks: Tensor, qtype: int) -> Tensor:
        return x.new_empty(x.shape[0], blocks.shape[0])
    return True


def _ensure() -> bool:
    if "built" not in _state:
        _state["built"] = _build()
        _state["decode_attention"] = _state["gguf_matmul"] = _state["built"]
    return _state["built"]


def decode_attention_available() -> bool:
    """Whether `torch.ops.lmstack.decode_attention` is built and loaded (built at the first call)."""
    _ensure()
    return _state["decode_attention"]


def decode_attention_ready() -> bool:
    """Whether it was built, without building it: safe to ask inside a traced function."""
    return _state.get("decode_attention", False)


def decode_attention_fits(q: Tensor, k: Tensor, mask: Tensor | None) -> bool:
    """Whether decode_attention computes this attention (from shapes and dtypes only, so a traced function may
    ask): one bfloat16 or float32 query per row on the CPU, a bfloat16, float16 or float32 cache contiguous in its
    head dim, a head dim it is compiled for, a bool mask [B|1, 1, 1, S] or none, and no gradient (it has no
    backward)."""
    return (q.device.type == "cpu" and q.dim() == 4 and q.shape[2] == 1
            and q.dtype in (torch.bfloat16, torch.float32)
            and k.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and q.shape[-1] in HEAD_DIMS and k.stride(-1) == 1
            and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1
                                  and mask.shape[2] == 1))
            and not (q.requires_grad or k.requires_grad))


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    """q [B, H, 1, D] (bfloat16 or float32), k, v [B, Hkv, S, D] (bfloat16, float16 or float32), mask bool
    [B|1, 1, 1, S] or None -> [B, H, 1, D] in q's dtype. Call decode_attention_available() first."""
    return torch.ops.lmstack.decode_attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale)


def gguf_matmul_available() -> bool:
    """Whether `torch.ops.lmstack.gguf_matmul` is built and loaded (built at the first call)."""
    _ensure()
    return _state["gguf_matmul"]


def gguf_matmul_ready() -> bool:
    """Whether it was built, without building it: safe to ask inside a traced function."""
    return _state.get("gguf_matmul", False)


def gguf_matmul(x: Tensor, blocks: Tensor, qtype: int) -> Tensor:
    """x [M, K] contiguous float32, blocks [N, K / 32 * bytes] uint8 (qtype 2 Q4_0, 3 Q4_1, 8 Q8_0) -> [M, N]
    float32. Call gguf_matmul_available() first."""
    return torch.ops.lmstack.gguf_matmul(x, blocks, qtype)
