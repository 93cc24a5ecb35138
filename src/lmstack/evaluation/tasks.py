"""Declarative evaluation tasks: a YAML file names the data, the prompt, the task type and the metrics.

    name: gsm8k
    type: generate                    # generate | multiple_choice | loglikelihood | perplexity
    dataset:
      path: ${data}/gsm8k/dev.jsonl   # ${data} = the shared data folder; relative paths = beside the YAML
      format: jsonl                   # jsonl (.jsonl/.jsonl.gz), tsv, pairs (two line-aligned files), text
      fields: [question, answer]      # keys every row must have
    fewshot: {path: ${data}/gsm8k/train.jsonl, num: 0, seed: 1234, separator: "\\n\\n"}
    prompt: "Question: {{ question }}\\nAnswer:"   # jinja2 over the row's fields
    target: "{{ answer }}"                          # the reference (and the answer shown in few-shot examples)
    answer_extraction: gsm8k          # none | gsm8k | first_line, or {regex: PATTERN}
    metrics: [exact_match]
    generation: {max_new_tokens: 256, stop: ["\\n\\n"]}

multiple_choice tasks name a `choices` field (a list of strings) and a `gold` field (an index or a letter);
each choice is scored as `choice_prefix + choice` after the prompt. loglikelihood tasks score `target` after the
prompt. perplexity tasks read `text` (a field, or the whole file for format text) with a strided window.

Built-in tasks live beside this module in tasks/*.yaml; `known_tasks()` lists them.
"""

from __future__ import annotations

import gzip
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from lmstack import runconfig
from lmstack.errors import LmstackError
from lmstack.evaluation.metrics import EXTRACTORS, METRICS, check_metric, extract_regex
from lmstack.io import json_records

TASK_DIR = Path(__file__).resolve().parent / "tasks"
TASK_TYPES = ("generate", "multiple_choice", "loglikelihood", "perplexity")
FORMATS = ("jsonl", "tsv", "pairs", "text")
REQUIRED = {  # keys a task file must have, by type (beyond name, type, dataset.path and metrics)
    "generate": ("prompt", "target"),
    "multiple_choice": ("prompt", "choices", "gold"),
    "loglikelihood": ("prompt", "target"),
    "perplexity": (),
}
TYPE_METRICS = {  # which metrics each task type computes
    "generate": set(METRICS),
    "multiple_choice": {"acc", "acc_norm"},
    "loglikelihood": {"acc", "perplexity"},
    "perplexity": {"perplexity"},
}




def known_tasks() -> list[str]:
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


# ------------------------------------------------------------------------------------------- spec


@dataclass
class FewShot:
    path: Path | None = None  # None: draw from the evaluation rows themselves (never the row being asked)
    source: Path | None = None  # format pairs: the few-shot pool's source side
    num: int = 0
    seed: int = 1234
    separator: str = "\n\n"


@dataclass
class EvalTask:
    """One evaluation task, as its YAML file describes it (load_task)."""

    name: str
    type: str
    file: Path  # the YAML it came from (for error messages)
    data_path: Path
    data_format: str
    fields: list[str]
    metrics: list[str]
    prompt: str = ""
    target: str = ""
    choices: str = ""  # field holding the list of choices
    gold: str = ""  # field holding the gold index or letter
    choice_prefix: str = " "
    target_prefix: str = " "  # between a few-shot example's prompt and its answer
    source_path: Path | None = None  # format pairs: the source side (data_path is the target side)
    text_field: str = "text"
    text_range: tuple[float, float] = (0.0, 1.0)  # format text: this fraction of the file's characters
    preprocess: str | None = None
    fewshot: FewShot = field(default_factory=FewShot)
    answer_extraction: str | dict[str, str] = "none"
    reference_extraction: str | dict[str, str] | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    seq2seq_prompt: str | None = None  # prompt for encoder-decoder models (default: prompt)
    chat: bool = False  # wrap the prompt in the model's chat template as one user turn
    window: int | None = None  # perplexity: tokens per window (default: the model's context)
    stride: int | None = None  # perplexity: window stride (default: half the window)
    description: str = ""

    def extractor(self, which: str = "answer") -> Any:
        spec = self.answer_extraction if which == "answer" else self.reference_extraction
        if spec is None:
            return EXTRACTORS["none"]
        if isinstance(spec, dict) and "regex" in spec:
            return extract_regex(spec["regex"])
        if isinstance(spec, str) and spec in EXTRACTORS:
            return EXTRACTORS[spec]
        raise LmstackError(f"{self.file}: unknown answer extraction {spec!r} "
                           f"(known: {', '.join(EXTRACTORS)}, or {{regex: PATTERN}})")


def _get(cfg: dict[str, Any], key: str, file: Path, where: str = "") -> Any:
    if key not in cfg or cfg[key] is None:
        raise LmstackError(f"{file}: missing key '{where}{key}'")
    return cfg[key]


KNOWN_KEYS = {"name", "description", "type", "dataset", "fewshot", "prompt", "target", "choices", "gold",
              "choice_prefix", "target_prefix", "answer_extraction", "reference_extraction", "metrics",
              "generation", "seq2seq_prompt", "chat", "window", "stride"}
DATASET_KEYS = {"path", "format", "fields", "source", "text_field", "text_range", "preprocess"}
FEWSHOT_KEYS = {"path", "source", "num", "seed", "separator"}


def _check_keys(cfg: dict[str, Any], known: set[str], file: Path, where: str = "") -> None:
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise LmstackError(f"{file}: unknown key '{where}{unknown[0]}' (known: {', '.join(sorted(known))})")


def _int(cfg: dict[str, Any], key: str, default: int | None, file: Path, where: str = "") -> int | None:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise LmstackError(f"{file}: '{where}{key}' must be an integer, not {value!r}")
    return value


def _path(value: str, file: Path, data_root: Path) -> Path:
    value = str(value).replace("${data}", str(data_root))
    p = Path(value).expanduser()
    return p if p.is_absolute() else (file.parent / p)


def resolve_task_file(name: str) -> Path:
    """A built-in task name, or a path to a task YAML."""
    builtin = TASK_DIR / f"{name}.yaml"
    if builtin.exists():
        return builtin
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise LmstackError(f"task file not found: {p}")
        return p
    raise LmstackError(f"unknown task {name!r} (known: {', '.join(known_tasks())}; or pass a task .yaml file)")


def load_task(name: str, data_root: str | Path | None = None) -> EvalTask:
    """Read and validate a task file; every missing or bad key is an error naming the file and the key."""
    file = resolve_task_file(name)
    root = runconfig.data_root(data_root)
    cfg = runconfig.read_yaml(file)  # one-line errors: file:line for bad YAML, a non-mapping top level
    _check_keys(cfg, KNOWN_KEYS, file)
    task_type = _get(cfg, "type", file)
    if task_type not in TASK_TYPES:
        raise LmstackError(f"{file}: unknown task type {task_type!r} (known: {', '.join(TASK_TYPES)})")
    data = _get(cfg, "dataset", file)
    if not isinstance(data, dict):
        raise LmstackError(f"{file}: 'dataset' must be a mapping with a 'path'")
    _check_keys(data, DATASET_KEYS, file, "dataset.")
    data_path = _path(_get(data, "path", file, "dataset."), file, root)
    fmt = data.get("format") or _format_from_suffix(data_path)
    if fmt not in FORMATS:
        raise LmstackError(f"{file}: unknown dataset.format {fmt!r} (known: {', '.join(FORMATS)})")
    for key in REQUIRED[task_type]:
        _get(cfg, key, file)
    metrics = _get(cfg, "metrics", file)
    if not isinstance(metrics, list) or not metrics:
        raise LmstackError(f"{file}: 'metrics' must be a non-empty list")
    for m in metrics:
        check_metric(m, f"{file}: ")
        allowed = TYPE_METRICS[task_type]
        if m not in allowed:
            raise LmstackError(f"{file}: metric {m!r} does not apply to a {task_type} task "
                               f"(it has: {', '.join(sorted(allowed))})")
    shots = cfg.get("fewshot") or {}
    if not isinstance(shots, dict):
        raise LmstackError(f"{file}: 'fewshot' must be a mapping")
    _check_keys(shots, FEWSHOT_KEYS, file, "fewshot.")
    fewshot = FewShot(path=_path(shots["path"], file, root) if shots.get("path") else None,
                      source=_path(shots["source"], file, root) if shots.get("source") else None,
                      num=_int(shots, "num", 0, file, "fewshot."), seed=_int(shots, "seed", 1234, file, "fewshot."),
                      separator=str(shots.get("separator", "\n\n")))
    spec = EvalTask(
        name=str(cfg.get("name") or file.stem), type=task_type, file=file, data_path=data_path, data_format=fmt,
        fields=list(data.get("fields") or []), metrics=list(metrics), prompt=str(cfg.get("prompt", "")),
        target=str(cfg.get("target", "")), choices=str(cfg.get("choices", "")), gold=str(cfg.get("gold", "")),
        choice_prefix=str(cfg.get("choice_prefix", " ")), target_prefix=str(cfg.get("target_prefix", " ")),
        source_path=_path(data["source"], file, root) if data.get("source") else None,
        text_field=str(data.get("text_field", "text")),
        text_range=tuple(data.get("text_range", (0.0, 1.0))),  # type: ignore[arg-type]
        preprocess=data.get("preprocess"), fewshot=fewshot,
        answer_extraction=cfg.get("answer_extraction", "none"),
        reference_extraction=cfg.get("reference_extraction"), generation=dict(cfg.get("generation") or {}),
        seq2seq_prompt=cfg.get("seq2seq_prompt"), chat=bool(cfg.get("chat", False)),
        window=_int(cfg, "window", None, file), stride=_int(cfg, "stride", None, file),
        description=str(cfg.get("description", "")))
    if fmt == "pairs" and spec.source_path is None:
        raise LmstackError(f"{file}: missing key 'dataset.source' (format pairs needs a source and a target file)")
    if spec.preprocess is not None and spec.preprocess not in PREPROCESS:
        raise LmstackError(f"{file}: unknown dataset.preprocess {spec.preprocess!r} (known: {', '.join(PREPROCESS)})")
    spec.extractor("answer"), spec.extractor("reference")  # validate now, not after the model ran
    return spec


def _format_from_suffix(path: Path) -> str:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".tsv"):
        return "tsv"
    return "text"


# ------------------------------------------------------------------------------------------ data


@dataclass
class Row:
    fields: dict[str, Any]
    where: str  # file:line, for error messages and reports


def _open_text(path: Path) -> Any:
    if not path.exists():
        raise LmstackError(f"dataset file not found: {path} (set --data or LMSTACK_DATA to the data folder)")
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_rows(spec: EvalTask, path: Path | None = None, source: Path | None = None) -> list[Row]:
    """The task's rows (or those of `path`, e.g. the few-shot pool), each checked for the task's fields."""
    path, fmt = path or spec.data_path, spec.data_format
    rows: list[Row] = []
    if fmt == "jsonl":
        with _open_text(path) as f:
            for n, obj in json_records(path, enumerate(f, 1)):
                if not isinstance(obj, dict):
                    raise LmstackError(f"{path}:{n}: expected a JSON object")
                rows.append(Row(obj, f"{path}:{n}"))
    elif fmt == "tsv":
        with _open_text(path) as f:
            header = f.readline().rstrip("\n").split("\t")
            for n, line in enumerate(f, 2):
                if line.strip():
                    rows.append(Row(dict(zip(header, line.rstrip("\n").split("\t"))), f"{path}:{n}"))
    elif fmt == "pairs":
        source = source or spec.source_path
        with _open_text(source) as fs, _open_text(path) as ft:
            src, tgt = fs.read().splitlines(), ft.read().splitlines()
        if len(src) != len(tgt):
            raise LmstackError(f"{source} has {len(src)} lines but {path} has {len(tgt)}; pairs must be line-aligned")
        rows = [Row({"source": s, "target": t}, f"{path}:{n}") for n, (s, t) in enumerate(zip(src, tgt), 1)]
    else:  # text: the whole file (or a slice of it) is one document
        with _open_text(path) as f:
            text = f.read()
        lo, hi = spec.text_range
        rows = [Row({spec.text_field: text[int(lo * len(text)):int(hi * len(text))]}, f"{path}:1")]
    _check_fields(spec, rows, list(spec.fields))
    if spec.preprocess:
        rows = [Row(PREPROCESS[spec.preprocess](r.fields, r.where), r.where) for r in rows]
    _check_fields(spec, rows, _needed_fields(spec))
    return rows


def _check_fields(spec: EvalTask, rows: list[Row], needed: list[str]) -> None:
    for r in rows:
        missing = [k for k in needed if k not in r.fields]
        if missing:
            raise LmstackError(f"{r.where}: row is missing key(s) {', '.join(map(repr, missing))} "
                               f"(task {spec.name} needs {', '.join(needed)})")


def _needed_fields(spec: EvalTask) -> list[str]:
    if spec.type == "multiple_choice":
        return [spec.choices, spec.gold]
    if spec.type == "perplexity":
        return [spec.text_field]
    return []


def hh_rlhf_pair(row: dict[str, Any], where: str) -> dict[str, Any]:
    """An hh-rlhf pair as a two-way choice: the shared conversation up to the last "Assistant:" is the context,
    and the two final assistant replies are the choices (gold 0 = the chosen one)."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise LmstackError(f"{where}: row is missing key {key!r} (hh-rlhf rows need chosen and rejected)")
    marker = "\n\nAssistant:"
    chosen, rejected = row["chosen"], row["rejected"]
    cut = chosen.rfind(marker)
    if cut < 0 or not rejected.startswith(chosen[:cut + len(marker)]):
        # The two conversations differ before the last reply: score them whole from an empty context.
        return {"context": "", "choices": [chosen, rejected], "gold": 0}
    cut += len(marker)
    return {"context": chosen[:cut], "choices": [chosen[cut:], rejected[cut:]], "gold": 0}


PREPROCESS = {"hh_rlhf_pair": hh_rlhf_pair}


# ---------------------------------------------------------------------------------------- prompts

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


def render(spec: EvalTask, template: str, row: Row) -> str:
    try:
        return _ENV.from_string(template).render(**row.fields)
    except jinja2.UndefinedError as e:
        raise LmstackError(f"{row.where}: {e.message} (used by a template in {spec.file})") from None
    except jinja2.TemplateSyntaxError as e:
        raise LmstackError(f"{spec.file}: bad template ({e.message})") from None


def gold_index(spec: EvalTask, row: Row) -> int:
    """The gold choice as an index: an int, a digit string, or a letter A, B, ..."""
    value, n = row.fields[spec.gold], len(choices_of(spec, row))
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().isalpha():
        index = ord(value.strip().upper()) - ord("A")
    else:
        try:
            index = int(value)
        except (TypeError, ValueError):
            raise LmstackError(f"{row.where}: gold {value!r} is neither an index nor a letter") from None
    if not 0 <= index < n:
        raise LmstackError(f"{row.where}: gold {value!r} is outside the {n} choices")
    return index


def choices_of(spec: EvalTask, row: Row) -> list[str]:
    choices = row.fields[spec.choices]
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise LmstackError(f"{row.where}: {spec.choices!r} must be a non-empty list of strings")
    return choices


def example_answer(spec: EvalTask, row: Row) -> str:
    """What a few-shot example shows after its prompt: the target, or the gold choice."""
    if spec.type == "multiple_choice":
        return spec.choice_prefix + choices_of(spec, row)[gold_index(spec, row)]
    return spec.target_prefix + render(spec, spec.target, row)


def fewshot_examples(spec: EvalTask, pool: list[Row], index: int, k: int, seed: int,
                     same_pool: bool) -> list[Row]:
    """k examples for evaluation row `index`, drawn without replacement by a generator seeded with
    (seed, index): the same seed gives the same prompts, whatever --limit or the order of evaluation."""
    if k <= 0:
        return []
    candidates = [i for i in range(len(pool)) if not (same_pool and i == index)]
    if len(candidates) < k:
        raise LmstackError(f"task {spec.name}: {k}-shot needs {k} examples, the few-shot pool has {len(candidates)}")
    rng = random.Random(seed * 1_000_003 + index)
    return [pool[i] for i in rng.sample(candidates, k)]


def build_prompt(spec: EvalTask, row: Row, shots: list[Row], template: str | None = None) -> str:
    """Few-shot examples (prompt + answer), separated by fewshot.separator, then the row's prompt."""
    template = template if template is not None else spec.prompt
    parts = [render(spec, template, s) + example_answer(spec, s) for s in shots]
    return spec.fewshot.separator.join([*parts, render(spec, template, row)])
