"""Masked-diffusion training objectives: LLaDA's SFT loss and SDAR's block-diffusion loss.

Both mask answer tokens independently with probability p = (1 - eps) t + eps and take the cross-entropy on masked
answer tokens weighted by 1/p, normalised by the number of answer tokens (LLaDA paper, Eq. 5 / SFT recipe). The
prompt is never masked; the answer region is padded with EOS and the padding is part of the answer (the model learns
to emit EOS).

* `masked_diffusion_loss` (LLaDA): one t per sequence, bidirectional attention over the whole noisy sequence.
* `block_diffusion_loss` (SDAR / BD3-LM): one t per block of `block_size` absolute positions; each noisy block attends
  bidirectionally to itself and to the **clean** earlier blocks, exactly what the block decoder's cache shows it. All
  blocks train in one forward by the SDAR trick: the input packs the clean sequence and a noisy copy of the answer
  blocks (the same absolute positions twice) under a mask where the clean copy is block-causal over itself and noisy
  block b sees noisy block b and clean blocks < b. The clean copy's K/V at every layer are then those of the
  inference cache (block-causal), so every answer block gets the gradient of its decoding situation in one forward
  of L + (answer blocks) tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _noise(
    input_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    p_mask: torch.Tensor,
    mask_id: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each answer token with its probability `p_mask` (B, L); return (noisy ids, masked bool)."""
    draws = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    masked = (draws < p_mask) & answer_mask
    return torch.where(masked, torch.full_like(input_ids, mask_id), input_ids), masked


def _weighted_ce(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    masked: torch.Tensor,
    p_mask: torch.Tensor,
    answer_mask: torch.Tensor,
) -> torch.Tensor:
    """Sum over masked tokens of CE / p, divided by the number of answer tokens."""
    ce = F.cross_entropy(logits[masked].float(), input_ids[masked], reduction="none")
    return (ce * (1.0 / p_mask[masked])).sum() / answer_mask.sum().clamp(min=1)


def masked_diffusion_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    key_mask: torch.Tensor,
    *,
    mask_id: int,
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
) -> torch.Tensor:
    """Return LLaDA's scalar SFT loss.

    Args:
        input_ids: clean sequences (B, L).
        answer_mask: bool (B, L), True on answer tokens (answer + EOS padding) that may be masked.
        key_mask: bool (B, L), True on real tokens; batch padding is neither attended to nor scored.
        mask_id: the model's mask token id.
        generator: optional generator for the mask draws (seeded training).
    """
    B, L = input_ids.shape
    t = torch.rand(B, 1, generator=generator, device=input_ids.device)
    p_mask = ((1 - eps) * t + eps).expand(B, L)
    noisy, masked = _noise(input_ids, answer_mask, p_mask, mask_id, generator)
    attention = key_mask[:, None, :].expand(B, L, L)  # (B, Q, K)
    logits = model(noisy, attention_mask=attention).logits  # (B, L, V)
    return _weighted_ce(logits, input_ids, masked, p_mask, answer_mask)


def block_diffusion_mask(
    positions: torch.Tensor, noisy: torch.Tensor, valid: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Bool (B, N, N) mask of a packed sequence of clean and noisy copies of blocks.

    Token n sits at absolute position `positions[:, n]` and is a noisy copy when `noisy[:, n]`. A clean query sees
    the clean keys of its own and earlier blocks (block-causal, as the cache); a noisy query sees the noisy keys of
    its own block and the clean keys of earlier blocks. Invalid keys (padding) are never seen, except that every
    query sees itself, so a padding query (never scored) has no empty row."""
    blk = positions // block_size
    q_blk, k_blk = blk[:, :, None], blk[:, None, :]
    q_noisy, k_noisy = noisy[:, :, None], noisy[:, None, :]
    sees = torch.where(
        q_noisy,
        (k_noisy & (k_blk == q_blk)) | (~k_noisy & (k_blk < q_blk)),
        ~k_noisy & (k_blk <= q_blk),
    )
    eye = torch.eye(positions.shape[1], dtype=torch.bool, device=positions.device)
    return (sees & valid[:, None, :]) | eye


def block_diffusion_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    key_mask: torch.Tensor,
    *,
    mask_id: int,
    block_size: int,
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
) -> torch.Tensor:
    """Return the block-diffusion loss of every answer block at once (one t per block).

    Only blocks holding answer tokens get a noisy copy (blocks of prompt alone have nothing to score), so the
    packed input is the clean sequence (L) followed by each row's noisy answer blocks (right-padded to the
    longest), `positions` repeating the absolute positions.

    Args:
        input_ids: clean sequences (B, L); blocks are absolute positions `[b * block_size, (b+1) * block_size)`.
        answer_mask, key_mask, mask_id, generator, eps: as in `masked_diffusion_loss`.
        block_size: the model's attention block size.
    """
    if block_size <= 0:
        raise ValueError(f"block_size={block_size!r} must be a positive integer")
    B, L = input_ids.shape
    dev = input_ids.device
    pos = torch.arange(L, device=dev)
    t = torch.rand(B, -(-L // block_size), generator=generator, device=dev)
    p_mask = ((1 - eps) * t + eps)[:, pos // block_size]  # (B, L): each token gets its block's rate
    noisy, masked = _noise(input_ids, answer_mask, p_mask, mask_id, generator)
    # the noisy copies: from each row's first answer block to its last real block
    has_answer = answer_mask.any(dim=1)
    first = torch.where(has_answer, answer_mask.int().argmax(dim=1), 0) // block_size * block_size
    width = int((key_mask.sum(dim=1) - first).clamp(min=0).max())
    width = -(-width // block_size) * block_size
    tail = first[:, None] + torch.arange(width, device=dev)  # (B, W) absolute positions
    inside = tail < L
    idx = tail.clamp(max=L - 1)
    tail_valid = inside & key_mask.gather(1, idx) & has_answer[:, None]
    scored = tail_valid & masked.gather(1, idx)
    logits = model(
        torch.cat([input_ids, noisy.gather(1, idx)], dim=1),
        position_ids=torch.cat([pos.expand(B, L), idx], dim=1),
        attention_mask=block_diffusion_mask(
            torch.cat([pos.expand(B, L), idx], dim=1),
            torch.cat([torch.zeros_like(key_mask), torch.ones_like(tail_valid)], dim=1),
            torch.cat([key_mask, tail_valid], dim=1),
            block_size,
        ),
    ).logits[:, L:]
    return _weighted_ce(
        logits, input_ids.gather(1, idx), scored, p_mask.gather(1, idx), answer_mask
    )
