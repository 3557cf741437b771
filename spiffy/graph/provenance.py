"""Calibration provenance: which decoder settings a graph was calibrated under (SPEC §5.5 step 3)."""

from __future__ import annotations

import hashlib
import json
import warnings

from spiffy.decoding.config import GenerationConfig
from spiffy.graph.draft_graph import DraftGraph

DECODER_KEYS = (
    "gen_length",
    "block_length",
    "rule",
    "steps",
    "k",
    "tau",
    "factor",
    "cache",
    "temperature",
    "remasking",
    "softmax_dtype",
    "logits_eos_inf",
    "confidence_eos_eot_inf",
)


# settings recorded only when set (not None / not False), so that graphs calibrated before they existed keep
# their provenance key
OPTIONAL_KEYS = ("steps_per_block", "stop_ids", "top_k", "top_p", "fuse_next")


def decoder_settings(cfg: GenerationConfig) -> dict:
    out = {key: getattr(cfg, key) for key in DECODER_KEYS}
    for key in OPTIONAL_KEYS:
        value = getattr(cfg, key)
        if value is not None and value is not False:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


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
