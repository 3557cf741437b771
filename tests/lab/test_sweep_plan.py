"""`run.py --dry-run`: a sweep's job list, validated, with what a launch would do with each job."""

from __future__ import annotations

import pytest

from spiffy.lab import results as store
from spiffy.lab.claims import try_claim
from spiffy.lab.schema import register_configs
from spiffy.lab.sweep import CONF_DIR, dry_run, plan

register_configs()


def test_dry_run_lists_jobs_with_their_action(tmp_path, capsys):
    sweep = [
        "hydra/launcher=slurm",
        "decoder=vanilla,spiffy",
        "graph.budget=3,10",
        f"results_dir={tmp_path}",
    ]
    jobs = plan(sweep)
    assert [j["overrides"] for j in jobs] == [
        f"decoder=vanilla graph.budget=3 results_dir={tmp_path}",
        f"decoder=vanilla graph.budget=10 results_dir={tmp_path}",
        f"decoder=spiffy graph.budget=3 results_dir={tmp_path}",
        f"decoder=spiffy graph.budget=10 results_dir={tmp_path}",
    ]
    assert [j["action"] for j in jobs] == ["run", "same as #0", "run", "run"]
    store.write_row(tmp_path, {"job_key": jobs[2]["key"], "experiment": "default", "metrics": {}})
    held = try_claim(tmp_path / "default", jobs[3]["key"])
    try:
        assert [j["action"] for j in plan(sweep)] == ["run", "same as #0", "done", "running"]
        assert [j["action"] for j in plan([*sweep, "force=true"])][2] == "run"
    finally:
        held.release()
    assert dry_run(sweep) == 0
    out = capsys.readouterr().out
    assert (
        "dry run: 4 job(s), hydra/launcher=slurm" in out
        and "2 to run, 1 done (skip), 0 running elsewhere, 1 duplicate(s)" in out
    )


def test_dry_run_names_the_job_with_a_bad_value(capsys):
    with pytest.raises(
        ValueError,
        match=r"job #1 \(graph.budget=-1\): graph.budget=-1 must be 'auto' or an integer >= 0",
    ):
        plan(["graph.budget=3,-1"])
    assert dry_run(["graph.budget=3,ten"]) == 1
    assert "job #1 (graph.budget=ten)" in capsys.readouterr().out


@pytest.mark.parametrize("launcher", ["slurm", "local_parallel", "submitit_local"])
def test_launcher_configs_compose_with_their_plugins(launcher):
    """The documented launcher settings are keys of the plugins' typed configs (a typo fails here)."""

    from hydra import compose, initialize_config_dir

    conf = CONF_DIR
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True
        )
    params = cfg.hydra.launcher
    if launcher == "slurm":
        assert params._target_.endswith("SlurmLauncher")
        assert (params.gpus_per_node, params.timeout_min, params.array_parallelism) == (1, 240, 32)
        assert "partition" in params and "setup" in params
