"""Hand-written CPU kernels, built on first use with the C++ compiler that torch.compile needs anyway.

`decode_attention` (decode_attention.cpp): one-query attention over a bfloat16 KV cache, for the compiled CPU
decode step. Inductor turns the same computation written in torch ops into loops that reapply RoPE to the query
for every cache slot, divide by the softmax sum for every slot and head, and cover the whole cache pool: about
110 us a layer for SmolLM2 over a 768-slot pool, a quarter of a decode step. The kernel skips masked slots and
spreads even a batch of one over the threads.

It is registered as `torch.ops.lmstack.decode_attention`, so a torch.compiled graph calls it as an opaque
operator (the C++ wrapper calls it through the dispatcher, without Python). The build is cached by torch's
extension builder (in TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions) under a name that hashes the source
and this CPU's instruction set, since it is compiled for the machine it runs on. Where no compiler works,
`decode_attention_available()` is False and callers keep their torch-ops path.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("decode_attention.cpp")
_state: dict[str, bool] = {}
HEAD_DIMS = (16, 32, 64, 128)  # the head dims decode_attention is compiled for


def _build() -> bool:
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch.utils import cpp_extension
    isa = pick_vec_isa()  # the vector ISA inductor compiles its kernels for on this CPU, with its flags
    flags = ["-O3", "-fopenmp", *isa.build_arch_flags().split(), *(f"-D{m}" for m in isa.build_macro())]
    key = hashlib.sha256(_SOURCE.read_bytes() + torch.__version__.encode() + " ".join(flags).encode()).hexdigest()
    try:
        cpp_extension.load(name=f"lmstack_kernels_{key[:12]}", sources=[str(_SOURCE)], is_python_module=False,
                           extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: the torch-ops path stays
        log.warning("lmstack: the decode attention kernel did not build (%s); using torch ops", exc)
        return False

    @torch.library.register_fake("lmstack::decode_attention")
    def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    return True


def decode_attention_available() -> bool:
    """Whether `torch.ops.lmstack.decode_attention` is built and loaded (built at the first call)."""
    if "decode_attention" not in _state:
        _state["decode_attention"] = _build()
    return _state["decode_attention"]


def decode_attention_ready() -> bool:
    """Whether it was built, without building it: safe to ask inside a traced function."""
    return _state.get("decode_attention", False)


def decode_attention_fits(q: Tensor, k: Tensor, mask: Tensor | None) -> bool:
    """Whether decode_attention computes this attention (from shapes and dtypes only, so a traced function may
    ask): one bfloat16 query per row on the CPU, a bfloat16 or float32 cache contiguous in its head dim, a head
    dim it is compiled for, a bool mask [B|1, 1, 1, S] or none, and no gradient (it has no backward)."""
    return (q.device.type == "cpu" and q.dim() == 4 and q.shape[2] == 1 and q.dtype == torch.bfloat16
            and k.dtype in (torch.bfloat16, torch.float32) and q.shape[-1] in HEAD_DIMS and k.stride(-1) == 1
            and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1
                                  and mask.shape[2] == 1))
            and not (q.requires_grad or k.requires_grad))


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    """q [B, H, 1, D], k, v [B, Hkv, S, D] (bfloat16 or float32), mask bool [B|1, 1, 1, S] or None
    -> [B, H, 1, D] in q's dtype. Call decode_attention_available() first."""
    return torch.ops.lmstack.decode_attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale)
