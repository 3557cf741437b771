"""The server's Prometheus metrics (`GET /metrics`, text exposition format 0.0.4, names prefixed `spiffy_`;
docs/serving.md "Metrics"): requests by outcome, queue depth, tokens and tokens/s, NFE per token, accepted drafts
per forward and the NFE speedup over the base decoder. Written by the engine loop's thread, read by the app's."""

from __future__ import annotations

import threading
import time
from collections import deque

WINDOW_S = 30.0  # spiffy_tokens_per_second: generated tokens over the last WINDOW_S seconds


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = {"ok": 0, "error": 0, "aborted": 0, "rejected": 0}
        self.tokens = self.blocks = 0
        self.nfe = self.base_nfe = self.transitions = self.decode_forwards = 0
        self.forwards = 0  # stacked forwards the engines ran (all requests)
        self.step_s = 0.0
        self.ttfb_sum = 0.0
        self.ttfb_count = 0
        self._recent: deque[tuple[float, int]] = deque()

    def step(self, forwards: int, seconds: float) -> None:
        with self._lock:
            self.forwards += forwards
            self.step_s += seconds

    def block(self, tokens: int, submitted: float | None) -> None:
        """A committed block of `tokens` tokens; `submitted`: the request's arrival, for its first block."""
        now = time.perf_counter()
        with self._lock:
            self.tokens += tokens
            self.blocks += 1
            self._recent.append((now, tokens))
            if submitted is not None:
                self.ttfb_sum += now - submitted
                self.ttfb_count += 1

    def finished(self, outcome: str, stats=None) -> None:
        with self._lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1
            if stats is not None:
                self.nfe += stats.nfe
                self.base_nfe += stats.nfe_base
                self.transitions += stats.transitions
                self.decode_forwards += sum(stats.accepted_per_forward.values())

    def rejected(self) -> None:
        with self._lock:
            self.requests["rejected"] += 1

    def tokens_per_second(self) -> float:
        now = time.perf_counter()
        with self._lock:
            while self._recent and self._recent[0][0] < now - WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / WINDOW_S

    def render(self, *, running: int, waiting: int, ready: bool) -> str:
        """The exposition text."""
        tps = self.tokens_per_second()
        with self._lock:
            rows = [
                (
                    "requests_total",
                    "counter",
                    "requests by outcome (rejected: 4xx/429/503 before decoding)",
                    [(f'{{outcome="{k}"}}', v) for k, v in self.requests.items()],
                ),
                ("requests_running", "gauge", "requests decoding now", [("", running)]),
                (
                    "queue_depth",
                    "gauge",
                    "requests admitted and waiting for a slot in the engine",
                    [("", waiting)],
                ),
                (
                    "ready",
                    "gauge",
                    "1 when the model is loaded and the graph ready",
                    [("", int(ready))],
                ),
                (
                    "generated_tokens_total",
                    "counter",
                    "tokens in committed blocks",
                    [("", self.tokens)],
                ),
                ("blocks_total", "counter", "committed blocks", [("", self.blocks)]),
                (
                    "tokens_per_second",
                    "gauge",
                    f"generated tokens per second over the last {WINDOW_S:g} s",
                    [("", tps)],
                ),
                (
                    "forwards_total",
                    "counter",
                    "stacked model forwards (all requests)",
                    [("", self.forwards)],
                ),
                (
                    "engine_step_seconds_total",
                    "counter",
                    "time in engine steps",
                    [("", self.step_s)],
                ),
                ("nfe_total", "counter", "model calls of finished requests", [("", self.nfe)]),
                (
                    "base_nfe_total",
                    "counter",
                    "the base decoder's model calls for the same requests",
                    [("", self.base_nfe)],
                ),
                (
                    "nfe_per_token",
                    "gauge",
                    "model calls per generated token (finished requests)",
                    [("", self.nfe / self.tokens if self.tokens else 0.0)],
                ),
                (
                    "accepted_drafts_per_forward",
                    "gauge",
                    "transitions per decoding forward minus one (finished requests)",
                    [
                        (
                            "",
                            self.transitions / self.decode_forwards - 1
                            if self.decode_forwards
                            else 0.0,
                        )
                    ],
                ),
                (
                    "speedup_nfe",
                    "gauge",
                    "base NFE / NFE (finished requests)",
                    [("", self.base_nfe / self.nfe if self.nfe else 0.0)],
                ),
                (
                    "time_to_first_block_seconds",
                    "summary",
                    "arrival to first committed block",
                    [("_sum", self.ttfb_sum), ("_count", self.ttfb_count)],
                ),
            ]
        lines = []
        for name, kind, help_text, samples in rows:
            lines += [f"# HELP spiffy_{name} {help_text}", f"# TYPE spiffy_{name} {kind}"]
            lines += [
                f"spiffy_{name}{labels} {value:g}"
                if isinstance(value, float)
                else f"spiffy_{name}{labels} {value}"
                for labels, value in samples
            ]
        return "\n".join(lines) + "\n"
