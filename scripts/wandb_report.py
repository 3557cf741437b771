"""Build the W&B report of one experiment's sweep with `wandb-workspaces` (pip install -e '.[reports]').

python scripts/wandb_report.py table1                        # offline: write the report spec, check its keys
python scripts/wandb_report.py table1 --mode online          # save the report to W&B, print its URL

Panels: NFE and wall-clock speedup vs D per base decoder (one panel grid per (rule, cache) in the rows), the
NFE/accuracy table (the runs table, with the experiment's sweep axes as columns), acceptance per graph level, and
calibration transfer (speedup per calibration task and per number of calibration prompts). Runs are selected by
W&B group = experiment (`spiffy.lab.tracking` conventions). Before writing or saving anything, every key a panel or
column refers to is checked against the keys the runs actually logged: offline, the `wandb.keys` block each row
stored from its run object; online, also the runs W&B holds. Offline runs are uploaded first with
`wandb sync <dir>` (the dirs are in the rows' `wandb.dir`, printed at the end).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spiffy.lab.report import experiment_table, rows_frame  # noqa: E402
from spiffy.lab.results import read_rows  # noqa: E402

TABLE_METRICS = [
    "accuracy",
    "nfe_mean",
    "nfe_base_mean",
    "speedup_nfe",
    "speedup_wall",
    "agreement",
]


def logged_rows(results: str | Path, experiment: str) -> list[dict]:
    rows = [r for r in read_rows(results) if r.get("experiment") == experiment]
    if not rows:
        raise SystemExit(f"experiment={experiment!r} has no rows in {results}")
    logged = [r for r in rows if (r.get("wandb") or {}).get("status") == "logged"]
    if not logged:
        raise SystemExit(
            f"none of the {len(rows)} rows of experiment={experiment!r} in {results} was logged to W&B "
            "(tracking=disabled, or rows written before W&B logging was recorded in rows)"
        )
    return logged


def logged_keys(rows: list[dict]) -> dict[str, set[str]]:
    """Union over the runs of the keys they logged, per section (config, summary, history)."""
    keys: dict[str, set[str]] = {"config": set(), "summary": set(), "history": set()}
    for row in rows:
        for section, names in row["wandb"].get("keys", {}).items():
            keys.setdefault(section, set()).update(names)
    return keys


def build(experiment: str, rows: list[dict], *, entity: str, project: str, online: bool):
    """The report (a `wandb_workspaces.reports.v2.Report`) for an experiment's logged rows."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    frame = rows_frame(rows)
    axes = [c for c in experiment_table(frame, experiment) if c in set(_config_columns(frame))]

    def runset(name: str, *filters) -> wr.Runset:
        where = dict(entity=entity, project=project) if online else {}
        return wr.Runset(
            name=name,
            filters=expr.And(expr.Metric("Group") == experiment, *filters),
            pinned_columns=[
                f"config:{a.split('.', 1)[0]}.value.{a.split('.', 1)[1]}" for a in axes if "." in a
            ]
            + [f"summary:{m}" for m in TABLE_METRICS],
            **where,
        )

    bases = sorted(
        {(r["config"]["decoder"]["rule"], r["config"]["decoder"]["cache"]) for r in rows}
    )
    blocks = [
        wr.H1(f"spiffy: {experiment}"),
        wr.P(
            f"{len(rows)} runs (W&B group {experiment!r}); sweep axes: {', '.join(axes) or 'none'}. "
            "Rows and tables: scripts/make_tables.py; this report: scripts/wandb_report.py."
        ),
        wr.H2("NFE / accuracy"),
        wr.PanelGrid(
            runsets=[runset("all runs")],
            panels=[
                wr.BarPlot(
                    title="NFE per request",
                    metrics=[wr.SummaryMetric("nfe_mean"), wr.SummaryMetric("nfe_base_mean")],
                ),
                wr.BarPlot(title="accuracy", metrics=[wr.SummaryMetric("accuracy")]),
            ],
        ),
        wr.H2("Speedup vs D, per base decoder"),
    ]
    for rule, cache in bases:
        blocks.append(
            wr.PanelGrid(
                runsets=[
                    runset(
                        f"rule={rule}, cache={cache}",
                        expr.Config("decoder.rule") == rule,
                        expr.Config("decoder.cache") == cache,
                    )
                ],
                panels=[
                    wr.ScatterPlot(
                        title=f"NFE speedup vs D ({rule}, {cache})",
                        x=wr.Config("graph.budget"),
                        y=wr.SummaryMetric("speedup_nfe"),
                    ),
                    wr.ScatterPlot(
                        title=f"wall-clock speedup vs D ({rule}, {cache})",
                        x=wr.Config("graph.budget"),
                        y=wr.SummaryMetric("speedup_wall"),
                    ),
                ],
            )
        )
    blocks += [
        wr.H2("Acceptance per graph level"),
        wr.PanelGrid(
            runsets=[runset("all runs")],
            panels=[
                wr.LinePlot(
                    title="forwards accepting a level-l draft",
                    x="level",
                    y=["acceptance/accepted"],
                )
            ],
        ),
        wr.H2("Calibration transfer"),
        wr.PanelGrid(
            runsets=[runset("all runs")],
            panels=[
                wr.BarPlot(
                    title="NFE speedup per calibration task",
                    metrics=[wr.SummaryMetric("speedup_nfe")],
                    groupby=wr.Config("task.calibration_task"),
                ),
                wr.ScatterPlot(
                    title="NFE speedup vs calibration prompts",
                    x=wr.Config("graph.n_samples"),
                    y=wr.SummaryMetric("speedup_nfe"),
                ),
            ],
        ),
    ]
    return wr.Report(
        project=project,
        entity=entity,
        title=f"spiffy {experiment}",
        description=f"Sweep {experiment!r}: speedup vs D, NFE/accuracy, acceptance per level, calibration transfer",
        blocks=blocks,
    )


def _config_columns(frame) -> list[str]:
    return [c.removeprefix("cfg.") for c in frame if c.startswith("cfg.")]


def references(report) -> list[tuple[str, str, str]]:
    """Every (where, section, key) the report's panels, filters and columns refer to."""
    import wandb_workspaces.reports.v2 as wr

    refs = []

    def metric(where: str, m) -> None:
        if m is None:
            return
        if isinstance(m, wr.Config):
            refs.append((where, "config", m.name))
        elif isinstance(m, wr.SummaryMetric):
            refs.append((where, "summary", m.name))
        elif isinstance(m, wr.Metric):
            refs.append((where, "history", m.name))
        elif isinstance(m, str):
            refs.append((where, "history", m))

    for block in report.blocks:
        if not isinstance(block, wr.PanelGrid):
            continue
        for rs in block.runsets:
            where = f"runset {rs.name!r}"
            for name in re.findall(r"""Config\(["']([^"']+)["']\)""", str(rs.filters)):
                refs.append((where, "config", name))
            for column in rs.pinned_columns:
                section, key = column.split(":", 1)
                refs.append((where, section, key.replace(".value", "", 1)))
        for panel in block.panels:
            where = f"panel {getattr(panel, 'title', None) or type(panel).__name__!r}"
            for attr in ("x", "z", "groupby"):
                metric(where, getattr(panel, attr, None))
            y = getattr(panel, "y", None)
            for m in y if isinstance(y, list) else [y]:
                metric(where, m)
            for m in getattr(panel, "metrics", None) or []:
                metric(where, m)
    return refs


def check(report, keys: dict[str, set[str]]) -> list[str]:
    """The references of `report` to keys no run logged (empty when the report is sound)."""
    return [
        f"{where}: {section} key {name!r} is not logged by any run"
        for where, section, name in references(report)
        if name not in keys.get(section, set())
    ]


def api_keys(entity: str, project: str, experiment: str) -> dict[str, set[str]]:
    """The keys the experiment's runs hold on W&B (online check)."""
    import wandb

    from spiffy.lab.tracking import flatten

    keys: dict[str, set[str]] = {"config": set(), "summary": set(), "history": set()}
    for run in wandb.Api().runs(f"{entity}/{project}", filters={"group": experiment}):
        keys["config"].update(flatten({k: v for k, v in run.config.items()}))
        keys["summary"].update(run.summary.keys())
        keys["history"].update(c for c in run.history(samples=50).columns)
    return keys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment")
    p.add_argument(
        "--results", default="runs/results", help="result store (results_dir of the sweep)"
    )
    p.add_argument("--mode", choices=("offline", "online"), default="offline")
    p.add_argument(
        "--project", default=None, help="W&B project (default: the rows' tracking.project)"
    )
    p.add_argument(
        "--entity", default=None, help="W&B entity (default: the rows', else your default)"
    )
    p.add_argument(
        "--out", default=None, help="offline spec path (default runs/reports/<experiment>.json)"
    )
    args = p.parse_args(argv)

    rows = logged_rows(args.results, args.experiment)
    project = args.project or rows[0]["wandb"].get("project") or "spiffy"
    online = args.mode == "online"
    entity = args.entity or rows[0]["wandb"].get("entity")
    if online and not entity:
        import wandb

        entity = wandb.Api().default_entity
    entity = entity or "<entity>"
    report = build(args.experiment, rows, entity=entity, project=project, online=online)
    keys = logged_keys(rows)
    if online:
        remote = api_keys(entity, project, args.experiment)
        keys = {s: keys.get(s, set()) & remote.get(s, set()) for s in keys}
    problems = check(report, keys)
    if problems:
        print("report refers to keys the runs do not log:\n  " + "\n  ".join(problems))
        return 1
    n_refs = len(references(report))
    if online:
        report.save()
        print(f"report saved: {report.url}")
        return 0
    out = Path(args.out or f"runs/reports/{args.experiment}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = report._to_model().model_dump(mode="json", by_alias=True, exclude_none=True)
    dirs = sorted({r["wandb"]["dir"] for r in rows if r["wandb"].get("dir")})
    out.write_text(
        json.dumps(
            {
                "experiment": args.experiment,
                "entity": entity,
                "project": project,
                "references": [list(r) for r in references(report)],
                "runs": [r["wandb"]["run_id"] for r in rows],
                "report": spec,
            },
            indent=1,
        )
    )
    print(f"report spec: {out} ({n_refs} key references, all logged by the {len(rows)} runs)")
    if dirs:
        print("upload the offline runs, then build it online:")
        print("  wandb sync " + " ".join(dirs))
        print(
            f"  python scripts/wandb_report.py {args.experiment} --results {args.results} --mode online"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
