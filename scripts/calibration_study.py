"""Calibration study on the embedded model: Tables 1 and 4 in shape, sample efficiency, transfer, bases.

    python scripts/calibration_study.py --n-test 200

Every number is an exact NFE count: trajectories of the base decoder are recorded once on held-out test
problems, and `spiffy.calibration.calibrate.evaluate` replays the acceptance walk for each graph. Its prediction equals
the NFE measured by actually decoding with Spiffy (tests/calibration/test_calibrate.py asserts this), so the tables are
what decoding would give, without decoding every (graph × base) pair. Writes results/tables/*.md and a JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from spiffy.calibration.calibrate import SELECTION_RULES, evaluate, select_graph
from spiffy.calibration.trajectories import Trajectories, record_trajectories
from spiffy.decoding.config import GenerationConfig
from spiffy.eval.offline import arith_test_prompts, encode, load_for_study
from spiffy.graph import chain, fig2, two_level_topk
from spiffy.lab.benchmarks import generation_for
from spiffy.tasks.arith import ArithConfig, format_prompt, generate_split
from spiffy.tasks.registry import TASKS, gsm8k_calibration

BUDGETS = (3, 5, 8, 10)


def first_prompts(traj: Trajectories, n: int, blocks_per_prompt: int) -> Trajectories:
    return Trajectories(traj.blocks[: n * blocks_per_prompt], traj.horizon, traj.meta)


def to_markdown(df: pd.DataFrame) -> str:
    for column in ("D", "n_calib"):
        if column in df:
            df[column] = df[column].astype(int).astype(str)
    return df.to_markdown(index=False, floatfmt=".2f", missingval="-")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--n-calib", type=int, nargs="+", default=[5, 10, 20, 50])
    p.add_argument(
        "--bases",
        nargs="+",
        default=[
            "vanilla",
            "vanilla:rule=fixed_k,k=2",
            "vanilla:rule=fixed_k,k=4",
            "multi_token",
            "multi_token:tau=0.8",
            "multi_token:tau=0.7",
            "kv_cache:cache=prefix",
            "kv_cache",
            "kv_cache:rule=threshold,tau=0.9",
        ],
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/tables")  # committed: results/tables
    args = p.parse_args()
    model, tok = load_for_study(args.model, args.threads)
    test = arith_test_prompts(tok, args.n_test)
    calib_texts = {
        "arith": [format_prompt(q["question"]) for q in generate_split("calib", max(args.n_calib))],
        "arith-1step": [
            format_prompt(q["question"])
            for q in generate_split("calib", 20, cfg=ArithConfig(min_steps=1, max_steps=1))
        ],
        "arith-max20": [
            format_prompt(q["question"])
            for q in generate_split(
                "calib", 20, cfg=ArithConfig(max_value=20, min_steps=2, max_steps=2)
            )
        ],
    }
    try:
        calib_texts["gsm8k"] = gsm8k_calibration(20)
    except FileNotFoundError:
        pass
    out, report = Path(args.out), {}
    out.mkdir(parents=True, exist_ok=True)
    vanilla_nfe = None
    base_rows = []
    for base in args.bases:
        gen = GenerationConfig(**generation_for("arith", base, args.temperature))
        t0 = time.perf_counter()
        test_traj = record_trajectories(model, gen, test, progress=True)
        base_nfe = sum(b.transitions for b in test_traj.blocks)
        vanilla_nfe = vanilla_nfe or base_nfe
        calib = {
            name: record_trajectories(model, gen, [encode(tok, t) for t in texts], progress=False)
            for name, texts in calib_texts.items()
            if base == "vanilla" or name == "arith"
        }
        per_prompt = gen.num_blocks
        calib20 = first_prompts(calib["arith"], 20, per_prompt)
        spiffy_nfe = {}
        for rule in SELECTION_RULES:
            for budget in BUDGETS:
                t1 = time.perf_counter()
                graph = select_graph(calib20, budget, rule)
                spiffy_nfe[(rule, budget)] = (
                    evaluate(graph, test_traj).nfe,
                    time.perf_counter() - t1,
                )
        best = spiffy_nfe[("greedy", 10)][0]
        base_rows.append(
            {
                "base decoder": base,
                "base NFE speedup vs vanilla": vanilla_nfe / base_nfe,
                "+ Spiffy (degree1, D=10) vs vanilla": vanilla_nfe / spiffy_nfe[("degree1", 10)][0],
                "+ Spiffy (greedy, D=10) vs vanilla": vanilla_nfe / best,
                "Spiffy gain over its base": base_nfe / best,
                "record_s": time.perf_counter() - t0,
            }
        )
        if base != "vanilla":
            continue
        rows = []
        for budget in BUDGETS:
            row = {
                "D": budget,
                "chain": base_nfe / evaluate(chain(budget), test_traj).nfe,
                "topk": base_nfe / evaluate(two_level_topk(max(1, budget // 2)), test_traj).nfe,
            }
            row["fig2 (D=5)"] = base_nfe / evaluate(fig2(), test_traj).nfe if budget == 5 else None
            for rule in SELECTION_RULES:
                row[rule] = base_nfe / spiffy_nfe[(rule, budget)][0]
            rows.append(row)
        report["table1_4"] = rows
        eff = []
        for n in args.n_calib:
            sub = first_prompts(calib["arith"], n, per_prompt)
            for budget in (5, 10):
                t1 = time.perf_counter()
                row = {"n_calib": n, "D": budget}
                for rule in ("degree1", "greedy"):
                    row[rule] = base_nfe / evaluate(select_graph(sub, budget, rule), test_traj).nfe
                row["select_s"] = time.perf_counter() - t1
                eff.append(row)
        report["sample_efficiency"] = eff
        report["transfer"] = [
            {
                "calibrated on": name,
                "evaluated on": "arith test",
                **{
                    rule: base_nfe
                    / evaluate(
                        select_graph(first_prompts(traj, 20, per_prompt), 10, rule), test_traj
                    ).nfe
                    for rule in ("degree1", "greedy")
                },
            }
            for name, traj in calib.items()
        ]
    report["bases"] = base_rows
    report["settings"] = {
        "n_test": args.n_test,
        "temperature": args.temperature,
        "generation": TASKS["arith"].generation,
        "model": args.model,
    }
    (out / "calibration_study.json").write_text(json.dumps(report, indent=1))
    sections = [
        ("table1_4", "NFE speedup vs D and selection rule (held-out test, calibrated on 20)"),
        ("sample_efficiency", "NFE speedup vs number of calibration prompts"),
        ("transfer", "Cross-task transfer (D = 10)"),
        ("bases", "Spiffy over each base decoder (NFE speedups vs vanilla; D = 10)"),
    ]
    lines = [f"# Calibration study ({args.n_test} held-out `arith` problems, T={args.temperature})"]
    for key, title in sections:
        if key in report:
            lines += ["", f"## {title}", "", to_markdown(pd.DataFrame(report[key]))]
    (out / "calibration_study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
