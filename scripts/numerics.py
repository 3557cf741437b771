"""Spiffy-vs-base agreement beyond float64, and batch variance of the verification forward (issue #16 item 5).

    python scripts/numerics.py --n 30 --threads 1            # writes results/bench/numerics_cpu.{json,md}

For each model (the embedded model on held-out `arith` prompts, the LLaDA reference fixture on random prompts),
dtype (float64, float32, bfloat16) and layout (exact = no cache, dual cache): the share of prompts on which Spiffy
returns exactly its base decoder's tokens, and both NFEs. Batch variance: the largest difference between a
state's logits computed in a verification forward of 11 states and the same state computed alone. Cached
attention is batch-invariant by construction (`spiffy.models.kv`); `min_rows=16` also keeps every matrix product
in the BLAS kernel class that gives each row the same result whatever the row count.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import pandas as pd
import torch

import spiffy
from spiffy.decoding.block_decoder import DecoderOptions
from spiffy.decoding.strategies import STRATEGIES
from spiffy.eval.offline import encode
from spiffy.tasks.arith import format_prompt, generate_split
from spiffy.tasks.registry import TASKS

SHARED = Path(os.environ.get("SPIFFY_SHARED", Path(__file__).resolve().parents[2] / "shared"))
FIXTURE = SHARED / "fixtures" / "llada_reference"
DTYPES = ("float64", "float32", "bfloat16")
# layout -> (cache mode, minimum query rows of a cached forward: 16 runs the base with Spiffy's GEMM row class)
LAYOUTS = {"exact": ("none", 0), "dual": ("dual", 0), "dual, min_rows=16": ("dual", 16)}


def prompts_for(name: str, n: int, vocab: int, mask_id: int) -> tuple[list[torch.Tensor], dict]:
    if name == "embedded":
        tok = spiffy.load_tokenizer("embedded")
        problems = generate_split("test", n)
        return [encode(tok, format_prompt(p["question"])) for p in problems], TASKS[
            "arith"
        ].generation
    g = torch.Generator().manual_seed(0)
    prompts = []
    for _ in range(n):
        p = torch.randint(0, vocab, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
        prompts.append(torch.where(p == mask_id, 0, p))
    return prompts, dict(gen_length=32, block_length=8, steps=32)


def batch_variance(model, cache: str, min_rows: int) -> float:
    """max |logits of a state in a forward of 11 states - the same state alone| over the 11 states."""
    mask_id = int(model.config.mask_token_id)
    g = torch.Generator().manual_seed(0)
    canvas = torch.randint(0, mask_id, (64,), generator=g)
    block = slice(40, 48)
    states = torch.randint(0, mask_id, (11, 8), generator=g)
    states[:, 4:] = mask_id
    canvas[block] = states[0]
    strategy = STRATEGIES[cache](model, min_rows=min_rows)
    strategy.begin_block(canvas, block)
    together = strategy.verify(canvas, block, states).logits.double()
    return max(
        float(
            (together[r] - strategy.verify(canvas, block, states[r : r + 1]).logits[0]).abs().max()
        )
        for r in range(states.shape[0])
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--graph", default="chain:8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fixture", default=str(FIXTURE))
    p.add_argument("--out", default="runs/bench")  # committed: results/bench
    p.add_argument("--name", default="numerics_cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for (name, path), dtype in itertools.product(
        [("embedded", "embedded"), ("llada_reference", args.fixture)], DTYPES
    ):
        model = spiffy.load_model(path, dtype=dtype)
        spec = spiffy.model_spec(model)
        prompts, gen = prompts_for(name, args.n, spec.vocab_size, spec.mask_id)
        for layout, (cache, min_rows) in LAYOUTS.items():
            options = DecoderOptions(min_rows=min_rows)
            base = spiffy.build_decoder(model, **gen, cache=cache, options=options)
            fast = spiffy.build_decoder(
                model, **gen, cache=cache, options=options, speculate=spiffy.Speculation(args.graph)
            )
            agree = nfe_base = nfe = 0
            for i, prompt in enumerate(prompts):
                a, b = base.generate(prompt, request_id=i), fast.generate(prompt, request_id=i)
                agree += torch.equal(a.tokens, b.tokens)
                nfe_base, nfe = nfe_base + a.stats.nfe, nfe + b.stats.nfe
            rows.append(
                {
                    "model": name,
                    "dtype": dtype,
                    "layout": layout,
                    "prompts": len(prompts),
                    "agreement": agree / len(prompts),
                    "nfe_base": nfe_base / len(prompts),
                    "nfe_spiffy": nfe / len(prompts),
                    "batch_variance": batch_variance(model, cache, min_rows),
                }
            )
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"args": vars(args), "torch": torch.__version__, "rows": rows}
    (out / f"{args.name}.json").write_text(json.dumps(payload, indent=1))
    md = [
        f"# {args.name}",
        "",
        f"CPU, torch {torch.__version__}, {args.threads} thread(s); graph `{args.graph}`, T = 0. `agreement`: share "
        "of prompts on which Spiffy returns exactly its base decoder's tokens; `batch_variance`: max |logit| "
        "difference between a state verified among 11 and the same state alone (0 = bitwise equal).",
        "",
        table.to_markdown(index=False, floatfmt=".3g"),
    ]
    (out / f"{args.name}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
