"""`lmstack plan`: how much memory and compute a training run needs, before running it.

The course rule of thumb (4 bytes to store a parameter, +20 to train it in fp32 with Adam) is reproduced in
`rule_of_thumb`; `plan` then replaces its "8 bytes/param of activations" guess with a count of the tensors
autograd really saves in lmstack's blocks (models/blocks.py, models/decoder.py, encoder.py, seq2seq.py). That
count was derived with `torch.autograd.graph.saved_tensors_hooks` and is checked against it in
tests/test_plan.py for decoders (causal LM), encoders (masked LM, the head at `mask_fraction` of the positions)
and encoder-decoders (teacher forcing on `seq` source and `target_len` target tokens); the whole peak is
checked against measured RSS by bench/plan_validate.py (decoders).

Conventions (also returned in the plan's `conventions` entry):
- fp32: weights, grads, optimizer states and activations in float32.
- bf16: the trainer's mixed precision (TrainConfig.precision="bf16"): fp32 master weights, fp32 grads, fp32
  optimizer states, matmuls under torch.autocast. Autocast keeps a bf16 copy of every matmul weight alive from
  forward to backward (+2 bytes per matmul parameter), and matmul inputs/outputs are saved in bf16; the
  residual stream, norms and the loss stay float32.
- lora/qlora: the base is frozen and stored in `precision` (fp32 4 B, bf16 2 B, int8 1 B + one fp32 scale per
  output row, nf4 4 bits + absmax per 64 with double quantization = 4.127 bits). int8/nf4 quantize the Linear
  weights inside the blocks; embeddings, norms and biases stay bf16 (as in QLoRA). Adapters are fp32 and
  compute runs under bf16 autocast for bf16/int8/nf4. lmstack.peft.lora's NF4 Linear dequantizes its weight in
  forward and again in backward (as torchtune's linear_nf4), so one dequantized weight is alive at a time.
- CPU peak RSS: the plan counts live tensors. glibc's malloc keeps part of the freed activation memory in the
  heap, so a process's RSS high-water mark can exceed the plan by 5-25% (bench/plan_validate.py); with
  MALLOC_MMAP_THRESHOLD_=131072 it matches the plan within 1%.
- FSDP (ZeRO-3) divides weights, grads and optimizer states by the number of GPUs; activations are per device.
  Two layers of gathered weights (the current one and the prefetched next) are added as `fsdp_gather_bytes`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmstack.config import (PRESETS, DecoderConfig, EncoderConfig, ModelConfig, Seq2SeqConfig,
                             config_from_dict, from_name)
from lmstack.errors import LmstackError
from lmstack.models.attention import MATMUL_ATTENTION_MAX_KEYS
from lmstack.training.flops import matmul_params, train_flops_per_token

Precision = Literal["fp32", "bf16", "int8", "nf4"]
Device = Literal["cuda", "cpu"]
Method = Literal["full", "lora", "qlora"]
Optimizer = Literal["adamw", "sgd", "sgd-momentum", "adafactor"]
Sharding = Literal["none", "fsdp"]

# RSS of an idle `python -c "import torch, lmstack..."` with 2 threads on the validation machine (AMD EPYC,
# torch 2.13 CPU), measured by bench/plan_validate.py. On a GPU the CUDA context (~0.5 GB) comes on top.
FRAMEWORK_OVERHEAD_BYTES = 267 * 2**20

# NF4 (QLoRA, Dettmers et al. 2023): 4-bit codes + one absmax per block of 64, the absmaxes themselves quantized
# to 8 bits with one fp32 scale per 256 of them: 4 + 8/64 + 32/(64*256) bits per parameter.
NF4_BITS_PER_PARAM = 4 + 8 / 64 + 32 / (64 * 256)
CHINCHILLA_TOKENS_PER_PARAM = 20

GB = 1e9


# ------------------------------------------------------------------------------------- rule of thumb


def rule_of_thumb(parameters: int) -> dict[str, Any]:
    """The course note's estimate: 4 bytes to store a parameter in fp32; training adds Adam's two states (8),
    the gradient (4) and a high-end guess for activations and temporaries (8): 24 bytes per parameter."""
    per_param = {"weights": 4, "adam_states": 8, "gradients": 4, "activations_and_temp": 8}
    return {"bytes_per_param": per_param, "store_bytes": 4 * parameters,
            "train_bytes": sum(per_param.values()) * parameters,
            "store_gb": 4 * parameters / GB, "train_gb": sum(per_param.values()) * parameters / GB,
            "note": "1B parameters: 4 GB to store, 24 GB to train in fp32 with Adam (4 + 8 + 4 + 8 bytes/param)"}


# ------------------------------------------------------------------------------------ model config


def load_config(model: str) -> ModelConfig:
    """A preset name, a JSON/YAML config file, or any checkpoint lmstack.checkpoints resolves (config only)."""
    if model in PRESETS:
        return from_name(model)
    path = Path(model).expanduser()
    if path.suffix in (".json", ".yaml", ".yml") and path.is_file():
        return _config_file(path)
    from lmstack.checkpoints import detect_format, resolve

    path = resolve(model)
    fmt = detect_format(path)
    if fmt == "gguf":
        from lmstack.checkpoints.gguf import gguf_config, read_gguf

        return gguf_config(read_gguf(path))  # metadata only: the tensors stay in the memory map
    if fmt == "native":
        return _config_file(path / "lmstack.json")
    return _hf_config(path)


def _config_file(path: Path) -> ModelConfig:
    """{"preset": name, **overrides}, a config dict with "family", or a native lmstack.json ({"config": ...})."""
    if path.suffix != ".json":
        from lmstack.runconfig import read_yaml

        values: Any = read_yaml(path)  # a syntax error is reported as file:line
    else:
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LmstackError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(values, dict):
        raise LmstackError(f"{path}: expected a mapping of config fields")
    if isinstance(values.get("config"), dict):
        values = values["config"]
    for key in _SIZE_FIELDS & set(values):  # before building: a 0 would divide by zero or give an empty model
        value = values[key]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise LmstackError(f"{path}: {key} must be >= 1, got {value!r}")
    try:
        if "preset" in values:
            rest = {k: v for k, v in values.items() if k != "preset"}
            return from_name(str(values["preset"]), **rest)
        return config_from_dict(values)
    except LmstackError as e:
        raise LmstackError(f"{path}: {e}") from None


# config fields that count something (layers, heads, widths, tokens): each must be a positive integer
_SIZE_FIELDS = {"n_layer", "n_encoder_layer", "n_decoder_layer", "n_head", "n_kv_head", "d_model", "d_ff",
                "head_dim", "vocab_size", "max_seq_len"}


def _hf_config(path: Path) -> ModelConfig:
    """Run the HF importer on meta tensors built from the safetensors headers, so no weight is read."""
    from lmstack.checkpoints.hf import IMPORTERS
    from lmstack.io import read_json

    hf = read_json(path / "config.json")
    if hf.get("model_type") not in IMPORTERS:
        raise LmstackError(f"{path / 'config.json'}: unsupported architecture {hf.get('model_type')!r}")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LmstackError(f"{path}: no *.safetensors weights found")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(_safetensors_meta(file))
    config, _ = IMPORTERS[hf["model_type"]](hf, weights, path, None)
    return config


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _safetensors_meta(file: Path) -> dict[str, torch.Tensor]:
    # safetensors layout: u64 little-endian header length, then a JSON header {name: {dtype, shape, offsets}}.
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LmstackError(f"{file}: truncated safetensors file")
        try:
            header = json.loads(f.read(struct.unpack("<Q", head)[0]))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LmstackError(f"{file}: corrupt safetensors header") from None
    return {name: torch.empty(info["shape"], dtype=_ST_DTYPES.get(info["dtype"], torch.float32), device="meta")
            for name, info in header.items() if name != "__metadata__"}


# -------------------------------------------------------------------------------------- model shape


@dataclass
class Shape:
    """What the planner needs from the real model, built on the meta device (no memory, exact counts)."""

    parameters: int
    matmul_parameters: int  # weights that take part in matmuls, incl. a tied head (training/flops.py)
    block_linears: dict[str, tuple[int, int]]  # one block's Linears: name -> (in_features, out_features)
    linears: list[tuple[str, int, int]]  # every block's Linears, all stacks: (name, in, out)
    layer_parameters: int  # parameters per block (the mean over the stacks' blocks)
    param_shapes: list[tuple[int, ...]]


def _stacks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of every stack: a decoder's or encoder's layers, a seq2seq's encoder + decoder."""
    blocks = [*getattr(model, "layers", []), *getattr(model, "encoder_layers", []),
              *getattr(model, "decoder_layers", [])]
    return blocks


def model_shape(config: ModelConfig) -> Shape:
    from lmstack.models import build_model

    with torch.device("meta"):
        model = build_model(config)
    blocks = _stacks(model)
    if not blocks:
        raise LmstackError(f"{config.name}: the model has no layers (n_layer must be >= 1)")
    linears = [(name.rsplit(".", 1)[-1], m.in_features, m.out_features)
               for block in blocks for name, m in block.named_modules() if isinstance(m, nn.Linear)]
    last = blocks[-1]  # a seq2seq decoder block has every Linear name (cross-attention reuses q/k/v/o)
    return Shape(parameters=sum(p.numel() for p in model.parameters()), matmul_parameters=matmul_params(model),
                 block_linears={name.rsplit(".", 1)[-1]: (m.in_features, m.out_features)
                                for name, m in last.named_modules() if isinstance(m, nn.Linear)},
                 linears=linears,
                 layer_parameters=sum(p.numel() for b in blocks for p in b.parameters()) // len(blocks),
                 param_shapes=[tuple(p.shape) for p in model.parameters()])


def lora_targets_of(targets: str, block_linears: dict[str, tuple[int, int]]) -> list[str]:
    """Targets as lmstack.peft.lora.apply_lora reads them ("all-linear", "q,v", "q_proj,v_proj", ...).

    "all-linear" keeps the Linears the block has (GPT-2's MLP has no gate_proj); an explicit name must exist."""
    from lmstack.peft.lora import resolve_targets

    names = resolve_targets(targets)
    if targets.strip() == "all-linear":
        names = [n for n in names if n in block_linears]
    missing = [n for n in names if n not in block_linears]
    if missing:
        raise LmstackError(f"unknown LoRA target(s) {', '.join(missing)}: this model's blocks have "
                           f"{', '.join(block_linears)}")
    return names


# -------------------------------------------------------------------------------------- activations


def activation_bytes(cfg: DecoderConfig, batch: int, seq: int, *, autocast: bool, trainable_base: bool,
                     lora_targets: list[str], lora_rank: int, grad_checkpointing: bool,
                     device: Device = "cuda") -> dict[str, int]:
    """Bytes autograd keeps between forward and backward for one micro-batch of the Decoder, plus the loss buffers.

    Each term names the tensors saved by lmstack's code path (derived with saved_tensors_hooks, see the module
    docstring). Shapes per token: C d_model, F d_ff, Dq = H*D query width, Dkv = Hkv*D, V vocabulary.
    The CPU and CUDA SDPA kernels (flash / memory-efficient) save q, k, v, the output and a logsumexp per head,
    never the T x T score matrix, and take GQA's shared k/v without expanding them. A half-precision step on
    CPU with up to 256 keys attends with models.attention.matmul_attention instead, which saves the probabilities.
    """
    C, F, V, H = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_head
    Dq, Dkv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    a = 2 if autocast else 4  # matmul inputs/outputs: bf16 under autocast
    f32 = 4  # norm statistics, softmax statistics and the loss are always float32 here
    tokens = batch * seq
    mlp_in = ("gate_proj", "up_proj") if cfg.gated_mlp else ("up_proj",)
    matmul_attention = device == "cpu" and autocast and seq <= MATMUL_ATTENTION_MAX_KEYS  # as Attention does

    def saves_input(name: str) -> bool:  # a Linear saves its input when its weight or its LoRA A needs a grad
        return trainable_base or name in lora_targets

    # The residual stream is fp32 unless a frozen base is stored in bf16 (lora/qlora under autocast): then the
    # embedding output and every residual add are bf16.
    residual_bf16 = autocast and not trainable_base
    r = 2 if residual_bf16 else f32

    def norm() -> int:
        # LayerNorm: input, mean, rstd in the stream's dtype (CPU autocast keeps layer_norm in its input dtype).
        # RMSNorm: its fp32 copy of the input, rstd, and x*rstd when the gain trains.
        if cfg.norm == "layernorm":
            return r * (C + 2)
        return f32 * (C + 1) + (f32 * C if trainable_base else 0)

    def input_reads(names: tuple[str, ...], width: int, source: str) -> int:
        """Bytes/token saved for the input of Linears `names`; source: "norm" | "sdpa" | "mlp" (bf16 product)."""
        readers = sum(saves_input(n) for n in names)
        if not autocast:  # the readers share the tensor; the SDPA output is saved by SDPA already
            return f32 * width if readers and source != "sdpa" else 0
        if source == "norm" and trainable_base:  # the fp32 norm output is cast to bf16 by each Linear
            return 2 * width * readers
        if source == "sdpa" and not matmul_attention:  # a view of the output SDPA saved
            return 0
        return 2 * width * (readers > 0)  # bf16 already (a bf16 base's stream): shared as is

    if matmul_attention:  # the grouped q copy, k, v, and the bf16 probabilities [.., H, S] (S = seq)
        core = 2 * (Dq + 2 * Dkv) + 2 * H * seq
    else:  # SDPA: q, k, v, output [.., Dq], logsumexp per head
        core = a * (2 * Dq + 2 * Dkv) + f32 * H
    attention = (norm() + input_reads(("q_proj", "k_proj", "v_proj"), C, "norm") + core
                 + input_reads(("o_proj",), Dq, "sdpa"))  # o_proj reads the attention output
    if cfg.gated_mlp:  # silu saves the gate, act*up saves both factors
        mlp_kept = a * 3 * F
    else:  # the activation saves its input
        mlp_kept = a * F
    mlp = norm() + input_reads(mlp_in, C, "norm") + mlp_kept + input_reads(("down_proj",), F, "mlp")
    lora = a * lora_rank * len(lora_targets)  # each adapter's B saves A's output [.., r]
    per_layer = (attention + mlp + lora) * tokens

    if grad_checkpointing:  # keep each layer's input; backward recomputes one layer at a time
        layers = cfg.n_layer * r * C * tokens + per_layer
    else:
        layers = cfg.n_layer * per_layer
    if not trainable_base:  # frozen embeddings: the first norm's input needs no grad, so it saves nothing
        layers -= norm() * tokens
    if matmul_attention:  # each layer's causal mask [T, S] (bool), saved by masked_fill
        layers += cfg.n_layer * seq * seq

    embeddings = 8 * tokens if trainable_base else 0  # token ids (int64) for the embedding grad
    if cfg.positions == "rope":
        # the gathered cos/sin [B, 1, T, D] in the stream's dtype, shared by all layers
        embeddings += 2 * r * cfg.head_dim * tokens
    head_input = (2 * C if autocast else f32 * C) if trainable_base else 0  # lm head (the tied embedding)
    head = (norm() + head_input) * tokens
    # cross_entropy on fp32 logits [B*T, V]: log_softmax output saved, target ids saved; in backward the
    # grad of the log-probs and the grad of the logits are both alive (in forward: logits + log-probs).
    loss = (f32 * V + 8) * tokens + 2 * f32 * V * tokens
    return {"layers": layers, "embeddings": embeddings, "final_norm_and_head": head, "logits_and_loss": loss}


# ------------------------------------------------------------------ activations: encoders and seq2seq

MLM_MASK_FRACTION = 0.15  # BERT's masking rate (data/batching.py): the MLM head runs at these positions only


@dataclass
class _Saved:
    """What autograd keeps in one training configuration: the Decoder count's rules, for the stacks below."""

    autocast: bool
    trainable_base: bool
    lora_targets: list[str]
    lora_rank: int
    device: str
    dropout: float

    @property
    def a(self) -> int:  # matmul inputs/outputs: bf16 under autocast
        return 2 if self.autocast else 4

    @property
    def r(self) -> int:  # the residual stream: bf16 only when a frozen base is stored in bf16
        return 2 if self.autocast and not self.trainable_base else 4

    def saves_input(self, name: str) -> bool:  # a Linear saves its input when its weight or LoRA A needs a grad
        return self.trainable_base or name in self.lora_targets

    def reads(self, names: tuple[str, ...], width: int, tokens: int) -> int:
        """Bytes Linears `names` save of an input they share that nothing else saves (the stream or a norm
        output): one fp32 tensor, or under autocast one bf16 cast per reader of an fp32 input."""
        readers = sum(self.saves_input(n) for n in names)
        if not readers:
            return 0
        if not self.autocast:
            return 4 * width * tokens
        return 2 * width * tokens * (readers if self.r == 4 else 1)

    def norm(self, kind: str, width: int, tokens: int) -> int:
        """LayerNorm: its input (stream dtype), mean and rstd (fp32). RMSNorm: its fp32 input, rstd, and x*rstd
        when the gain trains."""
        if kind == "layernorm":
            return (self.r * width + 8) * tokens
        return (4 * (width + 1) + (4 * width if self.trainable_base else 0)) * tokens

    def drop(self, elements: int, nbytes: int) -> int:
        """nn.Dropout in training keeps its mask: bool from CUDA's fused kernel, in the input's dtype on CPU
        (input * mask / (1 - p)); p = 0 keeps nothing."""
        if not self.dropout:
            return 0
        return elements * (1 if self.device == "cuda" else nbytes)

    def matmul_attention(self, kv_len: int) -> bool:  # as models.attention.attend chooses
        return self.device == "cpu" and self.autocast and kv_len <= MATMUL_ATTENTION_MAX_KEYS and not self.dropout

    def attention(self, batch: int, q_len: int, kv_len: int, n_head: int, dq: int, dkv: int, *, mask: str) -> int:
        """One attention call without its input reads: the kernel's saved tensors and o_proj's input.

        mask: "none" | "causal" (SDPA's is_causal) | "padding" (bool [B,1,1,S], one tensor for the stack) |
        "bias" (an additive float bias, T5's relative positions; it needs a grad when the base trains).
        """
        q_tok, kv_tok = batch * q_len, batch * kv_len
        probs = batch * n_head * q_len * kv_len
        if self.matmul_attention(kv_len):
            # matmul_attention: q, k^T, v and the probabilities in bf16; o_proj reads a reshaped copy
            saved = 2 * (q_tok * dq + 2 * kv_tok * dkv) + 2 * probs
            saved += q_len * kv_len if mask == "causal" else 0  # the [T, S] mask masked_fill keeps
            return saved + (2 * q_tok * dq if self.saves_input("o_proj") else 0)
        if self.device == "cpu" and ((mask == "bias" and self.trainable_base) or self.dropout):
            # SDPA's math path (a bias that needs a grad, or dropout), in fp32 (CPU autocast runs SDPA in fp32):
            # q, k^T, v, probabilities (+ the dropout mask and the dropped probabilities); o_proj reads a
            # reshaped copy (cast to bf16 under autocast)
            saved = 4 * (q_tok * dq + 2 * kv_tok * dkv) + 4 * probs
            saved += self.drop(probs, 4) + 4 * probs if self.dropout else 0
            return saved + (self.a * q_tok * dq if self.saves_input("o_proj") else 0)
        # flash / memory-efficient SDPA: q, k, v, the output (o_proj's input is a view of it), logsumexp
        saved = self.a * (2 * q_tok * dq + 2 * kv_tok * dkv) + 4 * batch * n_head * q_len
        if mask == "padding":  # converted to an additive float mask [B, 1, 1, S] on every call
            saved += 4 * kv_tok
        return saved

    def mlp(self, tokens: int, d_model: int, d_ff: int, gated: bool, activation: str) -> int:
        """MLP without its input read: the activation's saved tensors and down_proj's input."""
        down = self.a * d_ff if self.saves_input("down_proj") else 0  # the product / activation output
        if gated:  # act(gate) keeps the gate, act * up keeps both factors
            kept = 3 * self.a * d_ff + down
        elif activation == "relu":  # relu keeps its output, which is down_proj's input
            kept = self.a * d_ff
        else:  # gelu/silu keep their input; down_proj keeps their output
            kept = self.a * d_ff + down
        return kept * tokens

    def lora(self, tokens: int, names: tuple[str, ...]) -> int:  # each adapter's B keeps A's output [.., r]
        return self.a * self.lora_rank * sum(n in self.lora_targets for n in names) * tokens


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def _block_bytes(rules: _Saved, *, norm: str, d_model: int, d_ff: int, gated: bool,
                 activation: str, n_head: int, head_dim: int, batch: int, q_len: int, self_mask: str,
                 cross_len: int | None = None, cross_mask: str = "none", mlp_dropout: bool = False) -> int:
    """One transformer block (models/blocks.py Block) in training: self-attention, optional cross-attention,
    MLP. Pre-norm and post-norm keep the same bytes: pre-norm's norm keeps the stream and the sub-layer reads
    the norm's output; post-norm's sub-layer reads the stream and its norm keeps the residual sum."""
    C, D = d_model, n_head * head_dim
    tokens = batch * q_len
    out = 0
    # self-attention
    out += rules.norm(norm, C, tokens) + rules.reads(("q_proj", "k_proj", "v_proj"), C, tokens)
    out += rules.attention(batch, q_len, q_len, n_head, D, D, mask=self_mask)
    out += rules.drop(tokens * C, rules.a) + rules.lora(tokens, _ATTN)
    if cross_len is not None:  # cross-attention: q reads the stream / norm, k and v the encoder memory
        out += rules.norm(norm, C, tokens) + rules.reads(("q_proj",), C, tokens)
        out += rules.attention(batch, q_len, cross_len, n_head, D, D, mask=cross_mask)
        out += rules.drop(tokens * C, rules.a) + rules.lora(tokens, ("q_proj", "o_proj"))
        out += rules.lora(batch * cross_len, ("k_proj", "v_proj"))
        if rules.autocast and rules.r == 4:  # each cross k/v casts the fp32 memory to bf16 for itself
            out += 2 * C * batch * cross_len * sum(rules.saves_input(n) for n in ("k_proj", "v_proj"))
    # MLP
    up = ("gate_proj", "up_proj") if gated else ("up_proj",)
    out += rules.norm(norm, C, tokens) + rules.reads(up, C, tokens) + rules.mlp(tokens, C, d_ff, gated, activation)
    out += rules.drop(tokens * C, rules.a) * (2 if mlp_dropout else 1)  # the block's (and the MLP's own)
    out += rules.lora(tokens, (*up, "down_proj"))
    return out


def _memory_reads(rules: _Saved, C: int, src_tokens: int) -> int:
    """The encoder output that every decoder layer's cross k/v read: one tensor kept for all of them, unless
    autocast casts it to bf16 for each reader (counted per layer in _block_bytes)."""
    if (rules.autocast and rules.r == 4) or not any(rules.saves_input(n) for n in ("k_proj", "v_proj")):
        return 0
    return rules.r * C * src_tokens


def _loss_bytes(vocab: int, rows: int) -> int:
    # cross_entropy on fp32 logits [rows, V]: log_softmax output and target ids saved; in backward the grads
    # of the log-probs and of the logits are both alive (the decoder count's convention)
    return (4 * vocab + 8) * rows + 2 * 4 * vocab * rows + 4


def encoder_activation_bytes(cfg: EncoderConfig, batch: int, seq: int, rules: _Saved, grad_checkpointing: bool,
                             mask_fraction: float = MLM_MASK_FRACTION) -> dict[str, int]:
    """Bytes autograd keeps for one masked-LM micro-batch of the Encoder (BERT: post-norm LayerNorm blocks, a
    padding mask, the MLM head at the masked positions only, training/objectives.masked_lm)."""
    C, tokens = cfg.d_model, batch * seq
    per_layer = _block_bytes(rules, norm="layernorm", d_model=C, d_ff=cfg.d_ff, gated=False,
                             activation=cfg.activation, n_head=cfg.n_head, head_dim=cfg.head_dim, batch=batch,
                             q_len=seq, self_mask="padding")
    if grad_checkpointing:
        layers = cfg.n_layer * rules.r * C * tokens + per_layer
    else:
        layers = cfg.n_layer * per_layer
    mask = batch * seq if rules.device == "cpu" and rules.autocast and seq <= MATMUL_ATTENTION_MAX_KEYS else 0
    embeddings = 0
    if rules.trainable_base:  # ids for the embedding grads (tokens, types, positions) and the embedding norm
        embeddings = 8 * tokens * (2 if cfg.type_vocab_size else 1) + 8 * seq + rules.norm("layernorm", C, tokens)
    embeddings += rules.drop(tokens * C, rules.r) + mask  # the padding mask masked_fill keeps, once for the stack
    picked = max(1, round(tokens * mask_fraction))
    head = tokens  # hidden[picked] keeps the bool mask
    head += (2 * rules.a * C + 8) * picked  # the activation's and the norm's inputs (+ norm statistics)
    if rules.trainable_base:  # mlm_dense's input and the tied projection's input
        head += 2 * rules.a * C * picked
    return {"layers": layers, "embeddings": embeddings, "final_norm_and_head": head,
            "logits_and_loss": _loss_bytes(cfg.vocab_size, picked)}


def seq2seq_activation_bytes(cfg: Seq2SeqConfig, batch: int, seq: int, target_len: int, rules: _Saved,
                             grad_checkpointing: bool) -> dict[str, int]:
    """Bytes autograd keeps for one teacher-forced micro-batch of Seq2Seq (training/objectives.seq2seq): an
    encoder over `seq` source tokens with a padding mask, a causal decoder over `target_len` tokens with
    cross-attention, a tied or separate head on every target position."""
    C, src, tgt = cfg.d_model, batch * seq, batch * target_len
    relative = cfg.positions == "relative"
    common = dict(norm=cfg.norm, d_model=C, d_ff=cfg.d_ff, gated=cfg.gated_mlp,
                  activation=cfg.activation, n_head=cfg.n_head, head_dim=cfg.head_dim, batch=batch, mlp_dropout=True)
    enc_layer = _block_bytes(rules, q_len=seq, self_mask="bias" if relative else "padding", **common)
    dec_layer = _block_bytes(rules, q_len=target_len, self_mask="bias" if relative else "causal",
                             cross_len=seq, cross_mask="padding", **common)
    if grad_checkpointing:
        layers = (cfg.n_encoder_layer * rules.r * C * src + enc_layer
                  + cfg.n_decoder_layer * rules.r * C * tgt + dec_layer)
    else:
        layers = cfg.n_encoder_layer * enc_layer + cfg.n_decoder_layer * dec_layer
    layers += _memory_reads(rules, C, src)
    if cfg.norm_first and not rules.trainable_base:  # each stack's first norm reads frozen embeddings: no grad
        layers -= rules.norm(cfg.norm, C, src) + rules.norm(cfg.norm, C, tgt)
    masks = 0
    if relative and rules.trainable_base:  # for the bias grads: the bool masks torch.where keeps
        masks += batch * seq + target_len * target_len  # (combine_mask) and the bucket ids [T, S] (int64)
        masks += 8 * (seq * seq + target_len * target_len)
    elif relative:  # a frozen bias goes to SDPA as a float mask it keeps, once per stack ([B|1, H, T, S])
        for rows, length in ((batch, seq), (1, target_len)):
            if not rules.matmul_attention(length):
                masks += 4 * rows * cfg.n_head * length * length
    elif rules.device == "cpu" and rules.autocast and not rules.dropout and seq <= MATMUL_ATTENTION_MAX_KEYS:
        masks += batch * seq  # the padding mask masked_fill keeps in cross-attention, once
    embeddings = masks + rules.drop((src + tgt) * C, rules.r)
    if rules.trainable_base:
        embeddings += 8 * (src + tgt)  # token ids for the embedding grad
        if cfg.positions == "learned":
            embeddings += 8 * (seq + target_len)
    final = rules.norm(cfg.norm, C, src) + rules.norm(cfg.norm, C, tgt) if cfg.final_norm else 0
    head = (rules.a * C * tgt if rules.trainable_base else 0) + final  # the head's input, for its weight grad
    return {"layers": layers, "embeddings": embeddings, "final_norm_and_head": head,
            "logits_and_loss": _loss_bytes(cfg.vocab_size, tgt)}


# ---------------------------------------------------------------------------------------- optimizer


def optimizer_bytes(optimizer: str, shapes: list[tuple[int, ...]]) -> int:
    """fp32 optimizer state for the trainable tensors `shapes`."""
    n = sum(math.prod(s) for s in shapes)
    if optimizer == "adamw":
        return 8 * n  # exp_avg and exp_avg_sq
    if optimizer == "sgd":
        return 0  # plain SGD (momentum 0) keeps no state
    if optimizer == "sgd-momentum":
        return 4 * n  # one momentum buffer
    if optimizer == "adafactor":
        # factored second moment (row + column sums) for matrices, full for vectors; no first moment (beta1=None)
        return sum(4 * (s[0] + math.prod(s[1:])) if len(s) >= 2 else 4 * math.prod(s) for s in shapes)
    raise LmstackError(f"unknown optimizer {optimizer!r}; use adamw, sgd, sgd-momentum or adafactor")


# --------------------------------------------------------------------------------------------- plan


def plan(*, model: str, precision: Precision = "fp32", method: Method = "full", optimizer: Optimizer = "adamw",
         batch: int = 1, seq: int = 512, grad_checkpointing: bool = False, gpus: int = 1,
         sharding: Sharding = "none", lora_rank: int = 8, lora_targets: str = "all-linear",
         peak_flops: float | None = None, mfu: float = 0.4, tokens: int | None = None,
         framework_overhead_bytes: int = FRAMEWORK_OVERHEAD_BYTES, device: Device = "cuda") -> dict[str, Any]:
    """Predict memory per device and compute for training a model, before running it.

    Every byte count is per device (per GPU).

    Args:
        model: a preset, a model name or path (only its config is read), or a JSON/YAML config file.
        precision: fp32, bf16 (mixed precision), or int8 / nf4 for a frozen base (lora / qlora).
        method: full fine-tuning, lora or qlora.
        optimizer: adamw, sgd, sgd-momentum or adafactor.
        batch: sequences per device per step.
        seq: tokens per sequence.
        grad_checkpointing: keep only each layer's input for the backward.
        gpus: number of devices.
        sharding: none or fsdp (ZeRO-3: weights, grads and optimizer states split over the devices).
        lora_rank: LoRA rank.
        lora_targets: all-linear or a comma list of q,k,v,o,gate,up,down.
        peak_flops: the device's peak FLOP/s, to estimate training time.
        mfu: the model FLOP utilization to assume for that estimate.
        tokens: training tokens (default: Chinchilla's 20 per parameter).
        framework_overhead_bytes: memory the framework takes besides the tensors (default: an idle torch process
            on CPU, measured by bench/plan_validate.py).
        device: cuda or cpu (a half-precision CPU step with up to 256 keys attends with plain matmuls, which
            keep the attention probabilities).
    """
    return plan_config(load_config(model), precision=precision, method=method, optimizer=optimizer, batch=batch,
                       seq=seq, grad_checkpointing=grad_checkpointing, gpus=gpus, sharding=sharding,
                       lora_rank=lora_rank, lora_targets=lora_targets, peak_flops=peak_flops, mfu=mfu,
                       tokens=tokens, framework_overhead_bytes=framework_overhead_bytes, device=device)


def plan_config(cfg: ModelConfig, precision: Precision = "fp32", method: Method = "full",
                optimizer: Optimizer = "adamw", batch: int = 1, seq: int = 512, grad_checkpointing: bool = False,
                gpus: int = 1, sharding: Sharding = "none", lora_rank: int = 8, lora_targets: str = "all-linear",
                peak_flops: float | None = None, mfu: float = 0.4, tokens: int | None = None,
                framework_overhead_bytes: int = FRAMEWORK_OVERHEAD_BYTES, device: Device = "cuda",
                target_len: int | None = None, mask_fraction: float = MLM_MASK_FRACTION) -> dict[str, Any]:
    """`plan` for a config object (what tests and the validation script use).

    Decoders train on `seq` tokens per sequence (causal LM); encoders on `seq` tokens with the MLM head at
    `mask_fraction` of them; encoder-decoders on `seq` source and `target_len` (default `seq`) target tokens."""
    _check_options(precision, method, optimizer, batch, seq, gpus, sharding, lora_rank, mfu, peak_flops, tokens,
                   device)
    target_len = seq if target_len is None else target_len
    if target_len < 1 or not 0 < mask_fraction <= 1:
        raise LmstackError(f"target_len must be >= 1 and mask_fraction in (0, 1], got {target_len}, {mask_fraction}")
    limited = getattr(cfg, "positions", None) != "relative"  # T5's relative positions have no length limit
    if limited and max(seq, target_len) > cfg.max_seq_len:
        raise LmstackError(f"seq {max(seq, target_len)} exceeds the model's max_seq_len {cfg.max_seq_len}")
    shape = model_shape(cfg)
    n = shape.parameters
    n_layer = cfg.n_layer if cfg.family != "seq2seq" else cfg.n_encoder_layer + cfg.n_decoder_layer
    full = method == "full"

    # ---- trainable parameters
    targets = [] if full else lora_targets_of(lora_targets, shape.block_linears)
    lora_shapes = [s for name, i, o in shape.linears if name in targets for s in ((lora_rank, i), (o, lora_rank))]
    trainable_shapes = shape.param_shapes if full else lora_shapes
    trainable = sum(math.prod(s) for s in trainable_shapes)

    # ---- weights, grads, optimizer (fp32 master / adapters in every mode)
    if full:
        weights = 4 * n
    else:
        weights = _frozen_base_bytes(shape, precision) + 4 * trainable
    grads = 4 * trainable
    opt = optimizer_bytes(optimizer, trainable_shapes)
    shard = gpus if sharding == "fsdp" else 1
    weights_dev, grads_dev, opt_dev = math.ceil(weights / shard), math.ceil(grads / shard), math.ceil(opt / shard)

    # ---- activations and compute-dtype copies
    autocast = precision != "fp32"
    if cfg.family == "decoder":
        act = activation_bytes(cfg, batch, seq, autocast=autocast, trainable_base=full, lora_targets=targets,
                               lora_rank=lora_rank, grad_checkpointing=grad_checkpointing, device=device)
    else:
        rules = _Saved(autocast=autocast, trainable_base=full, lora_targets=targets, lora_rank=lora_rank,
                       device=device, dropout=cfg.dropout)
        act = (encoder_activation_bytes(cfg, batch, seq, rules, grad_checkpointing, mask_fraction)
               if cfg.family == "encoder" else
               seq2seq_activation_bytes(cfg, batch, seq, target_len, rules, grad_checkpointing))
    activations = sum(act.values())
    # Autocast's bf16 copies of fp32 matmul weights live until backward: all of them for full bf16 training,
    # only the adapters' when the frozen base is already stored in bf16/int8/nf4.
    if autocast and full:
        cast_copies = 2 * shape.matmul_parameters
        if cfg.family == "encoder":  # the MLM head's tied projection is a matmul too; the [CLS] pooler is unused
            cast_copies += 2 * cfg.vocab_size * cfg.d_model * cfg.mlm_head - 2 * cfg.d_model ** 2 * cfg.cls_pooler
    elif autocast:
        # each stack's first q/k/v adapters read the frozen embeddings' stream: no grad flows to their input, so
        # autograd does not keep their lora_a copy
        stacks = 2 if cfg.family == "seq2seq" else 1
        first = stacks * sum(t in ("q_proj", "k_proj", "v_proj") for t in targets) * lora_rank * cfg.d_model
        cast_copies = 2 * (trainable - first)
    else:
        cast_copies = 0
    largest_linear = max(i * o for _, i, o in shape.linears)
    dequant = 2 * largest_linear if precision in ("int8", "nf4") else 0  # one dequantized bf16 weight at a time
    gather = 0
    if sharding == "fsdp" and gpus > 1:  # ZeRO-3 all-gathers the current and the prefetched layer
        gather = 2 * math.ceil(weights / n * shape.layer_parameters)  # at the average stored bytes per parameter
    total = (weights_dev + grads_dev + opt_dev + activations + cast_copies + dequant + gather
             + framework_overhead_bytes)

    # ---- compute
    d_attn = cfg.n_head * cfg.head_dim
    if full:
        flops_per_token = train_flops_per_token(shape.matmul_parameters, n_layer, d_attn, seq)
    else:  # frozen matmuls skip the weight gradient: 2N forward + 2N input-gradient
        flops_per_token = (train_flops_per_token(trainable, n_layer, d_attn, seq)
                           + 4.0 * shape.matmul_parameters)
    chinchilla = CHINCHILLA_TOKENS_PER_PARAM * n
    train_tokens = tokens if tokens is not None else chinchilla
    flops_total = flops_per_token * train_tokens
    time_s = flops_total / (peak_flops * mfu * gpus) if peak_flops else None

    rule = rule_of_thumb(n)
    rule["planned_bytes_per_param"] = {
        "weights": weights / n, "optimizer_states": opt / n, "gradients": grads / n,
        "activations_and_temp": (activations + cast_copies + dequant) / n}
    return {
        "model": cfg.name, "family": cfg.family, "precision": precision, "method": method, "optimizer": optimizer,
        "batch": batch, "seq": seq, "grad_checkpointing": grad_checkpointing, "gpus": gpus, "sharding": sharding,
        "device": device,
        "lora_rank": lora_rank if not full else None, "lora_targets": targets or None,
        "parameters": n, "trainable_parameters": trainable, "matmul_parameters": shape.matmul_parameters,
        "weights_bytes": weights_dev, "grads_bytes": grads_dev, "optimizer_bytes": opt_dev,
        "activations_bytes": activations, "activations_breakdown": act,
        "autocast_weight_copies_bytes": cast_copies, "dequant_buffer_bytes": dequant, "fsdp_gather_bytes": gather,
        "framework_overhead_bytes": framework_overhead_bytes, "total_bytes_per_device": total,
        "total_gb_per_device": total / GB,
        "train_flops_per_token": flops_per_token, "chinchilla_tokens": chinchilla, "train_tokens": train_tokens,
        "train_flops_total": flops_total, "train_flops_6nd": 6.0 * n * train_tokens,
        "peak_flops": peak_flops, "mfu": mfu, "time_s": time_s,
        "rule_of_thumb": rule, "conventions": _conventions(precision, method, optimizer),
    }


def _frozen_base_bytes(shape: Shape, precision: str) -> int:
    """Storage of the frozen base for LoRA/QLoRA: int8/nf4 quantize the blocks' Linear weights only."""
    if precision == "fp32":
        return 4 * shape.parameters
    if precision == "bf16":
        return 2 * shape.parameters
    linear_weights = sum(i * o for _, i, o in shape.linears)
    if precision == "int8":  # 1 byte per weight + an fp32 scale per output row
        quantized = sum(i * o + 4 * o for _, i, o in shape.linears)
    else:
        quantized = math.ceil(linear_weights * NF4_BITS_PER_PARAM / 8)
    return quantized + 2 * (shape.parameters - linear_weights)  # the rest (embeddings, norms, biases) in bf16


def _conventions(precision: str, method: str, optimizer: str) -> dict[str, str]:
    weights = {
        "fp32": "fp32 weights, grads, optimizer states and activations",
        "bf16": ("mixed precision as the trainer runs it: fp32 master weights, fp32 grads and optimizer states, "
                 "bf16 autocast for matmuls (+2 B per matmul weight for autocast's bf16 copies)"),
        "int8": "frozen base Linears in int8 with one fp32 scale per output row; compute in bf16 autocast",
        "nf4": "frozen base Linears in NF4 (block 64, double-quantized absmax: 4.127 bits); compute in bf16 autocast",
    }[precision]
    if method != "full":
        weights += "; base frozen, LoRA adapters trainable in fp32 (grads and optimizer states only for them)"
    return {"precision": weights, "optimizer": f"{optimizer}, states in fp32",
            "activations": ("tensors saved by autograd in lmstack's blocks: SDPA without a TxT matrix, "
                            "except half-precision CPU steps up to 256 keys (matmul attention) and, on CPU, "
                            "attention with dropout or a trainable relative-position bias (SDPA's math path); "
                            "encoders: masked LM with the head at 15% of the positions; encoder-decoders: "
                            "seq source and seq target tokens"),
            "fsdp": "ZeRO-3: weights, grads and optimizer states divided by the GPU count; activations are not"}


def _check_options(precision: str, method: str, optimizer: str, batch: int, seq: int, gpus: int, sharding: str,
                   lora_rank: int, mfu: float, peak_flops: float | None, tokens: int | None, device: str) -> None:
    if device not in ("cuda", "cpu"):
        raise LmstackError(f"unknown device {device!r}; use cuda or cpu")
    if precision not in ("fp32", "bf16", "int8", "nf4"):
        raise LmstackError(f"unknown precision {precision!r}; use fp32, bf16, int8 or nf4")
    if method not in ("full", "lora", "qlora"):
        raise LmstackError(f"unknown method {method!r}; use full, lora or qlora")
    if method == "full" and precision in ("int8", "nf4"):
        raise LmstackError(f"full fine-tuning cannot use {precision} weights: an optimizer step needs weights it "
                           "can update in small increments, and int8/nf4 codes cannot hold them; use --method "
                           "qlora (frozen quantized base + trainable adapters) or precision fp32/bf16")
    if method == "qlora" and precision not in ("int8", "nf4"):
        raise LmstackError(f"qlora keeps the frozen base quantized; use precision nf4 (or int8), not {precision!r} "
                           "(or --method lora for an fp32/bf16 base)")
    optimizer_bytes(optimizer, [])  # validates the name
    if sharding not in ("none", "fsdp"):
        raise LmstackError(f"unknown sharding {sharding!r}; use none or fsdp")
    for name, value in (("batch", batch), ("seq", seq), ("gpus", gpus), ("lora_rank", lora_rank)):
        if value < 1:
            raise LmstackError(f"{name} must be >= 1, got {value}")
    if not 0 < mfu <= 1:
        raise LmstackError(f"mfu must be in (0, 1], got {mfu}")
    if peak_flops is not None and peak_flops <= 0:
        raise LmstackError(f"peak_flops must be > 0, got {peak_flops}")
    if tokens is not None and tokens < 1:
        raise LmstackError(f"tokens must be >= 1, got {tokens}")
