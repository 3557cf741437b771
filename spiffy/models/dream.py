"""Native PyTorch implementation of Dream-v0 (Qwen2.5 made bidirectional), weight-compatible with Dream-org/*.

It reads Dream's `config.json` (`model_type: Dream`) and Qwen2-style weight names (q/k/v biases, grouped-query
attention). Dream's raw logits are **shifted**: the hidden state at position i predicts position i+1. The shift
lives here, not in the decoders: `forward` returns logits aligned to the query positions (docs/algorithm.md §9) at the rows
`logits_at` only (`spiffy.models.base.DiffusionLM`), and runs the LM head on the hidden rows those need. For a query
row at position p the aligned logits are the raw logits of the row at position p-1 that it attends to (so
appended drafts use their own previous row, or the canvas row before the block), `raw[0]` at position 0, and,
when position p-1 lives only in a K/V cache, the cache's `boundary_logits` (the aligned logits that its
block-start forward computed for p = `insert_at`: Fast-dLLM's "keep its last logits"). With a `range` of
positions and no mask the alignment is a fixed shift, computed without reading the device. Precision follows
Qwen2: RMSNorm in float32, float32 RoPE tables cast to the model dtype.
"""

from __future__ import annotations

import torch

from spiffy.models.base import RopeTables, row_slice
from spiffy.models.generate import DreamGenerate
from spiffy.models.kv import KVCache, plan_attention
from spiffy.models.transformer import (
    BidirectionalLM,
    DecoderLM,
    QwenConfig,
    qwen_fields,
    rope_tables,
)


class DreamConfig(QwenConfig):
    """Dream's config format (Qwen2 fields plus `mask_token_id`)."""

    model_type = "Dream"
    # (layers, width, query heads, kv heads, MLP width) of Dream-v0-7B
    published = qwen_fields(152064, (28, 3584, 28, 4, 18944), positions=131072, theta=1e6)

    def __init__(
        self,
        mask_token_id: int = 151666,
        eos_token_id: int = 151643,
        pad_token_id: int = 151643,
        **kwargs,
    ):
        self.init_fields(locals())
        self.check_positive("hidden_size", "num_hidden_layers", "num_attention_heads")
        self.check_divisible(
            ("hidden_size", "num_attention_heads"), ("num_attention_heads", "num_key_value_heads")
        )


class DreamModel(DreamGenerate, BidirectionalLM, DecoderLM):
    """Dream masked-diffusion LM returning position-aligned logits (the shift is applied here)."""

    config_class = DreamConfig
    position_limit = "max_position_embeddings"

    def __init__(self, config: DreamConfig):
        block = config.block_config(qkv_bias=True)  # Qwen2: biases on q/k/v
        super().__init__(config, block)
        self._rope = RopeTables(
            lambda pos: rope_tables(
                pos, block.head_dim, config.rope_theta, self.model.embed_tokens.weight.dtype
            )
        )

    def hidden(self, input_ids, positions, span, plan, kv_cache, return_kv):
        """Final-norm hidden states (B, Q, d) and, if requested, the fresh K/V per layer (`BidirectionalLM`)."""
        x = self.model.embed_tokens(input_ids)
        cos_sin = self._rope(positions, span, x.device, x.dtype)
        x, present = self.model.run(x, cos_sin, plan, kv_cache, return_kv)
        return self.model.norm(x), present

    def raw_logits(
        self, input_ids, position_ids, attention_mask=None, kv_cache=None, return_kv=False
    ):
        """Unshifted logits (B, Q, V) at every query row of positions `position_ids` (B, Q) and, if
        requested, the fresh K/V per layer."""
        B, Q = input_ids.shape
        plan = plan_attention(kv_cache, B, Q, attention_mask, input_ids.device)
        h, present = self.hidden(input_ids, position_ids, None, plan, kv_cache, return_kv)
        return self.lm_head(h), present

    def head(self, h, logits_at, positions, span, attention_mask, kv_cache) -> torch.Tensor:
        """Aligned logits (B, P, V) at the rows `logits_at` (the shift: docs/algorithm.md §9)."""
        B, Q = h.shape[:2]
        rows = row_slice(logits_at, Q)
        if span is not None and attention_mask is None and rows is not None:
            return self._shifted(h, rows, span.start, kv_cache)
        if rows is not None:
            logits_at = torch.arange(rows.start, rows.stop, device=h.device)
        if positions is None:
            positions = torch.arange(span.start, span.stop, device=h.device)[None]
        return self._aligned(h, logits_at, positions.expand(B, Q), attention_mask, kv_cache)

    def _boundary(self, kv_cache: KVCache | None, position: int) -> torch.Tensor:
        if kv_cache is None or kv_cache.boundary_logits is None or kv_cache.insert_at != position:
            raise ValueError(
                f"Dream needs the logits of position {position - 1} for a query at position {position}: "
                "pass a KVCache whose boundary_logits are at that position"
            )
        return kv_cache.boundary_logits

    def _shifted(self, h, rows: slice, first_position: int, kv_cache) -> torch.Tensor:
        """Contiguous positions: aligned row r = raw row r - 1; row 0 = raw row 0 at position 0, else the cache's
        boundary logits. Only the needed hidden rows go through the LM head."""
        a, b = rows.start, rows.stop
        if a > 0:
            return self.lm_head(h[:, a - 1 : b - 1])
        raw = self.lm_head(h[:, : b - 1])
        if first_position == 0:
            first = self.lm_head(h[:, :1])
        else:
            boundary = self._boundary(kv_cache, first_position)
            first = boundary.to(raw.dtype).expand(h.shape[0], 1, -1)
        return torch.cat([first, raw], dim=1)

    def _aligned(self, h, rows: torch.Tensor, positions, attention_mask, kv_cache) -> torch.Tensor:
        """General layouts (masks, appended drafts, per-row `rows` (B, P)): aligned[r] = raw[r'] with r' the
        visible query row at position pos[r] - 1 (docs/algorithm.md §9); the LM head runs on the P selected source
        rows only. A row whose previous position is cached out takes its cache's boundary logits."""
        B, Q = positions.shape
        rows = rows.expand(B, -1) if rows.dim() == 1 else rows  # (B, P)
        pos = positions.gather(1, rows)
        prev = positions[:, None, :] == (pos[:, :, None] - 1)  # (B, P, Q): row r -> source r'
        if attention_mask is not None:  # the query rows' own keys follow the cached ones
            lo = kv_cache.length if kv_cache is not None else 0
            own = attention_mask[:, :, lo : lo + Q]
            prev &= own.gather(1, rows[..., None].expand(-1, -1, Q))
        has_prev = prev.any(-1)
        source = torch.where(has_prev, prev.to(torch.int8).argmax(-1), rows)
        hidden = h.gather(1, source[..., None].expand(B, -1, h.shape[-1]))
        logits = self.lm_head(hidden)
        missing = ~has_prev & (pos != 0)
        if bool(missing.any()):
            b, p = missing.nonzero(as_tuple=True)
            if kv_cache is None:
                self._boundary(None, int(pos[b[0], p[0]]))  # raises
            boundary = kv_cache.boundary(b, pos[b, p])
            logits = logits.index_put((b, p), boundary.to(logits.dtype))
        return logits
