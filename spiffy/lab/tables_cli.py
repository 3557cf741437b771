"""Turn result rows into markdown/CSV tables and plots: `spiffy tables` (= `python scripts/make_tables.py`).

Reads `--results` (default runs/results, the runner's rows) and writes `--out` (default runs/tables); the committed
tables are made with `--results results/runs --out results/tables` (scripts/reproduce_results.sh).

spiffy tables                      # every experiment found
spiffy tables --experiment table1
spiffy tables --experiment fig5 --cost-curve runs/bench/fig5_cpu.json

Per experiment: `<name>.md` / `<name>.csv` (sweep axes + metrics, acceptance per level appended),
`<name>_speedup.png` when D, n_samples or pruning varies (one line per setting of the other axes), and
`<name>_acceptance.png` (share of forwards accepting a level-l draft). With `--cost-curve`, the Figure-5 join of the
measured cost curve with the runs' NFE speedups: `<name>_cost.{md,csv,png}` with the recommended D per layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spiffy.lab.report import (
    LEVEL_PREFIX,
    axis_columns,
    blocks_per_request,
    budget_recommendation,
    experiment_table,
    load_cost_curve,
    load_frame,
    plot_acceptance,
    plot_axis,
    plot_cost_curve,
    plot_speedup,
)


def markdown(title: str, table, note: str = "") -> str:
    # integer columns (D, n_samples) as integers: tabulate would format them with the float format
    table = table.astype({c: str for c in table.select_dtypes("integer").columns})
    body = table.to_markdown(index=False, floatfmt=".3f")
    return f"# {title}\n\n" + (f"{note}\n\n" if note else "") + body + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="spiffy tables", description=__doc__.splitlines()[0])
    p.add_argument(
        "--results", default="runs/results", help="result rows (committed: results/runs)"
    )
    p.add_argument(
        "--out", default="runs/tables", help="tables and plots (committed: results/tables)"
    )
    p.add_argument("--experiment", nargs="*", default=None)
    p.add_argument(
        "--cost-curve", default=None, help="scripts/bench.py JSON holding a cost curve (Figure 5)"
    )
    args = p.parse_args(argv)
    frame = load_frame(args.results)
    if frame.empty:
        raise SystemExit(f"no result rows in {args.results}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curve, env = load_cost_curve(args.cost_curve) if args.cost_curve else (None, {})
    for name in args.experiment or sorted(frame.experiment.dropna().unique()):
        table = experiment_table(frame, name, levels=True)
        table.to_csv(out / f"{name}.csv", index=False)
        (out / f"{name}.md").write_text(markdown(name, table))
        print(markdown(name, table))
        if x := plot_axis(table):
            plot_speedup(table, x, out / f"{name}_speedup.png", by=axis_columns(table))
        if any(c.startswith(LEVEL_PREFIX) for c in table):
            plot_acceptance(table, out / f"{name}_acceptance.png")
        if curve is not None:
            blocks = blocks_per_request(frame, name)
            runs = experiment_table(frame, name, keep=("decoder.cache", "graph.budget"))
            rec = budget_recommendation(curve, runs, blocks_per_request=blocks)
            device = (
                f"{env.get('device_name', '?')} ({env.get('device', '?')}, {env.get('dtype', '?')})"
            )
            note = (
                f"Cost curve from `{args.cost_curve}` ({device}), {blocks} blocks per request. "
                "Predicted wall speedup = (B·F_start + (N0 − B)·F(0) + N0·c) / (B·F_start + (N − B)·F(d) + N·c + "
                "N·o) with F(d) the forward time at the mean number of drafts d the D-node graph sent and o Spiffy's "
                "own ms per forward (`spiffy_overhead_ms`) "
                "(`spiffy.lab.report.budget_recommendation`); `recommended` = best predicted D per layout."
            )
            rec.to_csv(out / f"{name}_cost.csv", index=False)
            (out / f"{name}_cost.md").write_text(markdown(f"{name}: cost vs D", rec, note))
            plot_cost_curve(rec, out / f"{name}_cost.png", device=device)
            print(markdown(f"{name}: cost vs D", rec, note))


if __name__ == "__main__":
    main()
