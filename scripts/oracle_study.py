"""Oracle study (docs/algorithm.md §5.9): how many forwards any drafting could save on the embedded model.

    python scripts/oracle_study.py --n-test 200 --cache runs/oracle_cache

For each base (the task preset with block 8 and with one block of 32, without a cache and with the dual cache),
trajectories are recorded on `--n-calib` calibration prompts and `--n-test` held-out `arith` test problems. On
the test trajectories, for D in `--budgets`, the NFE speedup over the same base is replayed exactly
(`spiffy.calibration.replay`) for the trajectory oracle (the base's next D states), the anchor oracle (the best D
states whose tokens are each among the anchor's top-4), the chain and the calibrated static graph (`best`,
selected on the calibration prompts). Writes results/tables/oracle.{md,csv} and oracle.png.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import pandas as pd

from spiffy.calibration.calibrate import evaluate, select_graph
from spiffy.calibration.oracle import anchor_oracle, trajectory_oracle
from spiffy.calibration.trajectories import Trajectories, record_trajectories
from spiffy.decoding.config import GenerationConfig
from spiffy.eval.offline import arith_test_prompts, encode, load_for_study
from spiffy.graph.builtin import chain
from spiffy.lab.report import plot_panels
from spiffy.tasks.registry import TASKS, task_generation

BASES = {
    "block 8": dict(),
    "block 32": dict(block_length=32),
    "dual cache, block 8": dict(cache="dual"),
    "dual cache, block 32": dict(cache="dual", block_length=32),
}


def recorded(model, gen: dict, prompts, cache: Path | None, name: str, horizon: int):
    """Trajectories of `gen` on `prompts` (reused from `cache` when recorded under the same settings)."""
    path = cache / f"{name}.json" if cache else None
    if path and path.exists():
        traj = Trajectories.load(path)
        if traj.meta.get("decoder") == gen and traj.horizon == horizon and traj.blocks[0].anchors:
            return traj
    t0 = time.perf_counter()
    traj = record_trajectories(  # with anchor features: scripts/dynamic_study.py replays from them
        model, GenerationConfig(**gen), prompts, horizon=horizon, progress=False, features=3
    )
    traj.meta.update(decoder=gen, record_s=time.perf_counter() - t0)
    if path:
        traj.save(path)
    return traj


def study_prompts(tok, args) -> tuple[list, list]:
    """The `--n-test` held-out `arith` test problems and the `--n-calib` calibration prompts, encoded."""
    test = arith_test_prompts(tok, args.n_test)
    calib = [encode(tok, t) for t in TASKS["arith"].calibration(args.n_calib, 0)]
    return test, calib


def trajectory_sets(model, test_prompts, calib_prompts, args):
    """For each base of `BASES`: (its name, its settings, calibration trajectories, test trajectories), recorded
    or reused from `--cache` (`scripts/dynamic_study.py` replays the same sets)."""
    cache = Path(args.cache) if args.cache else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    for base, overrides in BASES.items():
        gen = task_generation("arith", **overrides)
        slug = base.replace(" ", "").replace(",", "_")
        calib = recorded(
            model, gen, calib_prompts, cache, f"{slug}-calib{args.n_calib}", args.horizon
        )
        test = recorded(model, gen, test_prompts, cache, f"{slug}-test{args.n_test}", args.horizon)
        yield base, gen, calib, test


def study(model, tok, args) -> pd.DataFrame:
    rows = []
    for base, _, calib, test in trajectory_sets(model, *study_prompts(tok, args), args):
        for budget in args.budgets:
            traj, anchor = (
                trajectory_oracle(test, budget),
                anchor_oracle(test, budget, top=args.top),
            )
            best = select_graph(calib, budget, "best")
            row = {
                "base": base,
                "D": budget,
                "chain:D": evaluate(chain(budget), test).speedup_nfe,
                "calibrated": evaluate(best, test).speedup_nfe,
                f"anchor oracle (top-{args.top})": anchor.speedup_nfe,
                "trajectory oracle": traj.speedup_nfe,
                "base NFE": traj.nfe_base,
                "calibrated chose": best.provenance["best"]["chosen"],
            }
            row["calibrated / anchor oracle"] = row["calibrated"] / anchor.speedup_nfe
            rows.append(row)
            print(
                {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True
            )
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, path: Path, top: int) -> None:
    series = [
        ("trajectory oracle", "k-o"),
        (f"anchor oracle (top-{top})", "b-s"),
        ("calibrated", "g-^"),
        ("chain:D", "r--v"),
    ]
    plot_panels(df, series, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--n-calib", type=int, default=20)
    p.add_argument("--budgets", type=int, nargs="+", default=[3, 5, 10])
    p.add_argument("--top", type=int, default=4, help="token ranks the anchor oracle may draft")
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=None, help="folder to reuse recorded trajectories from")
    p.add_argument("--out", default="results/tables")
    args = p.parse_args()
    if args.horizon < max(args.budgets):
        p.error(f"--horizon={args.horizon} must be >= the largest budget {max(args.budgets)}")
    model, tok = load_for_study(args.model, args.threads)
    df = study(model, tok, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "oracle.csv", index=False, float_format="%.4f")
    plot(df, out / "oracle.png", args.top)
    device = f"cpu ({platform.processor() or platform.machine()})"
    lines = [
        f"# Oracle study: NFE speedup over the same base on {args.n_test} held-out `arith` problems",
        "",
        "Written by `python scripts/oracle_study.py "
        f"--n-test {args.n_test}` (embedded model, {device}, {args.threads} torch thread; NFE is exact, "
        "machine load does not change it). Plain walk (no cross-block). The trajectory oracle drafts the "
        "base's next D states: no drafting with D drafts per forward accepts more. The anchor oracle drafts "
        f"the best D states whose tokens are each among the anchor's top-{args.top} predictions at their "
        "positions: the bound for drafting from one forward's predictions. `calibrated` is the default "
        f"static graph (`graph.rule=best`) selected on {args.n_calib} calibration prompts; chain:D is the "
        "uncalibrated chain. docs/algorithm.md §5.9.",
        "",
        df.to_markdown(index=False, floatfmt=".2f"),
        "",
        "![oracle](oracle.png)",
    ]
    (out / "oracle.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
