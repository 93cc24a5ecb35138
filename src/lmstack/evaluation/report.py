"""Evaluation reports: a text table, results.json and report.md with every per-example prediction, and a bar
chart (comparison.png) of the models side by side."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmstack.errors import LmstackError
from lmstack.evaluation.runner import TaskResult
from lmstack.io import atomic_write, atomic_write_json, atomic_write_text

Results = dict[str, dict[str, TaskResult]]  # model label -> task -> result


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def metric_rows(results: Results) -> tuple[list[str], list[tuple[str, str, list[Any]]]]:
    """(model labels, [(task, metric, [value per model])]) in task order."""
    models = list(results)
    rows: list[tuple[str, str, list[Any]]] = []
    seen: set[tuple[str, str]] = set()
    for label in models:
        for task, res in results[label].items():
            for metric in res.metrics:
                if (task, metric) not in seen:
                    seen.add((task, metric))
                    rows.append((task, metric, [results[m][task].metrics.get(metric, float("nan"))
                                                if task in results[m] else float("nan") for m in models]))
    return models, rows


def table(results: Results) -> str:
    """An aligned text table: one row per task and metric, one column per model; sacreBLEU signatures below."""
    models, rows = metric_rows(results)
    header = ["task", "metric", *models]
    body = [[t, m, *(_fmt(v) for v in vals)] for t, m, vals in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"{task} {key}: {value}" for task, key, value in signatures(results)]
    return "\n".join(lines)


def signatures(results: Results) -> list[tuple[str, str, str]]:
    out, seen = [], set()
    for res_by_task in results.values():
        for task, res in res_by_task.items():
            for key, value in res.info.items():
                if key.endswith("_signature") and (task, key) not in seen:
                    seen.add((task, key))
                    out.append((task, key.replace("_", " "), value))
    return out


def summary(results: Results) -> dict[str, Any]:
    """`--json`: {task: {metric: value}} for one model, {model: {task: {metric: value}}} for several."""
    per_model = {label: {task: dict(res.metrics) for task, res in by_task.items()}
                 for label, by_task in results.items()}
    return next(iter(per_model.values())) if len(per_model) == 1 else per_model


def _md_cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = text.replace("|", "\\|").replace("\n", "⏎")
    return text if len(text) <= 300 else text[:150] + " … " + text[-140:]


def markdown(results: Results, command: str) -> str:
    models, rows = metric_rows(results)
    lines = ["# lmstack eval report", "", f"`{command}`", "", "| task | metric | " + " | ".join(models) + " |",
             "|---|---|" + "---|" * len(models)]
    lines += [f"| {t} | {m} | " + " | ".join(_fmt(v) for v in vals) + " |" for t, m, vals in rows]
    for task, key, value in signatures(results):
        lines += ["", f"{task} {key}: `{value}`"]
    for label, by_task in results.items():
        for task, res in by_task.items():
            info = ", ".join(f"{k} {v}" for k, v in res.info.items() if not k.endswith("_signature"))
            lines += ["", f"## {label} - {task}", "", info, ""]
            if not res.examples:
                continue
            keys = list(res.examples[0])
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_md_cell(ex.get(k, "")) for k in keys) + " |" for ex in res.examples]
    return "\n".join(lines) + "\n"


def bar_chart(results: Results, path: Path) -> None:
    """One panel per task and metric, one bar per model, written to `path` as a PNG."""
    import matplotlib.pyplot as plt

    fig = chart_figure(results)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def chart_figure(results: Results):
    """The comparison chart as a matplotlib Figure (the caller closes it)."""
    try:
        import matplotlib
    except ImportError:
        raise LmstackError("the comparison chart needs matplotlib: pip install matplotlib "
                           "(or pip install 'lmstack[eval]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models, rows = metric_rows(results)
    n = max(len(rows), 1)
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    colors = [f"C{i}" for i in range(len(models))]
    for ax, (task, metric, vals) in zip(axes.flat, rows):
        heights = [0.0 if (isinstance(v, float) and math.isnan(v)) else v for v in vals]
        bars = ax.bar(range(len(models)), heights, color=colors)
        ax.bar_label(bars, labels=[_fmt(v) for v in vals], fontsize=8)
        if min(heights, default=0.0) >= 0:  # scores are non-negative: the axis starts at 0, even when all are 0
            ax.set_ylim(0, max(max(heights, default=0.0) * 1.15, 1e-9) if any(heights) else 1.0)
        ax.set_title(f"{task}\n{metric}", fontsize=9)
        ax.set_xticks(range(len(models)), [m if len(m) <= 18 else m[:16] + "…" for m in models], fontsize=7,
                      rotation=15)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def write_reports(results: Results, out: str | Path, command: str) -> list[Path]:
    """results.json, report.md and comparison.png in `out` (each written atomically)."""
    out = Path(out)
    payload = {"command": command, "summary": summary(results),
               "models": {label: {task: res.to_dict() for task, res in by_task.items()}
                          for label, by_task in results.items()}}
    paths = [out / "results.json", out / "report.md", out / "comparison.png"]
    atomic_write_json(paths[0], payload)
    atomic_write_text(paths[1], markdown(results, command))
    bar_chart(results, paths[2])
    return paths
