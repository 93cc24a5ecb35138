"""The `lmstack eval` verb: its signature is the command line (see the verb table in cli.py)."""

import shlex
import sys
from pathlib import Path
from typing import Any, Literal

from lmstack.errors import LmstackError


def evaluate(*, model: list[str], tasks: str, adapter: list[str] | None = None, limit: int | None = None,
             num_fewshot: int | None = None, seed: int | None = None, out: str | None = None,
             data_root: str | None = None, batch_size: int = 8, stride: int | None = None,
             dtype: Literal["auto", "float32", "bfloat16"] = "auto", progress: bool = True) -> dict[str, Any]:
    """Evaluate one or more models on evaluation tasks; print a table, write JSON / Markdown / PNG reports.

    Tasks are built-in names (gsm8k, gsm8k-8shot, multi30k-en-de, multi30k-en-fr, tinyshakespeare-ppl,
    hh-rlhf-harmless, course-quiz) or task YAML files. Several --model values are compared side by side.

    Args:
        model: A registry name or checkpoint path; repeat the option to compare several models.
        tasks: Comma-separated task names or task .yaml files.
        adapter: A PEFT adapter folder for the --model at the same position; give one per --model ('none'
            for a model without one).
        limit: Evaluate only the first N examples of each task (windows for perplexity tasks).
        num_fewshot: Few-shot examples per prompt (default: the task's own setting).
        seed: Seed of the few-shot draw and of any sampling (default: each task's seed).
        out: Folder for results.json, report.md (every per-example prediction) and comparison.png.
        data_root: The shared data folder that ${data} in task files refers to (default $LMSTACK_DATA, else
            ../shared/data).
        batch_size: Sequences per forward pass when scoring or generating.
        stride: Perplexity window stride in tokens (default: the task's stride).
        dtype: Compute dtype of the weights: auto (bfloat16 where the CPU has native bf16 or on a GPU, else
            float32), float32 or bfloat16.
        progress: Show progress bars on stderr.
    """
    from lmstack.evaluation.metrics import KNOWN_METRICS  # noqa: F401  (import errors surface here, early)
    from lmstack.evaluation.tasks import load_task
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise LmstackError("--tasks is empty; give task names or task files, comma-separated")
    if not model:
        raise LmstackError("give at least one --model")
    adapters = _pair_adapters(model, adapter)
    for value, flag in ((limit, "--limit"), (batch_size, "--batch-size"), (stride, "--stride")):
        if value is not None and value < 1:
            raise LmstackError(f"{flag} must be >= 1, not {value}")
    if num_fewshot is not None and num_fewshot < 0:
        raise LmstackError(f"--num-fewshot must be >= 0, not {num_fewshot}")
    specs = [load_task(n, data_root) for n in names]  # every task file is checked before any model loads

    from lmstack.evaluation.report import write_reports
    from lmstack.evaluation.runner import RunOptions, generation_config, load_eval_model, run_task, set_seed
    for spec in specs:  # sampling settings too: a bad temperature is reported before the first model loads
        if spec.type == "generate":
            generation_config(spec, seed or 0)
    opts = RunOptions(limit=limit, num_fewshot=num_fewshot, seed=seed, batch_size=batch_size, stride=stride,
                      progress=progress)
    results: dict[str, Any] = {}
    for name, adapter_path in zip(model, adapters):
        em = load_eval_model(name, adapter_path, dtype)
        label = em.label if em.label not in results else f"{em.label} #{len(results) + 1}"
        results[label] = {}
        for spec in specs:
            set_seed(seed)
            if progress:
                print(f"[{label}] {spec.name} ...", file=sys.stderr, flush=True)
            results[label][spec.name] = run_task(em, spec, opts)
        del em
    if out is not None:
        command = "lmstack eval " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["eval"] \
            else f"evaluate(model={model!r}, tasks={tasks!r}, limit={limit}, num_fewshot={num_fewshot}, seed={seed})"
        write_reports(results, Path(out), command)
    return results


def _pair_adapters(models: list[str], adapters: list[str] | None) -> list[str | None]:
    if not adapters:
        return [None] * len(models)
    if len(adapters) != len(models):
        raise LmstackError(f"{len(adapters)} --adapter value(s) for {len(models)} --model value(s): give one per "
                           "--model, in the same order ('none' for a model without an adapter)")
    return [None if a.lower() in ("none", "-") else a for a in adapters]
