"""Key/value caches and the attention over them (SPEC §4, §5.3).

A `KVCache` holds post-RoPE keys and values of canvas positions, one `(k, v)` pair per layer, with batch 1: one
frozen cache shared by every block state verified in a forward. Queries attend to `[cached keys, fresh keys]`:

* prefix cache: the cache holds positions `[0, s)`; queries are `[s, L)`.
* dual cache:   the cache holds the whole canvas; queries are the block `[s, e)`; the cached block columns
  `[insert_at, insert_at + replace)` are masked out (the block's own K/V are always recomputed).

With a cache, attention runs in two parts merged by their log-sum-exp: every query row of every state (drafts
folded into one query axis) against the shared cache, and each state's rows against that state's own fresh keys
(batched over states). So no row copies the cache, no draft sees another (SPEC §5.3 constraints), and a row's
arithmetic does not depend on how many states share the forward (batch-invariant, so a draft's distribution
equals the base decoder's computation of the same state bit for bit, in every dtype). Grouped-query heads are
grouped, never repeated. Without a cache (full canvases) it is SDPA, with `enable_gqa` when torch has it.

Forwards never write into a cache (`append_kv` builds a new one: SDAR's stored blocks). Shifted-logit families (Dream) also keep `boundary_logits`, the block-start
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
    """How B rows of Q queries attend in one forward; built once per forward, shared by every layer.

    Without a cache `mask` is SDPA's bool mask (B, 1, Q, K). With one, `cached` (B, Q, L_c) or (L_c,) says which
    cached keys each query sees and `own` (B, Q, Q) which of its own fresh keys (None: all)."""

    batch: int
    mask: torch.Tensor | None = None
    cached: torch.Tensor | None = None
    own: torch.Tensor | None = None
    _additive: dict = field(default_factory=dict, compare=False, repr=False)

    def additive(self, name: str, dtype: torch.dtype, groups: int = 1) -> torch.Tensor | None:
        """A bool mask as an additive float mask in `dtype`, shaped for its part; converted once per plan."""
        key = (name, dtype, groups)
        if key not in self._additive:
            mask = getattr(self, name)
            if mask is None:
                self._additive[key] = None
            else:
                out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
                out.masked_fill_(~mask, float("-inf"))
                if name == "cached" and mask.dim() == 3:  # rows (b, g, q) of the folded query axis
                    b, q, n = mask.shape
                    out = out[:, None].expand(b, groups, q, n).reshape(1, 1, b * groups * q, n)
                elif name == "own":  # (B, 1, G*Q, Q)
                    b, q, n = mask.shape
                    out = out[:, None].expand(b, groups, q, n).reshape(b, 1, groups * q, n)
                self._additive[key] = out
        return self._additive[key]


def plan_attention(
    cache: KVCache | None,
    batch: int,
    q_len: int,
    attention_mask: torch.Tensor | None,
    device: torch.device,
) -> AttentionPlan:
    """The attention masks of a forward. `attention_mask` (B, Q, K) uses keys `[cache (L_c), own fresh (Q)]`."""
    if cache is None:
        return AttentionPlan(
            batch, mask=None if attention_mask is None else attention_mask[:, None]
        )
    if attention_mask is None:
        if batch not in cache._masks:
            cache._masks[batch] = AttentionPlan(
                batch, cached=cache.visible(device) if cache.replace else None
            )
        return cache._masks[batch]
    n_cache = cache.length
    cached = attention_mask[:, :, :n_cache]
    if cache.replace:
        cached = cached & cache.visible(device)
    return AttentionPlan(batch, cached=cached, own=attention_mask[:, :, n_cache:])


@functools.cache
def sdpa_has_gqa() -> bool:
    """Whether this torch's SDPA accepts `enable_gqa` (torch >= 2.5); else heads are repeated by hand."""
    q, kv = torch.zeros(1, 2, 1, 2), torch.zeros(1, 1, 1, 2)
    try:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    except (TypeError, RuntimeError):
        return False
    return True


def _part(q, k, v, mask, scale):
    """Attention of q (B, H_kv, M, hd) over k, v (B, H_kv, K, hd) under an additive mask: output and lse."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.matmul(torch.exp(scores - lse), v), lse


def bidirectional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan | torch.Tensor | None,
    cache: KVCache | None,
    layer: int,
) -> torch.Tensor:
    """Attention of fresh queries (B, H, Q, hd) over `[cache, fresh K/V (B, H_kv, Q, hd)]` under `plan`;
    returns (B, Q, H * hd). Scaled by 1/sqrt(hd), no causal mask: the attention of LLaDA and Dream.
    A bool mask (B, Q, K) or None instead of a plan is planned here (per layer: prefer one plan per forward)."""
    B, H, Q, hd = q.shape
    if not isinstance(plan, AttentionPlan):
        plan = plan_attention(cache, B, Q, plan, q.device)
    if cache is None:
        kwargs = {}
        if k.shape[1] != H:
            if sdpa_has_gqa():
                kwargs["enable_gqa"] = True
            else:
                rep = H // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=plan.mask, is_causal=False, **kwargs
        )
        return out.transpose(1, 2).reshape(B, Q, H * hd)
    dtype = q.dtype
    work = (
        torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    )  # as SDPA accumulates
    kv_heads = k.shape[1]
    g = H // kv_heads
    scale = hd**-0.5
    qg = q.to(work).view(B, kv_heads, g, Q, hd)
    out_o, lse_o = _part(  # each state's rows against its own fresh keys
        qg.reshape(B, kv_heads, g * Q, hd),
        k.to(work),
        v.to(work),
        plan.additive("own", work, g),
        scale,
    )
    out_o, lse_o = out_o.view(B, kv_heads, g, Q, hd), lse_o.view(B, kv_heads, g, Q, 1)
    k_c, v_c = cache.layers[layer]
    if k_c.shape[2] == 0:  # an empty prefix (empty prompt): nothing cached to attend to
        return out_o.to(dtype).reshape(B, H, Q, hd).transpose(1, 2).reshape(B, Q, H * hd)
    # part 1: every query row of every state against the shared cache (rows ordered (b, g, q))
    folded = qg.transpose(0, 1).reshape(1, kv_heads, B * g * Q, hd)
    out_c, lse_c = _part(
        folded, k_c.to(work), v_c.to(work), plan.additive("cached", work, g), scale
    )
    out_c = out_c.view(kv_heads, B, g, Q, hd).transpose(0, 1)
    lse_c = lse_c.view(kv_heads, B, g, Q, 1).transpose(0, 1)
    top = torch.maximum(lse_c, lse_o)
    w_c, w_o = torch.exp(lse_c - top), torch.exp(lse_o - top)
    out = (out_c * w_c + out_o * w_o) / (w_c + w_o)
    return out.to(dtype).reshape(B, H, Q, hd).transpose(1, 2).reshape(B, Q, H * hd)


def append_kv(
    cache: KVCache | None,
    present: tuple[tuple[torch.Tensor, torch.Tensor], ...] | list,
    row: int = 0,
) -> KVCache:
    """A new cache holding `cache`'s positions followed by batch row `row` of a forward's fresh K/V
    (`present`, per layer `(B, H_kv, Q, hd)`): storing a finished block of a block-causal model (SPEC §12).
    The input cache is not modified; the result's splice point is its end (queries are appended)."""
    fresh = tuple((k[row : row + 1], v[row : row + 1]) for k, v in present)
    if cache is not None:
        fresh = tuple(
            (torch.cat([kc[:1], k], dim=2), torch.cat([vc[:1], v], dim=2))
            for (kc, vc), (k, v) in zip(cache.layers, fresh, strict=True)
        )
    return KVCache(fresh, insert_at=fresh[0][0].shape[2] if fresh else 0)
