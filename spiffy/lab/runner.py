"""The runner's Hydra entry point: `spiffy run [overrides]` (= `python run.py` in a checkout), sweeps with `-m`, the
job list of a sweep with `--dry-run`. The configuration ships inside the package (`pkg://spiffy.conf`)."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from spiffy.lab.schema import register_configs

register_configs()


def one_line(err: Exception) -> None:
    """A user error as one line on stderr, exit status 2; HYDRA_FULL_ERROR=1 shows the traceback instead."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"spiffy: {err}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="pkg://spiffy.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    from spiffy.lab.pipeline import ConfigError, run

    try:
        return run(cfg)
    except ConfigError as err:
        one_line(err)


def main(argv: list[str] | None = None) -> int:
    """Run `argv` (Hydra overrides and flags). `--dry-run` lists the jobs of the sweep and what a launch would do
    with each (launcher overrides accepted and ignored), running nothing."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--dry-run" in argv:
        from spiffy.lab.sweep import dry_run

        return dry_run([a for a in argv if a not in {"--dry-run", "-m", "--multirun"}])
    sys.argv = [sys.argv[0], *argv]
    hydra_main()
    return 0
