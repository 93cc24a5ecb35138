"""`lmstack eval`: metrics, declarative task files, batched scoring, reports and an lm-evaluation-harness adapter.

    metrics.py   ROUGE (rouge-score), BLEU/chrF/TER (sacrebleu), SQuAD EM/F1, classification, MC acc/acc_norm
    tasks.py     YAML task files, datasets, few-shot prompts; built-in tasks in tasks/*.yaml
    scoring.py   the one batched log-likelihood scorer; strided perplexity windows
    runner.py    runs a task on a model; report.py writes the table, JSON, Markdown and the bar chart
    harness.py   lmstack as an lm-eval `LM` (`python -m lmstack.evaluation.harness run --model lmstack ...`)
    command.py   the `lmstack eval` verb

Heavy imports (torch, the models) happen inside the modules that need them, so the CLI starts fast.
"""
