"""spiffy experiment runner: `python run.py [overrides]`, sweeps with `-m`, job lists with `--dry-run` (see README)."""

import sys

import hydra
from omegaconf import DictConfig

from spiffy.lab.pipeline import run
from spiffy.lab.schema import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    if "--dry-run" in sys.argv[1:]:  # list the jobs of the sweep (launcher overrides ignored), run nothing
        from spiffy.lab.sweep import dry_run

        flags = {"--dry-run", "-m", "--multirun"}
        sys.exit(dry_run([a for a in sys.argv[1:] if a not in flags]))
    main()
