"""`lmstack pretrain`: a model preset, prepared data and trainer flags, wired into the one trainer.

Objectives and what they train:
    causal   decoder (GPT-2 / Llama presets) on token shards: next-token prediction
    mlm      encoder (BERT presets) on token shards: 15% masking, 80/10/10
    span     seq2seq (T5 / Transformer presets) on token shards: T5 span corruption
    seq2seq  seq2seq on line-aligned pairs (e.g. Multi30k en->de)

A YAML config holds the same keys as the function's arguments (`train:` holds TrainConfig fields); command-line
values override it. Relative paths are tried against the working directory, then the repository root;
`${data}` expands to the shared data folder (`../shared/data` beside the repository, or `--data DIR`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lmstack.checkpoints import save_native
from lmstack.config import from_name
from lmstack.errors import LmstackError
from lmstack.models import build_model
from lmstack.tokenizer import Tokenizer
from lmstack.training import distributed
from lmstack.training.objectives import OBJECTIVES
from lmstack.training.trainer import TrainConfig, Trainer, TrainResult

REPO_ROOT = Path(__file__).resolve().parents[3]
FAMILY_FOR = {"causal": "decoder", "mlm": "encoder", "span": "seq2seq", "seq2seq": "seq2seq"}


# ------------------------------------------------------------------------------------------ config


def load_run_config(path: str | None, overrides: dict[str, Any], data_root: str | None) -> dict[str, Any]:
    """YAML file (optional) + overrides, with `${data}` expanded and relative paths resolved."""
    cfg: dict[str, Any] = {}
    if path:
        file = Path(path)
        if not file.exists():
            raise LmstackError(f"config file not found: {path}")
        try:
            cfg = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else path
            raise LmstackError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(cfg, dict):
            raise LmstackError(f"{path}: expected a mapping at the top level")
    for key, value in overrides.items():
        if value is None:
            continue
        if key in TRAIN_KEYS:
            cfg.setdefault("train", {})[key] = value
        else:
            cfg[key] = value
    root = Path(data_root) if data_root else REPO_ROOT.parent / "shared" / "data"
    return _expand(cfg, str(root))


TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


def _expand(value: Any, data_root: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, data_root) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, data_root) for v in value]
    if isinstance(value, str) and "${data}" in value:
        return value.replace("${data}", data_root)
    return value


def resolve_path(path: str) -> Path:
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    candidate = REPO_ROOT / p
    return candidate if candidate.exists() else p


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


def pretrain(objective: str = "causal", model: str | None = None, shards: str | None = None, out: str | None = None,
             config: str | None = None, seq_len: int | None = None, tokenizer: str | None = None,
             strategy: str = "single", data: str | None = None, model_overrides: dict[str, Any] | None = None,
             resume: bool = True, **train_overrides: Any) -> TrainResult:
    """Pretrain a model from a preset with the causal, mlm, span or seq2seq objective.

    `shards` is a prepared shard folder (`lmstack data prepare`) for causal/mlm/span; seq2seq reads `pairs`, a
    mapping with `train: [src, tgt]` and `val: [src, tgt]` line-aligned files (config file only). `tokenizer` defaults to the one
    saved with the shards. Writes OUT/metrics.jsonl, OUT/loss.png, OUT/checkpoints/ and the final model in
    OUT/final (native format).
    """
    run = load_run_config(config, {"objective": objective if config is None else None, "model": model,
                                   "shards": shards, "out": out, "seq_len": seq_len, "tokenizer": tokenizer,
                                   **train_overrides}, data)
    if model_overrides:
        run["model_overrides"] = {**run.get("model_overrides", {}), **model_overrides}
    objective = run.get("objective", objective)
    if objective not in OBJECTIVES:
        raise LmstackError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    for key in ("model", "pairs" if objective == "seq2seq" else "shards", "out"):
        if not run.get(key):
            raise LmstackError(f"pretrain needs --{key} (or `{key}:` in the config file)")
    train_cfg = TrainConfig(**{**run.get("train", {}), "out_dir": str(run["out"])})
    seq_len = int(run.get("seq_len") or 128)

    device = distributed.init(strategy)
    torch.manual_seed(train_cfg.seed)
    if objective == "seq2seq":
        source, tok = _pair_source(run["pairs"], run, train_cfg, seq_len)
    else:
        data_dir = resolve_path(str(run["shards"]))
        if run.get("prepare") and not (data_dir / "manifest.json").exists():
            prepare_from_config(run["prepare"], data_dir)
        tok = Tokenizer.from_dir(resolve_path(run["tokenizer"])) if run.get("tokenizer") else None
        if tok is None:
            from lmstack.data.batching import TokenShards
            tok = TokenShards(data_dir, "train").tokenizer()
    model_cfg = _model_config(run["model"], objective, tok, seq_len, run.get("model_overrides", {}))
    if objective != "seq2seq":
        start = getattr(model_cfg, "bos_token_id", None)
        source = shard_source(objective, data_dir, seq_len, train_cfg.seed, train_cfg.eval_batches, tok,
                              start if start is not None else (tok.eos_token_id or 0))
    with torch.device(device):
        net = build_model(model_cfg)
    wrapped = distributed.wrap(net, strategy)
    run_record = {**run, "model_config": dataclasses.asdict(model_cfg), "strategy": strategy}
    run_record.pop("train", None)
    trainer = Trainer(wrapped, OBJECTIVES[objective], source, train_cfg, run_config=_jsonable(run_record),
                      state_model=net)
    result = trainer.fit(resume=resume)
    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.rank == 0:
        save_native(net, tok, Path(train_cfg.out_dir) / "final", state=full,
                    metadata={"objective": objective, "steps": result.step, "val_loss": result.best_val_loss})
    distributed.shutdown()
    return result


def prepare_from_config(prep: dict[str, Any], data_dir: Path) -> None:
    """The config's `prepare:` block: train a tokenizer if asked (`tokenizer: char|bpe`), then pack shards."""
    from lmstack.data.prepare import prepare_data
    from lmstack.data.tokenizer_train import train_tokenizer

    inputs = [str(resolve_path(p)) for p in prep.get("inputs", [])]
    if not inputs:
        raise LmstackError("the config's prepare block needs `inputs:`")
    tokenizer = str(prep.get("tokenizer", "char"))
    if tokenizer in ("char", "bpe"):
        tokenizer = str(train_tokenizer(inputs, str(data_dir / "tokenizer-trained"), kind=tokenizer,
                                        vocab_size=int(prep.get("vocab_size", 8000)),
                                        **({"doc_split": prep["doc_split"]} if "doc_split" in prep else {})))
    options = {k: prep[k] for k in ("val_fraction", "doc_split", "split", "dedup", "normalize", "min_chars",
                                    "field") if k in prep}
    prepare_data(inputs, str(data_dir), tokenizer, **options)


def _pair_source(spec: Any, run: dict[str, Any], cfg: TrainConfig, seq_len: int) -> tuple[PairSource, Tokenizer]:
    from lmstack.data.batching import PairDataset

    if not isinstance(spec, dict) or "train" not in spec or "val" not in spec:
        raise LmstackError("seq2seq `pairs:` must be a mapping: {train: [src, tgt], val: [src, tgt]}")
    if not run.get("tokenizer"):
        raise LmstackError("seq2seq pretraining needs `tokenizer:` (a folder from `lmstack tokenizer train`)")
    tok_dir = resolve_path(run["tokenizer"])
    if not (tok_dir / "tokenizer.json").exists() and run.get("tokenizer_train"):
        from lmstack.data.tokenizer_train import train_tokenizer
        tok_spec = dict(run["tokenizer_train"])
        inputs = [str(resolve_path(p)) for p in tok_spec.pop("inputs", [])]
        train_tokenizer(inputs, str(tok_dir), **tok_spec)
    tok = Tokenizer.from_dir(tok_dir)
    limit = spec.get("limit")
    train = PairDataset(*(resolve_path(p) for p in spec["train"]), tok, seq_len, limit=limit)
    val = PairDataset(*(resolve_path(p) for p in spec["val"]), tok, seq_len)
    micro = cfg.micro_batch_size or cfg.batch_size
    return PairSource(train, val, cfg.batch_size // micro, cfg.seed, cfg.eval_batches, seq_len), tok


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

