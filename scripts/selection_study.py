"""Selection study (issue 21): chain:D (= FreeDave d = D+1), degree1, greedy and `best`, per base and walk.

    python scripts/selection_study.py --n-test 100 --spot 10

For each base decoder (vanilla with block 8 and with one block of 32, dual cache, threshold 0.9), trajectories
are recorded once on 20 calibration prompts and on `--n-test` held-out `arith` test problems. For every walk
(plain; cross-block where the layout allows it), budget D and selection rule, a graph is selected on the
calibration trajectories and its NFE replayed on the test trajectories (`spiffy.calibration.calibrate.evaluate`,
equal to decoding: tests/calibration/test_calibrate.py). Speedups are NFE reductions over the same base. A spot check
then decodes the first `--spot` test problems with the `best` graph at D = 10 and compares tokens with the base
and the measured NFE with the replay. Writes results/tables/selection_study.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import pandas as pd
import torch

import spiffy
from spiffy.calibration.calibrate import evaluate, select_graph
from spiffy.calibration.trajectories import Trajectories, record_trajectories
from spiffy.decoding.config import GenerationConfig
from spiffy.eval.offline import arith_test_prompts, encode, load_for_study
from spiffy.graph.builtin import chain
from spiffy.tasks.registry import TASKS, task_generation

BASES = {
    "vanilla, block 8": dict(),
    "vanilla, block 32": dict(block_length=32),
    "dual cache": dict(cache="dual"),
    "threshold 0.9": dict(rule="threshold", tau=0.9),
}
RULES = ("degree1", "greedy", "best")
BUDGETS = (3, 5, 10, 16)


def recorded(model, gen, prompts, cache: Path | None, name: str, horizon: int):
    """Trajectories of `gen` on `prompts`, and the seconds recording took (reused from `cache`)."""
    path = cache / f"{name}.json" if cache else None
    if path and path.exists():
        traj = Trajectories.load(path)
        if traj.meta.get("decoder") == gen and traj.horizon == horizon:
            return traj, traj.meta["record_s"]
    t0 = time.perf_counter()
    traj = record_trajectories(
        model, GenerationConfig(**gen), prompts, horizon=horizon, progress=False
    )
    traj.meta.update(decoder=gen, record_s=time.perf_counter() - t0)
    if path:
        traj.save(path)
    return traj, traj.meta["record_s"]


def spot_check(model, gen, graph, cross, prompts, test: Trajectories) -> dict:
    """Decode `prompts` with the base and with Spiffy: tokens equal? measured NFE vs the replay."""
    base = spiffy.build_decoder(model, **gen)
    spec = spiffy.build_decoder(
        model, speculate=spiffy.Speculation(graph, cross_block=cross), **gen
    )
    same, nfe, base_nfe = True, 0, 0
    for i, prompt in enumerate(prompts):
        a = base.generate(prompt, request_id=i)
        b = spec.generate(prompt, request_id=i)
        same &= torch.equal(a.tokens, b.tokens)
        nfe, base_nfe = nfe + b.stats.nfe, base_nfe + a.stats.nfe
    replay = evaluate(graph, test.subset(range(len(prompts))), cross_block=cross).nfe
    return {"tokens_equal": same, "measured_nfe": nfe, "replayed_nfe": replay, "base_nfe": base_nfe}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--n-calib", type=int, default=20)
    p.add_argument("--spot", type=int, default=10, help="test problems decoded for the spot check")
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=None, help="folder to reuse recorded trajectories from")
    p.add_argument("--out", default="runs/tables")  # committed: results/tables
    args = p.parse_args()
    model, tok = load_for_study(args.model, args.threads)
    test_prompts = arith_test_prompts(tok, args.n_test)
    calib_prompts = [encode(tok, t) for t in TASKS["arith"].calibration(args.n_calib, 0)]
    cache = Path(args.cache) if args.cache else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    rows, spots = [], []
    for base, overrides in BASES.items():
        gen = task_generation("arith", **overrides)
        slug = base.replace(" ", "").replace(",", "_")
        calib, record_s = recorded(
            model, gen, calib_prompts, cache, f"{slug}-calib{args.n_calib}", args.horizon
        )
        test, _ = recorded(
            model, gen, test_prompts, cache, f"{slug}-test{args.n_test}", args.horizon
        )
        transitions = sum(b.transitions for b in test.blocks)
        # the cross-block walk needs the no-cache layout and a next block to continue into
        walks = (
            (False, True)
            if gen.get("cache", "none") == "none" and len(test.prompts) < len(test.blocks)
            else (False,)
        )
        for cross in walks:
            for budget in BUDGETS:
                row = {"base": base, "walk": "cross-block" if cross else "plain", "D": budget}
                row["chain:D"] = transitions / evaluate(chain(budget), test, cross_block=cross).nfe
                for rule in RULES:
                    t0 = time.perf_counter()
                    graph = select_graph(calib, budget, rule, cross_block=cross)
                    select_s = time.perf_counter() - t0
                    row[rule] = transitions / evaluate(graph, test, cross_block=cross).nfe
                    if rule == "best":
                        row["best chose"] = graph.provenance["best"]["chosen"]
                        row["calibration_s"] = record_s + select_s
                        if budget == 10 and args.spot:
                            spot = spot_check(
                                model, gen, graph, cross, test_prompts[: args.spot], test
                            )
                            spots.append({"base": base, "walk": row["walk"], "D": 10, **spot})
                            print(spots[-1], flush=True)
                row["best / chain"] = row["best"] / row["chain:D"]
                rows.append(row)
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    write(rows, spots, args)


def write(rows: list[dict], spots: list[dict], args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "selection_study.csv", index=False, float_format="%.4f")
    settings = {
        "n_test": args.n_test,
        "n_calib": args.n_calib,
        "horizon": args.horizon,
        "threads": torch.get_num_threads(),
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "model": args.model,
    }
    (out / "selection_study.json").write_text(
        json.dumps({"settings": settings, "rows": rows, "spot_checks": spots}, indent=1)
    )
    lines = [
        f"# Selection study: NFE speedup over the same base on {args.n_test} held-out `arith` problems",
        "",
        f"Graphs selected on {args.n_calib} calibration prompts; chain:D is FreeDave with draft depth "
        "d = D + 1; `best` is the default (cross-validated choice among degree0/degree1/total/greedy/"
        "phased, chain:D, fig2, topk). The cross-block walk needs the no-cache layout and more than one "
        "block. calibration_s = recording + selection of `best` "
        f"({settings['threads']} torch thread, {settings['device']}).",
        "",
        df.to_markdown(index=False, floatfmt=".2f"),
        "",
        "## Spot checks: decoded with the `best` graph at D = 10",
        "",
        pd.DataFrame(spots).to_markdown(index=False) if spots else "(none)",
    ]
    (out / "selection_study.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
