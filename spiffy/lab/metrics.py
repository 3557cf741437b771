"""Reduce per-request records and lm-eval results to one flat row of metrics (docs/algorithm.md §7)."""

from __future__ import annotations

import statistics
from collections import Counter

from spiffy.eval.harness import RequestRecord


def task_scores(results: dict, task: str) -> dict[str, float]:
    """lm-eval's metrics for `task`, keyed `task/<metric>/<filter>`."""
    out = {}
    for key, value in results.get("results", {}).get(task, {}).items():
        if isinstance(value, (int, float)) and "," in key and "_stderr" not in key:
            metric, filt = key.split(",", 1)
            out[f"task/{metric}/{filt}"] = float(value)
    return out


def headline_accuracy(scores: dict[str, float]) -> float:
    """The task's primary score: strict-match exact match, else the first score."""
    for key in ("task/exact_match/strict-match", "task/humaneval_pass_at_1/create_test"):
        if key in scores:
            return scores[key]
    return next(iter(scores.values()), float("nan"))


def summarize(records: list[RequestRecord], scores: dict[str, float]) -> dict[str, float]:
    """Flat metrics: accuracy, NFE, speedups, acceptance, overhead shares, agreement."""
    stats = [r.stats for r in records]
    nfe = sum(s.nfe for s in stats)
    transitions = sum(s.transitions for s in stats)
    nfe_base = sum(s.nfe_base for s in stats)  # = transitions, plus SDAR's prefill and store calls
    wall = sum(s.wall_s for s in stats)
    model_s = sum(s.model_s for s in stats)
    tokens = sum(s.generated_tokens for s in stats)
    hist: Counter = Counter()
    for s in stats:
        hist.update(s.accepted_per_forward)
    out = {
        **scores,
        "accuracy": headline_accuracy(scores),
        "n_requests": len(records),
        "nfe_mean": nfe / max(1, len(stats)),
        "nfe_base_mean": nfe_base / max(1, len(stats)),
        "speedup_nfe": nfe_base / nfe if nfe else float("nan"),
        # per forward that performed a transition (SDAR's prefill and plain store calls perform none)
        "accepted_per_forward": transitions / sum(hist.values()) - 1 if hist else float("nan"),
        "tokens_per_s": tokens / wall if wall else float("nan"),
        "latency_s_p50": statistics.median(s.latency_s or s.wall_s for s in stats)
        if stats
        else float("nan"),
        "draft_query_tokens_per_forward": sum(s.draft_query_tokens for s in stats) / max(1, nfe),
        "overhead_share": sum(s.overhead_s for s in stats) / model_s if model_s else 0.0,
        "draft_share": sum(s.draft_s for s in stats) / model_s if model_s else 0.0,
        "mask_share": sum(s.mask_s for s in stats) / model_s if model_s else 0.0,
        "bookkeeping_share": sum(s.bookkeeping_s for s in stats) / model_s if model_s else 0.0,
        "wall_s": wall,
        "model_s": model_s,
        "model_ms_per_forward": 1000 * model_s / nfe if nfe else float("nan"),
        "wall_ms_per_forward": 1000 * wall / nfe if nfe else float("nan"),
    }
    for n, count in sorted(hist.items()):
        out[f"accepted_hist/{n}"] = count
    levels: Counter = Counter()
    for s in stats:
        levels.update(s.accepted_per_level)
    for level, count in sorted(levels.items()):
        out[f"accepted_level/{level}"] = count / max(1, nfe)
    compared = [r for r in records if r.base_stats is not None]
    if compared:
        base_wall = sum(r.base_stats.wall_s for r in compared)
        out["agreement"] = sum(bool(r.agrees) for r in compared) / len(compared)
        out["speedup_wall"] = base_wall / sum(r.stats.wall_s for r in compared)
        out["base_tokens_per_s"] = sum(r.base_stats.generated_tokens for r in compared) / base_wall
    return out
