"""Calibrate draft graphs (docs/algorithm.md §5.5) for a model × decoder settings × task × n × D × selection rule.

    python scripts/calibrate_graph.py --budgets 3 5 8 10 --rules best degree1 greedy --n 20
    python scripts/calibrate_graph.py --budgets 10 --cross-block
    python scripts/calibrate_graph.py --rule-name threshold --tau 0.9 --budgets 8

Trajectories are recorded once per (model, decoder settings, task, n, seed) and every budget/rule is selected
from them; graphs (with provenance and calibration time) go to results/graphs/ and are reused when present.
"""

from __future__ import annotations

import argparse
import json

import torch

import spiffy
from spiffy.calibration.calibrate import SELECTION_RULES
from spiffy.calibration.store import load_or_calibrate
from spiffy.decoding.config import GenerationConfig
from spiffy.eval.offline import encode
from spiffy.models.loading import load_tokenizer
from spiffy.tasks.registry import TASKS, task_generation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--model-name", default="tiny-llada-arith")
    p.add_argument("--task", default="arith", choices=sorted(TASKS))
    p.add_argument("--n", type=int, default=20, help="calibration prompts")
    p.add_argument("--budgets", type=int, nargs="+", default=[3, 5, 8, 10])
    p.add_argument("--rules", nargs="+", default=["best"], choices=SELECTION_RULES)
    p.add_argument("--cross-block", action="store_true", help="calibrate for the cross-block walk")
    p.add_argument("--horizon", type=int, default=16, help="recorded depth (>= budget for best)")
    p.add_argument("--rule-name", default="schedule", help="transition rule of the base decoder")
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--factor", type=float, default=None)
    p.add_argument("--cache", default="none")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--remasking", default="low_confidence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--root", default="runs/graphs"
    )  # committed: results/graphs (reproduce_results.sh)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--force", action="store_true")
    args = p.parse_args()
    model = spiffy.load_model(args.model, dtype=args.dtype)
    tok = load_tokenizer(args.model)
    cfg = GenerationConfig(
        **task_generation(
            args.task,
            rule=args.rule_name,
            k=args.k,
            tau=args.tau,
            factor=args.factor,
            cache=args.cache,
            temperature=args.temperature,
            remasking=args.remasking,
        )
    )

    def prompts() -> list[torch.Tensor]:
        return [encode(tok, t) for t in TASKS[args.task].calibration(args.n, args.seed)]

    for rule in args.rules:
        for budget in args.budgets:
            graph = load_or_calibrate(
                model,
                cfg,
                prompts,
                model_name=args.model_name,
                task=args.task,
                n_samples=args.n,
                budget=budget,
                rule=rule,
                seed=args.seed,
                horizon=args.horizon,
                cross_block=args.cross_block,
                root=args.root,
                force=args.force,
            )
            prov = graph.provenance
            print(
                json.dumps(
                    {
                        "budget": budget,
                        "rule": rule,
                        "nodes": len(graph.nodes),
                        "chosen": prov.get("best", {}).get("chosen", rule),
                        "calibration_s": prov.get("calibration_s"),
                        "predicted_speedup_nfe": prov.get("predicted_speedup_nfe"),
                    }
                )
            )


if __name__ == "__main__":
    main()
