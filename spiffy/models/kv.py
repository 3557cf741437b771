"""Key/value caches and the attention over them (docs/algorithm.md §4, §5.3).

A `KVCache` holds post-RoPE keys and values of canvas positions, one `(k, v)` pair per layer, with batch 1: one
frozen cache shared by every block state verified in a forward. A *stacked* cache (`stack_caches`, batched
decoding of many requests, docs/algorithm.md §13) holds C requests' caches, padded to one length, and serves
`group` consecutive query rows each: row b reads cache `b // group`. Queries attend to `[cached keys, fresh keys]`:

* prefix cache: the cache holds positions `[0, s)`; queries are `[s, L)`.
* dual cache:   the cache holds the whole canvas; queries are the block `[s, e)`; the cached block columns
  `[insert_at, insert_at + replace)` are masked out (the block's own K/V are always recomputed).

With a cache, the attention scores come in two products joined under one softmax: every query row of every state
(drafts folded into one query axis) against the shared cache, and each state's rows against that state's own
fresh keys (batched over states). So no row copies the cache, no draft sees another (docs/algorithm.md §5.3 constraints), and a row's
arithmetic does not depend on how many states share the forward (batch-invariant, so a draft's distribution
equals the base decoder's computation of the same state bit for bit, in every dtype). Grouped-query heads are
grouped, never repeated. Without a cache (full canvases) it is SDPA, with `enable_gqa` when torch has it.

Forwards never write into a cache (`append_kv` builds a new one: SDAR's stored blocks). Shifted-logit families (Dream) also keep `boundary_logits`, the block-start
forward's aligned logits at position `insert_at`: the only cached-out position a query row can need (docs/algorithm.md §9).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from spiffy.models import numerics


@dataclass(frozen=True)
class KVCache:
    """Frozen per-layer keys/values, each `(1, H_kv, L_c, head_dim)`, plus the masked-out block region.

    Stacked (`group > 0`): each `(C, H_kv, L_c, head_dim)`, the caches `parts` zero-padded to one length; which
    keys a row sees then comes only from the call's explicit `attention_mask` (`insert_at = replace = 0`)."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    insert_at: int
    replace: int = 0
    boundary_logits: torch.Tensor | None = None  # (V,) aligned logits at position `insert_at`
    group: int = 0  # stacked caches: query rows per cache (0: one cache for every row)
    parts: tuple[KVCache, ...] = ()  # stacked caches: the request caches, in order
    _masks: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        batch = self.layers[0][0].shape[0] if self.layers else 1
        if self.group == 0 and batch != 1:
            raise ValueError(f"KVCache holds batch 1, got {batch} (stack caches with stack_caches)")
        if self.group and batch != len(self.parts):
            raise ValueError(f"a stacked KVCache of {batch} caches lists {len(self.parts)} parts")

    def boundary(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Boundary logits (M, V) for batch rows `rows` (M,) whose query positions `positions` (M,) start
        their cached-out region (docs/algorithm.md §9); raises `ValueError` where a cache holds none there."""
        parts = self.parts or (self,)
        owner = rows // self.group if self.group else torch.zeros_like(rows)
        out = []
        for c, position in zip(owner.tolist(), positions.tolist(), strict=True):
            part = parts[c]
            if part.boundary_logits is None or part.insert_at != position:
                raise ValueError(
                    f"Dream needs the logits of position {position - 1} for a query at position "
                    f"{position}: pass a KVCache whose boundary_logits are at that position"
                )
            out.append(part.boundary_logits)
        return torch.stack(out)

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
    """How B states of Q query rows attend in one forward; built once per forward, shared by every layer.

    Without a cache `mask` is SDPA's bool mask (B, 1, Q, K). With one, `cached` (B, Q, L_c) or (L_c,) says which
    cached keys each query sees and `own` (B, Q, Q) which of its own fresh keys (None: all)."""

    batch: int
    q_len: int = 0
    mask: torch.Tensor | None = None
    cached: torch.Tensor | None = None
    own: torch.Tensor | None = None
    _additive: dict = field(default_factory=dict, compare=False, repr=False)

    def joint(self, dtype: torch.dtype, groups: int, n_cache: int) -> torch.Tensor | None:
        """The additive mask over `[cached keys, own fresh keys]` for query rows `(g, q)` of each state,
        broadcastable to (B, H_kv, G*Q, L_c + Q); None when every key is visible. Built once per plan."""
        key = (dtype, groups)
        if key not in self._additive:
            if self.own is None and self.cached is None:
                self._additive[key] = None
            elif self.own is None and self.cached.dim() == 1:  # the same visibility for every row
                vis = torch.cat([self.cached, self.cached.new_ones(self.q_len)])
                self._additive[key] = _additive(vis, dtype)
            else:
                b, q = self.batch, self.q_len
                cached = self.cached if self.cached is not None else torch.ones(1, dtype=torch.bool)
                own = self.own if self.own is not None else torch.ones(1, dtype=torch.bool)
                device = (self.cached if self.cached is not None else self.own).device
                both = torch.cat(
                    [
                        cached.to(device).expand(b, q, n_cache),
                        own.to(device).expand(b, q, q),
                    ],
                    dim=2,
                )
                out = _additive(both, dtype)[:, None].expand(b, groups, q, n_cache + q)
                self._additive[key] = out.reshape(b, 1, groups * q, n_cache + q)
        return self._additive[key]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf")
    )


def bidirectional_mask(positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """The default attention of LLaDA and Dream as an explicit bool mask (B, Q, L_c + Q) for query
    positions (B, Q): every visible cached key and every fresh key (batched decoding stacks such masks)."""
    b, q = positions.shape
    own = torch.ones(b, q, q, dtype=torch.bool, device=positions.device)
    if cache is None:
        return own
    return torch.cat([cache.visible(positions.device).expand(b, q, -1), own], dim=2)


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
        if (batch, q_len) not in cache._masks:
            cache._masks[batch, q_len] = AttentionPlan(
                batch, q_len, cached=cache.visible(device) if cache.replace else None
            )
        return cache._masks[batch, q_len]
    n_cache = cache.length
    cached = attention_mask[:, :, :n_cache]
    if cache.replace:
        cached = cached & cache.visible(device)
    return AttentionPlan(batch, q_len, cached=cached, own=attention_mask[:, :, n_cache:])


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
    """Attention of fresh queries (B, H, Q, hd) over `[cache, fresh K/V (B, H_kv, Q, hd)]` under `plan`;
    returns (B, Q, H * hd). Scaled by 1/sqrt(hd), no causal mask: the attention of LLaDA and Dream.
    A bool mask (B, Q, K) or None instead of a plan is planned here (per layer: prefer one plan per forward)."""
    B, H, Q, hd = q.shape
    if not isinstance(plan, AttentionPlan):
        plan = plan_attention(cache, B, Q, plan, q.device)
    if numerics.active():
        return invariant_attention(q, k, v, plan, cache, layer)
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
    k_c, v_c = cache.layers[layer]  # (C, H_kv, L_c, hd): C = 1, or C stacked caches of `group` rows
    n_caches, n_cache = k_c.shape[0], k_c.shape[2]
    rows = B // n_caches
    qg = (q.to(work) * hd**-0.5).view(n_caches, rows, kv_heads, g, Q, hd)
    # scores against the cache, every row of every state of a cache folded into one product (rows (b, g, q))
    folded = qg.transpose(1, 2).reshape(n_caches, kv_heads, rows * g * Q, hd)
    s_c = torch.matmul(folded, k_c.to(work).transpose(-1, -2))  # (C, H_kv, B/C*G*Q, L_c)
    s_c = s_c.view(n_caches, kv_heads, rows, g * Q, n_cache).transpose(1, 2)
    s_c = s_c.reshape(B, kv_heads, g * Q, n_cache)
    # and against each state's own fresh keys (batched over states): one softmax over both
    s_o = torch.matmul(qg.reshape(B, kv_heads, g * Q, hd), k.to(work).transpose(-1, -2))
    scores = torch.cat([s_c, s_o], dim=-1)
    mask = plan.joint(work, g, n_cache)
    if mask is not None:
        scores = scores + mask
    p = torch.softmax(scores, dim=-1)
    p_c = p[..., :n_cache].reshape(n_caches, rows, kv_heads, g * Q, n_cache).transpose(1, 2)
    out_c = torch.matmul(p_c.reshape(n_caches, kv_heads, rows * g * Q, n_cache), v_c.to(work))
    out_c = (
        out_c.view(n_caches, kv_heads, rows, g * Q, hd)
        .transpose(1, 2)
        .reshape(B, kv_heads, g * Q, hd)
    )
    out = out_c + torch.matmul(p[..., n_cache:], v.to(work))  # (B, H_kv, G*Q, hd)
    return out.to(dtype).reshape(B, H, Q, hd).transpose(1, 2).reshape(B, Q, H * hd)


def _round_up(n: int, tile: int) -> int:
    return max(-(-n // tile), 1) * tile


def _pad_dim(t: torch.Tensor, dim: int, size: int, value=0) -> torch.Tensor:
    """`t` padded with `value` at the end of `dim` to `size`."""
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_full(shape, value)], dim=dim)


def invariant_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    cache: KVCache | None,
    layer: int,
) -> torch.Tensor:
    """`bidirectional_attention` in invariant numerics (`spiffy.models.numerics`): a row's arithmetic depends
    neither on the other rows nor on keys that padding or stacking adds after its own.

    Each state's query rows are padded to whole `ROW_TILE` tiles and each key part (the state's own fresh keys,
    then the cache's) to whole `KEY_TILE` chunks (padded keys masked). Scores are products of one shape,
    (ROW_TILE, hd) x (hd, KEY_TILE); the softmax runs row by row over `[own keys, cached keys]` (a masked or
    padded key is an exact 0 there); the output sums the per-chunk products (ROW_TILE, KEY_TILE) x
    (KEY_TILE, hd) left to right, so chunks of padding add exact zeros at the end. Returns (B, Q, H * hd)."""
    B, H, Q, hd = q.shape
    dtype = q.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    rt, kt = numerics.QUERY_TILE, numerics.KEY_TILE
    g = H // k.shape[1]
    qp, lp = _round_up(Q, rt), _round_up(Q, kt)
    keys, vals = _pad_dim(k.to(work), 2, lp), _pad_dim(v.to(work), 2, lp)
    if (
        cache is not None
    ):  # each state's rows read their own cache (stacked caches: row b reads b // group)
        k_c, v_c = cache.layers[layer]
        lc = _round_up(k_c.shape[2], kt)
        owner = torch.arange(B, device=q.device) // (B // k_c.shape[0])
        keys = torch.cat([keys, _pad_dim(k_c.to(work), 2, lc).index_select(0, owner)], dim=2)
        vals = torch.cat([vals, _pad_dim(v_c.to(work), 2, lc).index_select(0, owner)], dim=2)
    if g > 1:
        keys, vals = keys.repeat_interleave(g, dim=1), vals.repeat_interleave(g, dim=1)
    n = keys.shape[2] // kt
    qt = _pad_dim(q.to(work) * hd**-0.5, 2, qp).view(B, H, qp // rt, 1, rt, hd)
    s = torch.matmul(
        qt, keys.view(B, H, 1, n, kt, hd).transpose(-1, -2)
    )  # (B, H, Qp/rt, n, rt, kt)
    s = s.permute(0, 1, 2, 4, 3, 5).reshape(B, H, qp, n * kt)
    mask = _invariant_mask(plan, cache, Q, qp, lp, n * kt, work, q.device)
    p = torch.softmax(s + mask, -1)  # row-wise; adding 0 is exact
    p = p.view(B, H, qp // rt, rt, n, kt).transpose(3, 4)  # (B, H, Qp/rt, n, rt, kt)
    per_chunk = torch.matmul(p, vals.view(B, H, 1, n, kt, hd))  # (B, H, Qp/rt, n, rt, hd)
    out = per_chunk[:, :, :, 0]
    for j in range(1, n):  # left to right: trailing padding adds exact zeros
        out = out + per_chunk[:, :, :, j]
    out = out.reshape(B, H, qp, hd)[:, :, :Q]
    return out.to(dtype).transpose(1, 2).reshape(B, Q, H * hd)


def _invariant_mask(
    plan: AttentionPlan,
    cache: KVCache | None,
    q: int,
    qp: int,
    lp: int,
    total: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The additive mask over keys `[own (padded to lp), cached (padded)]`, (B or 1, 1, qp, total): -inf where a
    row may not look, 0 (or the caller's additive value, no-cache float masks) elsewhere; padded query rows see
    the real own keys (they are dropped). Built once per plan, shared by every layer."""
    key = ("invariant", qp, total, dtype)
    if key not in plan._additive:
        own = plan.own if cache is not None else None if plan.mask is None else plan.mask[:, 0]
        b = 1 if own is None else own.shape[0]
        add = torch.full((b, q, lp), float("-inf"), dtype=dtype, device=device)
        if own is None:
            add[:, :, :q] = 0
        elif own.dtype == torch.bool:
            add[:, :, :q] = _additive(own, dtype)
        else:  # an additive float mask (no cache)
            add[:, :, :q] = own.to(dtype)
        if cache is not None:
            cached = plan.cached
            if cached is None:
                cached = cache.visible(device)
            cached = cached if cached.dim() == 3 else cached[None, None].expand(1, q, -1)
            cached = _additive(_pad_dim(cached, 2, total - lp, False), dtype)
            batch = max(add.shape[0], cached.shape[0])
            add = torch.cat([add.expand(batch, -1, -1), cached.expand(batch, -1, -1)], dim=2)
        padded_rows = torch.zeros(add.shape[0], qp - q, add.shape[2], dtype=dtype, device=device)
        padded_rows[..., lp:] = float("-inf")  # padded rows: own real keys only
        padded_rows[..., q:lp] = float("-inf")
        plan._additive[key] = torch.cat([add, padded_rows], dim=1)[:, None]
    return plan._additive[key]


def append_kv(
    cache: KVCache | None,
    present: tuple[tuple[torch.Tensor, torch.Tensor], ...] | list,
    row: int = 0,
) -> KVCache:
    """A new cache holding `cache`'s positions followed by batch row `row` of a forward's fresh K/V
    (`present`, per layer `(B, H_kv, Q, hd)`): storing a finished block of a block-causal model (docs/algorithm.md §12).
    The input cache is not modified; the result's splice point is its end (queries are appended)."""
    fresh = tuple((k[row : row + 1], v[row : row + 1]) for k, v in present)
    if cache is not None:
        fresh = tuple(
            (torch.cat([kc[:1], k], dim=2), torch.cat([vc[:1], v], dim=2))
            for (kc, vc), (k, v) in zip(cache.layers, fresh, strict=True)
        )
    return KVCache(fresh, insert_at=fresh[0][0].shape[2] if fresh else 0)


def stack_caches(caches: list[KVCache], group: int) -> KVCache:
    """One stacked cache over the request caches `caches` (each batch 1), zero-padded to the longest, for a
    forward whose consecutive `group` query rows belong to each cache in turn (batched decoding). Which keys a
    row sees (the padding, a recomputed block) must come with the call's `attention_mask`."""
    longest = max(c.length for c in caches)
    layers = []
    for per_layer in zip(*(c.layers for c in caches), strict=True):
        pair = []
        for j in (0, 1):
            first = per_layer[0][j]
            out = first.new_zeros((len(caches), *first.shape[1:2], longest, first.shape[3]))
            for c, kv in enumerate(per_layer):
                out[c, :, : kv[j].shape[2]] = kv[j][0]
            pair.append(out)
        layers.append(tuple(pair))
    return KVCache(tuple(layers), insert_at=0, group=group, parts=tuple(caches))
