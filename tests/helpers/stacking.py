"""Cases the stacking tests share: a request whose decode fails (the engine and `generate_batch` must keep it to
itself), and several requests' cached attention rows stacked into one call (`spiffy.models.kv.stack_caches`)."""

from __future__ import annotations

import torch

from spiffy.models.kv import KVCache, stack_caches


def fail_request_1_in_block_2(decoder) -> None:
    """Make `decoder` raise "request 1 fails in its second block" when request 1 enters its second block."""
    original = decoder.enter_block

    def failing(state, carry):
        if state.request_id == 1 and state.index == 1:
            raise RuntimeError("request 1 fails in its second block")
        return original(state, carry)

    decoder.enter_block = failing


def stacked_attention_case(rand, cases, *, group=3, heads=4, kv_heads=2, hd=8, q=3, device="cpu"):
    """Requests with caches of the given (cache length, query rows) `cases`, drawn by `rand(*shape)`, each padded
    to `group` rows (copies of its first row, masked like it) and stacked into one call. Returns (caches, queries,
    fresh K, stacked cache, stacked queries, stacked K, mask): request c's rows are `c * group` onwards."""
    caches, queries, fresh = [], [], []
    for length, rows in cases:
        layers = ((rand(1, kv_heads, length, hd), rand(1, kv_heads, length, hd)),)
        caches.append(KVCache(layers, insert_at=length))
        queries.append(rand(rows, heads, q, hd))
        fresh.append(rand(rows, kv_heads, q, hd))
    stacked = stack_caches(caches, group)
    mask = torch.zeros(len(cases) * group, q, stacked.length + q, dtype=torch.bool, device=device)
    qs, ks = [], []
    for c, (cache, qq, kk) in enumerate(zip(caches, queries, fresh)):
        pad = group - qq.shape[0]
        qs.append(torch.cat([qq, qq[:1].expand(pad, -1, -1, -1)]))
        ks.append(torch.cat([kk, kk[:1].expand(pad, -1, -1, -1)]))
        mask[c * group : (c + 1) * group, :, : cache.length] = True
        mask[c * group : (c + 1) * group, :, stacked.length :] = True
    return caches, queries, fresh, stacked, torch.cat(qs), torch.cat(ks), mask
