"""Result rows → tables and plots (pandas / matplotlib), shared by scripts/make_tables.py and the notebooks.

A table shows, for one experiment, the config keys that vary between its rows (the sweep axes) and the headline
metrics of SPEC §7. Rows come from the append-only JSONL store (`spiffy.results`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from spiffy.results import read_rows

METRICS = [
    "accuracy",
    "nfe_mean",
    "speedup_nfe",
    "accepted_per_forward",
    "speedup_wall",
    "tokens_per_s",
    "agreement",
    "overhead_share",
    "calibration_s",
]


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_frame(results_dir: str | Path = "results/runs") -> pd.DataFrame:
    """One row per job: flattened config (`cfg.*`) and metrics."""
    rows = []
    for row in read_rows(results_dir):
        flat = {f"cfg.{k}": v for k, v in _flatten(row["config"]).items()}
        rows.append(
            {
                "experiment": row.get("experiment"),
                "name": row.get("name"),
                **flat,
                **{m: row["metrics"].get(m) for m in METRICS},
            }
        )
    return pd.DataFrame(rows)


def experiment_table(frame: pd.DataFrame, experiment: str) -> pd.DataFrame:
    """The sweep axes (config keys that vary) and the metrics of one experiment."""
    sub = frame[frame.experiment == experiment].dropna(axis=1, how="all")
    axes = [
        c
        for c in sub.columns
        if c.startswith("cfg.")
        and sub[c].astype(str).nunique() > 1
        and not c.startswith("cfg.tracking")
    ]
    table = sub[axes + [m for m in METRICS if m in sub]].rename(
        columns={c: c.removeprefix("cfg.") for c in axes}
    )
    return table.sort_values([c.removeprefix("cfg.") for c in axes]).reset_index(drop=True)


def plot_speedup(table: pd.DataFrame, x: str, path: str | Path) -> None:
    """NFE (and wall-clock) speedup against one sweep axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    data = table.sort_values(x)
    ax.plot(data[x], data["speedup_nfe"], marker="o", label="NFE speedup")
    if "speedup_wall" in data and data["speedup_wall"].notna().any():
        ax.plot(data[x], data["speedup_wall"], marker="s", label="wall-clock speedup (this device)")
    ax.set_xlabel(x)
    ax.set_ylabel("× vs base decoder")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
