"""End-to-end: a multirun of run.py on the embedded model writes one result row per job; reruns skip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_py(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "run.py",
        "-m",
        "task.limit=2",
        "graph.n_samples=3",
        "tracking=disabled",
        "eval.progress=false",
        "eval.threads=1",
        f"results_dir={tmp_path}/runs",
        f"graph.root={tmp_path}/graphs",
        f"hydra.sweep.dir={tmp_path}/multirun",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_smoke_multirun_writes_one_row_per_job_and_reruns_skip(tmp_path):
    sweep = ["decoder=vanilla,spiffy", "graph.budget=2,4", "experiment_name=smoke"]
    proc = run_py(tmp_path, *sweep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [
        json.loads(line) for line in (tmp_path / "runs" / "smoke.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4
    spiffy_rows = [r for r in rows if r["config"]["decoder"]["speculate"]]
    assert len(spiffy_rows) == 2
    for row in spiffy_rows:
        m = row["metrics"]
        assert m["agreement"] == 1.0 and m["speedup_nfe"] >= 1.0 and m["n_requests"] == 2
        assert row["env"]["git_sha"] is not None and row["graph"] is not None
    assert list((tmp_path / "graphs").rglob("D4-degree1-*.json"))  # calibrated and cached
    again = run_py(tmp_path, *sweep)
    assert again.returncode == 0 and again.stdout.count("skip: job") == 4
    assert len((tmp_path / "runs" / "smoke.jsonl").read_text().splitlines()) == 4


def test_bad_override_fails_with_a_readable_message(tmp_path):
    proc = run_py(tmp_path, "graph.budget=ten")
    assert proc.returncode != 0
    assert "graph.budget" in proc.stderr and "ten" in proc.stderr


@pytest.mark.slow
def test_dream_family_runs_end_to_end(tmp_path):
    proc = run_py(tmp_path, "model=dream_tiny", "experiment_name=dream")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "runs" / "dream.jsonl").read_text().splitlines()[0])
    assert (
        row["metrics"]["agreement"] == 1.0 and row["config"]["model"]["name"] == "tiny-dream-random"
    )


@pytest.mark.slow
def test_parallel_sweep_with_the_joblib_launcher_keeps_every_row(tmp_path):
    """`hydra/launcher=local_parallel`: two jobs in two processes append to one locked JSONL store."""
    sweep = ["hydra/launcher=local_parallel", "decoder=vanilla,spiffy", "experiment_name=par"]
    proc = run_py(tmp_path, *sweep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "runs" / "par.jsonl").read_text().splitlines()]
    assert sorted(r["config"]["decoder"]["name"] for r in rows) == ["spiffy", "vanilla"]
