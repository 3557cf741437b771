"""Invariant numerics measured (docs/numerics.md): exactness below float64 and the mode's cost on this device.

    python scripts/invariant_study.py --n 200 --threads 1      # writes results/bench/invariant_cpu.{json,md}

Exactness, in `DecoderOptions(invariant=True)`, on `--n` held-out `arith` prompts with the embedded model, for
dtype in {float32, bfloat16} x cache in {none, dual} x T in {0, 0.9}: token mismatches and verified-logits
mismatches of Spiffy vs its base, and of a batch of `--batch` requests vs each alone. A verified row's logits are
compared wherever both runs verified the same canvas state (every state the base verified is one of Spiffy's
rows; every state a request verified alone is verified again in the batch); the default mode is measured beside
it. Cost: wall-clock of dual and dual + Spiffy with and without the mode, interleaved in one process (medians of
`--rounds` rounds over `--cost-n` prompts, float32).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

import spiffy
from spiffy.decoding.block_causal import BlockCausalCache
from spiffy.decoding.block_decoder import DecoderOptions
from spiffy.decoding.forward import Pending
from spiffy.decoding.strategies import STRATEGIES
from spiffy.models.numerics import machine
from spiffy.tasks.arith import format_prompt, generate_split
from spiffy.tasks.registry import TASKS


class VerifiedRows:
    """Records a digest of every verified state's block logits, keyed by the canvas with that state."""

    def __init__(self):
        self.rows: dict[tuple, bytes] = {}
        self._saved = {}

    def __enter__(self):
        for cls in {*STRATEGIES.values(), BlockCausalCache}:
            self._saved[cls] = original = cls.verify_call
            rows = self.rows

            def verify_call(strategy, canvas, block, states, *args, _original=original, **kwargs):
                pending = _original(strategy, canvas, block, states, *args, **kwargs)
                canvas, states, name = canvas.clone(), states.clone(), strategy.name

                def finish(out, _finish=pending.finish):
                    result = _finish(out)
                    for r in range(states.shape[0]):
                        row = canvas.clone()
                        row[block] = states[r]
                        logits = result.logits[r].detach().cpu().contiguous()
                        raw = logits.view(torch.int16) if logits.dtype == torch.bfloat16 else logits
                        key = (name, block.start, tuple(row.tolist()))
                        rows[key] = hashlib.blake2b(raw.numpy().tobytes(), digest_size=16).digest()
                    return result

                return Pending(pending.call, finish)

            cls.verify_call = verify_call
        return self

    def __exit__(self, *exc):
        for cls, original in self._saved.items():
            cls.verify_call = original

    def compare(self, other: VerifiedRows) -> tuple[int, int]:
        """(states of self compared, how many differ or are missing in other)."""
        bad = sum(other.rows.get(k) != v for k, v in self.rows.items())
        return len(self.rows), bad


def exactness(model, prompts, gen, cache, temperature, invariant, batch, graph) -> dict:
    options = DecoderOptions(invariant=invariant)
    kw = dict(gen, cache=cache, temperature=temperature, options=options)
    base = spiffy.build_decoder(model, **kw)
    fast = spiffy.build_decoder(model, **kw, speculate=spiffy.Speculation(graph))
    ids = list(range(len(prompts)))
    with VerifiedRows() as rec_base:
        a = [base.generate(p, request_id=i, seed=1) for i, p in zip(ids, prompts)]
    with VerifiedRows() as rec_fast:
        b = [fast.generate(p, request_id=i, seed=1) for i, p in zip(ids, prompts)]
    with VerifiedRows() as rec_batch:
        c = list(fast.generate_batch(prompts, ids, seed=1, batch_size=batch))
    rows_sb, bad_sb = rec_base.compare(rec_fast)
    rows_ba, bad_ba = rec_fast.compare(rec_batch)
    return {
        "spiffy_vs_base_token_mismatches": sum(
            not torch.equal(x.tokens, y.tokens) for x, y in zip(a, b)
        ),
        "spiffy_vs_base_rows": rows_sb,
        "spiffy_vs_base_row_mismatches": bad_sb,
        "batch_vs_alone_token_mismatches": sum(
            not torch.equal(x.tokens, y.tokens) for x, y in zip(b, c)
        ),
        "batch_vs_alone_rows": rows_ba,
        "batch_vs_alone_row_mismatches": bad_ba,
        "nfe_base": sum(x.stats.nfe for x in a) / len(a),
        "nfe_spiffy": sum(x.stats.nfe for x in b) / len(b),
    }


def cost(model, prompts, gen, graph, rounds) -> list[dict]:
    """Median wall-clock per prompt of dual and dual + Spiffy, default vs invariant, interleaved per round."""
    decoders = {}
    for invariant, speculate in itertools.product((False, True), (False, True)):
        name = ("dual+spiffy" if speculate else "dual") + (" invariant" if invariant else "")
        decoders[name] = spiffy.build_decoder(
            model,
            **gen,
            cache="dual",
            options=DecoderOptions(invariant=invariant),
            speculate=spiffy.Speculation(graph) if speculate else None,
        )
    times = {name: [] for name in decoders}
    for _ in range(rounds + 1):  # the first round warms up
        for name, decoder in decoders.items():
            t = time.perf_counter()
            for i, p in enumerate(prompts):
                decoder.generate(p, request_id=i)
            times[name].append((time.perf_counter() - t) / len(prompts))
    rows = []
    for name, ts in times.items():
        median = statistics.median(ts[1:])
        default = statistics.median(times[name.replace(" invariant", "")][1:])
        rows.append({"decoder": name, "s_per_prompt": median, "vs_default_mode": median / default})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--graph", default="chain:8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cost-n", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--default-mode", action="store_true", help="also measure the default mode")
    p.add_argument("--out", default="results/bench")
    p.add_argument("--name", default="invariant_cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = spiffy.load_tokenizer("embedded")
    problems = generate_split("test", args.n)
    prompts = [
        tok(format_prompt(q["question"]), return_tensors="pt").input_ids[0] for q in problems
    ]
    gen = dict(TASKS["arith"].generation)
    gen.setdefault("steps", gen["gen_length"])
    rows = []
    modes = (True, False) if args.default_mode else (True,)
    for dtype, cache, temperature, invariant in itertools.product(
        ("float32", "bfloat16"), ("none", "dual"), (0.0, 0.9), modes
    ):
        model = spiffy.load_model("embedded", dtype=dtype)
        t = time.perf_counter()
        row = {"dtype": dtype, "cache": cache, "temperature": temperature, "invariant": invariant}
        row.update(
            exactness(model, prompts, gen, cache, temperature, invariant, args.batch, args.graph)
        )
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        print(row, flush=True)
    model = spiffy.load_model("embedded", dtype="float32")
    costs = cost(model, prompts[: args.cost_n], gen, args.graph, args.rounds)
    for c in costs:
        print(c, flush=True)
    env = {"torch": torch.__version__, "threads": args.threads, **machine()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(
        json.dumps({"args": vars(args), "env": env, "exactness": rows, "cost": costs}, indent=1)
    )
    md = [
        f"# {args.name}",
        "",
        f"`python scripts/invariant_study.py {' '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in vars(args).items() if k not in ('out', 'name', 'default_mode'))}`"
        f"{' --default-mode' if args.default_mode else ''}; CPU ({env['cpu_isa']}, {env['blas']}), torch "
        f"{env['torch']}, {args.threads} thread(s), graph `{args.graph}`, {args.n} held-out arith prompts, batch "
        f"{args.batch}. Mismatches count prompts (tokens) or verified states (rows: bitwise logits).",
        "",
        "| dtype | cache | T | mode | Spiffy vs base: tokens | rows (differing / compared) | batch vs alone: tokens | rows (differing / compared) | NFE base | NFE Spiffy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['dtype']} | {r['cache']} | {r['temperature']} | {'invariant' if r['invariant'] else 'default'} "
            f"| {r['spiffy_vs_base_token_mismatches']} | {r['spiffy_vs_base_row_mismatches']} / {r['spiffy_vs_base_rows']} "
            f"| {r['batch_vs_alone_token_mismatches']} | {r['batch_vs_alone_row_mismatches']} / {r['batch_vs_alone_rows']} "
            f"| {r['nfe_base']:.2f} | {r['nfe_spiffy']:.2f} |"
        )
    md += [
        "",
        f"Cost (float32, {args.cost_n} prompts, median of {args.rounds} interleaved rounds, seconds per prompt):",
        "",
        "| decoder | s / prompt | vs the default mode |",
        "|---|---|---|",
    ]
    md += [
        f"| {c['decoder']} | {c['s_per_prompt']:.4f} | {c['vs_default_mode']:.3f} |" for c in costs
    ]
    (out / f"{args.name}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
