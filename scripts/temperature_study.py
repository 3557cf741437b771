"""Acceptance vs temperature with and without noise-aware drafting (docs/algorithm.md §5.7; paper v4 Fig. 6 in shape).

    python scripts/temperature_study.py --n-test 100

For each remasking × temperature × draft_noise, a greedy D = 10 graph is calibrated on 20 calibration prompts
under that very definition, and the speedup on held-out test prompts is computed from recorded trajectories
(`spiffy.calibration.calibrate.evaluate`). With `none` the prediction equals decoding exactly; with `keyed` it is a
lower bound on the speedup (per-level rank tables can let two formulas build one state, which decoding accepts
and the replay does not count). `--measure N` also decodes the first N test prompts with Spiffy and reports the
measured speedup beside the prediction.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

import spiffy
from spiffy.calibration.calibrate import evaluate, select_graph
from spiffy.calibration.trajectories import record_trajectories
from spiffy.decoding.config import GenerationConfig
from spiffy.eval.offline import arith_test_prompts, encode, load_for_study
from spiffy.tasks.registry import TASKS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--n-calib", type=int, default=20)
    p.add_argument("--budget", type=int, default=10)
    p.add_argument("--rule", default="greedy")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.3, 0.7, 1.0])
    p.add_argument("--measure", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/tables")  # committed: results/tables
    args = p.parse_args()
    model, tok = load_for_study(args.model, args.threads)
    test = arith_test_prompts(tok, args.n_test)
    calib = [encode(tok, t) for t in TASKS["arith"].calibration(args.n_calib, 0)]
    rows = []
    for remasking in ("low_confidence", "random"):
        for temperature in args.temperatures:
            gen = dict(TASKS["arith"].generation, temperature=temperature, remasking=remasking)
            cfg = GenerationConfig(**gen)
            for noise in ("none", "keyed"):
                calib_traj = record_trajectories(
                    model, cfg, calib, progress=False, draft_noise=noise
                )
                test_traj = record_trajectories(model, cfg, test, progress=False, draft_noise=noise)
                graph = select_graph(calib_traj, args.budget, args.rule)
                pred = evaluate(graph, test_traj)
                row = {
                    "remasking": remasking,
                    "T": temperature,
                    "draft_noise": noise,
                    "speedup_nfe": pred.speedup_nfe,
                    "accepted_per_forward": pred.accepted_per_forward,
                }
                if args.measure:
                    decoder = spiffy.build_decoder(
                        model, **gen, speculate=spiffy.Speculation(graph, draft_noise=noise)
                    )
                    nfe = sum(
                        decoder.generate(x, request_id=i).stats.nfe
                        for i, x in enumerate(test[: args.measure])
                    )
                    base = args.measure * cfg.gen_length if cfg.rule == "schedule" else None
                    row[f"measured_speedup_first_{args.measure}"] = base / nfe if base else None
                rows.append(row)
                print(json.dumps(row))
    table = pd.DataFrame(rows)
    for remasking in ("low_confidence", "random"):
        sub = table[table.remasking == remasking]
        t0 = sub[(sub["T"] == 0.0)].set_index("draft_noise")["speedup_nfe"]
        table.loc[sub.index, "share_of_T0_speedup"] = [
            r.speedup_nfe / t0[r.draft_noise] for r in sub.itertuples()
        ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "temperature_study.json").write_text(table.to_json(orient="records", indent=1))
    md = (
        f"# Acceptance vs temperature ({args.n_test} held-out `arith` problems, {args.rule} "
        f"D={args.budget} calibrated per setting on {args.n_calib} prompts)\n\n"
        + table.to_markdown(index=False, floatfmt=".2f")
        + "\n"
    )
    (out / "temperature_study.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
