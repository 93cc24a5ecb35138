"""The verbs of the `lmstack` CLI as typed Python functions: the function signature is the CLI.

`lmstack.cli` turns each function here into a command: positional parameters become arguments, keyword-only
parameters become `--options`, and the docstring's summary and `Args:` lines become the help text. Parameters
the CLI cannot express (callbacks, streams) are left out there and stay available to Python callers.

    from lmstack import commands
    commands.convert("smollm2-135m-instruct", "runs/smollm2", to="native")

(`generate` and `chat` live in `lmstack.generation.chat`.)

Heavy modules (torch, the models) are imported inside the functions, so `lmstack --help` starts fast.
"""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from lmstack.errors import LmstackError
from lmstack.evaluation.command import evaluate  # noqa: F401  (`lmstack eval`; light: imports on call)
from lmstack.generation.chat import DEFAULT_MODEL, DType  # noqa: F401  (light: no torch at import)

# -------------------------------------------------------------------------------------------- models


@dataclass
class ModelEntry:
    """One row of `lmstack models list`."""

    name: str
    kind: Literal["model", "preset"]
    description: str
    installed: bool  # weights are on this machine (presets have none: always False)
    path: str | None = None


def list_models() -> list[ModelEntry]:
    """Registry models (with weights, from installed packages) and config presets (architectures, no weights)."""
    from lmstack.checkpoints import REGISTRY
    from lmstack.config import PRESETS, from_name
    entries = []
    for name, (description, locate) in REGISTRY.items():
        path = locate()
        installed = path is not None and path.exists()
        entries.append(ModelEntry(name, "model", description, installed, str(path) if installed else None))
    for name in PRESETS:
        cfg = from_name(name)  # a dataclass: cheap, and it fills in the defaults
        layers = getattr(cfg, "n_layer", None) or f"{cfg.n_encoder_layer}+{cfg.n_decoder_layer}"
        entries.append(ModelEntry(name, "preset", f"{cfg.family} config: {layers} layers, d_model {cfg.d_model}, "
                                                  f"vocab {cfg.vocab_size}", installed=False))
    return entries


def show_model(name: str) -> dict[str, Any]:
    """Describe a model: architecture, parameter count, layers, heads, context, dtype or quant types, tokenizer.

    Args:
        name: A registry name, a path to a checkpoint, or a config preset (shown without weights).
    """
    from lmstack.checkpoints import REGISTRY, model_summary
    from lmstack.config import PRESETS
    if name in PRESETS and name not in REGISTRY and not Path(name).exists():
        return _preset_summary(name)
    from lmstack.checkpoints import load_model
    return model_summary(load_model(name))


def _preset_summary(name: str) -> dict[str, Any]:
    import torch

    from lmstack.checkpoints import LoadedModel, model_summary
    from lmstack.config import from_name
    from lmstack.models import build_model
    config = from_name(name)
    with torch.device("meta"):  # count parameters without allocating them
        model = build_model(config)
    summary = model_summary(LoadedModel(model=model, tokenizer=None, config=config, source=f"preset {name}"))
    summary["dtype"] = "none (a preset has no weights)"
    return summary


# ------------------------------------------------------------------------------------------- convert


def convert(src: str, dst: str, *, to: Literal["native", "hf"] = "native", dtype: DType = "float32") -> Path:
    """Convert a checkpoint (registry name, GGUF, HF or native folder) into a native or an HF folder.

    Args:
        src: What to convert: a registry name, a GGUF file, an HF folder or a native folder.
        dst: The output folder (created; files in it are replaced atomically).
        to: Output format: native (lmstack safetensors + JSON) or hf (a transformers folder).
        dtype: dtype of the saved weights (quantized GGUF weights are dequantized to it).
    """
    from lmstack.checkpoints import load_model, save_native
    out = Path(dst)
    if out.exists() and not out.is_dir():
        raise LmstackError(f"{dst}: exists and is not a folder")
    loaded = load_model(src, dtype=dtype)
    if to == "native":
        metadata = {**loaded.metadata, "converted_from": loaded.source}
        return save_native(loaded.model, loaded.tokenizer, out, metadata=metadata)
    from lmstack.checkpoints.hf import export_hf
    export_hf(loaded.model, loaded.tokenizer, out)
    return out


# ------------------------------------------------------------------------------------------ training


def tokenizer_train(inputs: list[str], *, out: str, kind: Literal["bpe", "char"] = "bpe", vocab_size: int = 8000,
                    field: str = "text", min_frequency: int = 2, sentinels: int = 0,
                    doc_split: Literal["file", "line", "blank-line"] = "blank-line") -> Path:
    """Train a byte-level BPE or a char-level tokenizer on text / JSONL / Parquet files.

    Args:
        inputs: text, JSONL or Parquet files (or folders).
        out: folder to write tokenizer.json and tokenizer_config.json to.
        kind: bpe (byte-level BPE) or char.
        vocab_size: BPE vocabulary size, special tokens included.
        field: the JSONL / Parquet field holding the text.
        min_frequency: BPE merges need at least this many occurrences.
        sentinels: add this many T5 sentinels <extra_id_N> (for span corruption).
        doc_split: how plain text splits into documents: file, line or blank-line.
    """
    from lmstack.data.tokenizer_train import train_tokenizer
    return train_tokenizer(inputs, out, kind=kind, vocab_size=vocab_size, field=field, min_frequency=min_frequency,
                           sentinels=sentinels, doc_split=doc_split)


def data_prepare(inputs: list[str], *, out: str, tokenizer: str, field: str = "text", val_fraction: float = 0.1,
                 min_chars: int = 1, dedup: bool = True, normalize: Literal["NFC", "NFKC", "none"] = "NFC",
                 shard_tokens: int = 50_000_000, seed: int = 0,
                 doc_split: Literal["file", "line", "blank-line"] = "blank-line",
                 split: Literal["hash", "tail"] = "hash") -> dict[str, Any]:
    """Clean, deduplicate, tokenize and pack text / JSONL / Parquet into train and val token shards.

    Args:
        inputs: text, JSONL or Parquet files (or folders); read streaming, so larger than RAM is fine.
        out: folder for the shards and manifest.json.
        tokenizer: a tokenizer folder, or any model name or path (its tokenizer is used).
        field: the JSONL / Parquet field holding the text.
        val_fraction: share of documents (split hash) or of tokens (split tail) that go to val.
        min_chars: drop documents shorter than this after cleaning.
        dedup: drop exact duplicate documents.
        normalize: unicode normalization: NFC, NFKC or none.
        shard_tokens: tokens per shard file.
        seed: seed of the hash split.
        doc_split: how plain text splits into documents: file, line or blank-line.
        split: hash (by document) or tail (the last val_fraction of the token stream, as nanoGPT).
    """
    from lmstack.data.prepare import prepare_data
    return prepare_data(inputs, out, tokenizer, field=field, val_fraction=val_fraction, min_chars=min_chars,
                        dedup=dedup, normalize=normalize, shard_tokens=shard_tokens, seed=seed, doc_split=doc_split,
                        split=split)


def pretrain(*, config: str | None = None, objective: Literal["causal", "mlm", "span", "seq2seq"] = "causal",
             model: str | None = None, shards: str | None = None, out: str | None = None,
             tokenizer: str | None = None, seq_len: int | None = None, data: str | None = None,
             strategy: Literal["single", "ddp", "fsdp"] = "single", max_steps: int | None = None,
             max_tokens: int | None = None, max_time: float | None = None, batch_size: int | None = None,
             micro_batch_size: int | None = None, lr: float | None = None, min_lr: float | None = None,
             warmup_steps: int | None = None, weight_decay: float | None = None, grad_clip: float | None = None,
             precision: Literal["fp32", "bf16"] | None = None, compile: bool | None = None,
             eval_every: int | None = None, eval_batches: int | None = None, save_every: int | None = None,
             keep_last: int | None = None, early_stopping_patience: int | None = None, seed: int | None = None,
             progress: bool = True, resume: bool = True, set: list[str] | None = None) -> dict[str, Any]:
    """Pretrain a model from a preset: causal LM, masked LM, T5 span corruption or seq2seq pairs.

    Run under torchrun with --strategy ddp or fsdp for several processes or GPUs. A YAML --config gives
    defaults; every flag given on the command line overrides it.

    Args:
        config: a YAML file (see configs/); flags override its values.
        objective: causal (decoder), mlm (encoder), span (seq2seq, T5 span corruption) or seq2seq (pairs).
        model: a preset name (lmstack models list), e.g. tiny-gpt2, gpt2-124m, tiny-bert, tiny-t5.
        shards: a folder from `lmstack data prepare` (causal, mlm, span).
        out: run folder: metrics.jsonl, loss.png, tensorboard/, checkpoints/, final/.
        tokenizer: tokenizer folder (default: the one saved with the shards).
        seq_len: tokens per training sequence.
        data: the shared data folder that ${data} in a config refers to (default ../shared/data).
        strategy: single, ddp or fsdp (FSDP2 fully_shard; needs torchrun).
        max_steps: optimizer steps.
        max_tokens: stop after this many tokens.
        max_time: stop after this many seconds, with a checkpoint.
        batch_size: sequences per optimizer step, over all ranks.
        micro_batch_size: sequences per forward pass (gradient accumulation makes up the rest).
        lr: peak learning rate.
        min_lr: learning rate at the end of the cosine decay.
        warmup_steps: linear warmup steps.
        weight_decay: AdamW weight decay (matrices only).
        grad_clip: gradient norm clipping (0 = off).
        precision: fp32 or bf16 (autocast).
        compile: torch.compile the training step.
        eval_every: steps between evaluations on val.
        eval_batches: batches per evaluation.
        save_every: steps between checkpoints (default eval_every).
        keep_last: checkpoints to keep.
        early_stopping_patience: stop after this many evaluations without a better val loss.
        seed: random seed.
        progress: show a progress bar.
        resume: continue from the newest intact checkpoint in --out.
        set: model config overrides as key=value (e.g. --set n_layer=4 --set dropout=0.1).
    """
    from lmstack.training.pretrain import parse_overrides
    from lmstack.training.pretrain import pretrain as run_pretrain
    train = {k: v for k, v in dict(
        max_steps=max_steps, max_tokens=max_tokens, max_time=max_time, batch_size=batch_size,
        micro_batch_size=micro_batch_size, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
        weight_decay=weight_decay, grad_clip=grad_clip, precision=precision, compile=compile,
        eval_every=eval_every, eval_batches=eval_batches, save_every=save_every, keep_last=keep_last,
        early_stopping_patience=early_stopping_patience, seed=seed).items() if v is not None}
    result = run_pretrain(objective=objective, model=model, shards=shards, out=out, config=config, seq_len=seq_len,
                          tokenizer=tokenizer, strategy=strategy, data=data,
                          model_overrides=parse_overrides(set or []) or None, resume=resume, progress=progress,
                          **train)
    return asdict(result)


def plan(*, model: str, precision: Literal["fp32", "bf16", "int8", "nf4"] = "fp32",
         method: Literal["full", "lora", "qlora"] = "full",
         optimizer: Literal["adamw", "sgd", "sgd-momentum", "adafactor"] = "adamw", batch: int = 1, seq: int = 512,
         grad_checkpointing: bool = False, gpus: int = 1, sharding: Literal["none", "fsdp"] = "none",
         lora_rank: int = 8, lora_targets: str = "all-linear", peak_flops: float | None = None, mfu: float = 0.4,
         tokens: int | None = None, device: Literal["cuda", "cpu"] = "cuda") -> dict[str, Any]:
    """Predict memory per device and compute for training a model, before running it.

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
        device: cuda or cpu (a half-precision CPU step with up to 256 keys attends with plain matmuls, which
            keep the attention probabilities).
    """
    from lmstack.plan import plan as make_plan
    return make_plan(model, precision=precision, method=method, optimizer=optimizer, batch=batch, seq=seq,
                     grad_checkpointing=grad_checkpointing, gpus=gpus, sharding=sharding, lora_rank=lora_rank,
                     lora_targets=lora_targets, peak_flops=peak_flops, mfu=mfu, tokens=tokens,
                     device=device)


# ------------------------------------------------------------------------------------------ fine-tuning


def finetune(*, method: Literal["full", "lora", "qlora", "prompt", "prefix", "adapter"] | None = None,
             model: str | None = None, data: list[str] | None = None, out: str | None = None,
             config: str | None = None, weight: list[float] | None = None, val_data: list[str] | None = None,
             template: Literal["chat", "alpaca", "flan", "plain"] | None = None,
             format: Literal["auto", "alpaca", "chat", "prompt-completion", "self-instruct"] | None = None,
             fields: str | None = None, limit: int | None = None, max_seq_len: int | None = None,
             overflow: Literal["truncate", "drop"] | None = None, pack: bool | None = None,
             val_fraction: float | None = None, rank: int | None = None, alpha: float | None = None,
             dropout: float | None = None, targets: str | None = None, n_virtual: int | None = None,
             prompt_init: str | None = None, prefix_len: int | None = None, prefix_hidden: int | None = None,
             bottleneck: int | None = None, dtype: DType | None = None, max_steps: int | None = None,
             max_time: float | None = None, batch_size: int | None = None, micro_batch_size: int | None = None,
             lr: float | None = None, warmup_steps: int | None = None, weight_decay: float | None = None,
             precision: Literal["fp32", "bf16"] | None = None, compile: bool | None = None,
             eval_every: int | None = None, eval_batches: int | None = None, save_every: int | None = None,
             seed: int | None = None, progress: bool = True, resume: bool = True) -> dict[str, Any]:
    """Fine-tune a model on instruction / chat JSONL with full, lora, qlora, prompt, prefix or adapter.

    Writes the adapter (OUT/adapter.safetensors + adapter.json; a full native checkpoint for full) and
    OUT/metrics.jsonl. Repeat --data to mix tasks (per-task val loss is logged). A YAML --config gives
    defaults (`tasks:` for per-task settings, `train:` for trainer fields); flags override it.

    Args:
        method: full, lora, qlora (NF4 base + LoRA), prompt (prompt tuning), prefix (prefix tuning) or adapter
            (Houlsby bottleneck adapters).
        model: the base model: a registry name, GGUF file, HF or native folder.
        data: a JSONL file (alpaca, chat messages, prompt/completion, self-instruct); repeat to mix tasks;
            NAME=PATH names the task.
        out: output folder.
        config: a YAML file; flags override its values.
        weight: sampling weight per --data file (default: proportional to size).
        val_data: a validation JSONL per --data file (default: hold out val_fraction of each).
        template: chat (the model's chat template), alpaca, flan or plain.
        format: the JSONL format (default: detected from the first line).
        fields: field mapping, e.g. instruction=question,output=answer for GSM8K.
        limit: read at most this many records per file.
        max_seq_len: the longest example, in model positions.
        overflow: what to do with a longer example: truncate or drop (counts are reported).
        pack: pack several examples per row (block-diagonal attention, positions restart).
        val_fraction: share of each task held out for validation.
        rank: LoRA rank.
        alpha: LoRA alpha (scaling alpha / rank).
        dropout: LoRA dropout.
        targets: LoRA target modules: comma list of q,k,v,o,gate,up,down, or all-linear.
        n_virtual: prompt tuning: number of virtual tokens.
        prompt_init: prompt tuning: text whose token embeddings start the virtual tokens.
        prefix_len: prefix tuning: prefix length.
        prefix_hidden: prefix tuning: width of the reparameterization MLP (default: no MLP).
        bottleneck: adapter: bottleneck width.
        dtype: dtype of the loaded base weights.
        max_steps: optimizer steps.
        max_time: stop after this many seconds, with a checkpoint.
        batch_size: examples (or packed rows) per optimizer step.
        micro_batch_size: examples per forward pass (gradient accumulation makes up the rest).
        lr: peak learning rate (default per method).
        warmup_steps: linear warmup steps.
        weight_decay: AdamW weight decay (matrices only).
        precision: fp32 or bf16 (autocast).
        compile: torch.compile the training step.
        eval_every: steps between evaluations.
        eval_batches: validation batches per evaluation.
        save_every: steps between checkpoints.
        seed: random seed (data order, init).
        progress: show a progress bar.
        resume: continue from the newest checkpoint in --out.
    """
    from lmstack.training.finetune import finetune as run_finetune
    settings = dict(weights=weight, val_data=val_data, template=template, format=format, fields=fields,
                    limit=limit, max_seq_len=max_seq_len, overflow=overflow, pack=pack, val_fraction=val_fraction,
                    rank=rank, alpha=alpha, dropout=dropout, targets=targets, n_virtual=n_virtual,
                    prompt_init=prompt_init, prefix_len=prefix_len, prefix_hidden=prefix_hidden,
                    bottleneck=bottleneck, dtype=dtype, max_steps=max_steps, max_time=max_time,
                    batch_size=batch_size, micro_batch_size=micro_batch_size, lr=lr, warmup_steps=warmup_steps,
                    weight_decay=weight_decay, precision=precision, compile=compile, eval_every=eval_every,
                    eval_batches=eval_batches, save_every=save_every, seed=seed, progress=progress)
    result = run_finetune(method=method, model=model, data=data, out=out, config=config, resume=resume,
                          **{k: v for k, v in settings.items() if v is not None})
    return asdict(result)


def merge(*, adapter: str, out: str, model: str | None = None, dtype: DType = "float32") -> Path:
    """Merge a LoRA / QLoRA adapter into its base model and write a native checkpoint (export it to HF with
    `lmstack convert --to hf`).

    Args:
        adapter: an adapter folder from `lmstack finetune` (or a peft LoRA folder).
        out: the output folder for the merged native checkpoint.
        model: the base model (default: the one recorded in the adapter).
        dtype: dtype of the merged weights.
    """
    from lmstack.training.finetune import merge as run_merge
    return run_merge(adapter, out, model=model, dtype=dtype)
