"""`python run.py --dry-run -m <overrides>`: the job list of a sweep, checked, before anything runs or is submitted.

The sweep is expanded exactly as Hydra's basic sweeper expands it (cartesian product of the comma-separated
overrides), every job's config is composed and validated (a bad value fails here, naming the job), and each job is
reported with its job key and what a real launch would do with it: `run`, `done` (its row is stored: it would
skip), `running` (another process holds its claim) or `same as #i` (an identical job earlier in the list, e.g. the
vanilla jobs of a `graph.budget` sweep). `hydra/launcher=...` and `hydra.*` overrides are accepted and ignored, so the
command you are about to submit can be dry-run as it is. Only Hydra's public API is used (the override parser,
`compose`).
"""

from __future__ import annotations

import itertools
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from spiffy.lab import results as store
from spiffy.lab.claims import claim_path, is_stale
from spiffy.lab.pipeline import typed_job

# the runner's configuration, inside the package (Hydra: pkg://spiffy.conf)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def expand(overrides: list[str]) -> list[list[str]]:
    """The override list of every job of a sweep, in Hydra's basic-sweeper order (the cartesian product of the
    comma-separated values, the first override varying slowest), through Hydra's public override API."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_delete() and override.value() is None:  # `~key`: delete whatever it holds
            choices.append([key])
            continue
        if override.is_sweep_override():
            values = override.sweep_string_iterator()
        else:
            values = [override.get_value_element_as_str()]
        choices.append([f"{key}={value}" for value in values])
    return [list(job) for job in itertools.product(*choices)]


def plan(overrides: list[str]) -> list[dict]:
    """One entry per job: its overrides, name, experiment, job key, action, and where its row is (or goes)."""
    job_overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    jobs, first_of_key = [], {}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for n, job in enumerate(expand(job_overrides)):
            try:
                cfg, resolved = typed_job(compose(config_name="config", overrides=job))
            except Exception as err:  # Hydra's composition errors and the schemas' ValueErrors
                cause = f"{err} ({err.__cause__})" if err.__cause__ else str(err)
                raise ValueError(f"job #{n} ({' '.join(job)}): {cause}") from err
            key = store.job_key(resolved)
            path = store.row_path(cfg.results_dir, cfg.experiment_name, key)
            claim = claim_path(path.parent, key)
            if key in first_of_key:
                action = f"same as #{first_of_key[key]}"
            elif not cfg.force and store.finished(cfg.results_dir, cfg.experiment_name, key):
                action = "done"
            elif claim.exists() and not is_stale(claim):
                action = "running"
            else:
                action = "run"
            first_of_key.setdefault(key, n)
            jobs.append(
                dict(
                    num=n,
                    overrides=" ".join(job),
                    experiment=cfg.experiment_name,
                    key=key,
                    action=action,
                    row=str(path),
                )
            )
    return jobs


def dry_run(overrides: list[str]) -> int:
    """Print the job list of `run.py <overrides>` and what a launch would do; return the exit status."""
    from rich.console import Console
    from rich.table import Table

    launcher = [o for o in overrides if o.startswith("hydra/launcher=")]
    try:
        jobs = plan(overrides)
    except ValueError as err:
        print(f"dry run: {err}")
        return 1
    table = Table(title=f"dry run: {len(jobs)} job(s)" + (f", {launcher[-1]}" if launcher else ""))
    for column in ("#", "overrides", "job key", "action"):
        table.add_column(column)
    for job in jobs:
        table.add_row(str(job["num"]), job["overrides"] or "(defaults)", job["key"], job["action"])
    Console(width=160).print(table)
    counts = {a: sum(j["action"] == a for j in jobs) for a in ("run", "done", "running")}
    same = len(jobs) - sum(counts.values())
    print(
        f"{counts['run']} to run, {counts['done']} done (skip), {counts['running']} running elsewhere, "
        f"{same} duplicate(s); rows go to {Path(jobs[0]['row']).parent if jobs else '-'}"
    )
    return 0
