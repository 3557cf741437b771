"""LLaDA's masked-diffusion SFT objective (LLaDA paper, Eq. 5 / SFT recipe).

For each sequence draw t ~ U(0, 1], mask every answer token independently with probability
p = (1 - eps) t + eps, and take the cross-entropy on masked answer tokens weighted by 1/p, normalised by the
number of answer tokens. The prompt is never masked; the answer region is padded with EOS to the generation
length and the padding is part of the answer (the model learns to emit EOS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """Return the scalar SFT loss.

    Args:
        input_ids: clean sequences (B, L).
        answer_mask: bool (B, L), True on answer tokens (answer + EOS padding) that may be masked.
        key_mask: bool (B, L), True on real tokens; batch padding is neither attended to nor scored.
        mask_id: the model's mask token id.
        generator: optional generator for the mask draws (seeded training).
    """
    B, L = input_ids.shape
    t = torch.rand(B, 1, generator=generator, device=input_ids.device)
    p_mask = (1 - eps) * t + eps  # (B, 1)
    draws = torch.rand(B, L, generator=generator, device=input_ids.device)
    masked = (draws < p_mask) & answer_mask  # (B, L)
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    attention = key_mask[:, None, :].expand(B, L, L)  # (B, Q, K)
    logits = model(noisy, attention_mask=attention).logits  # (B, L, V)
    ce = F.cross_entropy(logits[masked].float(), input_ids[masked], reduction="none")
    weights = 1.0 / p_mask.expand(B, L)[masked]
    return (ce * weights).sum() / answer_mask.sum().clamp(min=1)
