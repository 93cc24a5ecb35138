"""The verbs of the `lmstack` CLI as typed Python functions: the function signature is the CLI.

`lmstack.cli` turns each function here into a command: positional parameters become arguments, keyword-only
parameters become `--options`, and the docstring's summary and `Args:` lines become the help text. Parameters
the CLI cannot express (callbacks, streams) are left out there and stay available to Python callers.

    from lmstack import commands
    out = commands.generate(prompt="Name three colours.", chat=True, max_new_tokens=32)
    print(out.text, out.decode_tokens_per_s)

Heavy modules (torch, the models) are imported inside the functions, so `lmstack --help` starts fast.
"""

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from lmstack.errors import LmstackError
from lmstack.evaluation.command import evaluate  # noqa: F401  (`lmstack eval`; light: imports on call)

if TYPE_CHECKING:
    from lmstack.checkpoints import LoadedModel
    from lmstack.generation import GenerationConfig, GenerationResult, Generator

DEFAULT_MODEL = "smollm2-135m-instruct"
DType = Literal["float32", "bfloat16"]


# ------------------------------------------------------------------------------------------ generate


@dataclass
class GenerateOutput:
    """What `generate` returns, and what `lmstack generate --json` prints."""

    text: str
    prompt_tokens: int
    new_tokens: int
    load_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    finish_reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generation_config(max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, repetition_penalty: float = 1.0, num_beams: int = 1,
                      seed: int | None = None, stop: list[str] | None = None) -> "GenerationConfig":
    """Build and validate a GenerationConfig (a LmstackError names the bad value) before any model loads."""
    from lmstack.generation import GenerationConfig
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, num_beams=num_beams, stop=list(stop or []),
                           seed=seed)
    cfg.validate()
    return cfg


def load_generator(model: str | None, dtype: DType = "float32", compile: bool = False,
                   adapter: str | None = None) -> tuple["Generator", "LoadedModel", float]:
    """Load `model` (registry name or path), with `adapter` applied unmerged when given, and wrap it in a
    Generator; also returns the load time in s. No model: the adapter's base, else DEFAULT_MODEL."""
    from lmstack.checkpoints import load_model
    from lmstack.generation import Generator
    start = time.perf_counter()
    if adapter is not None:
        from lmstack.training.finetune import load_with_adapter
        loaded = load_with_adapter(model, adapter, dtype)
    else:
        loaded = load_model(model or DEFAULT_MODEL, dtype=dtype)
    generator = Generator(loaded.model, loaded.tokenizer, compile=compile)
    return generator, loaded, time.perf_counter() - start


def run_generation(generator: "Generator", prompt: "str | list[int]", cfg: "GenerationConfig",
                   on_text: Callable[[str], None] | None = None) -> "GenerationResult":
    """Generate, streaming text pieces to `on_text` as they decode (beam search only knows its text at the end)."""
    if on_text is None:
        return generator.generate(prompt, cfg)
    if cfg.num_beams > 1:
        result = generator.generate(prompt, cfg)
        on_text(result.text)
        return result
    for piece in generator.stream(prompt, cfg):
        on_text(piece)
    return generator.last_result


def generate(*, prompt: str, model: str | None = None, chat: bool = False, system: str | None = None,
             max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, repetition_penalty: float = 1.0, num_beams: int = 1,
             seed: int | None = None, stop: list[str] | None = None, dtype: DType = "float32",
             compile: bool = False, adapter: str | None = None,
             on_text: Callable[[str], None] | None = None) -> GenerateOutput:
    """Continue a prompt (or answer it as a chat message with --chat) and report timings.

    Args:
        prompt: The text to continue, or the user message with --chat.
        model: A registry name (see `lmstack models list`), a GGUF file, an HF folder or a native folder
            (default smollm2-135m-instruct; with --adapter, the adapter's base model).
        chat: Wrap the prompt in the model's chat template as one user turn.
        system: A system message for --chat.
        max_new_tokens: The most tokens to generate.
        temperature: Sampling temperature; 0 means greedy decoding.
        top_k: Sample only from the k most likely tokens.
        top_p: Sample from the smallest set of tokens whose probability adds up to p (0 < p <= 1).
        repetition_penalty: Divide the logits of tokens already seen by this (1.0 = off).
        num_beams: Beam search with this many beams (1 = off); its text is printed at the end.
        seed: Random seed for sampling, for reproducible output.
        stop: Stop when the text contains this string; repeat the option for more strings.
        dtype: Compute dtype of the weights.
        compile: torch.compile the decode step (slow first call, faster after).
        adapter: An adapter folder from `lmstack finetune` (or a peft LoRA folder), applied unmerged.
        on_text: Called with each new piece of text as it is decoded.
    """
    cfg = generation_config(max_new_tokens, temperature, top_k, top_p, repetition_penalty, num_beams, seed, stop)
    if system is not None and not chat:
        raise LmstackError("--system needs --chat (a plain prompt has no system message)")
    generator, _, load_s = load_generator(model, dtype, compile, adapter)
    source: str | list[int] = prompt
    if chat:
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        source = generator.chat_prompt([*messages, {"role": "user", "content": prompt}])
    result = run_generation(generator, source, cfg, on_text)
    return GenerateOutput(text=result.text, prompt_tokens=result.prompt_tokens, new_tokens=result.new_tokens,
                          load_s=round(load_s, 3), prefill_tokens_per_s=round(result.prefill_tokens_per_s, 1),
                          decode_tokens_per_s=round(result.decode_tokens_per_s, 1),
                          finish_reason=result.finish_reason)


# ---------------------------------------------------------------------------------------------- chat


class ChatSession:
    """A multi-turn conversation: the message history, a system message, and the generator that answers.

    When the history no longer fits the context window (prompt + max_new_tokens), the oldest turns are dropped.
    """

    def __init__(self, generator: "Generator", cfg: "GenerationConfig", context: int,
                 system: str | None = None) -> None:
        self.generator, self.cfg, self.context, self.system = generator, cfg, context, system
        self.messages: list[dict[str, str]] = []  # user/assistant turns, without the system message

    def reset(self) -> None:
        self.messages = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def _prompt_ids(self) -> list[int]:
        while True:
            system = [{"role": "system", "content": self.system}] if self.system else []
            ids = self.generator.chat_prompt([*system, *self.messages])
            if len(ids) + self.cfg.max_new_tokens <= self.context or len(self.messages) <= 1:
                return ids  # a single turn that is still too long is the generator's error to report
            self.messages = self.messages[2:]  # drop the oldest user/assistant pair

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> "GenerationResult":
        """Answer `text` as the next user turn, streaming to `on_text`; the answer joins the history."""
        self.messages.append({"role": "user", "content": text})
        try:
            result = run_generation(self.generator, self._prompt_ids(), self.cfg, on_text)
        except BaseException:
            self.messages.pop()  # a failed turn leaves the history as it was
            raise
        self.messages.append({"role": "assistant", "content": result.text})
        return result


CHAT_HELP = "/reset clears the history, /system TEXT sets the system message, /exit quits"


def chat(*, model: str | None = None, system: str | None = None, max_new_tokens: int = 256,
         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
         repetition_penalty: float = 1.0, num_beams: int = 1, seed: int | None = None,
         stop: list[str] | None = None, dtype: DType = "float32", compile: bool = False,
         adapter: str | None = None, input: TextIO | None = None, output: TextIO | None = None,
         notices: TextIO | None = None) -> int:
    """Chat with a model: one message per line on stdin, streamed replies on stdout, until EOF or /exit.

    Commands: /reset clears the history, /system TEXT sets the system message, /exit quits. Replies go to
    stdout one per turn; prompts and notices go to stderr, so the command works in a pipe. A failed turn is
    reported on stderr and the chat goes on; the number of failed turns is returned (the CLI exits with 1).

    Args:
        model: A registry name (see `lmstack models list`), a GGUF file, an HF folder or a native folder
            (default smollm2-135m-instruct; with --adapter, the adapter's base model).
        system: The system message that starts each conversation.
        max_new_tokens: The most tokens in one reply.
        temperature: Sampling temperature; 0 means greedy decoding.
        top_k: Sample only from the k most likely tokens.
        top_p: Sample from the smallest set of tokens whose probability adds up to p (0 < p <= 1).
        repetition_penalty: Divide the logits of tokens already seen by this (1.0 = off).
        num_beams: Beam search with this many beams (1 = off); replies then appear whole.
        seed: Random seed for sampling, for reproducible output.
        stop: Stop a reply when it contains this string; repeat the option for more strings.
        dtype: Compute dtype of the weights.
        compile: torch.compile the decode step (slow first call, faster after).
        adapter: An adapter folder from `lmstack finetune` (or a peft LoRA folder), applied unmerged.
        input: Where the user's lines come from (default stdin).
        output: Where replies go (default stdout).
        notices: Where prompts, notices and per-turn errors go (default stderr).
    """
    input, output, notices = input or sys.stdin, output or sys.stdout, notices or sys.stderr
    cfg = generation_config(max_new_tokens, temperature, top_k, top_p, repetition_penalty, num_beams, seed, stop)
    generator, loaded, load_s = load_generator(model, dtype, compile, adapter)
    context = getattr(loaded.model, "config", loaded.config).max_seq_len  # prompt tuning takes N positions
    session = ChatSession(generator, cfg, context=context, system=system)
    interactive = input.isatty()

    def say(text: str) -> None:
        notices.write(text)
        notices.flush()

    def write(piece: str) -> None:
        output.write(piece)
        output.flush()

    if interactive:
        say(f"loaded {loaded.source} in {load_s:.1f} s; {CHAT_HELP}\n")
    failures = 0
    while True:
        if interactive:
            say("> ")
        line = input.readline()
        if not line:  # EOF
            break
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                session.reset()
                say("[history cleared]\n")
            elif command == "/system":
                session.set_system(arg.strip())
                say("[system message set]\n" if arg.strip() else "[system message removed]\n")
            else:
                say(f"[unknown command {command}; {CHAT_HELP}]\n")
            continue
        try:
            session.ask(text, on_text=write)
        except LmstackError as e:
            failures += 1
            say(f"error: {e}\n")
            continue
        write("\n")
    return failures


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
    return train_tokenizer(inputs, out=out, kind=kind, vocab_size=vocab_size, field=field, min_frequency=min_frequency,
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
    return prepare_data(inputs, out=out, tokenizer=tokenizer, field=field, val_fraction=val_fraction, min_chars=min_chars,
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
