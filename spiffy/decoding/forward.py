"""Forward strategies: how the distribution of one or many block states is computed (SPEC §4, §5.3).

Every strategy has two calls, each one model forward (one NFE):

* `begin_block(canvas, block)`: the block-start forward on the full canvas (cache refresh in cache modes);
  returns the block's logits.
* `block_logits(canvas, block, states, verify)`: the distributions of `N` block states in one forward. Row 0
  is the real state, rows 1.. are Spiffy's drafts. With `N = 1` this is the base decoder's step.

Layouts (SPEC §5.3): `exact` gives every state its own row (batch), so each state's logits equal a separate
forward; `shared` appends drafts after one canvas and reuses the block's position ids (the paper's layout,
near-lossless). With the dual cache every state is a query block against the frozen cache, which is exact, so
`verify` is ignored. No forward writes into a cache. Timings of the mask building are reported separately.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from spiffy.models.kv import KVCache


@dataclass
class ForwardTimer:
    """Seconds spent in model calls and in building attention masks / position ids."""

    model_s: float = 0.0
    mask_s: float = 0.0
    query_tokens: int = 0
    draft_query_tokens: int = 0
    calls: int = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForwardStrategy:
    """Base class: owns the model, the timer and the cache of the current block."""

    name = "none"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.timer = ForwardTimer()
        self.cache: KVCache | None = None
        self.lookahead_logits: torch.Tensor | None = None

    def _no_lookahead(self, lookahead: slice | None) -> None:
        if lookahead is not None:
            raise ValueError(f"cache={self.name!r}: cross-block lookahead needs cache='none'")

    def _call(self, input_ids: torch.Tensor, draft_rows: int = 0, **kwargs):
        """One model forward (one NFE); `draft_rows` of its query rows belong to drafts."""
        self.timer.draft_query_tokens += draft_rows
        _sync(input_ids.device)
        t = time.perf_counter()
        with torch.no_grad():
            out = self.model(input_ids, **kwargs)
        _sync(input_ids.device)
        self.timer.model_s += time.perf_counter() - t
        self.timer.calls += 1
        self.timer.query_tokens += input_ids.numel()
        return out

    def _timed_mask(self, build, *args):
        t = time.perf_counter()
        out = build(*args)
        self.timer.mask_s += time.perf_counter() - t
        return out

    def begin_block(self, canvas: torch.Tensor, block: slice) -> torch.Tensor:
        """Full-canvas forward at block start; returns block logits (Lb, V)."""
        out = self._call(canvas[None], return_kv=self.name != "none")
        self._keep_cache(out, block)
        return out.logits[0, block]

    def _keep_cache(self, out, block: slice) -> None:
        self.cache = None

    def block_logits(
        self,
        canvas: torch.Tensor,
        block: slice,
        states: torch.Tensor,
        verify: str = "exact",
        lookahead: slice | None = None,
    ) -> torch.Tensor:
        """Logits (N, Lb, V) of the block states `states` (N, Lb); `canvas` holds row 0's state.

        `lookahead` (no cache, exact layout only): also keep the logits of these positions (the next block) of
        every draft row in `self.lookahead_logits` (N - 1, Lb', V). A complete draft's next-block logits are
        that block's first-forward distribution (SPEC §5.4, optional cross-block continuation).
        """
        raise NotImplementedError


def shared_layout_mask(
    n_context: int, blocked: slice, n_drafts: int, block_len: int, n_prefix: int = 0
) -> torch.Tensor:
    """Attention mask (Q, K) of the appended-drafts layout (SPEC §5.3 `shared`).

    Keys are `[prefix (n_prefix), context rows (n_context), drafts (n_drafts * block_len)]`; queries are the
    context rows then the drafts. Context rows see the prefix and the context. Draft `d` sees the prefix, the
    context except `blocked` (the real block it replaces, relative to the context rows) and itself.
    """
    n_draft_rows = n_drafts * block_len
    q = n_context + n_draft_rows
    mask = torch.zeros(q, n_prefix + q, dtype=torch.bool)
    mask[:, :n_prefix] = True
    mask[:n_context, n_prefix : n_prefix + n_context] = True
    ctx_visible = torch.ones(n_context, dtype=torch.bool)
    ctx_visible[blocked] = False
    mask[n_context:, n_prefix : n_prefix + n_context] = ctx_visible
    for d in range(n_drafts):
        rows = slice(n_context + d * block_len, n_context + (d + 1) * block_len)
        cols = slice(n_prefix + rows.start, n_prefix + rows.stop)
        mask[rows, cols] = True
    return mask


def _shared_inputs(
    context: torch.Tensor,
    context_pos: torch.Tensor,
    block_rel: slice,
    drafts: torch.Tensor,
    block_pos: torch.Tensor,
    n_prefix: int,
):
    n_drafts, block_len = drafts.shape
    ids = torch.cat([context, drafts.reshape(-1)])[None]  # (1, Q)
    pos = torch.cat([context_pos, block_pos.repeat(n_drafts)])[None]  # (1, Q)
    mask = shared_layout_mask(context.numel(), block_rel, n_drafts, block_len, n_prefix)
    return ids, pos, mask.to(context.device)[None]


class NoCache(ForwardStrategy):
    """Full-canvas recomputation at every step (the reference decoders)."""

    name = "none"

    def block_logits(self, canvas, block, states, verify="exact", lookahead=None):
        n = states.shape[0]
        if lookahead is not None and verify != "exact":
            raise ValueError(f"verify={verify!r}: cross-block lookahead needs the exact layout")
        if verify == "shared" and n > 1:
            positions = torch.arange(canvas.numel(), device=canvas.device)
            ids, pos, mask = self._timed_mask(
                _shared_inputs, canvas, positions, block, states[1:], positions[block], 0
            )
            lb = states.shape[1]
            logits = self._call(ids, (n - 1) * lb, position_ids=pos, attention_mask=mask).logits[0]
            return torch.cat([logits[block][None], logits[canvas.numel() :].view(n - 1, lb, -1)])
        rows = canvas.repeat(n, 1)  # (N, L)
        rows[:, block] = states
        logits = self._call(rows, (n - 1) * canvas.numel()).logits
        self.lookahead_logits = logits[1:, lookahead].clone() if lookahead is not None else None
        return logits[:, block]


class PrefixCache(ForwardStrategy):
    """Fast-dLLM prefix cache: keep the block-start forward's K/V of positions before the block."""

    name = "prefix"

    def _keep_cache(self, out, block):
        cache = KVCache(tuple(out.present), insert_at=0, logits=out.logits)
        self.cache = cache.slice_positions(block.start)

    def block_logits(self, canvas, block, states, verify="exact", lookahead=None):
        self._no_lookahead(lookahead)
        n, lb = states.shape
        s = block.start
        positions = torch.arange(s, canvas.numel(), device=canvas.device)
        if verify == "shared" and n > 1:
            ids, pos, mask = self._timed_mask(
                _shared_inputs, canvas[s:], positions, slice(0, lb), states[1:], positions[:lb], s
            )
            logits = self._call(
                ids, (n - 1) * lb, position_ids=pos, attention_mask=mask, kv_cache=self.cache
            ).logits[0]
            ctx = canvas.numel() - s
            return torch.cat([logits[:lb][None], logits[ctx:].view(n - 1, lb, -1)])
        rows = canvas[s:].repeat(n, 1)  # (N, L - s)
        rows[:, :lb] = states
        return self._call(
            rows, (n - 1) * rows.shape[1], position_ids=positions, kv_cache=self.cache
        ).logits[:, :lb]


class DualCache(ForwardStrategy):
    """Fast-dLLM dual cache: queries are block states against frozen prefix and suffix K/V."""

    name = "dual"

    def _keep_cache(self, out, block):
        self.cache = KVCache(
            tuple(out.present),
            insert_at=block.start,
            replace=block.stop - block.start,
            logits=out.logits,
        )

    def block_logits(self, canvas, block, states, verify="exact", lookahead=None):
        self._no_lookahead(lookahead)
        positions = torch.arange(block.start, block.stop, device=canvas.device)
        return self._call(
            states,
            (states.shape[0] - 1) * states.shape[1],
            position_ids=positions,
            kv_cache=self.cache,
        ).logits


STRATEGIES: dict[str, type[ForwardStrategy]] = {
    "none": NoCache,
    "prefix": PrefixCache,
    "dual": DualCache,
}
