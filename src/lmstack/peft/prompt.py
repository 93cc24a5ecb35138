"""Prompt tuning (Lester et al., 2021) and prefix tuning (Li & Liang, 2021) for decoder models.

Prompt tuning: N trainable "virtual token" embeddings go before the input embeddings. `PromptTuned(model, N)`
wraps a Decoder and keeps its interface: `forward(tokens, ...)` returns logits for the real positions only (so
`causal_lm` and the trainer work unchanged), and generation works through the same `setup_cache` / `forward`
calls: the virtual tokens occupy cache slots 0..N-1 and positions 0..N-1, written once by `setup_cache`, and the
wrapper shifts the caller's slots, positions and masks by N.

Prefix tuning: P trainable keys and values in every self-attention layer, visible to every query (through
`Attention.prefix` in models/blocks.py), optionally produced by an MLP from a smaller embedding (Li & Liang's
reparameterization, as peft's `prefix_projection`). The prefix sits outside the KV cache and takes no position,
so positions, caching and generation are unchanged.

Shapes: B batch, T tokens, N virtual tokens / P prefix length, C d_model, L layers, Hkv kv heads, D head_dim.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.errors import LmstackError
from lmstack.models.blocks import Attention, Block


def _require_decoder(model: nn.Module, method: str) -> None:
    if getattr(getattr(model, "config", None), "family", None) != "decoder":
        raise LmstackError(f"{method} needs a decoder-only model, not a "
                           f"{getattr(getattr(model, 'config', None), 'family', type(model).__name__)!r} model")


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    # Trainable weights stay float32 over a half-precision model.
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


# ------------------------------------------------------------------------------------------ prompt tuning


class PromptTuned(nn.Module):
    """A Decoder with `n_virtual` trainable embeddings before every input; the Decoder itself is frozen.

    `init_ids`: token ids whose embeddings start the virtual tokens (repeated or cut to length, as peft's TEXT
    init); default: the embeddings of `n_virtual` random vocabulary tokens (Lester et al.'s sampled vocabulary).
    """

    peft_switch = True  # disable_adapter() runs the bare model (training-style calls only)
    peft_weights = ("prompt",)  # what peft_state_dict saves (not the wrapped model)

    def __init__(self, model: nn.Module, n_virtual: int, init_ids: list[int] | Tensor | None = None) -> None:
        super().__init__()
        _require_decoder(model, "prompt tuning")
        cfg = model.config
        if not 1 <= n_virtual < cfg.max_seq_len:
            raise LmstackError(f"n_virtual must be in 1..{cfg.max_seq_len - 1}, not {n_virtual}")
        self.model, self.n_virtual = model, n_virtual
        # Generation plans against what is left of the context for real tokens.
        self.config = dataclasses.replace(cfg, max_seq_len=cfg.max_seq_len - n_virtual)
        self.disabled = False
        for p in model.parameters():
            p.requires_grad_(False)
        V = cfg.vocab_size
        if init_ids is None:
            ids = torch.randint(0, V, (n_virtual,), device=model.device)
        else:
            ids = torch.as_tensor(init_ids, dtype=torch.long, device=model.device).reshape(-1)
            if ids.numel() == 0:
                raise LmstackError("prompt tuning init text is empty")
            if ((ids < 0) | (ids >= V)).any():
                raise LmstackError(f"prompt tuning init ids must be in 0..{V - 1}")
            ids = ids.repeat(math.ceil(n_virtual / ids.numel()))[:n_virtual]
        with torch.no_grad():
            init = model.tok_emb(ids)  # [N, C]: a lookup, so a quantized table works too
        self.prompt = nn.Parameter(init.detach().clone().to(_float_dtype(init.dtype)))  # [N, C]

    # The CausalLM protocol (lmstack.models.CausalLM), by composition over the wrapped Decoder.
    def head(self, hidden: Tensor) -> Tensor:
        return self.model.head(hidden)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def cache_len(self) -> int:
        return max(0, self.model.cache_len - self.n_virtual)

    def cache_shape(self) -> tuple[int, int, torch.dtype] | None:
        shape = self.model.cache_shape()
        return None if shape is None else (shape[0], shape[1] - self.n_virtual, shape[2])

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.model.reorder_cache(beam_idx)

    def clear_cache(self) -> None:
        self.model.clear_cache()

    def use_cache_rows(self, rows: slice, length: int) -> None:
        self.model.use_cache_rows(rows, length + self.n_virtual)  # the virtual tokens' slots come first

    def copy_cache_row(self, src: int, dst: int, length: int) -> None:
        self.model.copy_cache_row(src, dst, length + self.n_virtual)

    @torch.no_grad()
    def setup_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """A cache for `max_len` real tokens plus the virtual ones, which are written to slots 0..N-1 now."""
        N = self.n_virtual
        self.model.setup_cache(batch_size, (max_len or self.config.max_seq_len) + N, dtype)
        slots = torch.arange(N, device=self.prompt.device)
        x = self._with_positions(self._virtual(batch_size, self.model.dtype), slots.expand(batch_size, N))
        self.model(slots.expand(batch_size, N), input_pos=slots, inputs_embeds=x, return_hidden=True)

    def _virtual(self, batch: int, dtype: torch.dtype) -> Tensor:
        return self.prompt.to(dtype).unsqueeze(0).expand(batch, -1, -1)  # [B, N, C]

    def _with_positions(self, x: Tensor, position_ids: Tensor) -> Tensor:
        """Add learned / sinusoidal position embeddings, which Decoder.forward skips for `inputs_embeds`."""
        m = self.model
        if m.pos_emb is not None:
            return x + m.pos_emb(position_ids)
        if m.config.positions == "sinusoidal":
            return x + m.pos_table[position_ids].to(x.dtype)
        return x  # RoPE models take position_ids inside attention

    def forward(self, tokens: Tensor, *, input_pos: Tensor | None = None, position_ids: Tensor | None = None,
                key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None, last_only: bool = False,
                return_hidden: bool = False) -> Tensor:
        """Decoder.forward's contract, for the real tokens: logits [B, T, V] (or [B, 1, V] / hidden [B, T, C]).

        input_pos, position_ids, key_padding_mask and attn_mask refer to the real tokens only; the wrapper adds
        the N virtual tokens in front of each of them.
        """
        m, N = self.model, self.n_virtual
        if self.disabled:
            if input_pos is not None:
                raise LmstackError("prompt tuning cannot be disabled during cached generation")
            return m(tokens, position_ids=position_ids, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                     inputs_embeds=inputs_embeds, last_only=last_only, return_hidden=return_hidden)
        embeds = m.tok_emb(tokens) if inputs_embeds is None else inputs_embeds  # [B, T, C]
        B, T = embeds.shape[:2]
        dev = embeds.device
        if position_ids is None:
            base = input_pos if input_pos is not None else torch.arange(T, device=dev)
            position_ids = base if base.dim() == 2 else base.unsqueeze(0).expand(B, T)  # [B, T]
        position_ids = position_ids + N  # real tokens come after the virtual ones
        if key_padding_mask is not None:  # [B, S] -> [B, N + S]: virtual tokens are always real
            key_padding_mask = torch.cat([key_padding_mask.new_ones(B, N), key_padding_mask], dim=1)

        if input_pos is not None:  # cached: the virtual tokens already sit in slots 0..N-1
            if attn_mask is not None:  # [B|1, 1, T, S] -> [B|1, 1, T, N + S]
                attn_mask = torch.cat([attn_mask.new_ones(*attn_mask.shape[:-1], N), attn_mask], dim=-1)
            x = self._with_positions(embeds, position_ids)
            return m(tokens, input_pos=input_pos + N, position_ids=position_ids, key_padding_mask=key_padding_mask,
                     attn_mask=attn_mask, inputs_embeds=x, last_only=last_only, return_hidden=return_hidden)

        virtual_pos = torch.arange(N, device=dev).expand(B, N)
        position_ids = torch.cat([virtual_pos, position_ids], dim=1)  # [B, N + T]
        x = self._with_positions(torch.cat([self._virtual(B, embeds.dtype), embeds], dim=1), position_ids)
        if attn_mask is not None:  # [B|1, 1, T, T] -> [B|1, 1, N + T, N + T]
            b = attn_mask.shape[0]
            top = torch.ones(N, N, dtype=torch.bool, device=dev).tril()  # virtual tokens: causal among themselves
            top = torch.cat([top, top.new_zeros(N, T)], dim=1).expand(b, 1, N, N + T)
            bottom = torch.cat([attn_mask.new_ones(b, 1, T, N), attn_mask], dim=-1)  # every token sees them
            attn_mask = torch.cat([top, bottom], dim=2)
        out = m(tokens, position_ids=position_ids, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                inputs_embeds=x, last_only=last_only, return_hidden=return_hidden)
        return out if last_only else out[:, N:]


# ------------------------------------------------------------------------------------------ prefix tuning


class PrefixTuning(nn.Module):
    """The trainable prefixes of every self-attention layer; attached to the model as `model.prefix_tuning`.

    Direct: a [L, 2, Hkv, P, D] tensor. Reparameterized (Li & Liang; peft's prefix_projection): an embedding
    [P, C] -> Linear(C, hidden) -> tanh -> Linear(hidden, L * 2 * Hkv * D); each layer computes only its slice.
    """

    peft_switch = True  # disable_adapter() detaches the prefixes, giving the exact base computation
    peft_weights = ("prefix", "embedding", "mlp_in", "mlp_out")  # direct, or the reparameterization's

    def __init__(self, attentions: list[Attention], n_prefix: int, d_model: int, hidden: int | None = None,
                 init_std: float = 0.02) -> None:
        super().__init__()
        if n_prefix < 1:
            raise LmstackError(f"prefix length must be >= 1, not {n_prefix}")
        a = attentions[0]
        self.n_layer, self.n_prefix, self.n_kv_head, self.head_dim = len(attentions), n_prefix, a.n_kv_head, a.head_dim
        if any((x.n_kv_head, x.head_dim) != (a.n_kv_head, a.head_dim) for x in attentions):
            raise LmstackError("prefix tuning needs every attention layer to have the same kv heads and head size")
        self._attentions = list(attentions)  # a plain list: these are the model's modules, not ours
        p = next(a.parameters())
        dev, dtype = p.device, _float_dtype(p.dtype)
        kv = self.n_layer * 2 * a.n_kv_head * a.head_dim
        if hidden is None:
            self.prefix = nn.Parameter(torch.randn(self.n_layer, 2, a.n_kv_head, n_prefix, a.head_dim,
                                                   device=dev, dtype=dtype) * init_std)
        else:
            self.embedding = nn.Parameter(torch.randn(n_prefix, d_model, device=dev, dtype=dtype))  # [P, C]
            self.mlp_in = nn.Linear(d_model, hidden, device=dev, dtype=dtype)
            self.mlp_out = nn.Linear(hidden, kv, device=dev, dtype=dtype)
        self.reparameterized = hidden is not None
        self._disabled = True
        self.disabled = False  # attaches the prefixes

    @property
    def disabled(self) -> bool:
        return self._disabled

    @disabled.setter
    def disabled(self, value: bool) -> None:
        # Off means Attention.prefix is None: exactly the code path of the untouched model.
        self._disabled = value
        for i, attn in enumerate(self._attentions):
            attn.prefix = None if value else partial(self.layer_kv, i)

    def layer_kv(self, layer: int, batch: int) -> tuple[Tensor, Tensor]:
        """Keys and values of one layer's prefix: each [B, Hkv, P, D]."""
        if self.reparameterized:
            size = 2 * self.n_kv_head * self.head_dim
            rows = slice(layer * size, (layer + 1) * size)
            h = torch.tanh(self.mlp_in(self.embedding))  # [P, hidden]
            kv = F.linear(h, self.mlp_out.weight[rows], self.mlp_out.bias[rows])  # [P, 2 * Hkv * D]
            kv = kv.view(self.n_prefix, 2, self.n_kv_head, self.head_dim).permute(1, 2, 0, 3)  # [2, Hkv, P, D]
        else:
            kv = self.prefix[layer]  # [2, Hkv, P, D]
        k, v = kv.unsqueeze(1).expand(2, batch, -1, -1, -1)  # [B, Hkv, P, D] each
        return k, v


def _self_attentions(model: nn.Module) -> list[Attention]:
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    attns = [getattr(b.attn, "inner", b.attn) for b in blocks]  # see through a WithBottleneck wrapper
    if not attns or not all(isinstance(a, Attention) for a in attns):
        raise LmstackError("prefix tuning needs a model built from lmstack attention blocks")
    return attns


def apply_prefix_tuning(model: nn.Module, n_prefix: int, hidden: int | None = None,
                        init_ids: list[int] | Tensor | None = None) -> nn.Module:
    """Add P trainable keys/values to every self-attention layer (in place) and freeze everything else.

    hidden:   None = train the prefixes directly; an int = Li & Liang's MLP reparameterization with that width.
    init_ids: P token ids whose keys/values (running the model on them) start the direct prefixes, as Li & Liang
              initialize from real words' activations; default: N(0, 0.02).
    """
    _require_decoder(model, "prefix tuning")
    if getattr(model, "prefix_tuning", None) is not None:
        raise LmstackError("the model already has prefix tuning")
    if init_ids is not None and hidden is not None:
        raise LmstackError("init_ids initializes direct prefixes; it cannot be combined with an MLP (hidden)")
    for p in model.parameters():
        p.requires_grad_(False)
    attns = _self_attentions(model)
    init = _activations(model, init_ids, n_prefix) if init_ids is not None else None
    model.prefix_tuning = PrefixTuning(attns, n_prefix, model.config.d_model, hidden)
    if init is not None:
        with torch.no_grad():
            model.prefix_tuning.prefix.copy_(init)
    return model


@torch.no_grad()
def _activations(model: nn.Module, init_ids: list[int] | Tensor, n_prefix: int) -> Tensor:
    """Run the model on the ids and read each layer's keys/values from its cache: [L, 2, Hkv, P, D]."""
    ids = torch.as_tensor(init_ids, dtype=torch.long, device=model.device).reshape(-1)
    if ids.numel() != n_prefix:
        raise LmstackError(f"prefix init needs exactly {n_prefix} token ids, got {ids.numel()}")
    model.setup_cache(1, n_prefix)
    model(ids[None], input_pos=torch.arange(n_prefix, device=ids.device), return_hidden=True)
    kv = torch.stack([torch.stack([k[0], v[0]]) for k, v in model.cached_kv()])  # [L, 2, Hkv, P, D]
    model.clear_cache()
    return kv.float()
