"""Prometheus metrics in the text exposition format (version 0.0.4), without a client library.

Counters, gauges and histograms, optionally labelled, thread-safe (the scheduler thread and the event loop
both update them). `Metrics.render()` is what GET /metrics returns.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

PREFIX = "lmstack_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)] + ([extra] if extra else [])
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(x: float) -> str:
    return ("+Inf" if x > 0 else "-Inf") if math.isinf(x) else repr(float(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = PREFIX + name, help, labels
        self.lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        super().__init__(name, help, labels)
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self.lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self.lock:
            items = sorted(self.values.items())
        return self.header() + [f"{self.name}_total{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help: str) -> None:
        super().__init__(name, help)
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = float(value)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_number(self.value)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        super().__init__(name, help)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self.counts = [0] * len(self.buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        with self.lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[i] += 1
            self.sum += value
            self.count += 1

    def render(self) -> list[str]:
        with self.lock:
            lines = [f'{self.name}_bucket{{le="{_number(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
            lines += [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.count}"]
        return self.header() + lines


LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Every metric the server exports."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.requests = Counter("requests", "HTTP requests by route and status code.", ("route", "status"))
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens prefilled.")
        self.completion_tokens = Counter("completion_tokens", "Tokens generated.")
        self.queue_depth = Gauge("queue_depth", "Requests waiting for a free batch row.")
        self.running = Gauge("running_sequences", "Sequences in the running decode batch.")
        self.tokens_per_s = Gauge("decode_tokens_per_second",
                                  f"Tokens decoded per second over the last {window_s:g} s of decode steps.")
        self.ttft = Histogram("time_to_first_token_seconds", "From request arrival to its first token.",
                              LATENCY_BUCKETS)
        self.latency = Histogram("request_duration_seconds", "From request arrival to its last byte.",
                                 LATENCY_BUCKETS)
        self.window_s = window_s
        self._steps: deque[tuple[float, int]] = deque()  # (time, tokens) of recent decode steps

    def observe_step(self, tokens: int, seconds: float) -> None:
        now = time.monotonic()
        self._steps.append((now, tokens))
        while self._steps and self._steps[0][0] < now - self.window_s:
            self._steps.popleft()
        span = max(now - self._steps[0][0] + seconds, 1e-9)
        self.tokens_per_s.set(sum(t for _, t in self._steps) / span)

    def render(self) -> str:
        if self._steps and self._steps[-1][0] < time.monotonic() - self.window_s:
            self._steps.clear()  # idle: nothing decoded in the window
            self.tokens_per_s.set(0.0)
        metrics = [self.requests, self.prompt_tokens, self.completion_tokens, self.queue_depth, self.running,
                   self.tokens_per_s, self.ttft, self.latency]
        return "\n".join(line for m in metrics for line in m.render()) + "\n"
