"""LLaDA's SFT objective trains the native model: a tiny model memorises one problem and decodes it."""

from __future__ import annotations

import torch

import spiffy
from spiffy.models.llada import LLaDAConfig, LLaDAModelLM
from spiffy.tasks.char_tokenizer import build_char_tokenizer
from spiffy.training.objective import masked_diffusion_loss


def test_objective_learns_and_never_scores_the_prompt():
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = LLaDAConfig(
        d_model=64,
        n_heads=4,
        n_layers=2,
        mlp_hidden_size=128,
        vocab_size=len(tok),
        max_sequence_length=128,
        rope_theta=10000.0,
        mask_token_id=tok.mask_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LLaDAModelLM(cfg)
    prompt = tok("Q: 3+4?\nA:")["input_ids"]
    answer = tok(" 7\n#### 7")["input_ids"] + [tok.eos_token_id] * 4
    ids = torch.tensor([prompt + answer] * 8)
    answer_mask = torch.zeros_like(ids, dtype=torch.bool)
    answer_mask[:, len(prompt) :] = True
    key_mask = torch.ones_like(answer_mask)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(120):
        loss = masked_diffusion_loss(
            model, ids, answer_mask, key_mask, mask_id=tok.mask_token_id, generator=gen
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.1 * sum(losses[:10])
    model.eval()
    out = spiffy.build_decoder(
        model, gen_length=len(answer), block_length=len(answer), steps=len(answer)
    ).generate(torch.tensor(prompt))
    assert out.tokens.tolist() == answer
    # the prompt is never masked, so its tokens never enter the loss: changing them only changes
    # the conditioning, and a zero answer mask gives a zero loss
    zero = masked_diffusion_loss(
        model,
        ids,
        torch.zeros_like(answer_mask),
        key_mask,
        mask_id=tok.mask_token_id,
        generator=gen,
    )
    assert zero.item() == 0.0
