"""Evaluate the embedded model on held-out `arith` test problems (the model card's numbers).

    python scripts/eval_embedded.py --n 200            # vanilla decoder, T=0, task settings
    python scripts/eval_embedded.py --n 200 --json results/embedded_eval.json
    python scripts/eval_embedded.py --model tiny-sdar-arith --n 200   # SDAR base, one token per step

Prints accuracy, the share of well-formatted answers, and the median confidence of committed tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import spiffy
from spiffy.decoding.block_decoder import DecoderOptions
from spiffy.eval.offline import accuracy, formatted_share, load_for_study, score_arith
from spiffy.lab.benchmarks import generation_for
from spiffy.tasks.arith import ArithConfig, generate_split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the metrics here")
    p.add_argument(
        "--base",
        default=None,
        help="decoder preset of spiffy/conf/decoder, <preset>[:key=value,...] (default: vanilla; sdar for "
        "block-causal models)",
    )
    p.add_argument("--gen", default="{}", help="JSON GenerationConfig fields, e.g. stop_ids")
    args = p.parse_args()
    model, tok = load_for_study(args.model, args.threads)
    base = args.base or ("sdar" if spiffy.model_spec(model).block_causal else "vanilla")
    generation = generation_for("arith", base, 0.0, **json.loads(args.gen))
    decoder = spiffy.build_decoder(
        model, **generation, options=DecoderOptions(record_confidence=True)
    )
    problems = generate_split("test", args.n, seed=args.seed, cfg=ArithConfig())
    t0 = time.perf_counter()
    samples = score_arith(decoder, tok, problems, seed=args.seed, desc="eval")
    confidences = [c for s in samples for c in s.result.stats.committed_confidence]
    metrics = {
        "model": args.model,
        "n": len(samples),
        "generation": generation,
        "accuracy": accuracy(samples),
        "formatted": formatted_share(samples),
        "median_committed_confidence": statistics.median(confidences),
        "share_committed_confidence_gt_0.9": sum(c > 0.9 for c in confidences) / len(confidences),
        "mean_nfe": statistics.mean(s.result.stats.nfe for s in samples),
        "seconds": time.perf_counter() - t0,
        "torch_threads": args.threads,
    }
    for s in samples[:3]:
        print(repr(s.prompt), "->", repr(s.completion), "gold", s.target, s.correct)
    print(json.dumps(metrics, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
