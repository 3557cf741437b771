"""Train the embedded tiny SDAR-format (block-causal) dLLM on the `arith` task with the block-diffusion objective.

The model is SDAR's published format (`model_type: sdar`, `spiffy/models/sdar.py`), trained like SDAR: clean prefix
blocks, a noised current block (one mask rate t per block, CE/t on masked answer tokens, the prompt never masked),
every answer block of a sequence in one forward (`spiffy.training.objective.block_diffusion_loss`). By default it
starts from the embedded LLaDA model's weights (same tokenizer and shapes; `spiffy.training.warm_start`).
`--block-sizes` trains several attention block sizes (one per batch, drawn from the list), so that one checkpoint
decodes at each of them (`config.block_size` is the first). Resumable and seeded as `scripts/train_tiny_dllm.py`.

    python scripts/train_tiny_sdar.py --out spiffy/checkpoints/tiny-sdar-arith
"""

from __future__ import annotations

import argparse
import random

import torch

from spiffy.models.loading import load_model
from spiffy.tasks.arith import ArithConfig, format_prompt, generate_split
from spiffy.tasks.char_tokenizer import build_char_tokenizer
from spiffy.tasks.scoring import is_correct
from spiffy.training.loop import add_common_args, arith_batch, save_checkpoint, train
from spiffy.training.objective import block_diffusion_loss
from spiffy.training.warm_start import sdar_from_llada, write_published_config


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(
        p, out="spiffy/checkpoints/tiny-sdar-arith", work="runs/train_sdar", steps=900,
        batch_size=32, lr=1e-3, warmup=50,
    )  # fmt: skip
    p.add_argument("--init-from", default="tiny-llada-arith", help="LLaDA checkpoint to start from")
    p.add_argument(
        "--block-sizes", default="8", help="comma-separated; the first is config.block_size"
    )
    p.add_argument(
        "--monitor-n", type=int, default=20, help="calib problems greedy-checked per save"
    )
    return p.parse_args()


@torch.no_grad()
def greedy_block_decode(model, prompt: list[int], gen_length: int, block_size: int) -> list[int]:
    """Training monitor only (no cache, one token per step): SDAR's static rule at 1 token/step, stopping after
    the block that holds EOS. The library's decoder is `spiffy.build_decoder(..., rule="sdar_static")`."""
    mask_id, eos_id = model.config.mask_token_id, model.config.eos_token_id
    total = -(-(len(prompt) + gen_length) // block_size) * block_size
    canvas = torch.tensor(prompt + [mask_id] * (total - len(prompt)))
    for start in range(len(prompt) // block_size * block_size, total, block_size):
        end = start + block_size
        while bool((canvas[start:end] == mask_id).any()):
            probs = model(canvas[None, :end]).logits[0, start:end].float().softmax(-1)
            conf, token = probs.max(-1)
            conf = torch.where(canvas[start:end] == mask_id, conf, -1.0)
            i = int(conf.argmax())
            canvas[start + i] = token[i]
        if eos_id in canvas[len(prompt) : end].tolist():
            break
    return canvas[len(prompt) :].tolist()


def monitor_fn(tok, args, block_sizes):
    problems = generate_split("calib", args.monitor_n, seed=args.seed)

    def monitor(model) -> dict:
        out = {}
        for bs in sorted(set(block_sizes)):
            model.config.block_size = bs
            hits = 0
            for p in problems:
                ids = greedy_block_decode(model, tok(format_prompt(p["question"]))["input_ids"],
                                          args.gen_length, bs)  # fmt: skip
                ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
                hits += is_correct(tok.decode(ids, skip_special_tokens=True), p["target"])
            out[f"calib_acc_b{bs}"] = hits / len(problems)
        model.config.block_size = block_sizes[0]
        return out

    return monitor


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = build_char_tokenizer()
    task = ArithConfig(args.max_value, args.min_steps, args.max_steps)
    block_sizes = [int(b) for b in args.block_sizes.split(",")]
    if not block_sizes or min(block_sizes) <= 0:
        raise ValueError(f"--block-sizes={args.block_sizes!r} must list positive integers")
    model = sdar_from_llada(load_model(args.init_from), block_sizes[0])

    def loss_at(step: int) -> torch.Tensor:
        bs = random.Random(f"block:{args.seed}:{step}").choice(block_sizes)
        ids, answer_mask, key_mask = arith_batch(tok, args, task, step, block_size=bs)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        return block_diffusion_loss(
            model, ids, answer_mask, key_mask, mask_id=tok.mask_token_id, block_size=bs,
            generator=gen,
        )  # fmt: skip

    monitor = monitor_fn(tok, args, block_sizes) if args.monitor_n > 0 else None
    trained = train(model, args, loss_at, monitor)
    objective = (
        "SDAR block diffusion: per block t~U(0,1], p=(1-1e-3)t+1e-3, CE/p on masked answer tokens, clean prefix "
        f"blocks (block-causal), block sizes {block_sizes}; warm start from {args.init_from}"
    )
    save_checkpoint(model, tok, args, objective, trained)
    write_published_config(model.config, args.out)  # the published SDAR key set


if __name__ == "__main__":
    main()
