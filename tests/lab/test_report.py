"""spiffy.lab.report: experiment tables, acceptance per level, and the Figure-5 cost model (docs/algorithm.md §7)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from spiffy.lab.report import (
    OVERHEAD_METRICS,
    acceptance_frame,
    budget_recommendation,
    experiment_table,
    load_frame,
    plot_axis,
)
from spiffy.lab.results import append_row

ROOT = Path(__file__).resolve().parents[2]


def row(experiment, cache, budget, metrics, n_samples=20):
    config = {
        "task": {"gen_length": 32, "block_length": 8},
        "decoder": {"cache": cache},
        "graph": {"budget": budget, "n_samples": n_samples},
        "tracking": {"mode": "offline"},
    }
    return {
        "experiment": experiment,
        "name": f"{cache}-{budget}",
        "config": config,
        "metrics": metrics,
    }


def write_rows(path: Path, rows: list[dict]) -> None:
    for r in rows:
        append_row(path, r)


def test_experiment_table_keeps_axes_metrics_and_levels(tmp_path):
    write_rows(
        tmp_path / "t.jsonl",
        [
            row(
                "t",
                "none",
                3,
                {"speedup_nfe": 2.0, "accepted_level/1": 0.5, "accepted_level/2": 0.25},
            ),
            row("t", "none", 10, {"speedup_nfe": 3.0, "accepted_level/1": 0.6}),
            row("other", "dual", 3, {"speedup_nfe": 9.0}),
        ],
    )
    frame = load_frame(tmp_path)
    table = experiment_table(frame, "t", levels=True)
    assert list(table["graph.budget"]) == [3, 10]  # the one varying axis; constant keys dropped
    assert "decoder.cache" not in table and "tracking.mode" not in table
    assert list(table.speedup_nfe) == [2.0, 3.0]
    assert plot_axis(table) == "graph.budget"
    long = acceptance_frame(table)
    assert sorted(map(tuple, long[["label", "level", "accepted"]].values.tolist())) == [
        ("budget=10", 1, 0.6),
        ("budget=3", 1, 0.5),
        ("budget=3", 2, 0.25),
    ]
    with pytest.raises(ValueError, match="experiment='missing'"):
        experiment_table(frame, "missing")


def test_table3_reports_the_overhead_breakdown(tmp_path):
    shares = {m: 0.01 for m in OVERHEAD_METRICS}
    write_rows(
        tmp_path / "t3.jsonl", [row("table3", "none", 3, shares), row("table3", "dual", 3, shares)]
    )
    table = experiment_table(load_frame(tmp_path), "table3")
    assert [c for c in OVERHEAD_METRICS if c in table] == OVERHEAD_METRICS
    assert "accuracy" not in table


def curve_rows():
    # exact layout: a draft costs a full canvas (100 rows); dual: one block (8 rows), block start = full canvas
    rows = []
    for d in (0, 2, 4):
        rows.append(
            dict(
                layout="exact",
                drafts=d,
                query_rows=100 * (d + 1),
                forward_ms=10.0 * (d + 1),
                block_start_ms=10.0,
            )
        )
        rows.append(
            dict(
                layout="dual",
                drafts=d,
                query_rows=8 * (d + 1),
                forward_ms=2.0 + 0.5 * d,
                block_start_ms=10.0,
            )
        )
    curve = pd.DataFrame(rows)
    curve["cost_vs_no_drafts"] = curve.forward_ms / curve.groupby("layout").forward_ms.transform(
        "first"
    )
    return curve


def test_cost_model_matches_hand_computation():
    runs = pd.DataFrame(
        {
            "decoder.cache": ["none", "none", "dual", "dual"],
            "graph.budget": [0, 4, 0, 4],
            "nfe_mean": [32.0, 16.0, 32.0, 16.0],
            "speedup_nfe": [1.0, 2.0, 1.0, 2.0],
            # drafts sent per in-block forward: 200 rows over (16 - 4) / 16 of the forwards -> 2 full canvases
            "draft_query_tokens_per_forward": [0.0, 150.0, 0.0, 12.0],
            "model_ms_per_forward": [10.0, 20.0, 3.0, 3.0],
            "wall_ms_per_forward": [11.0, 22.0, 3.5, 3.5],
        }
    )
    rec = budget_recommendation(curve_rows(), runs, blocks_per_request=4).set_index(
        ["layout", "graph.budget"]
    )
    exact = rec.loc[("exact", 4)]
    assert exact.drafts_per_forward == pytest.approx(2.0)
    assert exact.forward_ms_at_d == pytest.approx(30.0)
    # base: 4*10 + 28*10 + 32*1 = 352; spiffy: 4*10 + 12*30 + 16*1 = 416
    assert exact.speedup_wall_predicted == pytest.approx(352 / 416)
    dual = rec.loc[("dual", 4)]
    assert dual.drafts_per_forward == pytest.approx(2.0)
    # base: 4*10 + 28*2 + 32*0.5 = 112; spiffy: 4*10 + 12*3 + 16*0.5 = 84
    assert dual.speedup_wall_predicted == pytest.approx(112 / 84)
    assert bool(dual.recommended) and bool(rec.loc[("exact", 0)].recommended)
    assert not bool(exact.recommended)

    # Spiffy's own work (its share of model time, per forward) is charged: 16 forwards x 0.1 x 3 ms
    charged = budget_recommendation(
        curve_rows(), runs.assign(overhead_share=[0.0, 0.05, 0.0, 0.1]), blocks_per_request=4
    ).set_index(["layout", "graph.budget"])
    assert charged.loc[("dual", 4)].spiffy_overhead_ms == pytest.approx(0.3)
    assert charged.loc[("dual", 4)].speedup_wall_predicted == pytest.approx(112 / (84 + 16 * 0.3))
    assert charged.loc[("exact", 4)].speedup_wall_predicted == pytest.approx(352 / (416 + 16 * 1.0))


def test_cost_model_rejects_runs_it_cannot_join():
    runs = pd.DataFrame(
        {"decoder.cache": ["none"], "graph.budget": [7], "nfe_mean": [10.0], "speedup_nfe": [2.0]}
    )
    with pytest.raises(ValueError, match="no \\(layout, D\\) pair"):
        budget_recommendation(curve_rows(), runs, blocks_per_request=4)
    with pytest.raises(ValueError, match="lack the columns"):
        budget_recommendation(curve_rows(), runs.drop(columns="nfe_mean"), blocks_per_request=4)
    with pytest.raises(ValueError, match="blocks_per_request=0"):
        budget_recommendation(curve_rows(), runs, blocks_per_request=0)


def test_make_tables_writes_tables_and_plots(tmp_path):
    runs = tmp_path / "runs"
    metrics = {
        "nfe_mean": 32.0,
        "speedup_nfe": 1.0,
        "model_ms_per_forward": 10.0,
        "wall_ms_per_forward": 11.0,
    }
    write_rows(
        runs / "fig5.jsonl",
        [
            row("fig5", "none", 0, metrics),
            row(
                "fig5",
                "none",
                4,
                {
                    **metrics,
                    "nfe_mean": 16.0,
                    "speedup_nfe": 2.0,
                    "draft_query_tokens_per_forward": 150.0,
                    "accepted_level/1": 0.5,
                },
            ),
        ],
    )
    bench = tmp_path / "fig5_cpu.json"
    bench.write_text(
        json.dumps({"env": {"device": "cpu"}, "cost_curve": curve_rows().to_dict("records")})
    )
    out = tmp_path / "tables"
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/make_tables.py",
            "--results",
            str(runs),
            "--out",
            str(out),
            "--experiment",
            "fig5",
            "--cost-curve",
            str(bench),
        ],
        cwd=ROOT,
        text=True,
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr
    written = sorted(p.name for p in out.iterdir())
    assert written == [
        "fig5.csv",
        "fig5.md",
        "fig5_acceptance.png",
        "fig5_cost.csv",
        "fig5_cost.md",
        "fig5_cost.png",
        "fig5_speedup.png",
    ]
    cost = pd.read_csv(out / "fig5_cost.csv")
    assert cost.speedup_wall_predicted.round(4).tolist() == [1.0, round(352 / 416, 4)]


def test_a_forced_rerun_supersedes_the_old_row(tmp_path):
    """`force=true` appends a second row for a job key; tables show the newest, torn lines are skipped."""
    path = tmp_path / "t.jsonl"
    old = {**row("t", "none", 3, {"speedup_nfe": 2.0}), "job_key": "k3"}
    new = {**old, "metrics": {"speedup_nfe": 2.5}}
    other = {**row("t", "none", 5, {"speedup_nfe": 3.0}), "job_key": "k5"}
    write_rows(path, [old, other])
    with open(path, "a") as f:
        f.write('{"torn": \n')
    write_rows(path, [new])
    table = experiment_table(load_frame(tmp_path), "t")
    assert table[["graph.budget", "speedup_nfe"]].values.tolist() == [[3, 2.5], [5, 3.0]]


def test_batching_plot_from_a_bench_payload(tmp_path):
    """`scripts/bench.py --batch-sizes` writes this plot: throughput vs batch size, and the batched cost curve."""
    from spiffy.lab.report import plot_batching

    decoders = [
        {"decoder": d, "batch_size": b, "tokens_per_s": 100.0 * b**0.5}
        for d in ("dual", "dual+spiffy")
        for b in (1, 4, 16)
    ]
    curve = [
        {"layout": "dual", "batch": b, "drafts": d, "cost_vs_no_drafts": 1 + d * b / 16}
        for b in (1, 4, 16)
        for d in (0, 5)
    ]
    plot_batching(
        {"env": {"device": "cpu"}, "decoders": decoders, "cost_curve": curve}, tmp_path / "b.png"
    )
    plot_batching({"decoders": decoders}, tmp_path / "only.png")
    assert (tmp_path / "b.png").stat().st_size > 0 and (tmp_path / "only.png").stat().st_size > 0


def test_study_panels_one_per_base_in_order(tmp_path, monkeypatch):
    """`scripts/oracle_study.py` and `scripts/dynamic_study.py` draw this figure: one panel per base, in the
    table's order, each with every requested series against D."""
    import matplotlib.figure

    from spiffy.lab.report import plot_panels

    table = pd.DataFrame(
        [
            {"base": b, "D": d, "chain:D": 1 + d / 10, "anchor oracle": 1 + d / 5}
            for b in ("block 8", "block 32", "dual cache, block 8")
            for d in (3, 5, 10)
        ]
    )
    saved = []
    original = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        saved.append([(ax.get_title(), [line.get_label() for line in ax.lines]) for ax in fig.axes])
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    plot_panels(table, [("anchor oracle", "b-s"), ("chain:D", "r--v")], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    assert saved == [
        [(b, ["anchor oracle", "chain:D"]) for b in ("block 8", "block 32", "dual cache, block 8")]
    ]
