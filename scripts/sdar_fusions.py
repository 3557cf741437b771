"""NFE effect of SDAR's two fusions (docs/algorithm.md §12) for the base decoder and for Spiffy, with losslessness checked.

    python scripts/sdar_fusions.py --model tests/fixtures/sdar_reference --out results/tables

For each SDAR rule, every prompt is decoded by the reference loop (prefill + denoising + one store forward per
block), by the base with `fuse_next` (the store forward also starts the next block), and by Spiffy with neither,
`fuse_store` (a block finished on a verified draft is stored from that forward), `fuse_next`, and both. Every row
must reproduce the reference canvas (the script fails otherwise); NFE counts every model call, and the speedups
are against the reference loop's count. Deterministic: the counts do not depend on the machine.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import pandas as pd
import torch

import spiffy

RULES = {"sdar_static": {}, "sdar_dynamic": {"tau": 0.9}, "sdar_sequential": {}}
VARIANTS = {  # label: (graph or None, fuse_store, fuse_next)
    "base (reference loop)": (None, False, False),
    "base + fuse_next": (None, False, True),
    "Spiffy": ("g", False, False),
    "Spiffy + fuse_store": ("g", True, False),
    "Spiffy + fuse_next": ("g", False, True),
    "Spiffy + both": ("g", True, True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tests/fixtures/sdar_reference")
    p.add_argument(
        "--graph", default="fig2", help="a graph spec (chain:D, fig2) or a graph JSON path"
    )
    p.add_argument("--n", type=int, default=12, help="random prompts (lengths 2..9)")
    p.add_argument("--gen-length", type=int, default=16)
    p.add_argument("--out", default=None, help="write sdar_fusions.{md,csv} here")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = spiffy.load_model(args.model, dtype=torch.float64)
    spec = spiffy.model_spec(model)
    bs = spec.attention_block_size
    vocab = [t for t in range(spec.vocab_size) if t not in (spec.mask_id, spec.eos_id)]
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.tensor(vocab)[torch.randint(len(vocab), (int(n),), generator=g)]
        for n in torch.randint(2, 10, (args.n,), generator=g)
    ]
    rows = []
    for rule, params in RULES.items():
        # one token per step (the dynamic rule: at least one)
        kw = dict(
            gen_length=args.gen_length, block_length=bs, rule=rule, steps_per_block=bs, **params
        )
        reference, nfe = None, {}
        for label, (graph, fuse_store, fuse_next) in VARIANTS.items():
            speculate = spiffy.Speculation(args.graph, fuse_store=fuse_store) if graph else None
            decoder = spiffy.build_decoder(model, speculate=speculate, fuse_next=fuse_next, **kw)
            results = [decoder.generate(q, request_id=i) for i, q in enumerate(prompts)]
            canvases = [r.canvas for r in results]
            if reference is None:
                reference = canvases
            if not all(itertools.starmap(torch.equal, zip(canvases, reference))):
                raise SystemExit(f"{rule} / {label}: output differs from the reference loop")
            nfe[label] = sum(r.stats.nfe for r in results)
            base = sum(r.stats.nfe_base for r in results)
            rows.append(
                dict(
                    rule=rule,
                    decoder=label,
                    nfe=nfe[label],
                    speedup_nfe=round(base / nfe[label], 3),
                )
            )
    table = pd.DataFrame(rows)
    note = (
        f"{args.n} prompts, gen_length {args.gen_length}, block {bs}, one token per step, graph "
        f"`{args.graph}`, model `{Path(args.model).name}`; every row's canvas equals the reference loop's."
    )
    text = f"# SDAR fusions: model calls per configuration\n\n{note}\n\n{table.to_markdown(index=False)}\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "sdar_fusions.csv", index=False)
        (out / "sdar_fusions.md").write_text(text)


if __name__ == "__main__":
    main()
