"""Turn result rows (results/runs/*.jsonl) into markdown/CSV tables and plots under results/tables/.

python scripts/make_tables.py                      # every experiment found
python scripts/make_tables.py --experiment table1
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spiffy.report import experiment_table, load_frame, plot_speedup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="results/runs")
    p.add_argument("--out", default="results/tables")
    p.add_argument("--experiment", nargs="*", default=None)
    args = p.parse_args()
    frame = load_frame(args.results)
    if frame.empty:
        raise SystemExit(f"no result rows in {args.results}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.experiment or sorted(frame.experiment.dropna().unique()):
        table = experiment_table(frame, name)
        table.to_csv(out / f"{name}.csv", index=False)
        (out / f"{name}.md").write_text(
            f"# {name}\n\n" + table.to_markdown(index=False, floatfmt=".3f") + "\n"
        )
        if "graph.budget" in table and table["graph.budget"].nunique() > 1:
            plot_speedup(table, "graph.budget", out / f"{name}_speedup_vs_D.png")
        print(f"## {name}\n{table.to_markdown(index=False, floatfmt='.3f')}\n")


if __name__ == "__main__":
    main()
