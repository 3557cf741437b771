"""Load-or-calibrate with a cache keyed by provenance (SPEC §5.5 step 3).

Calibrated graphs live in `results/graphs/<model>/<task>/D<budget>-<rule>-<key>.json`, recorded trajectories
beside them in `trajectories/<key>.json` so that other budgets and selection rules reuse one decoding pass. The
key hashes everything the graph depends on: model, decoder settings, task, number of prompts, seed and horizon.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from spiffy.decoding.config import GenerationConfig
from spiffy.graph.calibrate import evaluate, select_graph
from spiffy.graph.draft_graph import DraftGraph
from spiffy.graph.provenance import calibration_key, decoder_settings
from spiffy.graph.trajectories import Trajectories, record_trajectories


def load_or_calibrate(
    model: torch.nn.Module,
    cfg: GenerationConfig,
    prompts: Callable[[], list[torch.Tensor]],
    *,
    model_name: str,
    task: str,
    n_samples: int,
    budget: int,
    rule: str = "degree1",
    seed: int = 0,
    horizon: int = 12,
    draft_noise: str = "none",
    root: str | Path = "results/graphs",
    force: bool = False,
    progress: bool = True,
) -> DraftGraph:
    """Return the cached graph for this provenance, or calibrate it (recording trajectories if needed)."""
    base = {
        "model": model_name,
        "decoder": decoder_settings(cfg),
        "task": task,
        "n_samples": n_samples,
        "seed": seed,
        "horizon": horizon,
    }
    key = calibration_key(base)
    folder = Path(root) / _slug(model_name) / _slug(task)
    graph_path = folder / f"D{budget}-{rule}-{key}.json"
    if graph_path.exists() and not force:
        return DraftGraph.load(graph_path)
    traj_path = folder / "trajectories" / f"{key}.json"
    record_s = 0.0
    if traj_path.exists() and not force:
        trajectories = Trajectories.load(traj_path)
        record_s = trajectories.meta.get("record_s", 0.0)
    else:
        t0 = time.perf_counter()
        trajectories = record_trajectories(
            model,
            cfg,
            prompts(),
            horizon=horizon,
            seed=seed,
            progress=progress,
            meta=dict(base),
            draft_noise=draft_noise,
        )
        record_s = time.perf_counter() - t0
        trajectories.meta["record_s"] = record_s
        trajectories.save(traj_path)
    t0 = time.perf_counter()
    graph = select_graph(trajectories, budget, rule)
    select_s = time.perf_counter() - t0
    predicted = evaluate(graph, trajectories)
    provenance = {
        **base,
        "key": key,
        "budget": budget,
        "selection": rule,
        "record_s": round(record_s, 3),
        "select_s": round(select_s, 3),
        "calibration_s": round(record_s + select_s, 3),
        "predicted_speedup_nfe": round(predicted.speedup_nfe, 4),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    graph = DraftGraph(graph.nodes, graph.parents, budget, rule, provenance)
    graph.save(graph_path)
    return graph


def trajectories_path(graph: DraftGraph, root: str | Path = "results/graphs") -> Path:
    """Where the trajectories a graph calibrated by `load_or_calibrate` was selected from are cached."""
    p = graph.provenance
    if not {"model", "task", "key"} <= set(p):
        raise ValueError(f"graph provenance {sorted(p)} lacks model/task/key: not from load_or_calibrate")
    return Path(root) / _slug(p["model"]) / _slug(p["task"]) / "trajectories" / f"{p['key']}.json"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(str(text)).name or text)
