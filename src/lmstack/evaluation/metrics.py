"""Evaluation metrics: the standard libraries where they exist, so the scores compare with published ones.

- ROUGE-1/2/L/Lsum through `rouge-score`; BLEU, chrF and TER through `sacrebleu` (with its signature).
- Exact match and token F1 with SQuAD's answer normalization (the official evaluate-v1.1 script).
- Classification accuracy, precision, recall and F1, macro and micro averaged.
- Multiple-choice `acc` / `acc_norm` as lm-evaluation-harness computes them.
- Answer extraction for generated text (GSM8K: the number after `####`, else the last number).

Every corpus metric is a function `(predictions, references) -> {name: value}`, listed in `METRICS`; a task file
names them, and an unknown name is an error that lists the known ones.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

from lmstack.errors import LmstackError


def _require(module: str, package: str) -> Any:
    """Import an optional metric library, or say which package to install."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LmstackError(f"metric library {package!r} is not installed: pip install {package} "
                           "(or pip install 'lmstack[eval]')") from None


# ----------------------------------------------------------------------------------------- ROUGE

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_scores(prediction: str, reference: str, use_stemmer: bool = False) -> dict[str, dict[str, float]]:
    """rouge-score's precision / recall / F1 for one pair: {"rouge1": {"precision", "recall", "f1"}, ...}.

    ROUGE-L here is the longest common *subsequence* (rouge-score, Lin 2004), not the longest common substring.
    """
    rouge_scorer = _require("rouge_score.rouge_scorer", "rouge-score")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    scores = scorer.score(reference, prediction)  # rouge-score takes (target, prediction)
    return {k: {"precision": s.precision, "recall": s.recall, "f1": s.fmeasure} for k, s in scores.items()}


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE F1 over the examples (what `evaluate`'s rouge and most papers report)."""
    totals = collections.defaultdict(float)
    for p, r in zip(predictions, references, strict=True):
        for k, s in rouge_scores(p, r).items():
            totals[k] += s["f1"]
    n = max(len(predictions), 1)
    return {k: totals[k] / n for k in ROUGE_TYPES}


# ------------------------------------------------------------------------------------- sacreBLEU


def _sacrebleu(kind: str, predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    sacrebleu = _require("sacrebleu", "sacrebleu")
    metric = {"bleu": sacrebleu.metrics.BLEU, "chrf": sacrebleu.metrics.CHRF, "ter": sacrebleu.metrics.TER}[kind]()
    score = metric.corpus_score(list(predictions), [list(references)])
    return {kind: score.score, f"{kind}_signature": str(metric.get_signature())}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    return _sacrebleu("bleu", predictions, references)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    return _sacrebleu("chrf", predictions, references)


def ter(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    return _sacrebleu("ter", predictions, references)


# ---------------------------------------------------------------------------- exact match and F1


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalization: lower case, drop punctuation and the articles a/an/the, squeeze whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1_score(prediction: str, reference: str) -> float:
    """SQuAD token F1 between the normalized bags of words."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    scores = [exact_match_score(p, r) for p, r in zip(predictions, references, strict=True)]
    return {"exact_match": sum(scores) / max(len(scores), 1)}


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    scores = [token_f1_score(p, r) for p, r in zip(predictions, references, strict=True)]
    return {"f1": sum(scores) / max(len(scores), 1)}


# -------------------------------------------------------------------------------- classification


def classification(predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, float]:
    """Accuracy, and precision / recall / F1 macro averaged (over the reference and predicted labels, as
    scikit-learn does) and micro averaged (which for single-label data all equal accuracy)."""
    labels = sorted(set(references) | set(predictions), key=str)
    tp = collections.Counter(r for p, r in zip(predictions, references, strict=True) if p == r)
    n_pred, n_ref = collections.Counter(predictions), collections.Counter(references)
    per_p = [tp[c] / n_pred[c] if n_pred[c] else 0.0 for c in labels]
    per_r = [tp[c] / n_ref[c] if n_ref[c] else 0.0 for c in labels]
    per_f = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(per_p, per_r)]
    total_tp, n = sum(tp.values()), len(references)
    micro = total_tp / n if n else 0.0  # sum TP / sum (TP + FP) = sum TP / n for one label per example
    k = max(len(labels), 1)
    return {"accuracy": micro, "precision_macro": sum(per_p) / k, "recall_macro": sum(per_r) / k,
            "f1_macro": sum(per_f) / k, "precision_micro": micro, "recall_micro": micro, "f1_micro": micro}


# ------------------------------------------------------------------------------- multiple choice


def argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])  # first index wins ties, as numpy.argmax


def multiple_choice_predictions(loglikelihoods: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """lm-evaluation-harness' choice rule (api/task.py, multiple_choice): `acc` takes the argmax of the summed
    log-likelihoods, `acc_norm` the argmax of log-likelihood / len(choice). The harness calls this byte-length
    normalization; its code divides by `len()` of the choice string (characters, without the target delimiter),
    which equals the UTF-8 byte length for ASCII text. We divide exactly as its code does."""
    lengths = [float(len(c)) for c in choices]
    normed = [ll / n if n else ll for ll, n in zip(loglikelihoods, lengths)]
    return argmax(loglikelihoods), argmax(normed)


# ------------------------------------------------------------------------------ answer extraction

NUMBER = r"-?[\d,]*\.?\d+"


def extract_gsm8k(text: str) -> str:
    """GSM8K's answer: the number after `####`, else the last number in the text; commas and $ dropped."""
    match = re.search(r"####\s*\$?\s*(" + NUMBER + ")", text)
    if match is None:
        numbers = re.findall(NUMBER, text)
        if not numbers:
            return ""
        value = numbers[-1]
    else:
        value = match.group(1)
    value = value.replace(",", "").rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", value):  # "18.00" and "18" are the same answer
        value = value.split(".")[0]
    return value


def extract_regex(pattern: str) -> Callable[[str], str]:
    """An extractor from a task file: the first group of the first match (the whole match without a group)."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise LmstackError(f"bad answer_regex {pattern!r}: {e}") from None

    def extract(text: str) -> str:
        m = compiled.search(text)
        if m is None:
            return ""
        return (m.group(1) if compiled.groups else m.group(0)).strip()
    return extract


EXTRACTORS: dict[str, Callable[[str], str]] = {
    "none": lambda text: text.strip(),
    "gsm8k": extract_gsm8k,
    "first_line": lambda text: text.strip().split("\n")[0].strip(),
}


# ---------------------------------------------------------------------------------------- registry

METRICS: dict[str, Callable[[Sequence[Any], Sequence[Any]], dict[str, Any]]] = {
    "exact_match": exact_match,
    "f1": token_f1,
    "rouge": rouge,
    "bleu": bleu,
    "chrf": chrf,
    "ter": ter,
    "classification": classification,
}
# Metrics that the scoring itself produces (multiple choice, log-likelihood, perplexity), not text metrics.
SCORE_METRICS = {"acc", "acc_norm", "perplexity"}
KNOWN_METRICS = sorted(set(METRICS) | SCORE_METRICS)


def check_metric(name: str, where: str = "") -> None:
    if name not in METRICS and name not in SCORE_METRICS:
        raise LmstackError(f"{where}unknown metric {name!r} (known: {', '.join(KNOWN_METRICS)})")


def compute(name: str, predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, Any]:
    check_metric(name)
    return METRICS[name](predictions, references)


def perplexity_from_nll(nll_sum: float, n_tokens: int) -> float:
    return math.exp(nll_sum / n_tokens) if n_tokens else float("nan")
