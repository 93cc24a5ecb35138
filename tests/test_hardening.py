"""Regressions from the hardening pass (issue 13): each test reproduces a failure a newcomer or a fuzzing pass
found, so it cannot come back."""

from __future__ import annotations

import pytest

from lmstack.errors import LmstackError


# ------------------------------------------------------------------------------- eval comparison chart


def test_comparison_chart_never_draws_a_negative_axis_for_zero_scores():
    pytest.importorskip("matplotlib")
    from lmstack.evaluation.report import chart_figure
    from lmstack.evaluation.runner import TaskResult

    results = {m: {"qa": TaskResult("qa", "generate", {"exact_match": 0.0, "f1": 0.0}, {"n": 3})}
               for m in ("a", "b")}
    fig = chart_figure(results)
    for ax in fig.axes[:2]:
        low, high = ax.get_ylim()
        assert low == 0 and high > 0
