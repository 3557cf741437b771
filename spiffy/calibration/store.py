"""Load-or-calibrate with a cache keyed by everything the graph depends on (docs/algorithm.md §5.5 step 3).

Calibrated graphs live in `<root>/<model>/<task>/D<budget>-<rule>[-xb]-<key>.json`, recorded trajectories beside
them in `trajectories/<key>.json`, so that other budgets, selection rules and walks reuse one decoding pass.

* The trajectory key hashes every setting the recorded trajectories depend on: model name, dtype and device
  type, every decoder setting (rule, steps, cache, block length, temperature, remasking, EOS options, ...),
  task, number of prompts, seed, horizon and draft noise. The graph key adds the budget, the selection rule and
  the walk (`cross_block`).
* A cached file is checked against its key before use: a graph must carry the expected provenance, budget and
  rule, ranks within the block and the vocabulary, and nodes unless calibration recorded no key. A trajectories file must parse
  and carry the expected settings. Anything else is recalibrated with a warning that names the path and why.
* Files are written atomically (temporary file + `os.replace`): a concurrent reader never sees a torn file.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from spiffy.calibration.calibrate import SELECTION_RULES, evaluate, key_statistics, select_graph
from spiffy.calibration.trajectories import VERSION, Trajectories, record_trajectories
from spiffy.decoding.config import GenerationConfig
from spiffy.decoding.modes import check_cross_block
from spiffy.decoding.provenance import calibration_key, decoder_settings
from spiffy.graph.draft_graph import DraftGraph
from spiffy.graph.files import atomic_write_text, slug
from spiffy.models.loading import model_spec

DRAFT_NOISE = ("none", "keyed")


def trajectory_settings(
    model: torch.nn.Module,
    cfg: GenerationConfig,
    *,
    model_name: str,
    task: str,
    n_samples: int,
    seed: int,
    horizon: int,
    draft_noise: str,
) -> dict:
    """Every setting the recorded trajectories depend on (their cache key)."""
    param = next(model.parameters(), None)
    return {
        "trajectories_version": VERSION,
        "model": model_name,
        "dtype": str(param.dtype).removeprefix("torch.") if param is not None else None,
        "device": param.device.type if param is not None else None,
        "decoder": decoder_settings(cfg),
        "task": task,
        "n_samples": n_samples,
        "seed": seed,
        "horizon": horizon,
        "draft_noise": draft_noise,
    }


def check_graph(
    graph: DraftGraph, expected: dict, block_length: int, vocab_size: int | None = None
) -> str | None:
    """Why a cached graph does not match its key, or None if it does."""
    if graph.budget != expected["budget"]:
        return f"budget={graph.budget}, expected {expected['budget']}"
    if graph.selection != expected["selection"]:
        return f"selection={graph.selection!r}, expected {expected['selection']!r}"
    for name, value in expected.items():
        if graph.provenance.get(name) != value:
            return f"provenance {name}={graph.provenance.get(name)!r}, expected {value!r}"
    for n, node in enumerate(graph.nodes):
        if len(node) > block_length or any(i > block_length for i, _ in node):
            return f"node {n} {list(node)} has a position rank beyond block_length={block_length}"
        if vocab_size is not None and any(j > vocab_size for _, j in node):
            return f"node {n} {list(node)} has a token rank beyond the vocabulary's {vocab_size} tokens"
    if not graph.nodes and graph.provenance.get("keys_seen", 0) != 0:
        return f"no nodes although calibration saw {graph.provenance.get('keys_seen')!r} keys"
    return None


def load_or_calibrate(
    model: torch.nn.Module,
    cfg: GenerationConfig,
    prompts: Callable[[], list[torch.Tensor]],
    *,
    model_name: str,
    task: str,
    n_samples: int,
    budget: int,
    rule: str = "best",
    seed: int = 0,
    horizon: int = 16,
    draft_noise: str = "none",
    cross_block: bool = False,
    root: str | Path = "runs/graphs",
    force: bool = False,
    progress: bool = True,
) -> DraftGraph:
    """Return the cached graph for these settings, or calibrate it (recording trajectories if needed)."""
    if rule not in SELECTION_RULES:
        raise ValueError(f"rule={rule!r} must be one of {list(SELECTION_RULES)}")
    if draft_noise not in DRAFT_NOISE:
        raise ValueError(f"draft_noise={draft_noise!r} must be one of {list(DRAFT_NOISE)}")
    if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
        raise ValueError(f"horizon={horizon!r} must be a positive integer")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"budget={budget!r} must be a positive integer")
    if cross_block:
        check_cross_block(cfg.cache, "exact")
    base = trajectory_settings(
        model,
        cfg,
        model_name=model_name,
        task=task,
        n_samples=n_samples,
        seed=seed,
        horizon=horizon,
        draft_noise=draft_noise,
    )
    traj_key = calibration_key(base)
    expected = {
        **base,
        "key": calibration_key({**base, "budget": budget, "rule": rule, "cross": cross_block}),
        "budget": budget,
        "selection": rule,
        "cross_block": cross_block,
    }
    folder = Path(root) / slug(model_name) / slug(task)
    graph_path = folder / f"D{budget}-{rule}{'-xb' if cross_block else ''}-{expected['key']}.json"
    if graph_path.exists() and not force:
        graph = _cached_graph(graph_path, expected, cfg.block_length, _vocab_size(model))
        if graph is not None:
            return graph
    traj_path = folder / "trajectories" / f"{traj_key}.json"
    trajectories = None if force else _cached_trajectories(traj_path, base)
    if trajectories is None:
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
        trajectories.meta["record_s"] = time.perf_counter() - t0
        trajectories.save(traj_path)
    record_s = trajectories.meta.get("record_s", 0.0)
    t0 = time.perf_counter()
    graph = select_graph(trajectories, budget, rule, cross_block=cross_block)
    select_s = time.perf_counter() - t0
    predicted = evaluate(graph, trajectories, cross_block=cross_block)
    provenance = {
        **graph.provenance,
        **expected,
        "keys_seen": len(key_statistics(trajectories, cross_block=cross_block)[0]),
        "record_s": round(record_s, 3),
        "select_s": round(select_s, 3),
        "calibration_s": round(record_s + select_s, 3),
        "predicted_speedup_nfe": round(predicted.speedup_nfe, 4),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    graph = DraftGraph(graph.nodes, graph.parents, budget, rule, provenance, graph.phases)
    atomic_write_text(graph_path, graph.to_json())
    return graph


def _vocab_size(model: torch.nn.Module) -> int | None:
    """The model's vocabulary size, where its config says (scripted test models may have none)."""
    try:
        return model_spec(model).vocab_size
    except (AttributeError, TypeError):
        return None


def _cached_graph(
    path: Path, expected: dict, block_length: int, vocab_size: int
) -> DraftGraph | None:
    try:
        graph = DraftGraph.load(path)
    except ValueError as err:
        warnings.warn(f"{err}; recalibrating", stacklevel=3)
        return None
    why = check_graph(graph, expected, block_length, vocab_size)
    if why is not None:
        warnings.warn(
            f"cached draft graph {str(path)!r} does not match its key ({why}); recalibrating",
            stacklevel=3,
        )
        return None
    return graph


def _cached_trajectories(path: Path, settings: dict) -> Trajectories | None:
    if not path.exists():
        return None
    try:
        trajectories = Trajectories.load(path)
    except ValueError as err:
        warnings.warn(f"{err}; recording the trajectories again", stacklevel=3)
        return None
    recorded = {k: trajectories.meta.get(k) for k in settings}
    if recorded != settings or trajectories.horizon != settings["horizon"]:
        diff = [k for k in settings if recorded[k] != settings[k]]
        warnings.warn(
            f"cached trajectories {str(path)!r} were recorded under other settings ({diff or 'horizon'}); "
            "recording them again",
            stacklevel=3,
        )
        return None
    return trajectories


# the keys of `trajectory_settings`: every cached graph's provenance carries them
TRAJECTORY_SETTINGS = (
    "trajectories_version",
    "model",
    "dtype",
    "device",
    "decoder",
    "task",
    "n_samples",
    "seed",
    "horizon",
    "draft_noise",
)


def trajectories_path(graph: DraftGraph, root: str | Path = "runs/graphs") -> Path:
    """Where the trajectories a graph calibrated by `load_or_calibrate` was selected from are cached."""
    p = graph.provenance
    missing = [k for k in TRAJECTORY_SETTINGS if k not in p]
    if missing:
        raise ValueError(f"graph provenance lacks {missing}: not a graph from load_or_calibrate")
    key = calibration_key({k: p[k] for k in TRAJECTORY_SETTINGS})
    return Path(root) / slug(p["model"]) / slug(p["task"]) / "trajectories" / f"{key}.json"
