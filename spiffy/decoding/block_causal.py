"""The exact block-causal cache (docs/algorithm.md §12): SDAR's finished blocks' K/V, stored once, read by every block query.

With block-causal attention a finished block never sees later positions, so its K/V are final when it is
finished and caching them is exact (not an approximation as in Fast-dLLM's caches, docs/algorithm.md §4). Calls:

* `prefill(canvas, end)`: one forward over the whole prompt blocks `[0, end)` that stores their K/V (none when
  the prompt is shorter than a block);
* `begin_block` / `verify`: query rows of one block (the real state, and Spiffy's drafts as extra batch
  rows) against the cache, storing nothing; each row is exactly its own forward. With `lookahead` every row
  also carries the next block (all masks), which attends to that row's block: its logits are the next block's
  first denoising distribution should that row be the finished state (docs/algorithm.md §12's second fusion), returned in
  `Verification.lookahead`;
* `store_block`: the finished block's K/V enter the cache, from a separate store forward (the reference's
  loop; with `with_next` it also computes the next block's first distribution), or, when the last forward
  already computed them as one of its rows, from that forward at no cost (the first fusion, `keep_kv`; the
  decoder then takes the next block's logits from that row's look-ahead).

A model whose forward attends to every key by default (LLaDA2, whose block length is a decoding setting, not a
config key) gets the block-causal mask of `block_length` explicitly whenever a query spans more than one block.
"""

from __future__ import annotations

import torch

from spiffy.decoding.forward import ForwardStrategy, Pending, Verification
from spiffy.models.base import DiffusionLMOutput
from spiffy.models.kv import append_kv


class BlockCausalCache(ForwardStrategy):
    """SDAR's cache: prefill, block queries that store nothing, one store per finished block.

    `keep_kv`: keep each forward's per-row block K/V, to store a finished draft row (Spiffy's `fuse_store`).
    `block_length`: the decoder's block length (LLaDA2's explicit block-causal mask needs it)."""

    name = "block_causal"
    stores_blocks = True

    def __init__(self, model: torch.nn.Module, *, block_length: int | None = None, **options):
        super().__init__(model, **options)
        self.keep_kv = options.get("keep_kv", False)
        self.last_kv: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
        # LLaDA2 (config attention_block_size 0): block-causal at the decoder's block length, passed as a mask
        self.block_length = block_length
        self.explicit_mask = getattr(model.config, "attention_block_size", None) == 0

    def _mask(self, n: int, start: int, stop: int) -> torch.Tensor | None:
        """Bool mask (n, Q, start + Q) of queries `[start, stop)` over the cache `[0, start)` and themselves:
        block-causal at `block_length` (None when the model's default already is, or one block queries)."""
        if not self.explicit_mask:
            return None
        if self.block_length is None:
            raise ValueError("BlockCausalCache.block_length is unset: LLaDA2's block mask needs it")
        if stop - start <= self.block_length:
            return None
        device = self.model.device
        query = torch.arange(start, stop, device=device) // self.block_length
        keys = torch.arange(stop, device=device) // self.block_length
        return (keys[None, :] <= query[:, None]).expand(n, -1, -1)

    def prefill(self, canvas: torch.Tensor, end: int) -> int:
        """Store the K/V of canvas positions `[0, end)` in one forward; returns the calls made (0 or 1)."""
        pending = self.prefill_call(canvas, end)
        self.run(pending)
        return int(pending is not None)

    def prefill_call(self, canvas: torch.Tensor, end: int) -> Pending | None:
        """`prefill` as a pending call (None: the prompt has no whole block, nothing to store)."""
        self.cache = None
        if end == 0:
            return None

        def finish(out: DiffusionLMOutput) -> None:
            self.cache = out.kv_cache

        mask = self._mask(1, 0, end)
        # nobody reads the prefill's logits: the LM head runs on one row (at a real vocabulary, most of its cost)
        call = self._call(
            canvas[None, :end], store_kv=True, attention_mask=mask, logits_at=slice(end - 1, end)
        )
        return Pending(call, finish)

    def begin_block_call(self, canvas: torch.Tensor, block: slice) -> Pending:
        """The block's first denoising forward: its current state against the cache (no drafts)."""
        pending = self.verify_call(canvas, block, canvas[block][None])
        return Pending(pending.call, lambda out: pending.finish(out).logits[0])

    def verify_call(self, canvas, block, states, layout="exact", lookahead=0):
        """Logits (N, Lb, V) of the block states (N, Lb) against the cache; every layout is exact."""
        n, lb = states.shape
        stop = min(block.stop + lookahead, canvas.numel())
        rows = states
        if stop > block.stop:  # the next block, still all masks on the canvas, after every row
            rows = torch.cat([states, canvas[block.stop : stop].expand(n, -1)], dim=1)
        call = self._call(
            rows,
            (n - 1) * rows.shape[1],
            position_ids=torch.arange(block.start, stop, device=canvas.device),
            kv_cache=self.cache,
            return_kv=self.keep_kv,
            attention_mask=self._mask(n, block.start, stop),
        )

        def finish(out: DiffusionLMOutput) -> Verification:
            self.last_kv = _block_part(out.present, lb) if self.keep_kv else None
            return Verification(
                out.logits[:, :lb], out.logits[:, lb:] if stop > block.stop else None
            )

        return Pending(call, finish)

    def store_block(
        self, canvas: torch.Tensor, block: slice, row: int | None, with_next: bool
    ) -> tuple[int, torch.Tensor | None]:
        """Store the finished block `canvas[block]`: from row `row` of the last forward when it computed it,
        else with a store forward (that also computes the next block's first logits if `with_next`).

        Returns the number of model calls made and the next block's first-forward logits computed by the store
        forward (or None; with a stored row the decoder reads them from that row's look-ahead).
        """
        pending = self.store_call(canvas, block, row, with_next)
        return int(pending is not None), self.run(pending)

    def store_call(
        self, canvas: torch.Tensor, block: slice, row: int | None, with_next: bool
    ) -> Pending | None:
        """`store_block` as a pending call, or None when the last forward's row `row` was stored at no cost."""
        lb = block.stop - block.start
        if row is not None and self.last_kv is not None:
            self.cache = append_kv(self.cache, self.last_kv, row)
            return None
        stop = block.stop + lb if with_next else block.stop
        call = self._call(
            canvas[None, block.start : stop],
            position_ids=torch.arange(block.start, stop, device=canvas.device),
            kv_cache=self.cache,
            return_kv=True,
            attention_mask=self._mask(1, block.start, stop),
            logits_at=slice(lb, stop - block.start)
            if with_next
            else slice(0, 1),  # only what is read
        )

        def finish(out: DiffusionLMOutput) -> torch.Tensor | None:
            self.cache = append_kv(self.cache, _block_part(out.present, lb))
            self.last_kv = None
            return out.logits[0] if with_next else None

        return Pending(call, finish)


def _block_part(present, lb: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Per-layer K/V of the first `lb` query positions (the block, without a lookahead block)."""
    return tuple((k[:, :, :lb], v[:, :, :lb]) for k, v in present)
