"""Write a tiny, randomly initialised Dream checkpoint (with the char tokenizer) for CPU smoke runs.

    python scripts/make_tiny_dream.py --out spiffy/checkpoints/tiny-dream-random

It exercises the Dream code path (shifted logits, GQA, q/k/v biases) end to end through run.py
(`model=dream_tiny`); its outputs are noise, so accuracy is meaningless. Seeded: the same command writes the
same weights.
"""

from __future__ import annotations

import argparse

import torch

from spiffy.models.dream import DreamConfig, DreamModel
from spiffy.tasks.char_tokenizer import build_char_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="spiffy/checkpoints/tiny-dream-random")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    tok = build_char_tokenizer()
    torch.manual_seed(args.seed)
    cfg = DreamConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        mask_token_id=tok.mask_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    DreamModel(cfg).save_pretrained(args.out)
    tok.save_pretrained(args.out)


if __name__ == "__main__":
    main()
