"""`lmstack finetune` and `lmstack merge`: instruction data + a PEFT method + the one Trainer.

    base model --load_model--> apply_method(spec) --Trainer(causal_lm_targets, InstructionSource)--> OUT/
        OUT/adapter.safetensors + OUT/adapter.json   (lora, qlora, prompt, prefix, adapter: the method's weights)
        OUT/adapter_model.safetensors + adapter_config.json  (lora on a Llama-architecture model: peft's format)
        OUT/model.safetensors + OUT/lmstack.json     (full: a native checkpoint, usable as --model OUT)
                                                     (full --qat SCHEME: the packed quantized checkpoint)
        OUT/metrics.jsonl                            (one record per evaluation, with per-task val loss)
        OUT/checkpoints/                             (the trainer's resumable checkpoints)

The data are one or more JSONL tasks (see lmstack.data.instruct): `--data FILE` repeated mixes them, with
`--weight` per task (default proportional to size); a YAML `--config` may list `tasks:` with per-task settings.
Every flag overrides the config's value; `train:` in the config holds the trainer options (TrainOptions).

Quantization-aware training (`--qat int4-g32`, with --method full): the base model's Linears and token
embedding are swapped for fake-quant modules (lmstack.quant.qat) before training, so every forward sees the
quantized weights and the float weights learn to sit well on the quantization grid; after training they are
converted to the packed layers and OUT holds the quantized checkpoint. LoRA over a fake-quant base is refused:
merging the adapter would move the weights off the grid they were trained on.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmstack.checkpoints import load_model, save_native
from lmstack.checkpoints.load import resolve_device
from lmstack import runconfig
from lmstack.errors import LmstackError
from lmstack.io import atomic_write_json
from lmstack.peft.lora import TARGETS, resolve_targets
from lmstack.peft.methods import ADAPTER_FORMAT, METHODS, PeftSpec, apply_method, read_adapter_spec, save_adapter
from lmstack.training.objectives import causal_lm_targets
from lmstack.runconfig import resolve_path
from lmstack.training.trainer import TrainConfig, Trainer, TrainOptions

# Learning rates that work for short runs of a ~100M-parameter model (override with --lr).
DEFAULT_LR = {"full": 2e-5, "lora": 3e-4, "qlora": 3e-4, "prompt": 3e-2, "prefix": 5e-3, "adapter": 1e-3}
PEFT_KEYS = {f.name for f in dataclasses.fields(PeftSpec)} - {"method"}


@dataclass
class FinetuneResult:
    """What `lmstack finetune` prints: the run's outcome, the method's size and the data's counts."""

    out: str
    method: str
    steps: int
    train_loss: float
    best_val_loss: float | None
    val_loss_by_task: dict[str, float]
    stop_reason: str
    elapsed_s: float
    device: str  # where it trained (what --device auto chose)
    trainable_params: int
    total_params: int
    trainable_pct: float
    adapter_bytes: int  # adapter.safetensors, or model.safetensors for full
    data: dict[str, dict[str, Any]]  # per task: weight, train/val examples, kept/truncated/dropped counts


# ------------------------------------------------------------------------------------------ config


def peft_spec(method: str, run: dict[str, Any]) -> PeftSpec:
    """The method's settings from the run config; target names are checked before any model loads."""
    values = {k: run[k] for k in PEFT_KEYS if run.get(k) is not None}
    if "targets" in values:
        targets = values["targets"]
        names = resolve_targets(targets)  # raises for an unknown name, listing the valid ones
        short = {v: k for k, v in TARGETS.items()}
        values["targets"] = [short[n] for n in names]
    spec = PeftSpec(method=method, **values)
    spec.validate()
    return spec


def task_specs(run: dict[str, Any]) -> list[Any]:
    """`tasks:` from the config, or one task per --data (NAME=PATH names it), with --weight / --val-data."""
    from lmstack.data.instruct import InstructionTask, parse_fields

    fields = run.get("fields")
    fields = parse_fields(fields) if isinstance(fields, str) else fields
    shared = {"template": run.get("template", "chat"), "format": run.get("format", "auto"), "fields": fields,
              "limit": run.get("limit")}
    if run.get("tasks"):
        if run.get("data"):
            raise LmstackError("give the data as --data or as `tasks:` in the config, not both")
        known = {f.name for f in dataclasses.fields(InstructionTask)}
        specs = []
        for k, task in enumerate(run["tasks"]):
            if not isinstance(task, dict) or "path" not in task:
                raise LmstackError(f"config tasks[{k}]: expected a mapping with `path:`")
            unknown = sorted(set(task) - known)
            if unknown:
                raise LmstackError(f"config tasks[{k}]: unknown key(s) {', '.join(unknown)}; known: "
                                   f"{', '.join(sorted(known))}")
            task = {**shared, **task}
            if isinstance(task.get("fields"), str):
                task["fields"] = parse_fields(task["fields"])
            task["path"] = str(resolve_path(str(task["path"])))
            if task.get("val_path"):
                task["val_path"] = str(resolve_path(str(task["val_path"])))
            specs.append(InstructionTask(**task))
        return specs
    data = run.get("data")
    paths = [data] if isinstance(data, str) else list(data or [])
    if not paths:
        raise LmstackError("finetune needs --data FILE.jsonl (or `tasks:` in the config file)")
    weights, val = list(run.get("weights") or []), list(run.get("val_data") or [])
    for name, values in (("--weight", weights), ("--val-data", val)):
        if values and len(values) != len(paths):
            raise LmstackError(f"{len(values)} {name} value(s) for {len(paths)} --data file(s); give one per file")
    specs = []
    for k, item in enumerate(paths):
        name, path = None, str(item)
        if "=" in path and not Path(path).exists():
            name, path = path.split("=", 1)
        specs.append(InstructionTask(str(resolve_path(path)), weight=float(weights[k]) if weights else None,
                              val_path=str(resolve_path(str(val[k]))) if val else None, name=name, **shared))
    return specs


def train_config(method: str, run: dict[str, Any], out: str) -> TrainConfig:
    """Fine-tuning defaults (a short run, small batches, a per-method learning rate), then the config's and the
    command line's values."""
    given = dict(run.get("train", {}))  # checked against TrainOptions by runconfig
    max_steps = int(given.get("max_steps", 200))
    lr = float(given.get("lr", DEFAULT_LR[method]))
    defaults = {"max_steps": max_steps, "batch_size": 8, "lr": lr, "min_lr": lr / 10,
                "warmup_steps": min(50, max(1, max_steps // 10)), "weight_decay": 0.0 if method != "full" else 0.01,
                "beta2": 0.999, "eval_every": min(100, max_steps), "eval_batches": 10, "log_every": 10,
                "keep_last": 1}
    return TrainConfig(**{**defaults, **given, "out_dir": out})


# ------------------------------------------------------------------------------------------ the run


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; an NF4 base counts its weights at their original size."""
    from lmstack.peft.lora import lora_layers

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(layer.in_features * layer.out_features for layer in lora_layers(model).values()
                 if layer.nf4 is not None)
    return trainable, total


def per_task_losses(source: Any, batch_size: int, max_batches: int):
    """The trainer's extra evaluation for a mixture: each task's mean val loss over its first batches."""
    def evaluate(trainer: Trainer) -> dict[str, Any]:
        by_task = source.val_batches_by_task(batch_size)
        return {"val_loss_by_task": {name: trainer.loss_on(batches[:max_batches])
                                     for name, batches in by_task.items()}}
    return evaluate


@dataclass(kw_only=True)
class FinetuneRun:
    """A fine-tuning run: the keys of a finetune YAML config (the command line's flags lay over them). PEFT
    settings left None take PeftSpec's defaults; `train:` holds the trainer options."""

    method: Literal["full", "lora", "qlora", "prompt", "prefix", "adapter"] = "lora"
    model: str | None = None
    out: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU when torch sees one
    data: list[str] | str | None = None
    val_data: list[str] | None = None
    weights: list[float] | None = None
    tasks: list[dict[str, Any]] | None = None  # per-task settings, checked against TaskSpec in task_specs
    template: Literal["chat", "alpaca", "flan", "plain"] = "chat"
    format: Literal["auto", "alpaca", "chat", "prompt-completion", "self-instruct"] = "auto"
    fields: str | dict[str, str] | None = None
    limit: int | None = None
    max_seq_len: int = 512
    overflow: Literal["truncate", "drop"] = "truncate"
    pack: bool = False
    val_fraction: float = 0.05
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    targets: str | list[str] | None = None
    n_virtual: int | None = None
    prompt_init: str | None = None
    prefix_len: int | None = None
    prefix_hidden: int | None = None
    bottleneck: int | None = None
    qat: str | None = None  # a QAT scheme (quant.qat.QAT_SCHEMES); full fine-tuning only
    qat_embedding: str | None = None  # the embedding's (and tied head's) QAT scheme, or "none"; default qat
    train: TrainOptions = dataclasses.field(default_factory=TrainOptions)  # type: ignore[valid-type]


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
             bottleneck: int | None = None, qat: str | None = None, qat_embedding: str | None = None,
             dtype: Literal["float32", "bfloat16"] | None = None,
             device: Literal["auto", "cpu", "cuda"] | None = None,
             train: TrainOptions | None = None,  # type: ignore[valid-type]
             resume: bool = True) -> FinetuneResult:
    """Fine-tune a model on instruction / chat JSONL with full, lora, qlora, prompt, prefix or adapter.

    Writes the adapter (OUT/adapter.safetensors + adapter.json; a full native checkpoint for full) and
    OUT/metrics.jsonl. Repeat --data to mix tasks (per-task val loss is logged). A YAML --config gives
    defaults (the keys of FinetuneRun: `tasks:` for per-task settings, `train:` for the trainer options);
    flags override it. --model, --data (or `tasks:`) and --out are required, from the flags or the config.

    Args:
        method: full, lora, qlora (NF4 base + LoRA), prompt (prompt tuning), prefix (prefix tuning) or adapter
            (Houlsby bottleneck adapters) (default lora).
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
        max_seq_len: the longest example, in model positions (default 512).
        overflow: what to do with a longer example: truncate or drop (counts are reported).
        pack: pack several examples per row (block-diagonal attention, positions restart).
        val_fraction: share of each task held out for validation (default 0.05).
        rank: LoRA rank.
        alpha: LoRA alpha (scaling alpha / rank).
        dropout: LoRA dropout.
        targets: LoRA target modules: comma list of q,k,v,o,gate,up,down, or all-linear.
        n_virtual: prompt tuning: number of virtual tokens.
        prompt_init: prompt tuning: text whose token embeddings start the virtual tokens.
        prefix_len: prefix tuning: prefix length.
        prefix_hidden: prefix tuning: width of the reparameterization MLP (default: no MLP).
        bottleneck: adapter: bottleneck width.
        qat: quantization-aware training with this scheme (int8, int4-g32|g64|g128, int3-gG, int2-gG; full
            fine-tuning only): OUT is the quantized checkpoint. int3/int2 are stored as int4 codes.
        qat_embedding: the token embedding's (and tied head's) QAT scheme, or none (default: --qat).
        dtype: dtype of the loaded base weights.
        device: where it trains: auto (the GPU when torch sees one, else the CPU), cpu or cuda.
        train: the trainer's options (fine-tuning defaults: 200 steps, batch 8, a per-method learning rate).
        resume: continue from the newest checkpoint in --out.
    """
    from lmstack.data.instruct import build_instruction_source
    from lmstack.data.prepare import load_tokenizer

    given = dict(method=method, model=model, data=list(data) if data else None, out=out, weights=weight,
                 val_data=val_data, template=template, format=format, fields=fields, limit=limit,
                 max_seq_len=max_seq_len, overflow=overflow, pack=pack, val_fraction=val_fraction, rank=rank,
                 alpha=alpha, dropout=dropout, targets=targets, n_virtual=n_virtual, prompt_init=prompt_init,
                 prefix_len=prefix_len, prefix_hidden=prefix_hidden, bottleneck=bottleneck, qat=qat,
                 qat_embedding=qat_embedding, dtype=dtype, device=device,
                 train=runconfig.given(train) or None)
    typed = runconfig.load(FinetuneRun, config, given)
    run = {f.name: getattr(typed, f.name) for f in dataclasses.fields(typed) if getattr(typed, f.name) is not None}
    run["train"] = runconfig.given(typed.train)
    method = run.get("method") or "lora"
    if method not in METHODS:
        raise LmstackError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for key in ("model", "out"):
        if not run.get(key):
            raise LmstackError(f"finetune needs --{key} (or `{key}:` in the config file)")
    spec = peft_spec(method, run)
    qat_scheme = _check_qat(method, run)
    tasks = task_specs(run)
    cfg = train_config(method, run, str(run["out"]))
    max_seq_len = int(run.get("max_seq_len") or 512)
    overflow = run.get("overflow", "truncate")
    where = resolve_device(run.get("device", "auto"))  # a bad device fails before the data is read

    # Data first: a bad line is reported before the model loads.
    tokenizer = load_tokenizer(str(run["model"]))
    source = build_instruction_source(tasks, tokenizer, max_seq_len, pack=bool(run.get("pack", False)),
                                      seed=cfg.seed, val_fraction=float(run.get("val_fraction", 0.05)),
                                      overflow=overflow)
    summary = source.summary()
    if not any(source.val):
        raise LmstackError("no validation examples: raise val_fraction or give --val-data")

    torch.manual_seed(cfg.seed)
    loaded = load_model(str(run["model"]), dtype=run.get("dtype", "float32"), device=where)
    if loaded.config.family != "decoder":
        raise LmstackError(f"finetune trains decoder models; {run['model']} is a {loaded.config.family}")
    if max_seq_len > loaded.config.max_seq_len:
        raise LmstackError(f"max_seq_len {max_seq_len} is longer than the model's context "
                           f"{loaded.config.max_seq_len}")
    qat_report: list[Any] = []  # quant.quantize.LayerChoice per swapped module
    if qat_scheme is not None:
        from lmstack.quant.qat import prepare_qat_
        qat_report = prepare_qat_(loaded.model, qat_scheme, embedding_scheme=run.get("qat_embedding"))
    net = apply_method(loaded.model, spec, loaded.tokenizer or tokenizer)
    net.train()
    trainable, total = count_parameters(net)
    micro = cfg.micro_batch_size or cfg.batch_size
    extra = per_task_losses(source, micro, cfg.eval_batches) if len(source.task_names) > 1 else None
    run_record = {k: v for k, v in run.items() if k != "train"}
    run_record["peft"] = dataclasses.asdict(spec)
    trainer = Trainer(net, causal_lm_targets, source, cfg, run_config=_jsonable(run_record), extra_eval=extra)
    result = trainer.fit(resume=resume)

    out_dir = Path(cfg.out_dir)
    info = {"base_model": str(run["model"]), "steps": result.step, "val_loss": result.best_val_loss,
            "data": summary}
    if qat_scheme is not None:
        from lmstack.quant.qat import convert_qat_
        convert_qat_(net, fuse=True)  # q|k|v and gate|up as one matmul each, as `lmstack quantize` writes them
        info["qat"] = {"scheme": qat_scheme, "embedding_scheme": run.get("qat_embedding") or qat_scheme,
                       "fallbacks": [vars(c) for c in qat_report if c.used != c.scheme]}
        save_native(net, loaded.tokenizer or tokenizer, out_dir, metadata={"finetune": info, "scheme": qat_scheme})
        atomic_write_json(out_dir / "adapter.json", {"format": ADAPTER_FORMAT, "base_model": str(run["model"]),
                                                     "peft": dataclasses.asdict(spec), **info})
        weights_file = out_dir / "model.safetensors"
    elif method == "full":
        save_native(net, loaded.tokenizer or tokenizer, out_dir, metadata={"finetune": info})
        atomic_write_json(out_dir / "adapter.json", {"format": ADAPTER_FORMAT, "base_model": str(run["model"]),
                                                     "peft": dataclasses.asdict(spec), **info})
        weights_file = out_dir / "model.safetensors"
    else:
        save_adapter(net, spec, out_dir, base_model=str(run["model"]), extra=info)
        weights_file = out_dir / "adapter.safetensors"
        if method == "lora" and loaded.config.positions == "rope":
            # The same folder is a peft adapter too: PeftModel.from_pretrained(hf_model, OUT) loads it.
            from lmstack.peft.export import export_peft_adapter
            export_peft_adapter(net, out_dir, str(run["model"]))
    last = trainer.history[-1] if trainer.history else {}
    return FinetuneResult(out=str(out_dir), method=method, steps=result.step, train_loss=result.train_loss,
                          best_val_loss=result.best_val_loss, val_loss_by_task=last.get("val_loss_by_task", {}),
                          stop_reason=result.stop_reason, elapsed_s=round(result.elapsed_s, 2), device=where,
                          trainable_params=trainable, total_params=total,
                          trainable_pct=round(100.0 * trainable / total, 4),
                          adapter_bytes=weights_file.stat().st_size, data=summary)


def _check_qat(method: str, run: dict[str, Any]) -> str | None:
    """The QAT scheme, checked before any model loads (None without --qat)."""
    scheme = run.get("qat")
    if scheme is None:
        if run.get("qat_embedding") is not None:
            raise LmstackError("--qat-embedding needs --qat")
        return None
    from lmstack.quant.qat import parse_qat_scheme
    parse_qat_scheme(scheme)
    if run.get("qat_embedding") not in (None, "none"):
        parse_qat_scheme(run["qat_embedding"])
    if method != "full":
        raise LmstackError(f"--qat trains the full model (--method full); with --method {method} the adapter "
                           "would be merged off the quantization grid it trained on (quantize the merged model "
                           "with `lmstack quantize` instead)")
    return scheme


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# ------------------------------------------------------------------------------------------ merge


def merge(*, adapter: str, out: str, model: str | None = None,
          dtype: Literal["float32", "bfloat16"] = "float32") -> Path:
    """Merge a LoRA / QLoRA adapter into its base model and write a native checkpoint (export it to HF with
    `lmstack convert --to hf`).

    Prompt, prefix and bottleneck adapters add computation that no base weight can hold, so they are refused.
    A QLoRA base is dequantized from NF4 first: the merged model computes what was trained.

    Args:
        adapter: an adapter folder from `lmstack finetune` (or a peft LoRA folder).
        out: the output folder for the merged native checkpoint.
        model: the base model (default: the one recorded in the adapter).
        dtype: dtype of the merged weights.
    """
    from lmstack.peft.lora import merge_lora

    spec, info = read_adapter_spec(adapter)
    if spec.method not in ("lora", "qlora", "peft-lora"):
        raise LmstackError(f"{adapter}: a {spec.method} adapter cannot be merged into the base weights (only "
                           "LoRA / QLoRA can); run it unmerged with --adapter")
    loaded = load_model(model, adapter=adapter, dtype=dtype)
    merged = merge_lora(loaded.model, dtype=loaded.model.dtype)
    metadata = {"merged_adapter": str(adapter), "base_model": info.get("base_model") or model,
                "peft": dataclasses.asdict(spec)}
    return save_native(merged, loaded.tokenizer, out, metadata=metadata)
