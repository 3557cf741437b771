"""Key/value caches that a query block attends to (SPEC §4, §5.3).

A `KVCache` holds post-RoPE keys and values for some canvas positions, one `(k, v)` pair per layer.
A forward that receives a cache *splices* its freshly computed keys into the cached sequence:
`keys = cache[:insert_at] ++ new ++ cache[insert_at + replace:]`. Both cache modes are this one rule:

* prefix cache: the cache holds positions `[0, s)`; queries are `[s, L)`; `insert_at = s`, `replace = 0`.
* dual cache:   the cache holds the whole canvas; queries are the block `[s, e)`;
  `insert_at = s`, `replace = e - s` (the block's own K/V are always recomputed).

Forwards never write into a cache: drafts and real-state steps only read it (SPEC §5.3 constraints).
The cache also keeps the block-start forward's logits, which shifted-logit families (Dream) need for the
first query position (SPEC §9).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class KVCache:
    """Frozen per-layer keys/values, each `(B, H_kv, L_c, head_dim)`, plus the splice point."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    insert_at: int
    replace: int = 0
    logits: torch.Tensor | None = None  # (1, L, V) the block-start forward's aligned logits

    @property
    def length(self) -> int:
        """Number of cached key positions."""
        return self.layers[0][0].shape[2] if self.layers else 0

    def keys_after_splice(self, num_new: int) -> int:
        """Total key length seen by a query block of `num_new` fresh positions."""
        return self.length - self.replace + num_new

    def splice(
        self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the full key/value sequences for `layer` with the fresh K/V spliced in."""
        k_c, v_c = self.layers[layer]
        batch = k_new.shape[0]
        if k_c.shape[0] != batch:  # one cache shared by every draft row
            k_c = k_c.expand(batch, *k_c.shape[1:])
            v_c = v_c.expand(batch, *v_c.shape[1:])
        lo, hi = self.insert_at, self.insert_at + self.replace
        k = torch.cat([k_c[:, :, :lo], k_new, k_c[:, :, hi:]], dim=2)
        v = torch.cat([v_c[:, :, :lo], v_new, v_c[:, :, hi:]], dim=2)
        return k, v

    def with_splice(self, insert_at: int, replace: int) -> KVCache:
        """The same cached tensors with another splice point."""
        return KVCache(self.layers, insert_at, replace, self.logits)

    def slice_positions(self, end: int) -> KVCache:
        """Keep only cached positions `[0, end)` (the prefix cache)."""
        layers = tuple((k[:, :, :end], v[:, :, :end]) for k, v in self.layers)
        return KVCache(layers, insert_at=end, replace=0, logits=self.logits)


def bidirectional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: KVCache | None,
    layer: int,
) -> torch.Tensor:
    """SDPA of fresh queries (B, H, Q, hd) over the cache spliced with the fresh K/V (B, H_kv, Q, hd),
    grouped-query heads repeated, an optional boolean mask (B, Q, K); returns (B, Q, H * hd).
    Scaled by 1/sqrt(hd), no causal mask: the attention of LLaDA and Dream."""
    if cache is not None:
        k, v = cache.splice(layer, k, v)
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    mask = attention_mask[:, None] if attention_mask is not None else None  # (B, 1, Q, K)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


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
