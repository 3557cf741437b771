"""A scripted fake dLLM whose distributions are known by hand (litgpt-style fake-model tests).

Position `p` of the canvas predicts token `(p + shift(state)) % n_tokens` with confidence decreasing in `p`, so
the most confident masked position is always the leftmost one. `shift` is 0 for `stable` models (drafts from a
stale anchor are always right) or the number of unmasked tokens for `drifting` models (every commit changes every
prediction, so no draft is ever right).
"""

from __future__ import annotations

import torch
from torch import nn

from spiffy.models.base import DiffusionLMOutput, select_rows


class _Config:
    def __init__(self, vocab: int):
        self.mask_token_id = vocab - 1
        self.eos_token_id = None
        self.pad_token_id = None
        self.eot_token_id = None
        self.vocab_size = vocab
        self.embedding_size = vocab
        self.max_sequence_length = 512


class ScriptedModel(nn.Module):
    def __init__(self, vocab: int = 16, drifting: bool = False):
        super().__init__()
        self.config = _Config(vocab)
        self.drifting = drifting
        self.anchor = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.calls = 0

    def forward(
        self,
        input_ids,
        position_ids=None,
        attention_mask=None,
        kv_cache=None,
        return_kv=False,
        logits_at=None,
        **_,
    ):
        self.calls += 1
        B, Q = input_ids.shape
        vocab = self.config.vocab_size
        if position_ids is None:
            position_ids = torch.arange(Q)
        if isinstance(position_ids, range):
            position_ids = torch.arange(position_ids.start, position_ids.stop)
        pos = position_ids.expand(B, Q)
        shift = (
            (input_ids != self.config.mask_token_id).sum(1, keepdim=True) if self.drifting else 0
        )
        target = (pos + shift) % (vocab - 1)  # never the mask id
        logits = torch.zeros(B, Q, vocab, dtype=torch.float64)
        logits.scatter_(2, target[..., None], (20.0 - 0.1 * pos.to(torch.float64))[..., None])
        logits = logits + self.anchor
        if logits_at is not None:  # the decoders' contract: logits at the requested rows only
            logits = select_rows(logits, logits_at)
        return DiffusionLMOutput(logits=logits)

    def default_attention_mask(self, positions, kv_cache):
        """Every key (it reads no keys at all); batched decoding stacks such masks."""
        b, q = positions.shape
        n = kv_cache.length if kv_cache is not None else 0
        return torch.ones(b, q, n + q, dtype=torch.bool)
