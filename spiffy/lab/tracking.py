"""Weights & Biases logging: the only module that imports wandb (docs/architecture.md, the lab).

`start(...)` opens a job's W&B run before any model loads, so a W&B that cannot start fails the job at once
(`TrackingError`), not after minutes of evaluation. Conventions that make a sweep a report
(`scripts/wandb_report.py`): `group` = experiment, `job_type` = decoder preset, tags `model:`, `task:`, `graph:`,
and a config whose dotted keys are the result tables' axes (`graph.budget`, `decoder.cache`, ...) plus `env.*`.
`Tracker.log_job` puts the metrics in the run summary, acceptance per graph level in the history (`level` ->
`acceptance/accepted`, one point per level) and as the `acceptance` table and plot, the per-forward cost data as
the `cost` table, the samples as the `samples` table; then it finishes the run and returns the row's `wandb`
block: mode, run id, where the run is, status, and the keys the run logged (read back from the run).
"""

from __future__ import annotations

from pathlib import Path

from spiffy.lab.schema import TrackingConfig

LEVEL_PREFIX = "accepted_level/"
HISTORY_X, HISTORY_Y = "level", "acceptance/accepted"
COST_KEYS = (
    "nfe_mean",
    "nfe_base_mean",
    "speedup_nfe",
    "speedup_wall",
    "accepted_per_forward",
    "draft_query_tokens_per_forward",
    "model_ms_per_forward",
    "wall_ms_per_forward",
    "draft_share",
    "mask_share",
    "bookkeeping_share",
    "overhead_share",
    "tokens_per_s",
)


class TrackingError(RuntimeError):
    """W&B could not start or could not log a job."""


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested config -> dotted keys (`{"graph": {"budget": 3}}` -> `{"graph.budget": 3}`), the tables' axes."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_config(resolved: dict, *, job_key: str, env: dict) -> dict:
    """The W&B config of a job: its resolved config (tracking excluded), key and environment, nested, so that
    W&B shows (and `wandb-workspaces` addresses) the result tables' axes as `graph.budget`, `decoder.cache`..."""
    return {
        **{k: v for k, v in resolved.items() if k != "tracking"},
        "job_key": job_key,
        "env": env,
    }


def run_tags(resolved: dict, *, speculates: bool) -> list[str]:
    g = resolved.get("graph", {})
    graph = "none"
    if speculates:
        rule = f"-{g.get('rule')}" if g.get("source") == "calibrate" else ""
        graph = f"{g.get('source')}{rule}-D{g.get('budget')}"
    model, task = resolved.get("model", {}).get("name"), resolved.get("task", {}).get("name")
    return [f"model:{model}", f"task:{task}", f"graph:{graph}"]


class Tracker:
    """One job's W&B run (or nothing, when tracking is disabled)."""

    def __init__(self, cfg: TrackingConfig, run=None):
        self.cfg, self.run = cfg, run

    def info(self, status: str) -> dict:
        if self.run is None:
            return {"mode": "disabled", "status": status}
        run = self.run
        where = (
            {"url": run.url} if self.cfg.mode == "online" else {"dir": str(Path(run.dir).parent)}
        )
        return {
            "mode": self.cfg.mode,
            "project": self.cfg.project,
            "entity": self.cfg.entity,
            "group": run.group,
            "job_type": run.job_type,
            "run_id": run.id,
            "name": run.name,
            **where,
            "status": status,
        }

    def log_job(self, metrics: dict, samples: list[dict] | None = None) -> dict:
        """Log a finished job's results, finish the run, and return the row's `wandb` block."""
        if self.run is None:
            return self.info("disabled")
        import wandb

        run = self.run
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, type(None)))}
        run.summary.update(scalars)
        history = []
        levels = sorted(
            (
                (int(k.removeprefix(LEVEL_PREFIX)), v)
                for k, v in scalars.items()
                if k.startswith(LEVEL_PREFIX)
            ),
        )
        if levels:
            run.define_metric(HISTORY_X)
            run.define_metric(HISTORY_Y, step_metric=HISTORY_X)
            for level, accepted in levels:
                run.log({HISTORY_X: level, HISTORY_Y: accepted})
            history = [HISTORY_X, HISTORY_Y]
            table = wandb.Table(columns=["level", "accepted"], data=[list(p) for p in levels])
            run.log(
                {
                    "acceptance": table,
                    "acceptance_plot": wandb.plot.line(
                        table, "level", "accepted", title="forwards accepting a level-l draft"
                    ),
                }
            )
        cost = [k for k in COST_KEYS if scalars.get(k) is not None]
        if cost:
            run.log({"cost": wandb.Table(columns=cost, data=[[scalars[k] for k in cost]])})
        if samples:
            columns = list(samples[0])
            run.log(
                {
                    "samples": wandb.Table(
                        columns=columns, data=[[s[c] for c in columns] for s in samples]
                    )
                }
            )
        keys = {
            "config": sorted(flatten(dict(run.config))),
            "summary": sorted(k for k in run.summary.keys() if not k.startswith("_")),
            "history": history,
        }
        info = self.info("logged")
        run.finish()
        return {**info, "keys": keys}

    def abort(self) -> None:
        """Finish the run as failed (the job raised)."""
        if self.run is not None:
            self.run.finish(exit_code=1)

    def failed(self, err: BaseException) -> dict:
        """The row's `wandb` block for a job whose logging raised `err` (the run is closed if it can be)."""
        if self.run is not None:
            try:
                self.run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - the original error is what the user needs to see
                pass
        return {**self.info("failed"), "error": f"{type(err).__name__}: {err}"}


def describe(info: dict | None) -> str:
    """One line saying where a row's W&B run went (printed after the summary table)."""
    info = info or {}
    if info.get("status") == "failed":
        return f"W&B: logging FAILED ({info.get('error')}); rerun the same command to upload the stored row"
    if info.get("mode") in (None, "disabled"):
        return "W&B: not logged (tracking=disabled)"
    if info.get("mode") == "online":
        return f"W&B: {info.get('url')}"
    return f"W&B: offline run in {info.get('dir')}; upload with: wandb sync {info.get('dir')}"


def start(
    cfg: TrackingConfig,
    *,
    config: dict,
    name: str,
    group: str,
    job_type: str,
    tags: list[str],
    job_dir: str | Path,
    run_id: str | None = None,
) -> Tracker:
    """Open the job's W&B run (no-op tracker when disabled); raise `TrackingError` if W&B cannot start.

    `run_id` (the job key): W&B's run id, so a rerun of the same job resumes its run instead of adding one."""
    if cfg.mode == "disabled":
        return Tracker(cfg)
    import wandb

    Path(job_dir).mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=cfg.mode,
            config=config,
            name=name,
            group=group,
            job_type=job_type,
            tags=tags,
            dir=str(job_dir),
            id=run_id,
            resume="allow" if run_id else None,
            reinit="finish_previous",
            settings=wandb.Settings(quiet=True),
        )
    except Exception as err:
        raise TrackingError(
            f"W&B could not start (tracking.mode={cfg.mode!r}, tracking.project={cfg.project!r}, "
            f"tracking.entity={cfg.entity!r}): {type(err).__name__}: {err}. Nothing was evaluated. "
            "Log in with `wandb login`, or run with tracking=offline (upload later with `wandb sync`) "
            "or tracking=disabled."
        ) from err
    return Tracker(cfg, run)
