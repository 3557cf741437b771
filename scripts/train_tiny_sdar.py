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

from spiffy.decoding.build import build_decoder
from spiffy.eval.offline import accuracy, score_arith
from spiffy.lab.benchmarks import generation_for
from spiffy.models.loading import load_model
from spiffy.tasks.arith import generate_split
from spiffy.training.loop import add_common_args, arith_batch, save_checkpoint, setup, train
from spiffy.training.objective import block_diffusion_loss
from spiffy.training.warm_start import sdar_from_llada, write_published_config


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(
        p, out="spiffy/checkpoints/tiny-sdar-arith", work="runs/train_sdar", steps=1200,
        batch_size=32, lr=1e-3, warmup=50,
    )  # fmt: skip
    p.add_argument("--init-from", default="tiny-llada-arith", help="LLaDA checkpoint to start from")
    p.add_argument(
        "--block-sizes",
        default="8,4,8,16",
        help="comma-separated, drawn uniformly per batch; the first is config.block_size",
    )
    p.add_argument(
        "--monitor-n", type=int, default=20, help="calib problems greedy-checked per save"
    )
    return p.parse_args()


def monitor_fn(tok, args, block_sizes):
    """Accuracy on `--monitor-n` calibration problems with SDAR's base decoder, at each trained block size."""
    problems = generate_split("calib", args.monitor_n, seed=args.seed)

    def monitor(model) -> dict:
        out = {}
        for bs in sorted(set(block_sizes)):
            model.config.block_size = bs
            gen = generation_for("arith", "sdar", 0.0, block_length=bs, stop_ids=[tok.eos_token_id])
            samples = score_arith(build_decoder(model, **gen), tok, problems, progress=False)
            out[f"calib_acc_b{bs}"] = accuracy(samples)
        model.config.block_size = block_sizes[0]
        return out

    return monitor


def main() -> None:
    args = parse_args()
    tok, task = setup(args)
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
