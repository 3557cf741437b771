"""End-to-end: a `graph.budget=auto` job on the embedded model chooses D*, records it, and explains it."""

from __future__ import annotations

from tests.lab.test_pipeline_smoke import rows_of, run_py


def test_budget_auto_job_records_the_chosen_budget_and_its_prediction(tmp_path):
    proc = run_py(tmp_path, "decoder=spiffy", "graph.max_budget=2", "experiment_name=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = rows_of(tmp_path / "runs" / "auto")
    m, auto = row["metrics"], row["auto"]
    assert row["config"]["graph"]["budget"] == "auto" and m["auto_budget"] in (0, 1, 2)
    assert auto["budget"] == m["auto_budget"] and auto["layout"] == "exact"
    assert sorted(c["budget"] for c in auto["candidates"]) == [0, 1, 2]
    chosen = next(c for c in auto["candidates"] if c["budget"] == auto["budget"])
    assert m["predicted_speedup_wall"] == chosen["speedup_wall"] >= 1.0
    assert (
        m["agreement"] == 1.0 and "speedup_wall" in m
    )  # measured beside the base, even for D* = 0
    assert row["name"] == f"arith-spiffy-Dauto{auto['budget']}"
    assert (row["graph"] is None) == (auto["budget"] == 0)
    assert f"auto: D*={auto['budget']}" in proc.stdout
    (costs,) = (tmp_path / "graphs" / "tiny-llada-arith" / "costs").glob("*.json")
    assert auto["costs_path"] == str(costs)
