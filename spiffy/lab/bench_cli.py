"""Benchmark decoders side by side in one process and print medians and ratios (plus the cost curve): `spiffy bench`.

`spiffy bench ARGS` and `python scripts/bench.py ARGS` are the same command.

    python scripts/bench.py --decoders vanilla vanilla+spiffy@calibrated:10 kv_cache kv_cache+spiffy@calibrated:10
    python scripts/bench.py --decoders multi_token:tau=0.8 multi_token:tau=0.8+spiffy  # a preset, overridden
    python scripts/bench.py --device cuda --dtype bfloat16 ...      # unchanged on a GPU
    python scripts/bench.py --decoders --name fig5_cpu              # the cost curve only (Figure 5)
    python scripts/bench.py --decoders --shape llada-8b --layers 2 --prompt-len 900 --gen-length 256 \\
        --block-length 32 --cost-curve 0 1 2 3 5 8 10 --layouts exact prefix dual --name fig5_llada8b_cpu
    python scripts/bench.py --decoders --cost-curve --shape llada-8b --layers 2 --hidden 256 \\
        --peak-memory 10 --name peak_memory_cpu
    python scripts/bench.py --decoders vanilla kv_cache kv_cache+spiffy@calibrated:5 --n 64 --batch-sizes 1 4 16 64 \
        --cost-curve 0 2 5 10 --name batching_cpu                    # throughput vs batch size, batched cost
    python scripts/bench.py --model tiny-sdar-arith --model-name tiny-sdar-arith --gen '{"stop_ids": [96]}' \
        --cost-curve --decoders sdar sdar+spiffy@calibrated:5 sdar:fuse_next=true \
        sdar:fuse_next=true+spiffy@calibrated:5/fused

Writes `<out>/<name>.json` and `<out>/<name>.md` (`--out` defaults to runs/bench; the committed results pass
`--out results/bench`). NFE ratios are hardware-independent; wall-clock ratios are
measured interleaved on this device (stated in the output). With `--shape` the model is a random-weight model of
a published configuration (`spiffy.models.shapes`): cost curves and memory only, and the curve is also fed to
`spiffy.lab.report.budget_recommendation` with the paper's NFE speedups (`spiffy.lab.benchmarks.paper_runs`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

import spiffy
from spiffy.decoding.config import GenerationConfig
from spiffy.decoding.strategies import STRATEGIES
from spiffy.eval.offline import encode
from spiffy.lab.benchmarks import (
    LAYOUTS,
    DecoderSpec,
    batch_throughput,
    batched_cost_curve,
    cost_curve,
    count_reads,
    environment,
    generation_for,
    make_decoder,
    paper_runs,
    run_side_by_side,
    summarize_rows,
    verification_peak_memory,
)
from spiffy.lab.report import budget_recommendation, plot_batching
from spiffy.models.loading import load_tokenizer, model_spec
from spiffy.models.shapes import SHAPES, random_model
from spiffy.tasks.arith import format_prompt, generate_split


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="spiffy bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--model-name", default="tiny-llada-arith")
    p.add_argument("--task", default="arith")
    p.add_argument(
        "--decoders",
        nargs="*",
        default=["vanilla", "vanilla+spiffy"],
        help="<preset>[:key=value,...][+spiffy[@graph][/shared|/cross|/fused]], presets of "
        "spiffy/conf/decoder; none: cost curve only",
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
    p.add_argument("--reads", action="store_true", help="count host reads per transition/forward")
    p.add_argument("--cost-curve", type=int, nargs="*", default=[0, 1, 2, 3, 5, 8, 10, 16])
    p.add_argument(
        "--layouts",
        nargs="+",
        default=None,
        choices=sorted(LAYOUTS),
        help="default: exact and dual (exact and block_causal for block-causal models)",
    )
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=1, help="cost-curve rounds not timed")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES), help="random published shape")
    p.add_argument("--layers", type=int, default=None, help="with --shape: number of blocks")
    p.add_argument("--hidden", type=int, default=None, help="with --shape: a narrower width")
    p.add_argument("--prompt-len", type=int, default=None, help="cost curve (default: task mean)")
    p.add_argument("--gen-length", type=int, default=None, help="cost curve (default: task's)")
    p.add_argument("--block-length", type=int, default=None, help="cost curve (default: task's)")
    p.add_argument("--peak-memory", type=int, default=None, metavar="D", help="one exact forward")
    p.add_argument("--name", default="bench")
    p.add_argument(
        "--batch-sizes",
        nargs="*",
        type=int,
        default=None,
        help="throughput table: decode the --n prompts at each batch size (docs/algorithm.md §13); "
        "with --cost-curve, the cost curve gets this batch axis",
    )
    p.add_argument(
        "--batch-repeats", type=int, default=1, help="throughput table: interleaved rounds"
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="throughput table: query tokens per forward (0: no limit; default: the device's default)",
    )
    p.add_argument(
        "--out", default="runs/bench", help="folder for <name>.json/.md (committed: results/bench)"
    )
    return p.parse_args(argv)


def layouts_for(model) -> tuple[str, ...]:
    """The cost-curve layouts a model runs by default: its cached layout next to the exact one."""
    return ("exact", "block_causal" if model_spec(model).block_causal else "dual")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [DecoderSpec.parse(s, args.graph) for s in args.decoders]
    if not specs and not args.cost_curve and args.peak_memory is None:
        raise SystemExit("nothing to measure: pass --decoders, --cost-curve and/or --peak-memory")
    if args.shape and specs:
        raise SystemExit("--shape has random weights: pass --decoders with no value (curves only)")
    if args.shape and args.prompt_len is None:
        raise SystemExit("--shape needs --prompt-len (there is no task tokenizer)")
    if args.shape:
        model = random_model(
            args.shape, layers=args.layers, hidden=args.hidden, dtype=args.dtype, device=args.device
        )
        tok = None
    else:
        model = spiffy.load_model(args.model, dtype=args.dtype, device=args.device)
        tok = load_tokenizer(args.model)
    overrides = json.loads(args.gen)
    problems = generate_split("test", args.n) if tok is not None else []
    decoders, bases = {}, {}
    for block in args.block_sizes or [None]:
        m, settings, tag = model, overrides, ""
        if block is not None:  # a block-causal model trained at several block sizes
            m = spiffy.load_model(args.model, dtype=args.dtype, device=args.device)
            m.config.block_size = block
            settings, tag = {**overrides, "block_length": block}, f" B={block}"
        for s in specs:
            kw = dict(
                task=args.task,
                model_name=args.model_name,
                temperature=args.temperature,
                overrides=settings,
            )
            decoders[s.label + tag], bases[s.label + tag] = (
                make_decoder(m, tok, s, **kw),
                s.base + tag,
            )
    if args.batch_sizes and specs:  # the throughput table replaces the one-at-a-time table
        if args.reads:
            raise SystemExit("--batch-sizes takes --decoders, without --reads")
        prompts = [encode(tok, format_prompt(p["question"])) for p in problems]
        table = pd.DataFrame(
            batch_throughput(
                decoders,
                prompts,
                sorted(args.batch_sizes),
                repeats=args.batch_repeats,
                max_tokens="auto" if args.max_tokens is None else (args.max_tokens or None),
            )
        )
        rows = {}
    else:
        rows = run_side_by_side(decoders, tok, problems) if specs else {}
        table = pd.DataFrame(summarize_rows(rows, bases) if rows else [])
    if args.reads and specs:
        prompts = [encode(tok, format_prompt(p["question"])) for p in problems[:3]]
        reads = {label: count_reads(d, d.model, prompts) for label, d in decoders.items()}
        table = table.assign(
            **{k: [reads[d][k] for d in table.decoder] for k in next(iter(reads.values()))}
        )
    device = next(model.parameters()).device
    env = environment(model, device)
    gen = GenerationConfig(**generation_for(args.task, "vanilla", args.temperature))
    gen_length = args.gen_length or gen.gen_length
    block_length = args.block_length or gen.block_length
    prompt_len = args.prompt_len or round(
        sum(len(tok(format_prompt(p["question"]))["input_ids"]) for p in problems) / len(problems)
    )
    canvas_len = prompt_len + gen_length
    layouts = tuple(args.layouts or layouts_for(model))
    if args.cost_curve and args.batch_sizes:  # the cost curve with a batch axis
        curve = pd.DataFrame(
            batched_cost_curve(
                model,
                canvas_len,
                block_length,
                args.cost_curve,
                sorted(args.batch_sizes),
                repeats=args.batch_repeats * 5,
                layouts=layouts,
            )
        )
    elif args.cost_curve:
        curve = pd.DataFrame(
            cost_curve(
                model,
                canvas_len,
                block_length,
                args.cost_curve,
                repeats=args.repeats,
                layouts=layouts,
                warmup=args.warmup,
            )
        )
    else:
        curve = pd.DataFrame()
    recommendation = pd.DataFrame()
    runs = paper_runs(gen_length, block_length) if not curve.empty and args.shape else None
    # the paper's NFE runs are of the exact and dual layouts: a curve of other layouts only (block_causal) has
    # no recommendation
    covered = set()  # the runs' layouts (cache "none" runs the exact layout)
    if runs is not None:
        covered = {{"none": "exact"}.get(c, c) for c in runs["decoder.cache"]}
    if covered and covered & set(curve["layout"]):
        recommendation = budget_recommendation(
            curve, runs, blocks_per_request=gen_length // block_length
        )
    memory = []
    if args.peak_memory is not None:
        mb = verification_peak_memory(model, STRATEGIES, canvas_len, block_length, args.peak_memory)
        memory.append({"drafts": args.peak_memory, "peak_mb": mb / 2**20})
    pd.set_option("display.width", 250)
    print(json.dumps(env))
    for frame in (table, curve, recommendation, pd.DataFrame(memory)):
        if not frame.empty:
            print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "args": vars(args),
        "env": env,
        "canvas_len": canvas_len,
        "decoders": table.to_dict("records"),
        "cost_curve": curve.to_dict("records"),
        "budget_recommendation": recommendation.to_dict("records"),
        "peak_memory": memory,
    }
    (out / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
    if args.batch_sizes and specs:  # throughput vs batch size (and the cost curve's batch axis)
        plot_batching(payload, out / f"{args.name}.png")
    what = (
        f"random-weight `{args.shape}` ({args.layers or 'all'} layers"
        f"{f', hidden {args.hidden}' if args.hidden else ''})"
        if args.shape
        else f"{args.n} held-out `{args.task}` problems, T={args.temperature}"
    )
    md = [
        f"# {args.name}",
        "",
        f"Device: {env['device_name']} ({env['device']}), dtype {env['dtype']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, {env['threads']} threads, peak memory "
        f"{env['peak_memory_mb']:.0f} MB; {what}. "
        + (
            f"Throughput at each batch size (docs/algorithm.md §13): decoders interleaved (a fresh order per batch "
            f"size and round), medians of {args.batch_repeats} round(s); every cell checks each request's tokens "
            "and NFE against batch 1."
            if args.batch_sizes and specs
            else "Decoders run interleaved per prompt (fresh order per prompt); ratios are of summed wall time."
        ),
    ]
    if not table.empty:
        md += ["", table.to_markdown(index=False, floatfmt=".3f")]
    if not curve.empty:
        md += [
            "",
            f"Cost curve (one verification forward; canvas {canvas_len}, block {block_length}):",
            "",
            curve.to_markdown(index=False, floatfmt=".3f"),
        ]
    if not recommendation.empty:
        md += [
            "",
            "Predicted wall speedup with the paper's NFE speedups (`spiffy.lab.report.budget_recommendation`, "
            "`spiffy.lab.benchmarks.paper_runs`):",
            "",
            recommendation.to_markdown(index=False, floatfmt=".3f"),
        ]
    if memory:
        md += [
            "",
            f"Peak memory of one exact verification forward with {args.peak_memory} drafts "
            f"(canvas {canvas_len}):",
            "",
            pd.DataFrame(memory).to_markdown(index=False, floatfmt=".1f"),
        ]
    (out / f"{args.name}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
