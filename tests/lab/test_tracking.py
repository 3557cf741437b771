"""W&B tracking: report conventions, fail-fast start, and no job recorded as done when its W&B logging fails."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from spiffy.lab import pipeline, tracking
from spiffy.lab import results as store
from spiffy.lab.schema import TrackingConfig, register_configs
from spiffy.lab.sweep import CONF_DIR

CONF = CONF_DIR
register_configs()

METRICS = {
    "accuracy": 0.5,
    "nfe_mean": 12.0,
    "nfe_base_mean": 32.0,
    "speedup_nfe": 2.67,
    "speedup_wall": 0.5,
    "agreement": 1.0,
    "model_ms_per_forward": 10.0,
    "accepted_level/1": 0.5,
    "accepted_level/2": 0.25,
}


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """No login, no ambient W&B settings: what a fresh machine has."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_ENTITY", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def compose_job(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[
                f"results_dir={tmp_path}/runs/results",
                f"graph.root={tmp_path}/runs/graphs",
                f"tracking.dir={tmp_path}/runs/wandb",
                "experiment_name=trk",
                *overrides,
            ],
        )


def test_offline_run_follows_the_report_conventions(wandb_env):
    resolved = {
        "graph": {"budget": 3, "source": "calibrate", "rule": "degree1"},
        "decoder": {"name": "spiffy"},
    }
    resolved |= {"model": {"name": "m"}, "task": {"name": "arith"}}
    tracker = tracking.start(
        TrackingConfig(mode="offline", dir=str(wandb_env)),
        config=tracking.run_config(resolved, job_key="k", env={"torch_threads": 1}),
        name="arith-spiffy-D3",
        group="exp",
        job_type="spiffy",
        tags=tracking.run_tags(resolved, speculates=True),
        job_dir=wandb_env / "k",
    )
    info = tracker.log_job(
        METRICS, [{"request_id": 0, "completion": "4", "nfe": 12, "agrees": True}]
    )
    assert info["status"] == "logged" and info["group"] == "exp" and info["job_type"] == "spiffy"
    assert Path(info["dir"]).is_dir() and info["dir"].startswith(str(wandb_env / "k"))
    keys = info["keys"]
    assert {"graph.budget", "decoder.name", "env.torch_threads", "job_key"} <= set(keys["config"])
    assert {"speedup_nfe", "accepted_level/2", "acceptance", "cost", "samples"} <= set(
        keys["summary"]
    )
    assert keys["history"] == ["level", "acceptance/accepted"]
    assert tracking.run_tags(resolved, speculates=True) == [
        "model:m",
        "task:arith",
        "graph:calibrate-degree1-D3",
    ]
    assert "wandb sync" in tracking.describe(info)


def test_online_without_login_fails_at_start_naming_the_setting(wandb_env):
    t0 = time.perf_counter()
    with pytest.raises(
        tracking.TrackingError, match="tracking.mode='online'.*Nothing was evaluated"
    ):
        tracking.start(
            TrackingConfig(mode="online", dir=str(wandb_env)),
            config={},
            name="n",
            group="g",
            job_type="j",
            tags=[],
            job_dir=wandb_env / "j",
        )
    assert time.perf_counter() - t0 < 60


def test_a_failing_wandb_start_stops_the_job_before_any_model_loads(wandb_env, monkeypatch):
    def must_not_run(cfg):
        raise AssertionError("the job evaluated although W&B could not start")

    monkeypatch.setattr(pipeline, "evaluate_job", must_not_run)
    cfg = compose_job(wandb_env, "tracking=online")
    with pytest.raises(tracking.TrackingError, match="could not start"):
        pipeline.run(cfg)
    assert not list(
        (wandb_env / "runs" / "results").rglob("*.json")
    )  # no row, no claim left behind


def test_a_job_whose_wandb_logging_fails_is_not_silently_done(wandb_env, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "evaluate_job", lambda cfg, *_: (dict(METRICS), None, []))
    real_log = tracking.Tracker.log_job

    def broken(self, metrics, samples=None):
        raise ConnectionError("W&B unreachable")

    monkeypatch.setattr(tracking.Tracker, "log_job", broken)
    cfg = compose_job(wandb_env, "tracking=offline", "decoder=vanilla")
    with pytest.raises(tracking.TrackingError, match="row is saved in .*W&B logging failed"):
        pipeline.run(cfg)
    (path,) = (wandb_env / "runs" / "results" / "trk").glob("*.json")
    assert store.load_row(path)["wandb"]["status"] == "failed"
    # the rerun does not re-evaluate: it uploads the stored row and marks it logged
    monkeypatch.setattr(tracking.Tracker, "log_job", real_log)
    monkeypatch.setattr(pipeline, "evaluate_job", lambda cfg, *_: pytest.fail("re-evaluated"))
    assert pipeline.run(cfg) == 0.5
    out = capsys.readouterr().out
    assert "skip: job" in out and "2.67x" in out and "wandb sync" in out
    assert store.load_row(path)["wandb"]["status"] == "logged"


def test_a_rerun_prints_the_stored_summary_and_where_the_row_is(wandb_env, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "evaluate_job", lambda cfg, *_: (dict(METRICS), None, []))
    cfg = compose_job(wandb_env, "tracking=disabled", "decoder=vanilla")
    assert pipeline.run(cfg) == 0.5
    first = capsys.readouterr().out
    (path,) = (wandb_env / "runs" / "results" / "trk").glob("*.json")
    assert f"row: {path}" in first and "W&B: not logged" in first and "1 torch thread" in first
    monkeypatch.setattr(pipeline, "evaluate_job", lambda cfg, *_: pytest.fail("re-evaluated"))
    assert pipeline.run(cfg) == 0.5
    again = capsys.readouterr().out
    assert f"already done; its row is in {path}" in again
    assert (
        "2.67x" in again and "12.0" in again and "32.0" in again
    )  # the stored metrics, not just "skip"


def test_run_name_has_the_model_and_the_run_id_is_the_job_key(wandb_env):
    """A rerun of a job resumes its W&B run (same id) instead of adding a duplicate; the name shows the model."""
    cfg, resolved = pipeline.typed_job(compose_job(wandb_env, "tracking=offline"))
    key = store.job_key(resolved)
    args = pipeline.tracking_args(cfg, resolved, key, {"torch_threads": 1})
    assert args["run_id"] == key
    assert args["name"] == f"{cfg.model.name}-{pipeline.job_name(resolved)}"
    ids = []
    for _ in range(2):
        tracker = tracking.start(TrackingConfig(mode="offline", dir=str(wandb_env)), **args)
        ids.append(tracker.log_job(METRICS)["run_id"])
    assert ids == [key, key]
