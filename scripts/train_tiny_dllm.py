"""Train the embedded tiny LLaDA-architecture dLLM on the `arith` task (LLaDA's masked-diffusion SFT objective).

Seeded and resumable: every batch is a pure function of (seed, step), and `--work` holds the latest
optimizer/model state, so rerunning the same command continues where it stopped. At the end the model is written
in the LLaDA checkpoint format (config.json + model.safetensors) with the tokenizer and a `recipe.json`.

    python scripts/train_tiny_dllm.py --out spiffy/checkpoints/tiny-llada-arith
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from spiffy.models.llada import LLaDAConfig, LLaDAModelLM
from spiffy.tasks.arith import ArithConfig, format_prompt, format_target, make_problem, split_of
from spiffy.tasks.char_tokenizer import build_char_tokenizer
from spiffy.training.objective import masked_diffusion_loss


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="spiffy/checkpoints/tiny-llada-arith")
    p.add_argument("--work", default="runs/train_tiny", help="resumable training state")
    p.add_argument("--steps", type=int, default=4200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--mlp-hidden", type=int, default=384)
    p.add_argument("--gen-length", type=int, default=32)
    p.add_argument("--max-value", type=int, default=10)
    p.add_argument("--min-steps", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def make_batch(tok, args, task: ArithConfig, step: int) -> tuple[torch.Tensor, ...]:
    """The training batch of `step`: train-split problems, answer padded with EOS to gen_length."""
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
        answer = answer + [tok.eos_token_id] * (args.gen_length - len(answer))
        rows.append((prompt, answer))
    width = max(len(p) + len(a) for p, a in rows)
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
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = build_char_tokenizer()
    task = ArithConfig(args.max_value, args.min_steps, args.max_steps)
    config = LLaDAConfig(
        d_model=args.d_model,
        n_heads=args.n_heads,
        n_layers=args.n_layers,
        mlp_hidden_size=args.mlp_hidden,
        vocab_size=len(tok),
        embedding_size=len(tok),
        max_sequence_length=512,
        rope_theta=10000.0,
        mask_token_id=tok.mask_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LLaDAModelLM(config)
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
        ids, answer_mask, key_mask = make_batch(tok, args, task, step)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        loss = masked_diffusion_loss(
            model, ids, answer_mask, key_mask, mask_id=tok.mask_token_id, generator=gen
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr_at(step, args):.2e}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            history.append({"step": step + 1, "loss_ema": ema, "minutes": (time.time() - t0) / 60})
            tmp = work / "state.pt.tmp"
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step + 1,
                    "elapsed": time.time() - t0,
                    "history": history,
                },
                tmp,
            )
            tmp.replace(state_path)
    out = Path(args.out)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    recipe = {
        "args": vars(args),
        "objective": "LLaDA masked-diffusion SFT: t~U(0,1], p=(1-1e-3)t+1e-3, CE/p on answer tokens",
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_minutes": (time.time() - t0) / 60,
        "final_loss_ema": ema,
        "history": history,
        "torch": torch.__version__,
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2))
    print(json.dumps({k: recipe[k] for k in ("parameters", "train_minutes", "final_loss_ema")}))


if __name__ == "__main__":
    main()
