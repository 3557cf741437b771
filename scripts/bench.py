"""Benchmark decoders side by side in one process and print medians and ratios (plus the cost curve).

    python scripts/bench.py --decoders vanilla vanilla+spiffy@calibrated:10 dual dual+spiffy@calibrated:10
    python scripts/bench.py --device cuda --dtype bfloat16 ...      # unchanged on a GPU
    python scripts/bench.py --decoders --name fig5_cpu              # the cost curve only (Figure 5)
    python scripts/bench.py --model tiny-sdar-arith --model-name tiny-sdar-arith --gen '{"stop_ids": [96]}' \
        --cost-curve --decoders sdar sdar+spiffy@calibrated:5 sdar_fused sdar_fused+spiffy@calibrated:5/fused

Writes `<out>/<name>.json` and `<out>/<name>.md`. NFE ratios are hardware-independent; wall-clock ratios are
measured interleaved on this device (stated in the output).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

import spiffy
from spiffy.bench import (
    DecoderSpec,
    cost_curve,
    environment,
    generation_for,
    make_decoder,
    run_side_by_side,
    summarize_rows,
)
from spiffy.decoding.config import GenerationConfig
from spiffy.models.loading import load_tokenizer
from spiffy.tasks.arith import format_prompt, generate_split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--model-name", default="tiny-llada-arith")
    p.add_argument("--task", default="arith")
    p.add_argument(
        "--decoders", nargs="*", default=["vanilla", "vanilla+spiffy"], help="none: cost curve only"
    )
    p.add_argument("--graph", default="calibrated:10", help="graph for '+spiffy' without '@'")
    p.add_argument("--gen", default="{}", help="JSON GenerationConfig fields for every decoder")
    p.add_argument(
        "--block-sizes",
        type=int,
        nargs="*",
        default=None,
        help="SDAR: decode in blocks of each N (one model copy with config.block_size = N each)",
    )
    p.add_argument("--n", type=int, default=50, help="held-out test problems")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cost-curve", type=int, nargs="*", default=[0, 1, 2, 3, 5, 8, 10, 16])
    p.add_argument(
        "--prompt-len", type=int, default=None, help="cost-curve prompt length (default: task mean)"
    )
    p.add_argument("--name", default="bench")
    p.add_argument("--out", default="results/bench")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = spiffy.load_model(args.model, dtype=args.dtype, device=args.device)
    tok = load_tokenizer(args.model)
    overrides = json.loads(args.gen)
    specs = [DecoderSpec.parse(s, args.graph) for s in args.decoders]
    decoders, bases = {}, {}
    for block in args.block_sizes or [None]:
        m, settings, tag = model, overrides, ""
        if block is not None:  # a block-causal model trained at several block sizes
            m = spiffy.load_model(args.model, dtype=args.dtype, device=args.device)
            m.config.block_size = block
            settings, tag = {**overrides, "block_length": block}, f" B={block}"
        for s in specs:
            decoders[s.label + tag] = make_decoder(
                m,
                tok,
                s,
                task=args.task,
                model_name=args.model_name,
                temperature=args.temperature,
                overrides=settings,
            )
            bases[s.label + tag] = s.base + tag
    if not specs and not args.cost_curve:
        raise SystemExit("nothing to measure: pass --decoders and/or --cost-curve")
    problems = generate_split("test", args.n)
    rows = run_side_by_side(decoders, tok, problems) if specs else {}
    table = pd.DataFrame(summarize_rows(rows, bases) if rows else [])
    device = next(model.parameters()).device
    env = environment(model, device)
    gen = GenerationConfig(**generation_for(args.task, "vanilla", args.temperature))
    prompt_len = args.prompt_len or round(
        sum(len(tok(format_prompt(p["question"]))["input_ids"]) for p in problems) / len(problems)
    )
    curve = (
        pd.DataFrame(
            cost_curve(model, prompt_len + gen.gen_length, gen.block_length, args.cost_curve)
        )
        if args.cost_curve
        else pd.DataFrame()
    )
    pd.set_option("display.width", 200)
    print(json.dumps(env))
    if not table.empty:
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if not curve.empty:
        print(curve.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "args": vars(args),
        "env": env,
        "decoders": table.to_dict("records"),
        "cost_curve": curve.to_dict("records"),
    }
    (out / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
    md = [
        f"# {args.name}",
        "",
        f"Device: {env['device_name']} ({env['device']}), dtype {env['dtype']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, {env['threads']} threads, peak memory "
        f"{env['peak_memory_mb']:.0f} MB; {args.n} held-out `{args.task}` problems, "
        f"T={args.temperature}. Decoders run interleaved per prompt; ratios are of summed wall time.",
    ]
    if not table.empty:
        md += ["", table.to_markdown(index=False, floatfmt=".3f")]
    if not curve.empty:
        md += [
            "",
            "Cost curve (one verification forward):",
            "",
            curve.to_markdown(index=False, floatfmt=".3f"),
        ]
    (out / f"{args.name}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
