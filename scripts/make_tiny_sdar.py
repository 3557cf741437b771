"""Write a tiny, randomly initialised SDAR checkpoint (with the char tokenizer) for CPU smoke runs.

    python scripts/make_tiny_sdar.py --out spiffy/checkpoints/tiny-sdar-random

It exercises the SDAR code path (block-causal attention, q/k norms, GQA, the exact block cache, the prefill and
store forwards) end to end through run.py (`model=sdar_tiny`); its outputs are noise, so accuracy is
meaningless. The mask token's `lm_head` row is zero, so its logit (0) is never the argmax of a random model
(SDAR's reference loop fails when a block keeps a mask), and the other rows are scaled up so that the
distributions are peaked, as a trained model's are. Seeded: the same command writes the same weights.
"""

from __future__ import annotations

import argparse

import torch

from spiffy.models.sdar import SDARConfig, SDARForCausalLM
from spiffy.tasks.char_tokenizer import build_char_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="spiffy/checkpoints/tiny-sdar-random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=4)
    args = p.parse_args()
    tok = build_char_tokenizer()
    torch.manual_seed(args.seed)
    cfg = SDARConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_theta=1000000.0,
        block_size=args.block_size,
        mask_token_id=tok.mask_token_id,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = SDARForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        model.lm_head.weight[tok.mask_token_id] = 0.0
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)


if __name__ == "__main__":
    main()
