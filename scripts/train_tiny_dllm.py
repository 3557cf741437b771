"""Train the embedded tiny LLaDA-architecture dLLM on the `arith` task (LLaDA's masked-diffusion SFT objective).

Seeded and resumable (`spiffy.training.loop`): every batch is a pure function of (seed, step), and `--work` holds
the latest optimizer/model state, so rerunning the same command continues where it stopped. At the end the model is
written in the LLaDA checkpoint format (config.json + model.safetensors) with the tokenizer and a `recipe.json`.

    python scripts/train_tiny_dllm.py --out spiffy/checkpoints/tiny-llada-arith
"""

from __future__ import annotations

import argparse

import torch

from spiffy.models.llada import LLaDAConfig, LLaDAModelLM
from spiffy.training.loop import add_common_args, arith_batch, save_checkpoint, setup, train
from spiffy.training.objective import masked_diffusion_loss


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, out="spiffy/checkpoints/tiny-llada-arith")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--mlp-hidden", type=int, default=384)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    tok, task = setup(args)
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

    def loss_at(step: int) -> torch.Tensor:
        ids, answer_mask, key_mask = arith_batch(tok, args, task, step)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        return masked_diffusion_loss(
            model, ids, answer_mask, key_mask, mask_id=tok.mask_token_id, generator=gen
        )

    trained = train(model, args, loss_at)
    objective = "LLaDA masked-diffusion SFT: t~U(0,1], p=(1-1e-3)t+1e-3, CE/p on answer tokens"
    save_checkpoint(model, tok, args, objective, trained)


if __name__ == "__main__":
    main()
