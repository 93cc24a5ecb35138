"""The one prefill step and the one decode step, over a pool of KV-cache rows with per-row positions.

After gpt-fast's `prefill` / `decode_one_token`. The pool is the model's static cache [rows, Hkv, S, D] per layer
(`setup_cache`). Every row holds one sequence at its own length, so the synchronous `Generator` (a batch of
prompts, or prompts x beams) and the serving scheduler (continuous batching: rows come and go) drive the same
two steps:

- `prefill(start, prompts)`: writes k right-padded prompts into rows start..start+k at slots 0..T-1, as causal
  attention over the written slots only (SDPA's flash kernel; pads come after each prompt, so no real token
  sees one), and runs the head on each prompt's last token only -> logits [k, V].
- `decode(tokens, positions)`: one token for each of the first n rows, row i written at its own slot
  positions[i] and attending to its slots <= positions[i] (the one-query attention path), over a view of the
  first L slots (L = the longest row, bucketed, so a compiled step sees few shapes and a short batch pays for
  what it uses) -> logits [n, V].

No process-wide switch is flipped here. oneDNN's bf16 matmul is 2-3x slower than ATen's own kernel for a
one-row input, and the earlier fix turned `torch.backends.mkldnn.enabled` off around every one-row step - a
global flag (not thread-local), so the server's scheduler thread changed the kernels of request threads
running the embedding encoder. No per-call route around oneDNN exists in torch 2.13 on CPU: `F.linear` on a
1-D input, `torch.mv` / `addmv`, `torch.matmul(W, x)` and transposed layouts all dispatch to oneDNN while the
flag is on (torch.profiler: `aten::mm` / `aten::addmv_`, same timings), so one-row steps take oneDNN's kernel.

It uses only the model's protocol (`lmstack.models.CausalLM`: forward, `head`, `setup_cache`, `cache_shape`,
`use_cache_rows`, `copy_cache_row`, `reorder_cache`), so LoRA, quantized or prompt-tuned models run unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmstack import kernels

SLOT_BUCKET = 64  # decode attends over a multiple of this many cache slots
CACHE_BUCKET = 256  # cache lengths are rounded up to this, so a compiled step sees few distinct shapes


def cache_len(needed: int, limit: int, bucket: int = CACHE_BUCKET) -> int:
    """`needed` slots rounded up to a multiple of `bucket`, at most `limit`."""
    return min(limit, -(-needed // bucket) * bucket)


def pad_id(model: nn.Module, tokenizer: Any) -> int:
    """The id prompts are padded with: the tokenizer's pad, the model's pad or EOS, else 0 (pads are never
    attended to, so any id will do)."""
    cfg = model.config
    for pad in (getattr(tokenizer, "pad_token_id", None), getattr(cfg, "pad_token_id", None),
                getattr(cfg, "eos_token_id", None)):
        if pad is not None:
            return pad
    return 0


def decode_one_token(model: nn.Module, tokens: Tensor, input_pos: Tensor) -> Tensor:
    """One cached step: tokens [n, 1] at per-row cache slots input_pos [n, 1] -> logits [n, V] (float32)."""
    return model(tokens, input_pos=input_pos)[:, -1].float()


def decode_hidden(model: nn.Module, tokens: Tensor, input_pos: Tensor) -> Tensor:
    """decode_one_token up to the head: -> the final hidden states [n, C]."""
    return model(tokens, input_pos=input_pos, return_hidden=True)[:, -1]


def _compile(fn: Any, device: torch.device) -> Any:
    # CUDA graphs ("reduce-overhead") need CUDA. On the CPU inductor's C++ wrapper calls the step's ~300 kernels
    # without Python in between: SmolLM2 int4 decoded 10% faster (66.3 against 60.4 tok/s, medians of 8
    # alternating runs) for a longer first compile (about 2 minutes cold, then cached).
    if device.type == "cuda":
        return torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    return torch.compile(fn, fullgraph=True, options={"cpp_wrapper": True})


def head_logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """The head over final hidden states [n, C] -> logits [n, V] (float32)."""
    return model.head(hidden).float()


def decode_with_hidden(model: nn.Module, tokens: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
    """decode_one_token that also returns the final hidden states [n, C]. Traced, a returned tensor is a buffer
    the head's loop reads; otherwise inductor inlines the final norm into that loop and recomputes it for every
    row of the table (SmolLM2's Q8_0 head: 4.2 against 2.1 ms)."""
    hidden = decode_hidden(model, tokens, input_pos)
    return head_logits(model, hidden), hidden


def compiled_decode(model: nn.Module) -> tuple[Any, Any]:
    """(the decode step, the head), torch.compiled; prefill calls the head. On the CPU:
    - a oneDNN-packed head (`quant.packed`: load_model(compile=True) packs a bf16 head and nothing else) cannot be
      traced, and runs eagerly after the compiled blocks; faster than inductor's aten.mm of a plain bf16 one
      (SmolLM2's 49152x576 head, one row: 3 ms packed, 6 ms traced);
    - any other (a grouped int8 Q8_0 table) is traced with the blocks, in one graph (one compiled call a token:
      10.4 against 11.2 ms for blocks and head as two, 12 alternating rounds), and compiled on its own for
      prefill, where it spares the eager head's dequantized chunks (70 MB of peak memory)."""
    from lmstack.quant.packed import PackedLinear
    if model.device.type != "cpu":
        return _compile(decode_one_token, model.device), head_logits
    kernels.decode_attention_available()  # built (or found in the build cache) before tracing, which asks for it
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        body = _compile(decode_hidden, model.device)

        def step(model: nn.Module, tokens: Tensor, input_pos: Tensor) -> Tensor:
            return head_logits(model, body(model, tokens, input_pos))  # [n, V]
        return step, head_logits
    fused = _compile(decode_with_hidden, model.device)

    def fused_step(model: nn.Module, tokens: Tensor, input_pos: Tensor) -> Tensor:
        return fused(model, tokens, input_pos)[0]  # [n, V]
    return fused_step, _compile(head_logits, model.device)


def compiled_cache_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a compiled decode step keeps its KV cache in: the model's, which the CPU step reads converting as
    it goes (kernels.decode_attention, models.attention.one_query_attention), except float16 for a quantized
    float32 model on the CPU (a GGUF's blocks), llama.cpp's default cache type. The cache is the step's largest
    read after the weights: half its bytes, and half its memory (SmolLM2, 768 slots: 18 MB less). float16 rather
    than bfloat16: on SmolLM2 its 11 significant bits kept 29 of 32 greedy chat answers equal to the float32
    model's, bf16's 8 kept 27 (docs/benchmarks.md). A float32 model that is not quantized keeps a float32 cache,
    so that it stays the exact reference."""
    from lmstack.quant.quantize import QUANTIZED
    if (model.device.type == "cpu" and model.dtype == torch.float32
            and any(isinstance(m, QUANTIZED) for m in model.modules())):
        return torch.float16
    return model.dtype


class DecodeEngine:
    """Prefill and decode over a decoder's KV-cache pool. Not thread-safe: one thread drives it.

    compile=True wraps the decode step in torch.compile; decode then always attends over the whole pool (one
    shape per pool size) instead of a bucketed view.
    """

    def __init__(self, model: nn.Module, pad_id: int, *, compile: bool = False) -> None:
        self.model, self.pad_id, self.compiled = model, pad_id, compile
        self.device = model.device
        # torch.compile is set up at first use (prefill's head, or the first decode): importing it takes a
        # second or two, part of the compile's warm-up, not of loading the model.
        self.step_fn: Any = None if compile else decode_one_token
        self.head_fn: Any = None if compile else head_logits
        self._view: tuple[int, int] | None = None  # (rows, slots) of the cache view the model attends over

    @property
    def slots(self) -> int:
        """Slots per row of the pool (0 without one)."""
        shape = self.model.cache_shape()
        return shape[1] if shape is not None else 0

    def reserve(self, rows: int, slots: int) -> None:
        """Make the pool [rows, slots]; an existing pool of that size (and its compiled graph) is kept."""
        shape = self.model.cache_shape()
        if shape is None or shape[:2] != (rows, slots):
            # The eager step picks its own (kv_cache_dtype: float32 for a half-precision model on the CPU).
            self.model.setup_cache(rows, slots, dtype=compiled_cache_dtype(self.model) if self.compiled else None)
            self._view = None

    def _use(self, rows: slice, slots: int) -> None:
        key = (rows.start or 0, rows.stop, slots)
        if self._view != key:
            self.model.use_cache_rows(rows, slots)
            self._view = key

    def prefill(self, start: int, prompts: list[list[int]]) -> Tensor:
        """Write `prompts` into pool rows start.. at slots 0..T-1; -> logits of each first new token [k, V]."""
        k, T = len(prompts), max(map(len, prompts))
        dev = self.device
        tokens = torch.tensor([p + [self.pad_id] * (T - len(p)) for p in prompts], device=dev)  # [k, T]
        # The rows' whole length: the model attends over the written slots only (kv_len = T), and a compiled
        # decode over the whole pool keeps the same view (and graph) from call to call.
        self._use(slice(start, start + k), self.slots)
        input_pos = torch.arange(T, device=dev)  # [T]: causal over slots 0..T-1
        if all(len(p) == T for p in prompts):
            hidden = self.model(tokens, input_pos=input_pos, last_only=True, return_hidden=True)[:, -1]  # [k, C]
        else:
            hidden = self.model(tokens, input_pos=input_pos, return_hidden=True)  # [k, T, C]
            last = torch.tensor([len(p) - 1 for p in prompts], device=dev)
            hidden = hidden[torch.arange(k, device=dev), last]  # [k, C]: each prompt's last token
        return self._steps()[1](self.model, hidden)  # [k, V]

    def decode(self, tokens: list[int], positions: list[int]) -> Tensor:
        """Feed tokens[i] to pool row i at slot positions[i]; -> next-token logits [n, V] (float32)."""
        n = len(tokens)
        slots = self.slots if self.compiled else cache_len(max(positions) + 1, self.slots, SLOT_BUCKET)
        self._use(slice(0, n), slots)
        dev = self.device
        token_t = torch.tensor(tokens, device=dev)[:, None]  # [n, 1]
        input_pos = torch.tensor(positions, device=dev)[:, None]  # [n, 1]: each row's own slot
        return self._steps()[0](self.model, token_t, input_pos)

    def _steps(self) -> tuple[Any, Any]:
        """(decode step, head); compiled ones are made at first use."""
        if self.step_fn is None:
            self.step_fn, self.head_fn = compiled_decode(self.model)
        return self.step_fn, self.head_fn

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` slots of row `src` into row `dst` (a choice's prompt; a retired row's hole)."""
        self.model.copy_cache_row(src, dst, length)

    def reorder(self, rows: Tensor) -> None:
        """Beam search: row i of the pool becomes row rows[i] ([n])."""
        self.model.reorder_cache(rows)

    def release(self) -> None:
        self.model.clear_cache()
        self._view = None
