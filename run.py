"""spiffy experiment runner: `python run.py [overrides]`, sweeps with `-m` (see README)."""

import hydra
from omegaconf import DictConfig

from spiffy.config import register_configs
from spiffy.pipeline import run

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    main()
