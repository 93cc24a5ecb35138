"""Hugging Face folders: import Llama (and Mistral), GPT-2, BERT and T5 checkpoints; export the first three back.

Import reads config.json, every *.safetensors file (sharded or not), the tokenizer files and, for
sentence-transformers folders, the pooling/normalize modules. It returns lmstack's config, a state dict in
lmstack key names, the tokenizer and metadata. Export writes what `transformers.AutoModelForCausalLM`
(llama, gpt2) and `AutoModel` / `AutoModelForMaskedLM` (bert) load with the same outputs.

Key maps (HF -> lmstack), per layer i:
  llama  model.embed_tokens -> tok_emb, model.layers.i.self_attn.{q,k,v,o}_proj -> layers.i.attn.*,
         mlp.{gate,up,down}_proj -> layers.i.mlp.*, input_layernorm -> attn_norm,
         post_attention_layernorm -> mlp_norm, model.norm -> norm, lm_head -> lm_head (absent when tied)
  gpt2   wte/wpe -> tok_emb/pos_emb, h.i.ln_1/ln_2 -> attn_norm/mlp_norm, attn.c_attn (fused q|k|v, Conv1D
         = transposed Linear) -> attn.{q,k,v}_proj, attn.c_proj -> o_proj, mlp.c_fc/c_proj -> up/down_proj
  bert   embeddings.{word,position,token_type}_embeddings/LayerNorm -> tok_emb/pos_emb/type_emb/emb_norm,
         encoder.layer.i.attention.self.{query,key,value} -> attn.{q,k,v}_proj, attention.output.dense ->
         o_proj, attention.output.LayerNorm -> attn_norm, intermediate.dense/output.dense -> mlp.up/down_proj,
         output.LayerNorm -> mlp_norm, pooler.dense -> pooler, cls.predictions.* -> mlm_dense/mlm_norm/mlm_bias
  t5     shared -> tok_emb, {encoder,decoder}.block.i.layer.N.{SelfAttention,EncDecAttention}.{q,k,v,o} ->
         {encoder,decoder}_layers.i.{attn,cross_attn}.*_proj, DenseReluDense.{wi,wi_0,wi_1,wo} ->
         mlp.{up,gate,up,down}_proj, layer_norm -> that sublayer's norm, block.0 relative_attention_bias ->
         {encoder,decoder}_rel_bias, final_layer_norm -> {encoder,decoder}_norm
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lmstack.checkpoints.native import read_safetensors
from lmstack.config import DecoderConfig, EncoderConfig, ModelConfig, Seq2SeqConfig
from lmstack.errors import LmstackError
from lmstack.io import atomic_write, atomic_write_json, read_json
from lmstack.tokenizer import Tokenizer, _special

SUPPORTED = ("llama", "mistral", "gpt2", "bert", "t5")

# HF activation names <-> lmstack's. gelu_new and gelu_pytorch_tanh are both the tanh approximation.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                  "silu": "silu", "swish": "silu"}
GPT2_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}

# Tensors that HF checkpoints carry but that are not weights (buffers of older transformers versions) or that
# belong to heads lmstack does not have (BERT's next-sentence classifier).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias", "embeddings.position_ids")
IGNORED_PREFIXES = ("cls.seq_relationship.",)


# ------------------------------------------------------------------------------------------ import


def load_hf(path: Path) -> tuple[ModelConfig, dict[str, Tensor], Tokenizer | None, dict]:
    """Read an HF model folder into (config, lmstack state dict, tokenizer or None, metadata)."""
    path = Path(path)
    hf = read_json(path / "config.json")
    model_type = hf.get("model_type")
    if model_type not in IMPORTERS:
        raise LmstackError(f"{path / 'config.json'}: unsupported architecture {model_type!r} "
                           f"(supported: {', '.join(SUPPORTED)})")
    weights = read_hf_weights(path)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
    try:
        config, state = IMPORTERS[model_type](hf, weights, path, tokenizer)
    except KeyError as e:
        raise LmstackError(f"{path / 'config.json'}: missing field {e.args[0]!r} for {model_type}") from None
    leftover = sorted(k for k in weights if not k.endswith(IGNORED_SUFFIXES) and not k.startswith(IGNORED_PREFIXES))
    if leftover:
        raise LmstackError(f"{path}: tensors this {model_type} importer does not know: "
                           f"{', '.join(leftover[:5])}{' ...' if len(leftover) > 5 else ''}")
    metadata = {"source_format": "hf", "hf_model_type": model_type,
                "hf_architectures": hf.get("architectures") or []}
    return config, state, tokenizer, metadata


def read_hf_weights(path: Path) -> dict[str, Tensor]:
    """All tensors of the folder's safetensors files: model.safetensors, or the shards an index names."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LmstackError(f"{index}: no weight_map")
        files = sorted({path / name for name in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        if pickles:
            raise LmstackError(f"{path}: only pickle weights ({', '.join(pickles[:3])}); lmstack never unpickles, "
                               "convert them to safetensors first")
        raise LmstackError(f"{path}: no *.safetensors weights found")
    weights: dict[str, Tensor] = {}
    for file in files:
        part = read_safetensors(file)
        clash = set(part) & set(weights)
        if clash:
            raise LmstackError(f"{file}: tensor {sorted(clash)[0]} also appears in another shard")
        weights.update(part)
    return weights


class _Take:
    """Pops tensors by HF name, so whatever is left over at the end was not understood."""

    def __init__(self, weights: dict[str, Tensor], path: Path, prefix: str = "") -> None:
        self.weights, self.path, self.prefix = weights, path, prefix

    def has(self, key: str) -> bool:
        return self.prefix + key in self.weights

    def __call__(self, key: str) -> Tensor:
        full = self.prefix + key
        if full not in self.weights:
            raise LmstackError(f"{self.path}: tensor {full} is missing from the checkpoint")
        return self.weights.pop(full)

    def optional(self, key: str) -> Tensor | None:
        return self.weights.pop(self.prefix + key, None)


def _first_id(value: Any) -> int | None:
    # eos_token_id may be a list (several stop tokens); lmstack's config keeps the first.
    return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None


def _activation(hf: dict[str, Any], key: str, default: str, path: Path) -> str:
    name = hf.get(key, default)
    if name not in HF_ACTIVATIONS:
        raise LmstackError(f"{path / 'config.json'}: unsupported {key} {name!r} "
                           f"(supported: {', '.join(HF_ACTIVATIONS)})")
    return HF_ACTIVATIONS[name]


def _tied_head(take: _Take, key: str, tie: bool, path: Path) -> Tensor | None:
    """The output head: None when tied (transformers then ignores any stored copy), else the stored matrix."""
    head = take.optional(key)
    if tie:
        return None
    if head is None:
        raise LmstackError(f"{path}: tie_word_embeddings is false but {take.prefix + key} is missing")
    return head


# ------------------------------------------------------------------------------------ llama/mistral


def _import_llama(hf: dict[str, Any], weights: dict[str, Tensor], path: Path,
                  tokenizer: Tokenizer | None) -> tuple[DecoderConfig, dict]:
    # transformers 5 keeps RoPE settings in rope_parameters; older files have rope_theta + rope_scaling.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise LmstackError(f"{path / 'config.json'}: RoPE scaling {rope_type!r} is not supported")
    if hf.get("pretraining_tp", 1) != 1:
        raise LmstackError(f"{path / 'config.json'}: pretraining_tp={hf['pretraining_tp']} is not supported")
    max_len = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window") if hf.get("model_type") == "mistral" else None
    if window and window < max_len:
        max_len = window  # attention is full within the window, so lmstack stays exact up to it
    n_head = hf["num_attention_heads"]
    cfg = DecoderConfig(
        name=path.name, vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
        d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head, max_seq_len=max_len, positions="rope",
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), activation=_activation(hf, "hidden_act", "silu", path),
        gated_mlp=True, attn_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), bos_token_id=_first_id(hf.get("bos_token_id")),
        eos_token_id=_first_id(hf.get("eos_token_id")), pad_token_id=_first_id(hf.get("pad_token_id")))
    take = _Take(weights, path)
    state = {"tok_emb.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    bias = ("weight", "bias") if cfg.attn_bias else ("weight",)
    mlp_bias = ("weight", "bias") if cfg.mlp_bias else ("weight",)
    for i in range(cfg.n_layer):
        hf_l, l = f"model.layers.{i}.", f"layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for p in bias:
                state[f"{l}attn.{proj}.{p}"] = take(f"{hf_l}self_attn.{proj}.{p}")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for p in mlp_bias:
                state[f"{l}mlp.{proj}.{p}"] = take(f"{hf_l}mlp.{proj}.{p}")
        state[f"{l}attn_norm.weight"] = take(f"{hf_l}input_layernorm.weight")
        state[f"{l}mlp_norm.weight"] = take(f"{hf_l}post_attention_layernorm.weight")
    head = _tied_head(take, "lm_head.weight", cfg.tie_embeddings, path)
    if head is not None:
        state["lm_head.weight"] = head
    return cfg, state


# ------------------------------------------------------------------------------------------- gpt-2


def _import_gpt2(hf: dict[str, Any], weights: dict[str, Tensor], path: Path,
                 tokenizer: Tokenizer | None) -> tuple[DecoderConfig, dict]:
    for flag, ok in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                     ("scale_attn_weights", True)):
        if bool(hf.get(flag, ok)) != ok:
            raise LmstackError(f"{path / 'config.json'}: GPT-2 with {flag}={hf[flag]} is not supported")
    d = hf["n_embd"]
    cfg = DecoderConfig(
        name=path.name, vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
        n_head=hf["n_head"], d_model=d, d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf.get("n_positions", 1024),
        positions="learned", norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=_activation(hf, "activation_function", "gelu_new", path), gated_mlp=False, attn_bias=True,
        mlp_bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=_first_id(hf.get("bos_token_id")), eos_token_id=_first_id(hf.get("eos_token_id")),
        pad_token_id=_first_id(hf.get("pad_token_id")))
    # GPT2LMHeadModel prefixes "transformer."; the original hub files (GPT2Model) do not.
    take = _Take(weights, path, "transformer." if "transformer.wte.weight" in weights else "")
    state = {"tok_emb.weight": take("wte.weight"), "pos_emb.weight": take("wpe.weight"),
             "norm.weight": take("ln_f.weight"), "norm.bias": take("ln_f.bias")}
    for i in range(cfg.n_layer):
        hf_l, l = f"h.{i}.", f"layers.{i}."
        # Conv1D stores [in, out]; Linear wants [out, in]. c_attn's output columns are q | k | v.
        q, k, v = take(f"{hf_l}attn.c_attn.weight").t().chunk(3, dim=0)  # 3 x [C, C]
        qb, kb, vb = take(f"{hf_l}attn.c_attn.bias").chunk(3)
        for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            state[f"{l}attn.{name}.weight"], state[f"{l}attn.{name}.bias"] = w.contiguous(), b.contiguous()
        for hf_name, name in (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"),
                              ("mlp.c_proj", "mlp.down_proj")):
            state[f"{l}{name}.weight"] = take(f"{hf_l}{hf_name}.weight").t().contiguous()
            state[f"{l}{name}.bias"] = take(f"{hf_l}{hf_name}.bias")
        for hf_name, name in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            state[f"{l}{name}.weight"] = take(f"{hf_l}{hf_name}.weight")
            state[f"{l}{name}.bias"] = take(f"{hf_l}{hf_name}.bias")
    head = _tied_head(_Take(weights, path), "lm_head.weight", cfg.tie_embeddings, path)
    if head is not None:
        state["lm_head.weight"] = head
    return cfg, state


# -------------------------------------------------------------------------------------------- bert

BERT_LAYER = {  # lmstack suffix -> HF suffix, inside layer i
    "attn.q_proj": "attention.self.query", "attn.k_proj": "attention.self.key",
    "attn.v_proj": "attention.self.value", "attn.o_proj": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm", "mlp.up_proj": "intermediate.dense",
    "mlp.down_proj": "output.dense", "mlp_norm": "output.LayerNorm"}
BERT_EMBEDDINGS = {"tok_emb": "embeddings.word_embeddings", "pos_emb": "embeddings.position_embeddings",
                   "type_emb": "embeddings.token_type_embeddings", "emb_norm": "embeddings.LayerNorm"}
BERT_MLM = {"mlm_dense": "cls.predictions.transform.dense", "mlm_norm": "cls.predictions.transform.LayerNorm"}


def _import_bert(hf: dict[str, Any], weights: dict[str, Tensor], path: Path,
                 tokenizer: Tokenizer | None) -> tuple[EncoderConfig, dict]:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise LmstackError(f"{path / 'config.json'}: position_embedding_type "
                           f"{hf['position_embedding_type']!r} is not supported (only absolute)")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise LmstackError(f"{path / 'config.json'}: BERT as a decoder is not supported")
    # BertForMaskedLM / BertForPreTraining prefix the encoder with "bert."; BertModel does not.
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights else ""
    take, head = _Take(weights, path, prefix), _Take(weights, path)
    has_mlm = head.has("cls.predictions.transform.dense.weight")
    cfg = EncoderConfig(
        name=path.name, vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2), norm_eps=hf.get("layer_norm_eps", 1e-12),
        activation=_activation(hf, "hidden_act", "gelu", path), pad_token_id=_first_id(hf.get("pad_token_id")) or 0,
        mask_token_id=_mask_token_id(path, tokenizer), mlm_head=has_mlm, cls_pooler=take.has("pooler.dense.weight"),
        **_sentence_transformers_settings(path))
    state: dict[str, Tensor] = {}
    for ours, theirs in BERT_EMBEDDINGS.items():
        _copy_linear(state, ours, theirs, take, weight_only=ours.endswith("_emb"))
    for i in range(cfg.n_layer):
        for ours, theirs in BERT_LAYER.items():
            _copy_linear(state, f"layers.{i}.{ours}", f"encoder.layer.{i}.{theirs}", take)
    if cfg.cls_pooler:
        _copy_linear(state, "pooler", "pooler.dense", take)
    if has_mlm:
        for ours, theirs in BERT_MLM.items():
            _copy_linear(state, ours, theirs, head)
        bias = head.optional("cls.predictions.bias")
        decoder_bias = head.optional("cls.predictions.decoder.bias")  # a tied copy of the same bias
        state["mlm_bias"] = bias if bias is not None else head("cls.predictions.decoder.bias")
        # (plan.py runs the importers on meta tensors, which have no values to compare.)
        if decoder_bias is not None and not decoder_bias.is_meta and not torch.equal(decoder_bias, state["mlm_bias"]):
            raise LmstackError(f"{path}: cls.predictions.decoder.bias differs from cls.predictions.bias")
        if _tied_head(head, "cls.predictions.decoder.weight", bool(hf.get("tie_word_embeddings", True)),
                      path) is not None:
            raise LmstackError(f"{path}: an MLM decoder untied from the word embeddings is not supported")
    return cfg, state


def _copy_linear(state: dict[str, Tensor], ours: str, theirs: str, take: _Take, weight_only: bool = False) -> None:
    state[f"{ours}.weight"] = take(f"{theirs}.weight")
    if not weight_only:
        state[f"{ours}.bias"] = take(f"{theirs}.bias")


def _mask_token_id(path: Path, tokenizer: Tokenizer | None) -> int | None:
    """[MASK]'s id: the mask token tokenizer_config.json names, looked up in the tokenizer."""
    cfg_file = path / "tokenizer_config.json"
    if tokenizer is None or not cfg_file.exists():
        return None
    return tokenizer.token_to_id(_special(read_json(cfg_file).get("mask_token")))


def _sentence_transformers_settings(path: Path) -> dict[str, Any]:
    """pooling, normalize_embeddings and embed_max_len from a sentence-transformers folder ({} otherwise)."""
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return {}
    settings: dict[str, Any] = {"normalize_embeddings": False}
    for module in read_json(modules_file):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Transformer":
            st_cfg = path / module.get("path", "") / "sentence_bert_config.json"
            if st_cfg.exists() and read_json(st_cfg).get("max_seq_length"):
                settings["embed_max_len"] = int(read_json(st_cfg)["max_seq_length"])
        elif kind == "Pooling":
            settings["pooling"] = _pooling_mode(path / module.get("path", "1_Pooling") / "config.json")
        elif kind == "Normalize":
            settings["normalize_embeddings"] = True
        else:
            raise LmstackError(f"{modules_file}: sentence-transformers module {kind!r} is not supported "
                               "(supported: Transformer, Pooling, Normalize)")
    return settings


def _pooling_mode(file: Path) -> str:
    cfg = read_json(file)
    if isinstance(cfg.get("pooling_mode"), str):  # newer sentence-transformers write the mode by name
        modes = [cfg["pooling_mode"]]
    else:
        modes = [k.removeprefix("pooling_mode_").removesuffix("_token").removesuffix("_tokens")
                 for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
    if modes not in (["cls"], ["mean"]):
        raise LmstackError(f"{file}: pooling {'+'.join(modes) or 'none'} is not supported (only cls or mean)")
    return modes[0]


# ------------------------------------------------------------------------------------------------ t5

_T5_ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu_tanh", "gelu": "gelu", "silu": "silu"}


def config_from_hf_t5(hf: dict[str, Any], name: str = "t5") -> Seq2SeqConfig:
    """A Seq2SeqConfig from an HF T5 config.json dict (T5 and T5 v1.1: relu or gated-gelu)."""
    proj = hf.get("feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    act = "gelu_new" if proj == "gated-gelu" else proj.removeprefix("gated-")  # HF's own special case
    if act not in _T5_ACTIVATIONS:
        raise LmstackError(f"unsupported T5 feed_forward_proj {proj!r}")
    tied = hf.get("tie_word_embeddings", True)
    # T5 v1.1 config.json files say tie_word_embeddings=false and have no scaling; transformers 5 always ties
    # and writes the scaling as `scale_decoder_outputs` instead.
    scale = hf.get("scale_decoder_outputs", tied)
    return Seq2SeqConfig(
        name=name, vocab_size=hf["vocab_size"], n_encoder_layer=hf["num_layers"],
        n_decoder_layer=hf.get("num_decoder_layers") or hf["num_layers"], n_head=hf["num_heads"],
        d_model=hf["d_model"], d_ff=hf["d_ff"], head_dim=hf["d_kv"], max_seq_len=hf.get("n_positions", 512),
        positions="relative", relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128), norm="rmsnorm", norm_first=True,
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), activation=_T5_ACTIVATIONS[act], gated_mlp=gated,
        bias=False, tie_embeddings=tied, scale_embeddings=False, final_norm=True, attn_scale=1.0,
        scale_decoder_outputs=scale, dropout=hf.get("dropout_rate", 0.1),
        pad_token_id=hf.get("pad_token_id", 0), bos_token_id=hf.get("decoder_start_token_id", 0),
        eos_token_id=hf.get("eos_token_id", 1))


_T5_KEY = re.compile(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d)\.(.+)")
_T5_SUBLAYERS = {"encoder": (("attn", "attn_norm"), ("mlp", "mlp_norm")),  # HF layer.N -> (module, its norm)
                 "decoder": (("attn", "attn_norm"), ("cross_attn", "cross_norm"), ("mlp", "mlp_norm"))}
_T5_LINEARS = {"SelfAttention.q": "q_proj", "SelfAttention.k": "k_proj", "SelfAttention.v": "v_proj",
               "SelfAttention.o": "o_proj", "EncDecAttention.q": "q_proj", "EncDecAttention.k": "k_proj",
               "EncDecAttention.v": "v_proj", "EncDecAttention.o": "o_proj", "DenseReluDense.wi": "up_proj",
               "DenseReluDense.wi_0": "gate_proj", "DenseReluDense.wi_1": "up_proj",
               "DenseReluDense.wo": "down_proj"}


def from_hf_t5_state_dict(hf_state: dict[str, Tensor], config: Seq2SeqConfig) -> dict[str, Tensor]:
    """Rename an HF T5ForConditionalGeneration state dict to Seq2Seq keys (tied copies are dropped)."""
    out: dict[str, Tensor] = {}
    for key, tensor in hf_state.items():
        if key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight") or (
                key == "lm_head.weight" and config.tie_embeddings):
            continue  # copies of shared.weight
        if key == "shared.weight":
            out["tok_emb.weight"] = tensor
        elif key == "lm_head.weight":
            out["lm_head.weight"] = tensor
        elif key in ("encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"):
            out[f"{key.split('.')[0]}_norm.weight"] = tensor
        elif (m := _T5_KEY.fullmatch(key)) is None:
            raise LmstackError(f"unexpected T5 weight {key!r}")
        else:
            stack, block, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
            if sub >= len(_T5_SUBLAYERS[stack]):
                raise LmstackError(f"unexpected T5 weight {key!r}")
            module, norm = _T5_SUBLAYERS[stack][sub]
            prefix = f"{stack}_layers.{block}"
            if rest == "layer_norm.weight":
                out[f"{prefix}.{norm}.weight"] = tensor
            elif rest.endswith("relative_attention_bias.weight"):
                if rest.startswith("SelfAttention") and block == 0:
                    out[f"{stack}_rel_bias.weight"] = tensor
                # HF also stores an unused cross-attention table in some checkpoints; it has no effect there.
                elif not rest.startswith("EncDecAttention"):
                    raise LmstackError(f"unexpected T5 weight {key!r}")
            elif rest.removesuffix(".weight") in _T5_LINEARS:
                out[f"{prefix}.{module}.{_T5_LINEARS[rest.removesuffix('.weight')]}.weight"] = tensor
            else:
                raise LmstackError(f"unexpected T5 weight {key!r}")
    return out


def _import_t5(hf: dict[str, Any], weights: dict[str, Tensor], path: Path,
               tokenizer: Tokenizer | None) -> tuple[Seq2SeqConfig, dict]:
    try:
        cfg = config_from_hf_t5(hf, name=path.name)
        state = from_hf_t5_state_dict(weights, cfg)
    except LmstackError as e:
        raise LmstackError(f"{path}: {e}") from None
    weights.clear()  # from_hf_t5_state_dict refuses any tensor it does not map, so nothing is left over
    return cfg, state


Importer = Callable[[dict[str, Any], dict[str, Tensor], Path, Tokenizer | None], tuple[ModelConfig, dict]]
IMPORTERS: dict[str, Importer] = {
    "llama": _import_llama, "mistral": _import_llama, "gpt2": _import_gpt2, "bert": _import_bert, "t5": _import_t5}


# ------------------------------------------------------------------------------------------ export


def export_hf(model: nn.Module, tokenizer: Tokenizer | None, out_dir: str | Path) -> Path:
    """Write config.json + model.safetensors (+ tokenizer, + sentence-transformers modules for encoders)."""
    cfg = model.config
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if cfg.family == "decoder":
        hf, weights = _export_llama(cfg, state) if cfg.positions == "rope" else _export_gpt2(cfg, state)
    elif cfg.family == "encoder":
        hf, weights = _export_bert(cfg, state)
    else:
        raise LmstackError(f"HF export supports decoder (llama, gpt2) and encoder (bert) models, not {cfg.family}")
    if state:  # e.g. LoRA or quantizer tensors that no HF key holds
        raise LmstackError(f"cannot export to HF: no HF name for {', '.join(sorted(state)[:5])} "
                           "(merge LoRA / dequantize first)")
    dtype = next(iter(weights.values())).dtype
    hf.update(dtype=str(dtype).removeprefix("torch."), torch_dtype=str(dtype).removeprefix("torch."))
    out = Path(out_dir)
    weights = {k: v.contiguous() for k, v in weights.items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
    atomic_write_json(out / "config.json", hf)
    if tokenizer is not None:
        tokenizer.save(out)
        if cfg.family == "encoder":
            _add_bert_special_tokens(out, tokenizer, cfg)
    if cfg.family == "encoder":
        _write_sentence_transformers(out, cfg)
    return out


class _Give:
    """Pops lmstack tensors by name, so anything left at the end has no HF home."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        self.state = state

    def __call__(self, key: str) -> Tensor:
        if key not in self.state:
            raise LmstackError(f"cannot export to HF: the model has no tensor {key} (quantized or modified?)")
        return self.state.pop(key)


def _require(cfg: ModelConfig, arch: str, checks: dict[str, bool]) -> None:
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise LmstackError(f"cannot export {cfg.name!r} as HF {arch}: needs {', '.join(failed)}")


def _export_llama(cfg: DecoderConfig, state: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    _require(cfg, "llama", {"norm=rmsnorm": cfg.norm == "rmsnorm", "gated_mlp=True": cfg.gated_mlp,
                            "activation=silu": cfg.activation == "silu"})
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
          "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
          "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
          "rope_theta": cfg.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
          "attention_bias": cfg.attn_bias, "mlp_bias": cfg.mlp_bias, "tie_word_embeddings": cfg.tie_embeddings,
          "attention_dropout": cfg.dropout, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
          "pad_token_id": cfg.pad_token_id}
    give = _Give(state)
    w = {"model.embed_tokens.weight": give("tok_emb.weight"), "model.norm.weight": give("norm.weight")}
    for i in range(cfg.n_layer):
        hf_l, l = f"model.layers.{i}.", f"layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for p in ("weight", "bias") if cfg.attn_bias else ("weight",):
                w[f"{hf_l}self_attn.{proj}.{p}"] = give(f"{l}attn.{proj}.{p}")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for p in ("weight", "bias") if cfg.mlp_bias else ("weight",):
                w[f"{hf_l}mlp.{proj}.{p}"] = give(f"{l}mlp.{proj}.{p}")
        w[f"{hf_l}input_layernorm.weight"] = give(f"{l}attn_norm.weight")
        w[f"{hf_l}post_attention_layernorm.weight"] = give(f"{l}mlp_norm.weight")
    if not cfg.tie_embeddings:
        w["lm_head.weight"] = give("lm_head.weight")
    return hf, w


def _export_gpt2(cfg: DecoderConfig, state: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    _require(cfg, "gpt2", {"positions=learned": cfg.positions == "learned",
                           "norm=layernorm": cfg.norm == "layernorm", "gated_mlp=False": not cfg.gated_mlp,
                           "attn_bias and mlp_bias": cfg.attn_bias and cfg.mlp_bias,
                           "n_kv_head=n_head": cfg.n_kv_head == cfg.n_head,
                           "head_dim=d_model/n_head": cfg.head_dim * cfg.n_head == cfg.d_model,
                           "a gelu/gelu_tanh/relu/silu activation": cfg.activation in GPT2_ACTIVATIONS})
    hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
          "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
          "n_inner": cfg.d_ff, "activation_function": GPT2_ACTIVATIONS[cfg.activation],
          "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
          "attn_pdrop": cfg.dropout, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_token_id,
          "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    give = _Give(state)
    w = {"transformer.wte.weight": give("tok_emb.weight"), "transformer.wpe.weight": give("pos_emb.weight"),
         "transformer.ln_f.weight": give("norm.weight"), "transformer.ln_f.bias": give("norm.bias")}
    for i in range(cfg.n_layer):
        hf_l, l = f"transformer.h.{i}.", f"layers.{i}."
        # Fuse q | k | v back into c_attn and store every projection as Conv1D ([in, out]).
        w[f"{hf_l}attn.c_attn.weight"] = torch.cat([give(f"{l}attn.{p}_proj.weight") for p in "qkv"]).t()
        w[f"{hf_l}attn.c_attn.bias"] = torch.cat([give(f"{l}attn.{p}_proj.bias") for p in "qkv"])
        for hf_name, name in (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"),
                              ("mlp.c_proj", "mlp.down_proj")):
            w[f"{hf_l}{hf_name}.weight"] = give(f"{l}{name}.weight").t()
            w[f"{hf_l}{hf_name}.bias"] = give(f"{l}{name}.bias")
        for hf_name, name in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            w[f"{hf_l}{hf_name}.weight"] = give(f"{l}{name}.weight")
            w[f"{hf_l}{hf_name}.bias"] = give(f"{l}{name}.bias")
    if not cfg.tie_embeddings:
        w["lm_head.weight"] = give("lm_head.weight")
    return hf, w


def _export_bert(cfg: EncoderConfig, state: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    _require(cfg, "bert", {"a gelu/gelu_tanh/relu/silu activation": cfg.activation in GPT2_ACTIVATIONS,
                           "type_vocab_size>0": cfg.type_vocab_size > 0})
    hf = {"architectures": ["BertForMaskedLM" if cfg.mlm_head else "BertModel"], "model_type": "bert",
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
          "num_attention_heads": cfg.n_head, "intermediate_size": cfg.d_ff,
          "hidden_act": GPT2_ACTIVATIONS[cfg.activation], "hidden_dropout_prob": cfg.dropout,
          "attention_probs_dropout_prob": cfg.dropout, "max_position_embeddings": cfg.max_seq_len,
          "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.norm_eps, "pad_token_id": cfg.pad_token_id,
          "position_embedding_type": "absolute", "tie_word_embeddings": True}
    # BertForMaskedLM nests the encoder under "bert."; BertModel keeps it at the top level.
    prefix = "bert." if cfg.mlm_head else ""
    give = _Give(state)
    w: dict[str, Tensor] = {}
    names = dict(BERT_EMBEDDINGS)
    names.update({f"layers.{i}.{ours}": f"encoder.layer.{i}.{theirs}"
                  for i in range(cfg.n_layer) for ours, theirs in BERT_LAYER.items()})
    if cfg.cls_pooler:
        names["pooler"] = "pooler.dense"
    for ours, theirs in names.items():
        for p in ("weight", "bias"):
            if f"{ours}.{p}" in state:
                w[f"{prefix}{theirs}.{p}"] = give(f"{ours}.{p}")
    if cfg.mlm_head:
        for ours, theirs in BERT_MLM.items():
            for p in ("weight", "bias"):
                w[f"{theirs}.{p}"] = give(f"{ours}.{p}")
        w["cls.predictions.bias"] = give("mlm_bias")
    return hf, w


def _add_bert_special_tokens(out: Path, tokenizer: Tokenizer, cfg: EncoderConfig) -> None:
    """tokenizer_config.json names [CLS]/[SEP]/[MASK]/[PAD]/[UNK] so transformers' pipelines find them."""
    file = out / "tokenizer_config.json"
    tok_cfg = json.loads(file.read_text(encoding="utf-8"))
    backend = tokenizer.backend
    named = {"mask_token": backend.id_to_token(cfg.mask_token_id) if cfg.mask_token_id is not None else None,
             "pad_token": backend.id_to_token(cfg.pad_token_id)}
    named.update({key: tok for key, tok in (("cls_token", "[CLS]"), ("sep_token", "[SEP]"), ("unk_token", "[UNK]"))
                  if backend.token_to_id(tok) is not None})
    tok_cfg.update({k: v for k, v in named.items() if v is not None and k not in tok_cfg})
    atomic_write_json(file, tok_cfg)


def _write_sentence_transformers(out: Path, cfg: EncoderConfig) -> None:
    """modules.json + 1_Pooling so `SentenceTransformer(out)` pools and normalizes as lmstack does."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if cfg.normalize_embeddings:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    atomic_write_json(out / "modules.json", modules)
    atomic_write_json(out / "sentence_bert_config.json",
                      {"max_seq_length": cfg.embed_max_len or cfg.max_seq_len, "do_lower_case": False})
    atomic_write_json(out / "1_Pooling" / "config.json",
                      {"word_embedding_dimension": cfg.d_model, "pooling_mode_cls_token": cfg.pooling == "cls",
                       "pooling_mode_mean_tokens": cfg.pooling == "mean", "pooling_mode_max_tokens": False,
                       "pooling_mode_mean_sqrt_len_tokens": False})
