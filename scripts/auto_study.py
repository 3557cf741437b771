"""`graph.budget=auto` against its base and every fixed D, side by side in one process (issue #20).

    python scripts/auto_study.py                                   # bases: vanilla, prefix/dual cache, threshold
    python scripts/auto_study.py --bases kv_cache --n 10 --rounds 1  # quicker

Per base decoder: `autotune` measures this device's cost model afresh (in this process) and chooses D*; then the
base, Spiffy with the graph calibrated at every fixed D = 1..max, and the auto choice (its own decoder instance)
decode the same held-out problems. Every round visits the bases in turn, and for each problem the decoders in a
fresh random order, so that a slow phase of a shared machine hits them alike. Writes `<out>/<name>.json` and `.md`:
predicted vs measured NFE and wall-clock speedup for every D, the best fixed D, and auto's ratios.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from spiffy.calibration.autotune import MARGIN, autotune
from spiffy.calibration.store import load_or_calibrate
from spiffy.decoding.build import build_decoder, generation_config
from spiffy.decoding.speculative import Speculation
from spiffy.eval.offline import arith_test_prompts, encode, load_for_study
from spiffy.lab.benchmarks import environment, generation_for
from spiffy.tasks.registry import TASKS

MODEL_NAME = "tiny-llada-arith"


def setup(model, tok, base: str, args) -> dict:
    """The auto choice and the decoders (base, every fixed D, auto) of one base decoder."""
    cfg = generation_config(**generation_for("arith", base, 0.0))
    prompts = [encode(tok, t) for t in TASKS["arith"].calibration(args.n_calib, 0)]
    common = dict(model_name=MODEL_NAME, task="arith", n_samples=args.n_calib, root=args.root)
    t0 = time.perf_counter()
    choice = autotune(
        model,
        cfg,
        prompts,
        max_budget=args.max_budget,
        margin=args.margin,
        remeasure=True,
        progress=False,
        **common,
    )
    tune_s = time.perf_counter() - t0
    print(f"[{base}] {choice.reason} ({tune_s:.1f} s)", flush=True)
    decoders = {"D0": build_decoder(model, cfg)}
    for d in args.budgets or range(1, args.max_budget + 1):
        graph = load_or_calibrate(model, cfg, lambda: prompts, budget=d, progress=False, **common)
        decoders[f"D{d}"] = build_decoder(
            model, cfg, speculate=Speculation(graph, verify=choice.layout)
        )
    decoders["auto"] = build_decoder(model, cfg, speculate=choice.speculation())
    return {"choice": choice, "decoders": decoders, "tune_s": tune_s}


def measure(setups: dict, prompts: list[torch.Tensor], rounds: int, seed: int = 0) -> dict:
    """Wall seconds, NFE, transitions and agreement per base and decoder, interleaved."""
    rng = random.Random(seed)
    out = {
        base: {
            label: {"wall": [[] for _ in range(rounds)], "nfe": 0, "transitions": 0, "agree": 0}
            for label in s["decoders"]
        }
        for base, s in setups.items()
    }
    for s in setups.values():  # warm up
        for decoder in s["decoders"].values():
            decoder.generate(prompts[0], request_id="warmup", seed=seed)
    for r in range(rounds):
        for base, s in setups.items():
            t0 = time.perf_counter()
            for i, prompt in enumerate(prompts):
                labels = list(s["decoders"])
                rng.shuffle(labels)
                results = {
                    label: s["decoders"][label].generate(prompt, request_id=i, seed=seed)
                    for label in labels
                }
                for label, result in results.items():
                    row = out[base][label]
                    row["wall"][r].append(result.stats.wall_s)
                    if r == 0:
                        row["nfe"] += result.stats.nfe
                        row["transitions"] += result.stats.transitions
                        row["agree"] += torch.equal(result.tokens, results["D0"].tokens)
            print(f"round {r + 1}/{rounds} {base}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def summarize(base: str, setup: dict, timing: dict, n: int) -> dict:
    choice = setup["choice"]
    predicted = {c.budget: c for c in choice.candidates if c.layout == choice.layout}
    base_wall = sum(map(sum, timing["D0"]["wall"]))
    rows = []
    for label, t in timing.items():
        wall = sum(map(sum, t["wall"]))
        d = choice.budget if label == "auto" else int(label[1:])
        per_round = [sum(b) / sum(w) for b, w in zip(timing["D0"]["wall"], t["wall"])]
        rows.append(
            {
                "decoder": label,
                "D": d,
                "speedup_nfe_predicted": predicted[d].speedup_nfe,
                "speedup_nfe": t["transitions"] / t["nfe"],
                "speedup_wall_predicted": predicted[d].speedup_wall,
                "speedup_wall": base_wall / wall,
                "speedup_wall_rounds": per_round,
                "prediction_error": predicted[d].speedup_wall / (base_wall / wall) - 1,
                "agreement": t["agree"] / n,
            }
        )
    fixed = [r for r in rows if r["decoder"] != "auto"]
    best = max(fixed, key=lambda r: r["speedup_wall"])
    auto = next(r for r in rows if r["decoder"] == "auto")
    return {
        "base": base,
        "chosen_D": choice.budget,
        "layout": choice.layout,
        "reason": choice.reason,
        "tune_s": setup["tune_s"],
        "costs_path": choice.costs_path,
        "costs": json.loads(Path(choice.costs_path).read_text()),
        "best_fixed_D": best["D"],
        "best_fixed_speedup_wall": best["speedup_wall"],
        "auto_speedup_wall": auto["speedup_wall"],
        "auto_vs_best_fixed": auto["speedup_wall"] / best["speedup_wall"],
        "auto_prediction_error": auto["prediction_error"],
        "rows": rows,
    }


def markdown(results: list[dict], env: dict, args) -> str:
    lines = [
        f"# `graph.budget=auto` vs its base and every fixed D ({env['device_name']}, {env['threads']} thread(s), "
        f"{env['dtype']}, torch {env['torch']})",
        "",
        f"{args.n} held-out `arith` problems x {args.rounds} rounds, every decoder side by side in one process, "
        "interleaved per problem in random order, bases visited in turn each round, on a shared 2-core machine. "
        "Predictions are from the calibration trajectories and the cost model measured in this process.",
        "",
        "| base | D* (auto) | auto vs base | best fixed D | best fixed vs base | auto vs best fixed | "
        "auto predicted | prediction error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        auto = next(x for x in r["rows"] if x["decoder"] == "auto")
        lines.append(
            f"| {r['base']} | {r['chosen_D']} | {r['auto_speedup_wall']:.3f}x | {r['best_fixed_D']} | "
            f"{r['best_fixed_speedup_wall']:.3f}x | {r['auto_vs_best_fixed']:.3f} | "
            f"{auto['speedup_wall_predicted']:.3f}x | {r['auto_prediction_error']:+.1%} |"
        )
    for r in results:
        lines += [
            "",
            f"## {r['base']}: {r['reason']}",
            "",
            "| decoder | NFE speedup predicted / measured | wall speedup predicted / measured | per round "
            "| error | agreement |",
            "|---|---|---|---|---|---|",
        ]
        for x in r["rows"]:
            rounds = " / ".join(f"{v:.2f}" for v in x["speedup_wall_rounds"])
            lines.append(
                f"| {x['decoder']} | {x['speedup_nfe_predicted']:.2f} / {x['speedup_nfe']:.2f} | "
                f"{x['speedup_wall_predicted']:.3f} / {x['speedup_wall']:.3f} | {rounds} | "
                f"{x['prediction_error']:+.1%} | {x['agreement']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bases = ["vanilla", "kv_cache:cache=prefix", "kv_cache", "multi_token"]  # decoder presets
    p.add_argument("--bases", nargs="+", default=bases)
    p.add_argument("--n", type=int, default=30, help="held-out test problems")
    p.add_argument("--n-calib", type=int, default=20, help="calibration prompts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-budget", type=int, default=10)
    p.add_argument(
        "--budgets", type=int, nargs="*", default=None, help="fixed D to sweep (default: all)"
    )
    p.add_argument("--margin", type=float, default=MARGIN)
    p.add_argument("--threads", type=int, default=1)
    # committed: results/graphs (reproduce_results.sh)
    p.add_argument("--root", default="runs/graphs")
    p.add_argument("--name", default="auto_cpu")
    p.add_argument("--out", default="runs/auto")  # committed: results/auto
    args = p.parse_args()
    for base in args.bases:
        try:
            generation_for("arith", base, 0.0)
        except ValueError as e:
            raise SystemExit(f"--bases: {e}") from None
    model, tok = load_for_study("embedded", threads=args.threads)
    setups = {base: setup(model, tok, base, args) for base in args.bases}
    prompts = arith_test_prompts(tok, args.n)
    timing = measure(setups, prompts, args.rounds)
    results = [summarize(b, setups[b], timing[b], args.n) for b in args.bases]
    env = environment(model, next(model.parameters()).device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"env": env, "args": vars(args), "results": results}
    (out / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
    (out / f"{args.name}.md").write_text(markdown(results, env, args))
    print(markdown(results, env, args))


if __name__ == "__main__":
    main()
