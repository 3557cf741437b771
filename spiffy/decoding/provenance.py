"""Calibration provenance: which decoder settings a graph was calibrated under (docs/algorithm.md §5.5)."""

from __future__ import annotations

import hashlib
import json
import warnings

from spiffy.decoding.config import GenerationConfig
from spiffy.graph.draft_graph import DraftGraph


def decoder_settings(cfg: GenerationConfig) -> dict:
    """Every decoder setting a graph may depend on: all fields of the config (new settings included)."""
    return {key: _jsonable(getattr(cfg, key)) for key in type(cfg).field_names()}


def _jsonable(value):
    """Tuples (e.g. `stop_ids`) as lists, as they read back from a graph's JSON file."""
    return list(value) if isinstance(value, tuple) else value


def calibration_key(provenance: dict) -> str:
    text = json.dumps(provenance, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def warn_if_mismatched(graph: DraftGraph, cfg: GenerationConfig, draft_noise: str = "none") -> None:
    """Warn when a graph was calibrated under other decoder settings (it stays lossless, maybe slower)."""
    recorded = graph.provenance.get("decoder")
    if not recorded:
        return
    current = {**decoder_settings(cfg), "draft_noise": draft_noise}
    recorded = {"draft_noise": "none", **recorded}
    diff = {
        k: (recorded.get(k), v)
        for k, v in current.items()
        if k in recorded and recorded.get(k) != v and k != "gen_length"
    }
    if diff:
        detail = ", ".join(f"{k}: calibrated {a!r}, now {b!r}" for k, (a, b) in diff.items())
        warnings.warn(
            f"draft graph was calibrated under other decoder settings ({detail}); "
            "output stays lossless but acceptance may be lower",
            stacklevel=3,
        )
