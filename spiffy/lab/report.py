"""Result rows → tables and plots (pandas / matplotlib), shared by scripts/make_tables.py and the notebooks.

A table shows, for one experiment, the config keys that vary between its rows (the sweep axes) and the headline
metrics of docs/algorithm.md §7 (`EXPERIMENT_METRICS` picks other columns per experiment, e.g. the overhead breakdown of
Table 3). Rows come from the result store (`spiffy.lab.results`: a row file per job, and the older JSONL stores).
Plots: speedup against a sweep axis (one line per setting of the other axes), acceptance per graph level, and the
Figure-5 cost curve with the `D` it recommends per layout (`budget_recommendation`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from spiffy.lab.results import read_rows
from spiffy.lab.tracking import flatten

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
    "calibration_speedup_nfe",
]
# Table 3: where the time goes. Shares are of model (forward) time, docs/algorithm.md §7.
OVERHEAD_METRICS = [
    "nfe_mean",
    "speedup_nfe",
    "draft_query_tokens_per_forward",
    "model_ms_per_forward",
    "draft_share",
    "mask_share",
    "bookkeeping_share",
    "overhead_share",
    "speedup_wall",
    "agreement",
]
# Figure 5: per-forward times, for the cost model of `budget_recommendation`.
COST_METRICS = [
    "accuracy",
    "nfe_mean",
    "speedup_nfe",
    "accepted_per_forward",
    "draft_query_tokens_per_forward",
    "model_ms_per_forward",
    "wall_ms_per_forward",
    "overhead_share",
    "speedup_wall",
    "agreement",
]
# graph.budget=auto: the chosen D* and its predicted vs measured speedups (spiffy.calibration.autotune)
AUTO_METRICS = [
    "auto_budget",
    "predicted_speedup_nfe",
    "speedup_nfe",
    "predicted_speedup_wall",
    "speedup_wall",
    "agreement",
    "accuracy",
]
EXPERIMENT_METRICS = {"table3": OVERHEAD_METRICS, "fig5": COST_METRICS, "auto": AUTO_METRICS}
EXTRA_METRICS = OVERHEAD_METRICS + COST_METRICS + AUTO_METRICS
LEVEL_PREFIX = "accepted_level/"
# sweep axes a speedup plot may use as its x axis, in order of preference
PLOT_AXES = ["graph.budget", "graph.n_samples", "graph.prune"]


def load_frame(results_dir: str | Path = "results/runs") -> pd.DataFrame:
    """One row per job of a result store (`spiffy.lab.results.read_rows`: JSONL stores and/or row-file folders)."""
    return rows_frame(read_rows(results_dir))


def rows_frame(result_rows: list[dict]) -> pd.DataFrame:
    """One row per result row: flattened config (`cfg.*`) and metrics."""
    rows = []
    for row in result_rows:
        flat = {f"cfg.{k}": v for k, v in flatten(row["config"]).items()}
        rows.append(
            {
                "experiment": row.get("experiment"),
                "name": row.get("name"),
                **flat,
                **{m: row["metrics"].get(m) for m in dict.fromkeys(METRICS + EXTRA_METRICS)},
                **{k: v for k, v in row["metrics"].items() if k.startswith(LEVEL_PREFIX)},
            }
        )
    return pd.DataFrame(rows)


def experiment_table(
    frame: pd.DataFrame, experiment: str, *, levels: bool = False, keep: tuple[str, ...] = ()
) -> pd.DataFrame:
    """The sweep axes (config keys that vary) and the metrics of one experiment.

    With `levels`, the acceptance-per-level columns (`accepted_level/<l>`: the share of forwards whose walk
    accepted a level-l draft) are appended. `keep` names config keys (`decoder.cache`) to show even when
    they do not vary.
    """
    sub = frame[frame.experiment == experiment].dropna(axis=1, how="all")
    if sub.empty:
        known = sorted(frame.experiment.dropna().unique())
        raise ValueError(f"experiment={experiment!r} has no result rows (have: {known})")
    axes = sweep_axes(sub)
    axes += [f"cfg.{k}" for k in keep if f"cfg.{k}" in sub and f"cfg.{k}" not in axes]
    metrics = [m for m in EXPERIMENT_METRICS.get(experiment, METRICS) if m in sub]
    if levels:
        metrics += sorted(
            (c for c in sub if c.startswith(LEVEL_PREFIX)),
            key=lambda c: int(c.removeprefix(LEVEL_PREFIX)),
        )
    table = sub[axes + metrics].rename(columns={c: c.removeprefix("cfg.") for c in axes})
    return table.sort_values([c.removeprefix("cfg.") for c in axes]).reset_index(drop=True)


def sweep_axes(sub: pd.DataFrame) -> list[str]:
    """Config columns (`cfg.*`) that vary between the rows (tracking settings excluded)."""
    return [
        c
        for c in sub.columns
        if c.startswith("cfg.")
        and sub[c].astype(str).nunique() > 1
        and not c.startswith("cfg.tracking")
    ]


def plot_axis(table: pd.DataFrame) -> str | None:
    """The x axis for a speedup plot: the first of `PLOT_AXES` that varies in `table`, else None."""
    return next((x for x in PLOT_AXES if x in table and table[x].nunique() > 1), None)


def axis_columns(table: pd.DataFrame) -> list[str]:
    """The config columns of an `experiment_table` (dotted keys such as `graph.budget`), not its metrics."""
    return [c for c in table if "." in c and not c.startswith(LEVEL_PREFIX)]


def acceptance_frame(table: pd.DataFrame) -> pd.DataFrame:
    """Long form of the per-level acceptance columns: one row per (table row, level)."""
    levels = [c for c in table if c.startswith(LEVEL_PREFIX)]
    if not levels:
        return pd.DataFrame(columns=["label", "level", "accepted"])
    frame = table.assign(label=_labels(table, axis_columns(table)), row=range(len(table)))
    long = frame.melt(
        id_vars=["row", "label"], value_vars=levels, var_name="level", value_name="accepted"
    )
    long["level"] = long["level"].str.removeprefix(LEVEL_PREFIX).astype(int)
    long = long.dropna(subset=["accepted"]).sort_values(["row", "level"])  # the table's row order
    return long.drop(columns="row").reset_index(drop=True)


def _labels(table: pd.DataFrame, columns: list[str]) -> pd.Series:
    if not columns:
        return pd.Series(["all"] * len(table), index=table.index)
    return (
        table[columns]
        .astype(str)
        .agg(
            lambda values: ", ".join(
                f"{c.rsplit('.', 1)[-1]}={v}" for c, v in zip(columns, values)
            ),
            axis=1,
        )
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path: str | Path, *axes) -> None:
    """Integer x ticks and a grid on every axis, the last one's legend beside it; save and close."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    for n, ax in enumerate(axes, 1):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if n < len(axes):
            ax.legend(fontsize=7)
        else:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_speedup(
    table: pd.DataFrame, x: str, path: str | Path, *, by: list[str] | None = None
) -> None:
    """NFE (solid) and wall-clock (dashed) speedup against one sweep axis, one line per setting of `by`."""
    plt = _pyplot()
    by = [c for c in (by or []) if c in table and c != x]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    groups = table.groupby(_labels(table, by), sort=False) if by else [("", table)]
    for label, data in groups:
        data = data.sort_values(x)
        (line,) = ax.plot(data[x], data["speedup_nfe"], marker="o", label=f"NFE {label}".strip())
        if "speedup_wall" in data and data["speedup_wall"].notna().any():
            ax.plot(
                data[x],
                data["speedup_wall"],
                marker="s",
                linestyle="--",
                color=line.get_color(),
                label=f"wall-clock {label}".strip(),
            )
    ax.set_xlabel(x)
    ax.set_ylabel("× vs base decoder")
    _finish(fig, path, ax)


def plot_panels(
    table: pd.DataFrame,
    series: list[tuple[str, str]],
    path: str | Path,
    *,
    panel: str = "base",
    x: str = "D",
    xlabel: str = "D (drafts per forward)",
    ylabel: str = "NFE speedup over the base",
) -> None:
    """One panel per value of `panel` (in order of appearance), each drawing `series` = (column, matplotlib
    style) against `x`: the oracle and dynamic-drafting studies' figure."""
    plt = _pyplot()
    panels = list(dict.fromkeys(table[panel]))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4 * len(panels), 3.4), sharey=True, squeeze=False
    )
    for ax, name in zip(axes[0], panels, strict=True):
        sub = table[table[panel] == name]
        for column, style in series:
            ax.plot(sub[x], sub[column], style, label=column)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_acceptance(table: pd.DataFrame, path: str | Path) -> None:
    """Acceptance per graph level: the share of forwards whose walk accepted a level-l draft."""
    long = acceptance_frame(table)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for label, data in long.groupby("label", sort=False):
        ax.plot(data["level"], data["accepted"], marker="o", label=label)
    ax.set_xlabel("graph level l (transitions ahead of the anchor)")
    ax.set_ylabel("forwards accepting level l")
    ax.set_ylim(0, 1)
    _finish(fig, path, ax)


def load_cost_curve(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """The cost curve (`cost_curve` rows) and environment stored by `scripts/bench.py` in its JSON output."""
    payload = json.loads(Path(path).read_text())
    if not payload.get("cost_curve"):
        raise ValueError(f"{path}: no 'cost_curve' rows (run scripts/bench.py with --cost-curve)")
    return pd.DataFrame(payload["cost_curve"]), payload.get("env", {})


LAYOUT_OF_CACHE = {"none": "exact", "dual": "dual"}


def blocks_per_request(frame: pd.DataFrame, experiment: str) -> int:
    """`gen_length // block_length` of an experiment's task (the same for all its rows)."""
    sub = frame[frame.experiment == experiment]
    blocks = set(sub["cfg.task.gen_length"] // sub["cfg.task.block_length"])
    if len(blocks) != 1:
        raise ValueError(f"experiment={experiment!r} mixes blocks per request: {sorted(blocks)}")
    return int(blocks.pop())


def budget_recommendation(
    curve: pd.DataFrame, runs: pd.DataFrame, *, blocks_per_request: int
) -> pd.DataFrame:
    """Figure 5: per layout and D, the forward cost, the NFE speedup, and the wall speedup they predict.

    `curve` (from `spiffy.lab.benchmarks.cost_curve`) has per layout `drafts, query_rows, forward_ms` (one in-block
    verification forward with 1 + d states) and `block_start_ms` (the block's first, full-canvas forward, which
    carries no drafts and which Spiffy never saves). `runs` is an experiment table with `decoder.cache`,
    `graph.budget`, `nfe_mean`, `speedup_nfe`, and, when measured, `draft_query_tokens_per_forward`,
    `model_ms_per_forward`, `wall_ms_per_forward`, `speedup_wall`.

    Per request with `B = blocks_per_request` blocks, `N` forwards (`N0 = N · speedup_nfe` for the base), `c`
    ms of per-step work outside the model (sampling, bookkeeping; read off the layout's D = 0 run as wall minus
    model time per forward, else 0) and `o` ms of Spiffy's own work per forward (drafting, masks, acceptance
    bookkeeping: the run's `overhead_share` of its model time, else 0), the predicted wall speedup is

        (B·F_start + (N0 − B)·F(0) + N0·c) / (B·F_start + (N − B)·F(d) + N·c + N·o)

    where `d` is the mean number of drafts the D-node graph actually sent per in-block forward (fewer than D: none
    that would unmask more positions than are left), from the measured draft query rows, and `F(d)` is the curve
    interpolated there. `recommended` marks the best predicted D per layout.
    """
    missing = {"decoder.cache", "graph.budget", "nfe_mean", "speedup_nfe"} - set(runs)
    if missing:
        raise ValueError(f"cost-curve runs lack the columns {sorted(missing)}")
    if blocks_per_request < 1:
        raise ValueError(f"blocks_per_request={blocks_per_request!r} must be >= 1")
    runs = runs.assign(layout=runs["decoder.cache"].map(LAYOUT_OF_CACHE))
    runs = runs.dropna(subset=["layout"])
    joined = runs.merge(
        curve.rename(columns={"drafts": "graph.budget"}), on=["layout", "graph.budget"], how="inner"
    )
    if joined.empty:
        raise ValueError(
            "no (layout, D) pair is both in the cost curve and in the runs: curve has "
            f"{sorted(set(zip(curve.layout, curve.drafts)))}"
        )
    out = []
    for layout, rows in joined.groupby("layout"):
        lc = curve[curve.layout == layout].sort_values("drafts")
        rows_per_state = float((lc.query_rows / (lc.drafts + 1)).iloc[0])
        f0, f_start = float(lc.forward_ms.iloc[0]), float(lc.block_start_ms.iloc[0])
        base = rows[rows["graph.budget"] == 0]
        c = 0.0
        if not base.empty and {"model_ms_per_forward", "wall_ms_per_forward"} <= set(base):
            c = float(base.wall_ms_per_forward.iloc[0] - base.model_ms_per_forward.iloc[0])
        rows = rows.copy()
        b, n = blocks_per_request, rows["nfe_mean"]
        n0 = n * rows["speedup_nfe"]
        in_block = (n - b).clip(lower=1e-9)
        if "draft_query_tokens_per_forward" in rows:
            sent = rows["draft_query_tokens_per_forward"].fillna(0.0) * n / in_block
            rows["drafts_per_forward"] = sent / rows_per_state
        else:  # not measured: assume every in-block forward sent all D drafts
            rows["drafts_per_forward"] = rows["graph.budget"].astype(float)
        rows["forward_ms_at_d"] = np.interp(rows["drafts_per_forward"], lc.drafts, lc.forward_ms)
        rows["step_overhead_ms"] = c
        rows["spiffy_overhead_ms"] = 0.0
        if {"overhead_share", "model_ms_per_forward"} <= set(rows):
            spiffy = rows["overhead_share"] * rows["model_ms_per_forward"]
            rows["spiffy_overhead_ms"] = spiffy.fillna(0.0).where(rows["graph.budget"] > 0, 0.0)
        base_ms = b * f_start + (n0 - b) * f0 + n0 * c
        rows["speedup_wall_predicted"] = base_ms / (
            b * f_start + (n - b) * rows["forward_ms_at_d"] + n * (c + rows["spiffy_overhead_ms"])
        )
        out.append(rows)
    joined = pd.concat(out)
    best = joined.groupby("layout")["speedup_wall_predicted"].transform("max")
    joined["recommended"] = joined["speedup_wall_predicted"] == best
    columns = ["layout", "graph.budget", "block_start_ms", "forward_ms", "cost_vs_no_drafts"]
    columns += ["drafts_per_forward", "forward_ms_at_d", "step_overhead_ms", "spiffy_overhead_ms"]
    columns += ["speedup_nfe"]
    columns += ["speedup_wall_predicted", "speedup_wall", "recommended"]
    return joined[[c for c in columns if c in joined]].sort_values(["layout", "graph.budget"])


def plot_cost_curve(recommendation: pd.DataFrame, path: str | Path, *, device: str = "") -> None:
    """Figure 5: forward cost vs D (left) and the NFE / predicted / measured wall speedup vs D (right)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for layout, data in recommendation.groupby("layout"):
        (line,) = left.plot(
            data["graph.budget"], data["cost_vs_no_drafts"], marker="o", label=layout
        )
        for column, style, what in (
            ("speedup_nfe", dict(marker="o"), "NFE"),
            ("speedup_wall_predicted", dict(linestyle="--"), "wall, predicted"),
            ("speedup_wall", dict(marker="s", linestyle=":"), "wall, measured"),
        ):
            if column in data and data[column].notna().any():
                right.plot(
                    data["graph.budget"],
                    data[column],
                    color=line.get_color(),
                    label=f"{layout}: {what}",
                    **style,
                )
    left.set_xlabel("D (drafts per forward)")
    left.set_ylabel("forward time / forward without drafts")
    left.set_title(f"cost curve {device}".strip(), fontsize=9)
    right.set_xlabel("D")
    right.set_ylabel("× vs base decoder")
    _finish(fig, path, left, right)


def plot_batching(payload: dict, path: str | Path) -> None:
    """Batched decoding (docs/algorithm.md §13), from a `scripts/bench.py --batch-sizes` payload: generated tokens/s
    vs batch size per decoder (left) and, with the batched cost curve, the forward cost of D drafts relative to
    none vs batch size (right): drafts pay while that stays below their NFE saving."""
    plt = _pyplot()
    table = pd.DataFrame(payload["decoders"])
    curve = pd.DataFrame(payload.get("cost_curve", []))
    batched = not curve.empty and "batch" in curve
    fig, axes = plt.subplots(
        1, 2 if batched else 1, figsize=(10 if batched else 6, 3.6), squeeze=False
    )
    left = axes[0][0]
    for decoder, data in table.groupby("decoder", sort=False):
        left.plot(data["batch_size"], data["tokens_per_s"], marker="o", label=decoder)
    left.set_xscale("log", base=2)
    left.set_xlabel("batch size (requests per forward)")
    left.set_ylabel("generated tokens / s")
    env = payload.get("env", {})
    left.set_title(
        f"throughput, {env.get('device', '')} {env.get('threads', '')} thread(s)", fontsize=9
    )
    if not batched:
        left.set_xticks(
            sorted(table["batch_size"].unique()),
            [str(b) for b in sorted(table["batch_size"].unique())],
        )
        _finish(fig, path, left)
        return
    right = axes[0][1]
    for (layout, drafts), data in curve[curve["drafts"] > 0].groupby(["layout", "drafts"]):
        right.plot(
            data["batch"], data["cost_vs_no_drafts"], marker="o", label=f"{layout}, D={drafts}"
        )
    right.set_xscale("log", base=2)
    right.set_xlabel("batch size")
    right.set_ylabel("forward cost with D drafts / without")
    right.set_title("cost curve with a batch axis", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.set_xticks(
            sorted(table["batch_size"].unique()),
            [str(b) for b in sorted(table["batch_size"].unique())],
        )
    left.legend(fontsize=7)
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
