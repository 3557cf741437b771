"""Key/value caches and the attention over them (SPEC §4, §5.3).

A `KVCache` holds post-RoPE keys and values of canvas positions, one `(k, v)` pair per layer, with batch 1: one
frozen cache shared by every block state verified in a forward. Queries attend to `[cached keys, fresh keys]`:

* prefix cache: the cache holds positions `[0, s)`; queries are `[s, L)`.
* dual cache:   the cache holds the whole canvas; queries are the block `[s, e)`; the cached block columns
  `[insert_at, insert_at + replace)` are masked out (the block's own K/V are always recomputed).

B > 1 query rows (drafts) are folded into the query axis of one batch-1 attention: row b's queries see the cache
and row b's own fresh keys only (a block-diagonal mask), so no row copies the cache and no draft sees another
(SPEC §5.3 constraints). Grouped-query heads go through SDPA's `enable_gqa` when torch has it.

Forwards never write into a cache. Shifted-logit families (Dream) also keep `boundary_logits`, the block-start
forward's aligned logits at position `insert_at`: the only cached-out position a query row can need (SPEC §9).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class KVCache:
    """Frozen per-layer keys/values, each `(1, H_kv, L_c, head_dim)`, plus the masked-out block region."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    insert_at: int
    replace: int = 0
    boundary_logits: torch.Tensor | None = None  # (V,) aligned logits at position `insert_at`
    _masks: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.layers and self.layers[0][0].shape[0] != 1:
            raise ValueError(f"KVCache holds batch 1, got {self.layers[0][0].shape[0]}")

    @property
    def length(self) -> int:
        """Number of cached key positions."""
        return self.layers[0][0].shape[2] if self.layers else 0

    def slice_positions(self, end: int) -> KVCache:
        """Keep only cached positions `[0, end)` (the prefix cache)."""
        layers = tuple((k[:, :, :end], v[:, :, :end]) for k, v in self.layers)
        return KVCache(layers, insert_at=end, replace=0, boundary_logits=self.boundary_logits)

    def visible(self, device: torch.device) -> torch.Tensor:
        """Which cached keys a query may attend to (L_c,): all but the recomputed block."""
        vis = torch.ones(self.length, dtype=torch.bool, device=device)
        vis[self.insert_at : self.insert_at + self.replace] = False
        return vis


@dataclass(frozen=True)
class AttentionPlan:
    """How B rows of Q queries attend in one forward; built once per forward, shared by every layer."""

    batch: int
    fold: bool  # B > 1 rows folded into one batch-1 query axis over the shared cache
    mask: torch.Tensor | None  # bool, broadcastable to SDPA's (B', H, Q', K')
    _additive: dict = field(default_factory=dict, compare=False, repr=False)

    def sdpa_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The mask as SDPA's additive float mask in `dtype`, converted once per plan (not per layer)."""
        if self.mask is None:
            return None
        if dtype not in self._additive:
            additive = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            self._additive[dtype] = additive.masked_fill_(~self.mask, float("-inf"))
        return self._additive[dtype]


def plan_attention(
    cache: KVCache | None,
    batch: int,
    q_len: int,
    attention_mask: torch.Tensor | None,
    device: torch.device,
) -> AttentionPlan:
    """The attention mask of a forward. `attention_mask` (B, Q, K) uses keys `[cache (L_c), own fresh (Q)]`."""
    if cache is None:
        return AttentionPlan(
            batch, False, None if attention_mask is None else attention_mask[:, None]
        )
    key = (batch, q_len)
    if attention_mask is None and key in cache._masks:
        return cache._masks[key]
    n_cache = cache.length
    if attention_mask is None and cache.replace == 0 and batch == 1:
        plan = AttentionPlan(batch, False, None)
    else:
        vis = cache.visible(device)
        own = torch.ones(batch, q_len, q_len, dtype=torch.bool, device=device)
        cached = vis.expand(batch, q_len, n_cache)
        if attention_mask is not None:
            cached = cached & attention_mask[:, :, :n_cache]
            own = own & attention_mask[:, :, n_cache:]
        if batch == 1:
            plan = AttentionPlan(1, False, torch.cat([cached, own], dim=2)[:, None])
        else:
            rows = batch * q_len
            fresh = torch.zeros(batch, q_len, batch, q_len, dtype=torch.bool, device=device)
            b = torch.arange(batch, device=device)
            fresh[b, :, b, :] = own  # block diagonal: row b sees its own fresh keys only
            mask = torch.cat([cached.reshape(rows, n_cache), fresh.reshape(rows, rows)], dim=1)
            plan = AttentionPlan(batch, True, mask[None, None])
    if attention_mask is None:
        cache._masks[key] = plan
    return plan


@functools.cache
def sdpa_has_gqa() -> bool:
    """Whether this torch's SDPA accepts `enable_gqa` (torch >= 2.5); else heads are repeated by hand."""
    q, kv = torch.zeros(1, 2, 1, 2), torch.zeros(1, 1, 1, 2)
    try:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    except (TypeError, RuntimeError):
        return False
    return True


def bidirectional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan | torch.Tensor | None,
    cache: KVCache | None,
    layer: int,
) -> torch.Tensor:
    """SDPA of fresh queries (B, H, Q, hd) over `[cache, fresh K/V (B, H_kv, Q, hd)]` under `plan`;
    returns (B, Q, H * hd). Scaled by 1/sqrt(hd), no causal mask: the attention of LLaDA and Dream.
    A bool mask (B, Q, K) or None instead of a plan is planned here (per layer: prefer one plan per forward)."""
    B, H, Q, hd = q.shape
    if not isinstance(plan, AttentionPlan):
        plan = plan_attention(cache, B, Q, plan, q.device)
    if plan.fold:  # (B, H, Q, hd) -> (1, H, B*Q, hd)
        q = q.transpose(0, 1).reshape(1, H, B * Q, hd)
        k = k.transpose(0, 1).reshape(1, k.shape[1], B * Q, hd)
        v = v.transpose(0, 1).reshape(1, v.shape[1], B * Q, hd)
    if cache is not None:
        k_c, v_c = cache.layers[layer]
        k, v = torch.cat([k_c, k], dim=2), torch.cat([v_c, v], dim=2)
    kwargs = {}
    if k.shape[1] != H:
        if sdpa_has_gqa():
            kwargs["enable_gqa"] = True
        else:
            rep = H // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    mask = plan.sdpa_mask(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False, **kwargs)
    if plan.fold:  # (1, H, B*Q, hd) -> (B, Q, H*hd)
        return out[0].view(H, B, Q, hd).permute(1, 2, 0, 3).reshape(B, Q, H * hd)
    return out.transpose(1, 2).reshape(B, Q, H * hd)
