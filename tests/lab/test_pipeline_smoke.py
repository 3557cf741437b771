"""End-to-end: run.py on the embedded model writes one result row per job under untracked paths; reruns skip and
print the stored summary; sweeps through the joblib and submitit_local launchers land every row once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spiffy.lab.sweep import CONF_DIR

REPO = Path(__file__).resolve().parents[2]


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


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def test_smoke_multirun_writes_one_row_per_job_and_reruns_skip(tmp_path):
    sweep = [
        "decoder=vanilla,spiffy",
        "graph.budget=2,4",
        "experiment_name=smoke",
        "eval.batch_size=16",
    ]
    proc = run_py(tmp_path, *sweep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = rows_of(tmp_path / "runs" / "smoke")
    assert len(rows) == 3  # the two vanilla jobs are one job: the second skips
    assert proc.stdout.count("skip: job") == 1
    spiffy_rows = [r for r in rows if r["config"]["decoder"]["speculate"]]
    assert len(spiffy_rows) == 2
    for row in spiffy_rows:
        m = row["metrics"]
        assert m["agreement"] == 1.0 and m["speedup_nfe"] >= 1.0 and m["n_requests"] == 2
        # both requests decoded in one batch: fewer forwards than their NFE
        assert m["batch_size"] == 16 and m["batch_forwards"] < m["nfe_mean"] * m["n_requests"]
        assert row["env"]["git_sha"] is not None and row["graph"] is not None
        assert row["env"]["torch_threads"] == 1 and row["env"]["dtype"] == "float32"
        # lm-eval's own files beside the row, with Spiffy's numbers (tracking=disabled here)
        files = row["lm_eval"]
        assert Path(files["results"]).parent.name == f"{row['job_key']}.lm_eval"
        lm_results = json.loads(Path(files["results"]).read_text())["results"]["spiffy_arith"]
        assert lm_results["nfe,none"] == m["nfe_mean"] and lm_results["agreement,none"] == 1.0
        [samples] = files["samples"]
        records = [json.loads(line) for line in Path(samples).read_text().splitlines()]
        # one record per document and answer filter (strict-match, flexible-extract), as lm-eval logs them
        assert len({r["doc_id"] for r in records}) == 2 and len(records) == 4
        assert all(r["spiffy"][0]["nfe"] >= 1 for r in records)
    assert list(
        (tmp_path / "graphs").rglob("D4-best-*.json")
    )  # calibrated (default rule) and cached
    again = run_py(tmp_path, *sweep)
    assert again.returncode == 0 and again.stdout.count("skip: job") == 4
    assert again.stdout.count("NFE speedup") == 4  # each skip prints the stored summary
    assert len(rows_of(tmp_path / "runs" / "smoke")) == 3


def summary_line(stdout: str) -> str:
    """The data row of the printed summary table (accuracy, NFE, ... as printed)."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "NFE speedup" in line)
    return next(line for line in lines[header + 1 :] if any(c.isdigit() for c in line))


@pytest.mark.slow
def test_first_run_with_the_defaults_shows_its_summary_and_a_rerun_shows_the_stored_one(tmp_path):
    """`python run.py` as a new user runs it (defaults: rows, graphs, W&B offline under ./runs), from tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "WANDB_SILENT": "true",
    }
    env["HOME"] = str(tmp_path)  # no W&B login: offline needs none
    cmd = [
        sys.executable,
        str(REPO / "run.py"),
        "task.limit=2",
        "graph.n_samples=3",
        "eval.progress=false",
    ]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    (row_file,) = (tmp_path / "runs" / "results" / "default").glob("*.json")
    assert f"row: runs/results/default/{row_file.name}" in first.stdout
    assert "W&B: offline run in runs/wandb/" in first.stdout and "wandb sync" in first.stdout
    assert list((tmp_path / "runs" / "graphs").rglob("D10-best-*.json"))
    row = json.loads(row_file.read_text())
    assert row["wandb"]["status"] == "logged" and row["env"]["torch_threads"] == 1
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        "already done" in again.stdout
        and "Running generate_until" not in again.stdout + again.stderr
    )
    assert summary_line(again.stdout) == summary_line(first.stdout)  # the stored metrics
    assert f"{row['metrics']['speedup_nfe']:.2f}x" in summary_line(again.stdout)


def test_every_default_output_location_is_untracked():
    """Rows, graphs, W&B and Hydra's run folders of a default job are git-ignored: `git status` stays clean."""
    if subprocess.run(["git", "rev-parse"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    from hydra import compose, initialize_config_dir

    from spiffy.lab.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    paths = [
        f"{cfg.results_dir}/default/0123.json",
        f"{cfg.graph.root}/model/task/D10-degree1-0123.json",
        f"{cfg.graph.root}/model/costs/cpu-0123.json",  # graph.budget=auto's device cost model
        f"{cfg.tracking.dir}/0123/wandb/offline-run-x/run.wandb",
        f"{cfg.hydra.run.dir}/.hydra/config.yaml",
        f"{cfg.hydra.sweep.dir}/0/.hydra/config.yaml",
    ]
    for path in paths:
        assert not Path(path).is_absolute() and not path.startswith("results/"), path
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert ignored.returncode == 0, f"{path} would be tracked by git"


def test_bad_override_fails_with_a_readable_message(tmp_path):
    proc = run_py(tmp_path, "graph.budget=ten")
    assert proc.returncode != 0
    assert "graph.budget" in proc.stderr and "ten" in proc.stderr


@pytest.mark.slow
def test_dream_family_runs_end_to_end(tmp_path):
    proc = run_py(tmp_path, "model=dream_tiny", "experiment_name=dream")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = rows_of(tmp_path / "runs" / "dream")
    assert (
        row["metrics"]["agreement"] == 1.0 and row["config"]["model"]["name"] == "tiny-dream-random"
    )


@pytest.mark.slow
def test_parallel_sweep_with_the_joblib_launcher_keeps_every_row(tmp_path):
    """`hydra/launcher=local_parallel`: two jobs in two processes, one row file each."""
    sweep = ["hydra/launcher=local_parallel", "decoder=vanilla,spiffy", "experiment_name=par"]
    proc = run_py(tmp_path, *sweep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    rows = rows_of(tmp_path / "runs" / "par")
    assert sorted(r["config"]["decoder"]["name"] for r in rows) == ["spiffy", "vanilla"]


def submitit_logs(tmp_path: Path) -> str:
    return "".join(p.read_text() for p in (tmp_path / "multirun" / ".submitit").rglob("*_log.out"))


@pytest.mark.slow
def test_submitit_local_sweep_lands_every_row_once_and_a_rerun_skips(tmp_path):
    """Hydra's submitit_local launcher: pickled jobs in their own processes and job folders, as on SLURM."""
    sweep = [
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=20",
        "hydra.sweeper.max_batch_size=2",  # two jobs at a time: the two identical vanilla jobs run together
        "decoder=vanilla,spiffy",
        "graph.budget=2,4",
        "experiment_name=sub",
    ]
    proc = run_py(tmp_path, *sweep)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "Submitit 'local' sweep output dir" in proc.stdout + proc.stderr
    rows = rows_of(tmp_path / "runs" / "sub")
    assert len(rows) == 3 and len({r["job_key"] for r in rows}) == 3
    logs = submitit_logs(tmp_path)
    assert logs.count("\nrow: ") + logs.startswith("row: ") == 3  # evaluated once per distinct job
    assert logs.count("is being run by") + logs.count("already done") == 1  # the vanilla duplicate
    again = run_py(tmp_path, *sweep)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    logs = submitit_logs(tmp_path)
    assert (
        logs.count("row: ") == 3 and logs.count("already done") >= 4
    )  # the rerun evaluated nothing
    assert len(rows_of(tmp_path / "runs" / "sub")) == 3
