"""Run evaluation tasks on models: prompts -> generations or log-likelihoods -> metrics + per-example records.

Generate tasks go through `lmstack.generation.Generator` (batched, stop strings, seq2seq models too); every
scoring task (multiple choice, log-likelihood, chosen-vs-rejected, perplexity) goes through the one batched
`Scorer`. Everything is deterministic for a seed: few-shot examples are drawn by (seed, example index) and
generation is greedy unless a task asks for sampling, which is then seeded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lmstack.errors import LmstackError
from lmstack.evaluation import metrics as M
from lmstack.evaluation.scoring import Scorer, perplexity_windows, window_perplexity
from lmstack.evaluation.tasks import (Row, EvalTask, build_prompt, choices_of, fewshot_examples, gold_index,
                                      read_rows, render)
from lmstack.tokenizer import Tokenizer


@dataclass
class EvalModel:
    label: str  # how reports name it: the model, plus "+adapter" when one is applied
    model: nn.Module
    tokenizer: Tokenizer | None
    family: str  # decoder | seq2seq | encoder
    context: int


def load_eval_model(name: str, adapter: str | None = None, dtype: str = "float32") -> EvalModel:
    """A model by registry name or path, with an optional PEFT adapter folder applied."""
    from lmstack.checkpoints import load_model
    loaded = load_model(name, adapter=adapter or None, dtype=dtype, inference=True)
    model, label = loaded.model, name
    if adapter:
        label = f"{name}+{Path(adapter).name}"
    return EvalModel(label=label, model=model.eval(), tokenizer=loaded.tokenizer,
                     family=getattr(loaded.config, "family", "decoder"), context=loaded.config.max_seq_len)


@dataclass
class TaskResult:
    task: str
    type: str
    metrics: dict[str, float]
    info: dict[str, Any]  # n examples, few-shot count, sacreBLEU signatures, time
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "type": self.type, "metrics": self.metrics, "info": self.info,
                "examples": self.examples}


@dataclass
class RunOptions:
    limit: int | None = None
    num_fewshot: int | None = None  # None: the task's fewshot.num
    seed: int | None = None  # None: the task's fewshot.seed (generation is greedy unless the task samples)
    batch_size: int = 8
    stride: int | None = None  # None: the task's stride
    progress: bool = True


def run_task(em: EvalModel, spec: EvalTask, opts: RunOptions) -> TaskResult:
    start = time.perf_counter()
    rows = read_rows(spec)
    if opts.limit is not None and spec.type != "perplexity":  # for perplexity, --limit counts windows
        rows = rows[:opts.limit]
    if not rows:
        raise LmstackError(f"task {spec.name}: the dataset {spec.data_path} has no rows")
    if spec.type == "generate":
        result = _run_generate(em, spec, rows, opts)
    elif spec.type == "multiple_choice":
        result = _run_multiple_choice(em, spec, rows, opts)
    elif spec.type == "loglikelihood":
        result = _run_loglikelihood(em, spec, rows, opts)
    else:
        result = _run_perplexity(em, spec, rows, opts)
    seconds = time.perf_counter() - start
    n = len(result.examples)
    result.info.update(examples=n, seconds=round(seconds, 3), examples_per_s=round(n / seconds, 3) if seconds else 0)
    return result


def _prompts(em: EvalModel, spec: EvalTask, rows: list[Row], opts: RunOptions) -> tuple[list[str], int, int]:
    """Each row's prompt with its few-shot examples; -> (prompts, k, seed)."""
    k = spec.fewshot.num if opts.num_fewshot is None else opts.num_fewshot
    seed = spec.fewshot.seed if opts.seed is None else opts.seed
    pool, same = rows, True
    if k > 0 and spec.fewshot.path is not None:
        pool, same = read_rows(spec, spec.fewshot.path, spec.fewshot.source), False
    template = spec.seq2seq_prompt if em.family == "seq2seq" and spec.seq2seq_prompt is not None else None
    prompts = [build_prompt(spec, row, fewshot_examples(spec, pool, i, k, seed, same), template)
               for i, row in enumerate(rows)]
    return prompts, k, seed


def _scorer(em: EvalModel, opts: RunOptions) -> Scorer:
    if em.family != "decoder":
        raise LmstackError(f"{em.label} is a {em.family} model; log-likelihood tasks need a decoder model")
    return Scorer(em.model, em.tokenizer, batch_size=opts.batch_size, max_length=em.context, progress=opts.progress)


# --------------------------------------------------------------------------------------- generate


def generation_config(spec: EvalTask, seed: int) -> Any:
    from lmstack.generation import GenerationConfig
    known = {"max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams", "stop"}
    unknown = sorted(set(spec.generation) - known)
    if unknown:
        raise LmstackError(f"{spec.file}: unknown generation key(s) {', '.join(unknown)} "
                           f"(known: {', '.join(sorted(known))})")
    cfg = GenerationConfig(**{k: (list(v) if k == "stop" else v) for k, v in spec.generation.items()}, seed=seed)
    cfg.validate()
    return cfg


def _run_generate(em: EvalModel, spec: EvalTask, rows: list[Row], opts: RunOptions) -> TaskResult:
    from lmstack.generation import Generator
    prompts, k, seed = _prompts(em, spec, rows, opts)
    cfg = generation_config(spec, seed)
    generator = Generator(em.model, em.tokenizer)
    inputs: list[str | list[int]] = list(prompts)
    if spec.chat:
        inputs = [generator.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
    # Batches of similar prompt length pad less; results go back to row order.
    lengths = [len(x) if isinstance(x, list) else len(em.tokenizer.encode(x)) for x in inputs]
    order = sorted(range(len(inputs)), key=lambda i: -lengths[i])
    outputs: list[str] = [""] * len(inputs)
    with tqdm(total=len(order), desc=f"{spec.name} generate", disable=not opts.progress, leave=False) as bar:
        for s in range(0, len(order), opts.batch_size):
            batch = order[s:s + opts.batch_size]
            for i, res in zip(batch, generator.generate_batch([inputs[i] for i in batch], cfg)):
                outputs[i] = res.text
            bar.update(len(batch))
    generator.release()
    extract, extract_ref = spec.extractor("answer"), spec.extractor("reference")
    predictions = [extract(o) for o in outputs]
    references = [extract_ref(render(spec, spec.target, r)) for r in rows]
    scores: dict[str, float] = {}
    info: dict[str, Any] = {"num_fewshot": k, "seed": seed}
    for name in spec.metrics:
        for key, value in M.compute(name, predictions, references).items():
            (info if key.endswith("_signature") else scores)[key] = value
    examples = []
    for row, prompt, out, pred, ref in zip(rows, prompts, outputs, predictions, references):
        ex: dict[str, Any] = {"id": row.where, "prompt": prompt, "output": out, "prediction": pred, "reference": ref}
        if "exact_match" in spec.metrics:
            ex["exact_match"] = M.exact_match_score(pred, ref)
        if "f1" in spec.metrics:
            ex["f1"] = M.token_f1_score(pred, ref)
        examples.append(ex)
    return TaskResult(spec.name, spec.type, scores, info, examples)


# -------------------------------------------------------------------------------- multiple choice


def _run_multiple_choice(em: EvalModel, spec: EvalTask, rows: list[Row], opts: RunOptions) -> TaskResult:
    prompts, k, seed = _prompts(em, spec, rows, opts)
    choices = [choices_of(spec, r) for r in rows]
    golds = [gold_index(spec, r) for r in rows]
    pairs = [(p, spec.choice_prefix + c) for p, cs in zip(prompts, choices) for c in cs]
    scores = _scorer(em, opts).score_text(pairs, desc=f"{spec.name} score")
    examples, at = [], 0
    for row, prompt, cs, gold in zip(rows, prompts, choices, golds):
        lls = [s.logprob for s in scores[at:at + len(cs)]]
        at += len(cs)
        pred, pred_norm = M.multiple_choice_predictions(lls, cs)
        examples.append({"id": row.where, "prompt": prompt, "choices": cs, "gold": gold, "loglikelihoods": lls,
                         "prediction": pred, "prediction_norm": pred_norm, "acc": float(pred == gold),
                         "acc_norm": float(pred_norm == gold)})
    n = len(examples)
    metrics = {m: sum(e[m] for e in examples) / n for m in ("acc", "acc_norm") if m in spec.metrics}
    return TaskResult(spec.name, spec.type, metrics, {"num_fewshot": k, "seed": seed}, examples)


# ---------------------------------------------------------------------------------- log-likelihood


def _run_loglikelihood(em: EvalModel, spec: EvalTask, rows: list[Row], opts: RunOptions) -> TaskResult:
    prompts, k, seed = _prompts(em, spec, rows, opts)
    targets = [spec.target_prefix + render(spec, spec.target, r) for r in rows]
    scores = _scorer(em, opts).score_text(list(zip(prompts, targets)), desc=f"{spec.name} score")
    examples = [{"id": r.where, "prompt": p, "target": t, "loglikelihood": s.logprob, "tokens": s.n_tokens,
                 "greedy": s.greedy} for r, p, t, s in zip(rows, prompts, targets, scores)]
    metrics: dict[str, float] = {}
    if "acc" in spec.metrics:
        metrics["acc"] = sum(s.greedy for s in scores) / len(scores)
    if "perplexity" in spec.metrics:
        metrics["perplexity"] = M.perplexity_from_nll(-sum(s.logprob for s in scores), sum(s.n_tokens for s in scores))
    return TaskResult(spec.name, spec.type, metrics, {"num_fewshot": k, "seed": seed}, examples)


# -------------------------------------------------------------------------------------- perplexity


def _run_perplexity(em: EvalModel, spec: EvalTask, rows: list[Row], opts: RunOptions) -> TaskResult:
    scorer = _scorer(em, opts)
    window = min(spec.window or em.context, em.context)
    stride = opts.stride or spec.stride or max(window // 2, 1)
    examples, all_windows, all_scores = [], [], []
    for row in rows:
        ids = em.tokenizer.encode(row.fields[spec.text_field])
        windows = perplexity_windows(ids, window, stride)
        if opts.limit is not None:
            windows = windows[:max(opts.limit - len(all_windows), 0)]
        scores = scorer.score([(w.context, w.continuation) for w in windows], desc=f"{spec.name} windows")
        for w, s in zip(windows, scores):
            examples.append({"id": row.where, "window": len(examples), "context_tokens": len(w.context),
                             "scored_tokens": s.n_tokens, "nll_mean": -s.logprob / s.n_tokens})
        all_windows += windows
        all_scores += scores
    ppl, _, n = window_perplexity(all_windows, all_scores)
    metrics = {"perplexity": ppl} if "perplexity" in spec.metrics else {}
    return TaskResult(spec.name, spec.type, metrics, {"window": window, "stride": stride, "tokens": n}, examples)


def set_seed(seed: int | None) -> None:
    if seed is not None:
        torch.manual_seed(seed)
