"""`graph.source=dynamic` through run.py (docs/algorithm.md §5.10): calibrated per job, lossless, fewer forwards."""

from __future__ import annotations

import json

import pytest

from tests.lab.test_pipeline_smoke import rows_of, run_py


def test_dynamic_source_runs_end_to_end(tmp_path):
    proc = run_py(
        tmp_path, "decoder=spiffy", "graph.source=dynamic", "graph.budget=5", "experiment_name=dyn"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = rows_of(tmp_path / "runs" / "dyn")
    metrics = row["metrics"]
    assert metrics["agreement"] == 1.0 and metrics["graph_nodes"] == 5
    assert metrics["speedup_nfe"] > 1.0
    assert json.loads(row["graph"])["format"] == "spiffy.dynamic_graph"


@pytest.mark.slow
def test_dynamic_preset_with_auto_budget_weighs_static_and_dynamic_graphs(tmp_path):
    """`graph=dynamic` (budget auto): static and dynamic graphs of every D compete, the choice is recorded with
    its kind, and the job is lossless whichever wins."""
    proc = run_py(
        tmp_path, "decoder=spiffy", "graph=dynamic", "graph.max_budget=2", "experiment_name=dynauto"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = rows_of(tmp_path / "runs" / "dynauto")
    auto = row["auto"]
    kinds = sorted((c["kind"], c["budget"]) for c in auto["candidates"])
    assert kinds == [("dynamic", 1), ("dynamic", 2), ("static", 0), ("static", 1), ("static", 2)]
    assert auto["kind"] in ("static", "dynamic") and row["metrics"]["agreement"] == 1.0
    if auto["budget"]:
        graph_format = json.loads(row["graph"]).get("format")
        assert (graph_format == "spiffy.dynamic_graph") == (auto["kind"] == "dynamic")
    assert f"auto: D*={auto['budget']}" in proc.stdout
