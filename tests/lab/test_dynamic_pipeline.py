"""`graph.source=dynamic` through run.py (docs/algorithm.md §5.10): calibrated per job, lossless, fewer forwards."""

from __future__ import annotations

import json

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
