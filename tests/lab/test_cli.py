"""The `spiffy` console command: subcommand registry, --version, env, run --dry-run and --help through the packaged
configuration (pkg://spiffy.conf). The non-editable install run from another directory is a CI step (.ci/run)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module

from spiffy.lab import cli
from spiffy.lab.schema import register_configs


def test_usage_lists_every_registered_command_and_unknown_ones_fail(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in ("run", "bench", "tables", "env", "--version"))
    assert cli.main(["serve-nothing"]) == 2
    assert "unknown command 'serve-nothing'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="registered twice"):
        cli.command("run", "again")(lambda argv: 0)


def test_version_and_env_report(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("spiffy ")
    assert cli.main(["env"]) == 0
    report = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert {
        "spiffy",
        "torch",
        "transformers",
        "lm_eval",
        "device",
        "cpu_capability",
        "blas",
    } <= set(report)


def test_packaged_config_composes_with_the_help_template():
    register_configs()  # as `spiffy run` does before composing: the config's defaults start with run_schema
    with initialize_config_module(config_module="spiffy.conf", version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    template = cfg.hydra.help.template
    assert (
        "Main keys" in template and "spiffy run -m" in template and "$APP_CONFIG_GROUPS" in template
    )
    assert cfg.model.path == "embedded"


def test_run_dry_run_lists_the_jobs_without_running(tmp_path, capsys):
    status = cli.main(
        [
            "run",
            "--dry-run",
            "-m",
            "decoder=vanilla,spiffy",
            f"results_dir={tmp_path}",
            "hydra/launcher=slurm",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0 and "dry run: 2 job(s), hydra/launcher=slurm" in out
    assert "2 to run" in out and not list(tmp_path.iterdir())
    assert cli.main(["run", "--dry-run", "-m", "graph.budget=ten"]) == 1
