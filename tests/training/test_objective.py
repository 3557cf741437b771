"""The training objectives: LLaDA's SFT loss trains the native model; SDAR's block-diffusion loss is exactly the
per-block decoding situation; the LLaDA -> SDAR warm start keeps every weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import spiffy
from spiffy.models.llada import LLaDAConfig, LLaDAModelLM
from spiffy.tasks.char_tokenizer import build_char_tokenizer
from spiffy.training.objective import (
    block_diffusion_loss,
    block_diffusion_mask,
    masked_diffusion_loss,
)
from spiffy.training.warm_start import sdar_from_llada
from tests.conftest import tiny_random_sdar


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


def test_block_diffusion_loss_is_every_block_decoded_against_its_clean_prefix():
    """The packed one-forward loss equals, block by block, a plain forward of the clean prefix blocks followed by
    the noisy block (the block decoder's view through its exact cache), with the same noise draws."""
    model, L, bs = tiny_random_sdar(block_size=4), 16, 4
    mask_id = model.config.mask_token_id
    clean = torch.randint(0, mask_id - 1, (3, L), generator=torch.Generator().manual_seed(0))
    key_mask = torch.ones(3, L, dtype=torch.bool)
    key_mask[1, 11:], key_mask[2, 14:] = False, False  # batch padding
    answer_mask = torch.zeros_like(key_mask)  # answers start mid-block, at a block start, at 2
    answer_mask[0, 5:], answer_mask[1, 8:11], answer_mask[2, 2:14] = True, True, True
    with torch.no_grad():
        packed = block_diffusion_loss(
            model, clean, answer_mask, key_mask, mask_id=mask_id, block_size=bs,
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip
        gen = torch.Generator().manual_seed(1)  # replay the draws: one t per block, then the mask
        t = torch.rand(3, L // bs, generator=gen)
        p = ((1 - 1e-3) * t + 1e-3)[:, torch.arange(L) // bs]
        draws = torch.rand(3, L, generator=gen)
        masked = (draws < p) & answer_mask
        noisy = torch.where(masked, mask_id, clean)
        total, scored = 0.0, 0
        for r in range(3):
            n = int(key_mask[r].sum())
            for s in range(0, n, bs):
                e = min(s + bs, n)
                logits = model(torch.cat([clean[r, :s], noisy[r, s:e]])[None]).logits[0, s:e]
                m = masked[r, s:e]
                ce = F.cross_entropy(logits[m], clean[r, s:e][m], reduction="none")
                total, scored = total + (ce / p[r, s:e][m]).sum(), scored + int(m.sum())
    assert scored > 10
    assert abs(packed.item() - (total / answer_mask.sum()).item()) < 1e-5 * packed.item()
    # the prompt never enters the loss
    zero = block_diffusion_loss(
        model, clean, torch.zeros_like(answer_mask), key_mask, mask_id=mask_id, block_size=bs
    )
    assert zero.item() == 0.0


def test_block_diffusion_mask_sees_clean_prefix_and_own_noisy_block():
    # clean positions 0..3, then a noisy copy of block 1 (block size 2)
    positions = torch.tensor([[0, 1, 2, 3, 2, 3]])
    noisy = torch.tensor([[False] * 4 + [True] * 2])
    mask = block_diffusion_mask(positions, noisy, torch.ones(1, 6, dtype=torch.bool), 2)[0]
    yes, no = True, False
    assert mask[4].tolist() == [yes, yes, no, no, yes, yes]  # clean block 0 + its own noisy block
    assert mask[2].tolist() == [yes, yes, yes, yes, no, no]  # clean: block-causal, no noisy keys
    assert mask[0].tolist() == [True, True, False, False, False, False]


def test_warm_start_carries_every_llada_weight():
    """With its q/k norms bypassed, the SDAR model made from a LLaDA model computes the same logits under the same
    (full) mask: every weight landed under the right SDAR name."""
    torch.manual_seed(0)
    llada = LLaDAModelLM(
        LLaDAConfig(d_model=32, n_heads=4, n_layers=2, mlp_hidden_size=64, vocab_size=50,
                    max_sequence_length=64, rope_theta=10000.0, mask_token_id=49, eos_token_id=48,
                    pad_token_id=47)
    ).eval()  # fmt: skip
    sdar = sdar_from_llada(llada, block_size=4).eval()
    assert all(bool((layer.self_attn.q_norm.weight == 1).all()) for layer in sdar.model.layers)
    for layer in sdar.model.layers:
        layer.self_attn.q_norm = layer.self_attn.k_norm = torch.nn.Identity()
    ids = torch.randint(0, 47, (2, 10))
    full = torch.ones(2, 10, 10, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(
            llada(ids, attention_mask=full).logits, sdar(ids, attention_mask=full).logits
        )
    assert sdar.config.mask_token_id == 49 and sdar.config.block_size == 4
