"""`lmstack pretrain`: a model preset, prepared data and trainer flags, wired into the one trainer.

Objectives and what they train:
    causal   decoder (GPT-2 / Llama presets) on token shards: next-token prediction
    mlm      encoder (BERT presets) on token shards: 15% masking, 80/10/10
    span     seq2seq (T5 / Transformer presets) on token shards: T5 span corruption
    seq2seq  seq2seq on line-aligned pairs (e.g. Multi30k en->de)

A YAML config holds the keys of `PretrainRun` (`train:` holds the trainer options), checked by lmstack.runconfig;
command-line values override it. Relative paths are tried against the working directory, then the repository
root; `${data}` expands to the data root (`--data-root`, else $LMSTACK_DATA, else ../shared/data).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import Tensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lmstack.checkpoints import save_native
from lmstack import runconfig
from lmstack.config import PRESETS, from_name
from lmstack.errors import LmstackError
from lmstack.models import build_model
from lmstack.tokenizer import Tokenizer
from lmstack.training import distributed
from lmstack.training.objectives import OBJECTIVES
from lmstack.runconfig import resolve_path
from lmstack.training.trainer import TrainConfig, Trainer, TrainOptions, TrainResult

FAMILY_FOR = {"causal": "decoder", "mlm": "encoder", "span": "seq2seq", "seq2seq": "seq2seq"}


# ------------------------------------------------------------------------------------------ config


@dataclass(kw_only=True)
class PrepareConfig:
    """A config's `prepare:` block: shards made from raw text the first time the config runs.

    Args:
        inputs: text, JSONL or Parquet files (or folders).
        tokenizer: char or bpe (trained on the inputs), or a tokenizer folder or model name.
        vocab_size: BPE vocabulary size.
        val_fraction: share of documents (or tokens, split tail) that go to val.
        doc_split: how plain text splits into documents: file, line or blank-line.
        split: hash (by document) or tail (the last val_fraction of the token stream).
        dedup: drop exact duplicate documents.
        normalize: unicode normalization: NFC, NFKC or none.
        min_chars: drop documents shorter than this after cleaning.
        field: the JSONL / Parquet field holding the text.
    """

    inputs: list[str]
    tokenizer: str = "char"
    vocab_size: int = 8000
    val_fraction: float | None = None  # None: prepare_data's default
    doc_split: Literal["file", "line", "blank-line"] | None = None
    split: Literal["hash", "tail"] | None = None
    dedup: bool | None = None
    normalize: Literal["NFC", "NFKC", "none"] | None = None
    min_chars: int | None = None
    field: str | None = None


@dataclass(kw_only=True)
class TokenizerTrainConfig:
    """A seq2seq config's `tokenizer_train:` block: the tokenizer to train when `tokenizer:` does not exist yet.

    Args:
        inputs: text, JSONL or Parquet files.
        kind: bpe or char.
        vocab_size: BPE vocabulary size.
        min_frequency: BPE merges need at least this many occurrences.
        sentinels: T5 sentinels to add.
        doc_split: how plain text splits into documents.
        field: the JSONL / Parquet field holding the text.
    """

    inputs: list[str]
    kind: Literal["bpe", "char"] = "bpe"
    vocab_size: int = 8000
    min_frequency: int = 2
    sentinels: int = 0
    doc_split: Literal["file", "line", "blank-line"] = "blank-line"
    field: str = "text"


@dataclass(kw_only=True)
class PairsConfig:
    """A seq2seq config's `pairs:` block: line-aligned source and target files.

    Args:
        train: [source file, target file] for training.
        val: [source file, target file] for validation.
        limit: read at most this many training pairs.
    """

    train: list[str]
    val: list[str]
    limit: int | None = None


@dataclass(kw_only=True)
class PretrainRun:
    """A pretraining run: the keys of a pretrain YAML config (the command line's flags lay over them)."""

    objective: Literal["causal", "mlm", "span", "seq2seq"] = "causal"
    model: str | None = None
    shards: str | None = None
    out: str | None = None
    tokenizer: str | None = None
    seq_len: int = 128
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    prepare: PrepareConfig | None = None
    pairs: PairsConfig | None = None
    tokenizer_train: TokenizerTrainConfig | None = None
    train: TrainOptions = dataclasses.field(default_factory=TrainOptions)  # type: ignore[valid-type]


# ------------------------------------------------------------------------------------------ data


class StepBatches:
    """Adapts a `batch_at(key)` maker (a pure function of the key) to the trainer's (step, micro-batch) calls.

    The micro-batch size is fixed per run, so batch (step, i) is the same whatever the number of ranks.
    """

    def __init__(self, make: Callable[[int, int], dict[str, Tensor]],
                 val: Callable[[int], list[dict[str, Tensor]]], seq_len: int) -> None:
        self.make, self.val, self.seq_len = make, val, seq_len
        self._val_cache: dict[int, list[dict[str, Tensor]]] = {}

    def train_batch(self, step: int, index: int, batch_size: int) -> dict[str, Tensor]:
        return self.make(step * 100_003 + index, batch_size)

    def val_batch(self, index: int, batch_size: int) -> dict[str, Tensor]:
        if batch_size not in self._val_cache:
            self._val_cache[batch_size] = self.val(batch_size)
        batches = self._val_cache[batch_size]
        if not batches:
            raise LmstackError("the validation split is empty; prepare data with a larger val_fraction")
        return batches[index % len(batches)]


def shard_source(objective: str, data_dir: Path, seq_len: int, seed: int, eval_batches: int,
                 tokenizer: Tokenizer, decoder_start: int) -> StepBatches:
    from lmstack.data import batching as b

    train, val = b.TokenShards(data_dir, "train"), b.TokenShards(data_dir, "val")
    if objective == "causal":
        def make(key: int, bs: int) -> dict[str, Tensor]:
            x, y = b.CausalBatches(train, bs, seq_len, seed).batch_at(key)
            return {"input_ids": x, "labels": y}

        def val_batches(bs: int) -> list[dict[str, Tensor]]:
            return [{"input_ids": x, "labels": y}
                    for x, y in b.CausalBatches(val, bs, seq_len, seed).eval_batches(eval_batches)]
        return StepBatches(make, val_batches, seq_len)
    if objective == "mlm":
        mask_id = tokenizer.token_to_id("[MASK]")
        if mask_id is None:
            raise LmstackError("masked LM needs a [MASK] token in the tokenizer; train one with "
                               "`lmstack tokenizer train` (it adds [MASK])")
        from lmstack.data.prepare import special_token_ids
        specials = special_token_ids(tokenizer)

        def make_mlm(split: b.TokenShards, key: int, bs: int) -> dict[str, Tensor]:
            x, y = b.MaskedLMBatches(split, bs, seq_len, mask_id, specials, seed).batch_at(key)
            return {"input_ids": x, "labels": y}
        return StepBatches(lambda key, bs: make_mlm(train, key, bs),
                           lambda bs: [make_mlm(val, 10**9 + i, bs) for i in range(eval_batches)], seq_len)
    if objective == "span":
        sentinels = b.sentinel_token_ids(tokenizer)
        if not sentinels:
            raise LmstackError("span corruption needs <extra_id_N> sentinel tokens; train the tokenizer with "
                               "sentinels (`lmstack tokenizer train --sentinels 100`)")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        def make_span(split: b.TokenShards, key: int, bs: int) -> dict[str, Tensor]:
            src, tgt = b.SpanCorruptionBatches(split, bs, seq_len, sentinels, seed).batch_at(key)
            return {"src": src, "tgt_in": b.shift_right(tgt, decoder_start, pad), "labels": tgt}
        return StepBatches(lambda key, bs: make_span(train, key, bs),
                           lambda bs: [make_span(val, 10**9 + i, bs) for i in range(eval_batches)], seq_len)
    raise LmstackError(f"objective {objective!r} does not read token shards")


class PairSource:
    """Seq2seq pairs, epoch after epoch; batch (step, i) is batch number step * per_step + i of the stream."""

    def __init__(self, train: Any, val: Any, per_step: int, seed: int, eval_batches: int, seq_len: int) -> None:
        self.train, self.val, self.per_step, self.seed = train, val, per_step, seed
        self.eval_batches, self.seq_len = eval_batches, seq_len
        self._epoch: tuple[int, int, list] | None = None
        self._val: dict[int, list] = {}

    @staticmethod
    def _as_dict(batch: Any) -> dict[str, Tensor]:
        return {"src": batch.src_ids, "src_mask": batch.src_mask, "tgt_in": batch.tgt_in, "labels": batch.labels}

    def train_batch(self, step: int, index: int, batch_size: int) -> dict[str, Tensor]:
        number = step * self.per_step + index
        n = self.train.num_batches(batch_size)
        epoch, position = divmod(number, n)
        if self._epoch is None or self._epoch[:2] != (epoch, batch_size):
            self._epoch = (epoch, batch_size, list(self.train.batches(batch_size, self.seed, epoch)))
        return self._as_dict(self._epoch[2][position])

    def val_batch(self, index: int, batch_size: int) -> dict[str, Tensor]:
        if batch_size not in self._val:
            self._val[batch_size] = list(self.val.batches(batch_size, 0, 0))[: self.eval_batches]
        batches = self._val[batch_size]
        return self._as_dict(batches[index % len(batches)])


# ------------------------------------------------------------------------------------------ command


def pretrain(*, config: str | None = None, objective: Literal["causal", "mlm", "span", "seq2seq"] | None = None,
             model: str | None = None, shards: str | None = None, out: str | None = None,
             tokenizer: str | None = None, seq_len: int | None = None, data_root: str | None = None,
             strategy: Literal["single", "ddp", "fsdp"] = "single",
             train: TrainOptions | None = None,  # type: ignore[valid-type]
             resume: bool = True, set: list[str] | None = None) -> TrainResult:
    """Pretrain a model from a preset: causal LM, masked LM, T5 span corruption or seq2seq pairs.

    Run under torchrun with --strategy ddp or fsdp for several processes or GPUs. A YAML --config holds the same
    keys (`train:` holds the trainer options; seq2seq reads `pairs: {train: [src, tgt], val: [src, tgt]}`);
    every flag given on the command line overrides it. Writes OUT/metrics.jsonl, OUT/loss.png,
    OUT/checkpoints/ and the final model in OUT/final (native format).

    Args:
        config: a YAML file (see configs/); flags override its values.
        objective: causal (decoder), mlm (encoder), span (seq2seq, T5 span corruption) or seq2seq (pairs)
            (default causal).
        model: a preset name (lmstack models list), e.g. tiny-gpt2, gpt2-124m, tiny-bert, tiny-t5.
        shards: a folder from `lmstack data prepare` (causal, mlm, span).
        out: run folder: metrics.jsonl, loss.png, tensorboard/, checkpoints/, final/.
        tokenizer: tokenizer folder (default: the one saved with the shards).
        seq_len: tokens per training sequence (default 128).
        data_root: the shared data folder that ${data} in a config refers to (default $LMSTACK_DATA, else
            ../shared/data).
        strategy: single, ddp or fsdp (FSDP2 fully_shard; needs torchrun).
        train: the trainer's options.
        resume: continue from the newest intact checkpoint in --out.
        set: model config overrides as key=value (e.g. --set n_layer=4 --set dropout=0.1).
    """
    given = {"objective": objective, "model": model, "shards": shards, "out": out, "tokenizer": tokenizer,
             "seq_len": seq_len, "train": runconfig.given(train) or None}
    run = runconfig.load(PretrainRun, config, given, data_root)
    from_set = parse_overrides(set or [])
    for key in ("model", "pairs" if run.objective == "seq2seq" else "shards", "out"):
        if not getattr(run, key):
            raise LmstackError(f"pretrain needs --{key} (or `{key}:` in the config file)")
    # Known keys get their types checked (`n_layer=abc` is an error), each against where it was written.
    for overrides, where in ((run.model_overrides, config or "config"), (from_set, "--set")):
        _check_overrides(str(run.model), overrides, where)
    run.model_overrides = {**run.model_overrides, **from_set}
    train_cfg = TrainConfig(**runconfig.given(run.train), out_dir=str(run.out))
    train_cfg.validate()

    device = distributed.init(strategy)
    torch.manual_seed(train_cfg.seed)
    if run.pairs is not None and run.objective == "seq2seq":
        source, tok = _pair_source(run.pairs, run, train_cfg)
    else:
        data_dir = resolve_path(str(run.shards))
        if run.prepare is not None and not (data_dir / "manifest.json").exists():
            prepare_from_config(run.prepare, data_dir)
        tok = Tokenizer.from_dir(resolve_path(run.tokenizer)) if run.tokenizer else None
        if tok is None:
            from lmstack.data.batching import TokenShards
            tok = TokenShards(data_dir, "train").tokenizer()
    model_cfg = _model_config(str(run.model), run.objective, tok, run.seq_len, run.model_overrides)
    if run.objective != "seq2seq":
        start = getattr(model_cfg, "bos_token_id", None)
        source = shard_source(run.objective, data_dir, run.seq_len, train_cfg.seed, train_cfg.eval_batches, tok,
                              start if start is not None else (tok.eos_token_id or 0))
    with torch.device(device):
        net = build_model(model_cfg)
    wrapped = distributed.wrap(net, strategy)
    run_record = {k: v for k, v in dataclasses.asdict(run).items() if k != "train" and v is not None}
    run_record.update(model_config=dataclasses.asdict(model_cfg), strategy=strategy)
    trainer = Trainer(wrapped, OBJECTIVES[run.objective], source, train_cfg, run_config=_jsonable(run_record),
                      state_model=net)
    result = trainer.fit(resume=resume)
    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.rank == 0:
        save_native(net, tok, Path(train_cfg.out_dir) / "final", state=full,
                    metadata={"objective": run.objective, "steps": result.step, "val_loss": result.best_val_loss})
    distributed.shutdown()
    return result


def prepare_from_config(prep: PrepareConfig, data_dir: Path) -> None:
    """The config's `prepare:` block: train a tokenizer if asked (`tokenizer: char|bpe`), then pack shards."""
    from lmstack.data.prepare import prepare_data
    from lmstack.data.tokenizer_train import train_tokenizer

    inputs = [str(resolve_path(p)) for p in prep.inputs]
    if not inputs:
        raise LmstackError("the config's prepare block needs `inputs:`")
    tokenizer = prep.tokenizer
    if tokenizer in ("char", "bpe"):
        tokenizer = str(train_tokenizer(inputs, out=str(data_dir / "tokenizer-trained"), kind=tokenizer,
                                        vocab_size=prep.vocab_size,
                                        **({"doc_split": prep.doc_split} if prep.doc_split else {})))
    options = {k: getattr(prep, k) for k in ("val_fraction", "doc_split", "split", "dedup", "normalize",
                                             "min_chars", "field") if getattr(prep, k) is not None}
    prepare_data(inputs, out=str(data_dir), tokenizer=tokenizer, **options)


def _pair_source(pairs: PairsConfig, run: PretrainRun, cfg: TrainConfig) -> tuple[PairSource, Tokenizer]:
    from lmstack.data.batching import PairDataset

    if len(pairs.train) != 2 or len(pairs.val) != 2:
        raise LmstackError("seq2seq `pairs:` must be a mapping: {train: [src, tgt], val: [src, tgt]}")
    if not run.tokenizer:
        raise LmstackError("seq2seq pretraining needs `tokenizer:` (a folder from `lmstack tokenizer train`)")
    tok_dir = resolve_path(run.tokenizer)
    if not (tok_dir / "tokenizer.json").exists() and run.tokenizer_train is not None:
        from lmstack.data.tokenizer_train import train_tokenizer
        spec = dataclasses.asdict(run.tokenizer_train)
        inputs = [str(resolve_path(p)) for p in spec.pop("inputs")]
        train_tokenizer(inputs, out=str(tok_dir), **spec)
    tok = Tokenizer.from_dir(tok_dir)
    train = PairDataset(*(resolve_path(p) for p in pairs.train), tok, run.seq_len, limit=pairs.limit)
    val = PairDataset(*(resolve_path(p) for p in pairs.val), tok, run.seq_len)
    micro = cfg.micro_batch_size or cfg.batch_size
    return PairSource(train, val, cfg.batch_size // micro, cfg.seed, cfg.eval_batches, run.seq_len), tok


def _check_overrides(name: str, overrides: dict[str, Any], where: str) -> None:
    """Model config overrides of preset `name`, type-checked per known key; unknown keys are from_name's to name."""
    if name not in PRESETS:
        return  # from_name reports the unknown preset
    cls = PRESETS[name][0]
    known = {f.name for f in dataclasses.fields(cls)}
    runconfig.check(cls, {k: v for k, v in overrides.items() if k in known}, where, prefix="model_overrides.")


def _model_config(name: str, objective: str, tok: Tokenizer, seq_len: int, overrides: dict[str, Any]):
    fam = from_name(name).family  # raises for unknown presets, listing the known ones
    want = FAMILY_FOR[objective]
    if fam != want:
        raise LmstackError(f"objective {objective!r} trains a {want} model; preset {name!r} is a {fam}")
    ids: dict[str, Any] = {"vocab_size": tok.vocab_size, "max_seq_len": max(seq_len + 1, 8)}
    eos, pad, bos = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    if fam == "decoder":
        ids.update(eos_token_id=eos, bos_token_id=bos, pad_token_id=pad)
    elif fam == "encoder":
        ids.update(pad_token_id=pad if pad is not None else 0, mask_token_id=tok.token_to_id("[MASK]"))
    else:
        ids.update(pad_token_id=pad if pad is not None else 0, eos_token_id=eos if eos is not None else 2,
                   bos_token_id=bos if bos is not None else (eos if eos is not None else 1))
    return from_name(name, **{**ids, **overrides})


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings from the command line, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if not re.fullmatch(r"[A-Za-z_][\w.]*=.*", pair):
            raise LmstackError(f"bad override {pair!r}; use key=value")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out

