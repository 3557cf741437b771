"""Weights & Biases logging: the only module that imports wandb (STYLE pattern 9).

`track(...)` is a context manager: it starts a run (offline by default, one directory per job so parallel
jobs never collide), logs the resolved config, and always calls `finish()`, even when the job crashes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from spiffy.config import TrackingConfig


@contextlib.contextmanager
def track(cfg: TrackingConfig, *, config: dict, name: str, group: str, job_dir: str | Path):
    """Yield a `log(metrics, samples)` function; a no-op when `cfg.mode == "disabled"`."""
    if cfg.mode == "disabled":
        yield lambda metrics, samples=None: None
        return
    import wandb

    Path(job_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        mode=cfg.mode,
        config=config,
        name=name,
        group=group,
        dir=str(job_dir),
        reinit="finish_previous",
        settings=wandb.Settings(quiet=True),
    )

    def log(metrics: dict, samples: list[dict] | None = None) -> None:
        run.summary.update(metrics)
        run.log(metrics)
        if samples:
            columns = list(samples[0])
            run.log(
                {
                    "samples": wandb.Table(
                        columns=columns, data=[[s[c] for c in columns] for s in samples]
                    )
                }
            )

    try:
        yield log
    finally:
        run.finish()
        if cfg.mode == "offline":
            print(f"W&B offline run in {run.dir}; upload with: wandb sync {Path(run.dir).parent}")
