"""scripts/wandb_report.py offline: the report spec is written and every panel refers to keys the runs logged."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from spiffy.lab import results as store
from spiffy.lab import tracking
from spiffy.lab.schema import TrackingConfig

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("wandb_workspaces")


def load_script():
    spec = importlib.util.spec_from_file_location(
        "wandb_report", ROOT / "scripts" / "wandb_report.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def job_config(decoder: str, budget: int, rule="schedule", cache="none") -> dict:
    return {
        "model": {"name": "tiny"},
        "task": {"name": "arith", "calibration_task": None},
        "decoder": {
            "name": decoder,
            "rule": rule,
            "cache": cache,
            "speculate": decoder != "vanilla",
        },
        "graph": {"budget": budget, "source": "calibrate", "rule": "degree1", "n_samples": 20},
        "eval": {"threads": 1},
        "tracking": {"mode": "offline"},
    }


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One real offline W&B run (its `wandb` block as the pipeline stores it) and a store of three rows."""
    tmp = tmp_path_factory.mktemp("wandb")
    metrics = {
        "accuracy": 0.5,
        "nfe_mean": 12.0,
        "nfe_base_mean": 32.0,
        "speedup_nfe": 2.6,
        "speedup_wall": 0.5,
        "agreement": 1.0,
        "accepted_level/1": 0.5,
    }
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
            mp.delenv(var, raising=False)
        mp.setenv("WANDB_SILENT", "true")
        resolved = job_config("spiffy", 3)
        tracker = tracking.start(
            TrackingConfig(mode="offline", dir=str(tmp)),
            config=tracking.run_config(resolved, job_key="k", env={"torch_threads": 1}),
            name="n",
            group="exp",
            job_type="spiffy",
            tags=[],
            job_dir=tmp / "k",
        )
        info = tracker.log_job(metrics)
    results = tmp / "results"
    for n, (decoder, budget) in enumerate([("vanilla", 0), ("spiffy", 3), ("spiffy", 10)]):
        row = {"job_key": f"k{n}", "experiment": "exp", "name": f"{decoder}-{budget}"}
        row |= {"config": job_config(decoder, budget), "metrics": metrics, "wandb": info}
        store.write_row(results, row)
    return results, info


def test_offline_report_spec_refers_only_to_logged_keys(logged, tmp_path, capsys):
    results, _ = logged
    out = tmp_path / "exp.json"
    code = load_script().main(["exp", "--results", str(results), "--out", str(out)])
    assert code == 0, capsys.readouterr().out
    spec = json.loads(out.read_text())
    blocks = spec["report"]["spec"]["blocks"]
    headings = [b["children"][0]["text"] for b in blocks if b["type"] == "heading"]
    assert headings == [
        "spiffy: exp",
        "NFE / accuracy",
        "Speedup vs D, per base decoder",
        "Acceptance per graph level",
        "Calibration transfer",
    ]
    refs = {(section, key) for _, section, key in spec["references"]}
    assert {
        ("config", "graph.budget"),
        ("summary", "speedup_nfe"),
        ("history", "acceptance/accepted"),
    } <= refs
    assert ("config", "decoder.name") in refs  # a sweep axis of the rows is a runs-table column
    assert "wandb sync" in capsys.readouterr().out


def test_a_panel_on_a_key_no_run_logged_is_reported(logged, tmp_path, capsys):
    results, info = logged
    broken = tmp_path / "results"
    for row in store.read_rows(results):
        row = copy.deepcopy(row)
        row["wandb"]["keys"]["history"] = []  # runs that logged no acceptance-per-level history
        store.write_row(broken, row)
    code = load_script().main(["exp", "--results", str(broken), "--out", str(tmp_path / "x.json")])
    out = capsys.readouterr().out
    assert code == 1 and not (tmp_path / "x.json").exists()
    assert "panel 'forwards accepting a level-l draft': history key 'acceptance/accepted'" in out


def test_rows_without_wandb_runs_give_a_clear_error(tmp_path):
    store.write_row(tmp_path, {"job_key": "k", "experiment": "exp", "config": {}, "metrics": {}})
    with pytest.raises(SystemExit, match="none of the 1 rows of experiment='exp'"):
        load_script().main(["exp", "--results", str(tmp_path)])
    with pytest.raises(SystemExit, match="experiment='other' has no rows"):
        load_script().main(["other", "--results", str(tmp_path)])
