"""spiffy experiment runner: `python run.py [overrides]`, sweeps with `-m`, job lists with `--dry-run` (see README)."""

import os
import sys

import hydra
from omegaconf import DictConfig

from spiffy.lab.pipeline import ConfigError, run
from spiffy.lab.schema import register_configs

register_configs()


def one_line(err: Exception) -> None:
    """A user error as one line on stderr, exit status 2; HYDRA_FULL_ERROR=1 shows the traceback instead."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"spiffy: {err}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except ConfigError as err:
        one_line(err)


if __name__ == "__main__":
    if "--dry-run" in sys.argv[1:]:  # list the jobs of the sweep (launcher overrides ignored), run nothing
        from spiffy.lab.sweep import dry_run

        flags = {"--dry-run", "-m", "--multirun"}
        sys.exit(dry_run([a for a in sys.argv[1:] if a not in flags]))
    main()
