"""The resumable training loop shared by the embedded models' scripts (`scripts/train_tiny_*.py`).

Seeded and resumable: every batch is a pure function of (seed, step) (`arith_batch`), and the work directory holds
the latest model/optimizer state, so rerunning the same command continues where it stopped. The schedule is linear
warmup then cosine decay to 10 % (`lr_at`); AdamW (0.9, 0.95), gradient clipping at 1.0. At the end the model is
written in its checkpoint format with the tokenizer and a `recipe.json` (`save_checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from spiffy.tasks.arith import ArithConfig, format_prompt, format_target, make_problem, split_of


def add_common_args(p: argparse.ArgumentParser, **defaults) -> None:
    """The flags every training script shares; `defaults` overrides per script (e.g. `out=...`)."""
    d = dict(out=None, work="runs/train_tiny", steps=4200, batch_size=32, lr=3e-3, warmup=150)
    d.update(defaults)
    p.add_argument("--out", default=d["out"])
    p.add_argument("--work", default=d["work"], help="resumable training state")
    p.add_argument("--steps", type=int, default=d["steps"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--warmup", type=int, default=d["warmup"])
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--gen-length", type=int, default=32)
    p.add_argument("--max-value", type=int, default=10)
    p.add_argument("--min-steps", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)


def setup(args) -> tuple:
    """Thread count and seed from `args`; the character tokenizer and the task's difficulty."""
    from spiffy.tasks.char_tokenizer import build_char_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return build_char_tokenizer(), ArithConfig(args.max_value, args.min_steps, args.max_steps)


def arith_batch(
    tok, args, task: ArithConfig, step: int, *, block_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training batch of `step`: train-split problems, answer padded with EOS to `gen_length`.

    With `block_size`, the EOS padding continues to the end of the block holding position P + gen_length (a
    block decoder fills whole blocks) and the batch width is a whole number of blocks.
    Returns `(ids, answer_mask, key_mask)`, each (B, L); batch padding is `pad_token_id` with key_mask False.
    """
    rng = random.Random(f"train:{args.seed}:{step}")
    rows = []
    while len(rows) < args.batch_size:
        problem = make_problem(rng, task)
        if split_of(problem["question"]) != "train":
            continue
        prompt = tok(format_prompt(problem["question"]))["input_ids"]
        answer = tok(format_target(problem["answer"]))["input_ids"]
        if len(answer) >= args.gen_length:
            raise ValueError(f"answer of {len(answer)} tokens does not fit gen_length")
        end = len(prompt) + args.gen_length
        if block_size is not None:
            end = -(-end // block_size) * block_size
        rows.append((prompt, answer + [tok.eos_token_id] * (end - len(prompt) - len(answer))))
    width = max(len(p) + len(a) for p, a in rows)
    if block_size is not None:
        width = -(-width // block_size) * block_size
    ids = torch.full((len(rows), width), tok.pad_token_id)
    answer_mask = torch.zeros_like(ids, dtype=torch.bool)
    key_mask = torch.zeros_like(answer_mask)
    for r, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        ids[r, :n] = torch.tensor(prompt + answer)
        answer_mask[r, len(prompt) : n] = True
        key_mask[r, :n] = True
    return ids, answer_mask, key_mask


def lr_at(step: int, args) -> float:
    """Linear warmup over `args.warmup` steps, then cosine from `args.lr` to 10 % at `args.steps`."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: torch.nn.Module,
    args,
    loss_at: Callable[[int], torch.Tensor],
    monitor: Callable[[torch.nn.Module], dict] | None = None,
) -> dict:
    """Run (or resume) steps `[start, args.steps)` of `loss_at(step)`; return the recipe's training fields.

    Every `args.save_every` steps the state is saved atomically to `args.work/state.pt` and a history entry is
    appended (loss EMA, minutes, plus `monitor(model)`'s fields, run in eval mode, when given).
    """
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay
    )
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    state_path, start, elapsed, history = work / "state.pt", 0, 0.0, []
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, elapsed, history = state["step"], state["elapsed"], state["history"]
        print(f"resuming from step {start}")
    model.train()
    t0, ema = time.time() - elapsed, None
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr_at(step, args):.2e}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            entry = {"step": step + 1, "loss_ema": ema, "minutes": (time.time() - t0) / 60}
            if monitor is not None:
                model.eval()
                with torch.no_grad():
                    entry.update(monitor(model))
                model.train()
            history.append(entry)
            print(json.dumps(entry), flush=True)
            tmp = work / "state.pt.tmp"
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}
            torch.save({**state, "elapsed": time.time() - t0, "history": history}, tmp)
            tmp.replace(state_path)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_minutes": (time.time() - t0) / 60,
        "final_loss_ema": ema,
        "history": history,
    }


def save_checkpoint(model, tok, args, objective: str, trained: dict, **extra) -> None:
    """Write the model (its checkpoint format), the tokenizer and `recipe.json` to `args.out`."""
    out = Path(args.out)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    recipe = {"args": vars(args), "objective": objective, **trained, **extra}
    recipe["torch"] = torch.__version__
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2))
    print(json.dumps({k: recipe[k] for k in ("parameters", "train_minutes", "final_loss_ema")}))
