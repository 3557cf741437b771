"""Dynamic drafting vs static graphs and the oracles (docs/algorithm.md §5.10): NFE speedups and wall-clock.

    python scripts/dynamic_study.py --n-test 200 --cache runs/oracle_cache --wall 20

Reuses the trajectories `scripts/oracle_study.py` recorded (with anchor features) in `--cache`, or records them.
For block 8 and one block of 32, without a cache and with the dual cache, and D in `--budgets`, it replays on the
test trajectories the chain, the calibrated static graph (`best`), `dynamic:D` and the calibrated dynamic graph
(both fitted on the calibration prompts only), next to the anchor and trajectory oracles. A spot check decodes
the first `--spot` test problems with the calibrated dynamic graph at D = 10 (tokens equal to the base? measured
vs replayed NFE). Wall-clock: the base, the best static graph and the calibrated dynamic graph over the dual
cache, decoded interleaved in one process on the first `--wall` test problems. The machine's
load average is recorded around each timing (other jobs may share the cores). Writes
results/tables/dynamic.{md,csv} and dynamic.png.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import pandas as pd
import torch

import spiffy
from spiffy.calibration.calibrate import evaluate, select_graph
from spiffy.calibration.dynamic import DynamicReplay, calibrate_dynamic
from spiffy.calibration.oracle import anchor_oracle, trajectory_oracle
from spiffy.eval.offline import load_for_study
from spiffy.graph.builtin import chain
from spiffy.graph.dynamic import dynamic_graph
from spiffy.lab.report import plot_panels


def _oracle_study():
    """`scripts/oracle_study.py` as a module: its prompts and recorded trajectory sets are this study's."""
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("oracle_study", Path(__file__).with_name("oracle_study.py"))
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spot_check(model, gen, graph, prompts, replay: DynamicReplay, test) -> dict:
    base = spiffy.build_decoder(model, **gen)
    fast = spiffy.build_decoder(model, speculate=spiffy.Speculation(graph), **gen)
    same, nfe, base_nfe = True, 0, 0
    for i, prompt in enumerate(prompts):
        a, b = base.generate(prompt, request_id=i), fast.generate(prompt, request_id=i)
        same &= torch.equal(a.tokens, b.tokens)
        nfe, base_nfe = nfe + b.stats.nfe, base_nfe + a.stats.nfe
    sub = DynamicReplay(test.subset(range(len(prompts))))
    return {
        "tokens_equal": same,
        "measured_nfe": nfe,
        "replayed_nfe": sub.evaluate(graph).nfe,
        "base_nfe": base_nfe,
    }


def order(trajectories) -> dict:
    """How often the base's next transition fills the best free position rank of the origin's anchor with its
    top token: at the first transition after the origin, and at later ones (given the earlier ones)."""
    hits = {"first": [0, 0], "later": [0, 0]}
    for block in trajectories.blocks:
        for seq in block.keys:
            previous: set = set()
            for level, key in enumerate(seq, start=1):
                added = set(key) - previous
                if len(added) != 1:  # several tokens in one transition: not a one-token step
                    break
                ((i, j),) = added
                taken = {p for p, _ in previous}
                best = next(r for r in range(1, i + 1) if r not in taken)
                counts = hits["first" if level == 1 else "later"]
                counts[0] += i == best and j == 1
                counts[1] += 1
                previous = set(key)
    return {
        f"{k}: best free rank, top token": (a / n if n else float("nan"))
        for k, (a, n) in hits.items()
    } | {"transitions counted": hits["first"][1] + hits["later"][1]}


def wall_clock(model, gen, graphs: dict, prompts, rounds: int = 2) -> dict:
    """Seconds per problem of each decoder, interleaved problem by problem in one process."""
    decoders = {
        name: spiffy.build_decoder(
            model, speculate=None if g is None else spiffy.Speculation(g), **gen
        )
        for name, g in graphs.items()
    }
    for d in decoders.values():  # warm-up
        d.generate(prompts[0], request_id=0)
    total = dict.fromkeys(decoders, 0.0)
    for _ in range(rounds):
        for i, prompt in enumerate(prompts):
            for name, d in decoders.items():
                t0 = time.perf_counter()
                d.generate(prompt, request_id=i)
                total[name] += time.perf_counter() - t0
    return {name: s / (rounds * len(prompts)) for name, s in total.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--n-calib", type=int, default=20)
    p.add_argument("--budgets", type=int, nargs="+", default=[3, 5, 8, 10])
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--spot", type=int, default=10)
    p.add_argument("--wall", type=int, default=20, help="test problems timed per decoder")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=None)
    p.add_argument("--out", default="results/tables")
    args = p.parse_args()
    model, tok = load_for_study(args.model, args.threads)
    oracle_study = _oracle_study()
    test_prompts, calib_prompts = oracle_study.study_prompts(tok, args)
    rows, spots, walls, orders = [], [], [], []
    for base, gen, calib, test in oracle_study.trajectory_sets(
        model, test_prompts, calib_prompts, args
    ):
        replay = DynamicReplay(test)
        orders.append({"base": base, **order(test)})
        for budget in args.budgets:
            static = select_graph(calib, budget, "best")
            dynamic = calibrate_dynamic(calib, budget)
            row = {
                "base": base,
                "D": budget,
                "chain:D": evaluate(chain(budget), test).speedup_nfe,
                "calibrated static": evaluate(static, test).speedup_nfe,
                "dynamic:D": replay.evaluate(dynamic_graph(budget)).speedup_nfe,
                "calibrated dynamic": replay.evaluate(dynamic).speedup_nfe,
                "anchor oracle": anchor_oracle(test, budget).speedup_nfe,
                "trajectory oracle": trajectory_oracle(test, budget).speedup_nfe,
                "dynamic slots": " ".join(map(str, dynamic.slots)),
            }
            row["dynamic / anchor oracle"] = (
                max(row["dynamic:D"], row["calibrated dynamic"]) / row["anchor oracle"]
            )
            rows.append(row)
            print(
                {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True
            )
            if budget == max(args.budgets) and args.spot:
                spots.append(
                    {
                        "base": base,
                        "D": budget,
                        **spot_check(model, gen, dynamic, test_prompts[: args.spot], replay, test),
                    }
                )
                print(spots[-1], flush=True)
            if budget == max(args.budgets) and args.wall and gen["cache"] == "dual":
                load = os.getloadavg()[0]
                seconds = wall_clock(
                    model,
                    gen,
                    {"base": None, "static": static, "dynamic": dynamic},
                    test_prompts[: args.wall],
                )
                walls.append(
                    {
                        "base": base,
                        "D": budget,
                        **{f"{k} s/problem": v for k, v in seconds.items()},
                        "static speedup": seconds["base"] / seconds["static"],
                        "dynamic speedup": seconds["base"] / seconds["dynamic"],
                        "dynamic / static (time)": seconds["dynamic"] / seconds["static"],
                        "load average (before, after)": f"{load:.1f}, {os.getloadavg()[0]:.1f}",
                    }
                )
                print(walls[-1], flush=True)
    write(rows, spots, walls, orders, args)


def plot(df: pd.DataFrame, path: Path) -> None:
    series = [
        ("trajectory oracle", "k-o"),
        ("anchor oracle", "b-s"),
        ("calibrated dynamic", "m-D"),
        ("dynamic:D", "m:x"),
        ("calibrated static", "g-^"),
        ("chain:D", "r--v"),
    ]
    plot_panels(df, series, path)


def write(rows, spots, walls, orders, args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "dynamic.csv", index=False, float_format="%.4f")
    plot(df, out / "dynamic.png")
    device = f"cpu ({platform.processor() or platform.machine()})"
    lines = [
        f"# Dynamic drafting: NFE speedup over the same base on {args.n_test} held-out `arith` problems",
        "",
        f"Written by `python scripts/dynamic_study.py --n-test {args.n_test} --spot {args.spot} --wall "
        f"{args.wall}` (embedded model, {device}, "
        f"{args.threads} torch thread). Plain walk. NFE replayed on the recorded test trajectories "
        "(static graphs and oracles exactly; dynamic drafting up to last-bit score ties, see the spot checks). "
        f"Static and dynamic graphs are fitted on {args.n_calib} calibration prompts only. docs/algorithm.md "
        "§5.9, §5.10.",
        "",
        df.to_markdown(index=False, floatfmt=".2f"),
        "",
        "## Order: how often the anchor's order is the base's (test trajectories)",
        "",
        "Share of the base's one-token transitions that fill the best position rank still free, in the "
        "origin's anchor, with its top token: the first transition after the origin (the anchor is the "
        "distribution the origin was sampled from, one forward older than the origin's own) and later ones.",
        "",
        pd.DataFrame(orders).to_markdown(index=False, floatfmt=".3f"),
        "",
        "## Spot checks: decoded with the calibrated dynamic graph",
        "",
        pd.DataFrame(spots).to_markdown(index=False) if spots else "(none)",
        "",
        f"## Wall-clock over the dual cache: D = {max(args.budgets)}, {args.wall} test problems, 2 rounds, "
        "interleaved problem by problem in one process (1 torch thread; the 2-core machine is shared with "
        "other jobs, whose load the load average shows)",
        "",
        pd.DataFrame(walls).to_markdown(index=False, floatfmt=".3f") if walls else "(none)",
        "",
        "![dynamic](dynamic.png)",
    ]
    (out / "dynamic.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
