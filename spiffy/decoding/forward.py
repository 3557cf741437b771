"""Forward strategies: how the distribution of one or many block states is computed (docs/algorithm.md §4, §5.3).

Every strategy has two calls, each one model forward (one NFE):

* `begin_block(canvas, block)`: the block-start forward on the full canvas (cache refresh in cache modes);
  returns the block's logits.
* `verify(canvas, block, states, layout, lookahead)`: the distributions of `N` block states in one forward.
  Row 0 is the real state, rows 1.. are Spiffy's drafts. With `N = 1` this is the base decoder's step.

Each call exists in two forms: `begin_block_call` / `verify_call` return a `Pending` (the `ModelCall`, not yet run,
and what turns its output into the result), which the decoder's step function hands to whoever runs model
calls (the engine stacks many requests' calls into one forward, docs/algorithm.md §13); `begin_block` / `verify`
run the call at once (`run`, alone, timed). `execute` is the one place a strategy runs the model itself.

Layouts (docs/algorithm.md §5.3): `exact` gives every state its own row (batch), so each state's logits equal a separate
forward; `shared` appends drafts after one canvas and reuses the block's position ids (the paper's layout,
near-lossless). With a cache, every row attends to one shared frozen cache (drafts folded into the query axis,
`spiffy.models.kv`); with the dual cache each state is a query block against it, which is exact, so the layout
is ignored. The model projects logits only at the rows read (`logits_at`): the block, plus the next block for
the cross-block look-ahead, and caches keep only the block-start logits a later step reads (Dream's boundary).
No forward writes into a cache and none reads the device back. Model time is measured with the host clock on
CPU, with CUDA events only when `profile=True` on a GPU (else it is not measured: NaN).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from spiffy.decoding.batching import ModelCall
from spiffy.models import numerics
from spiffy.models.base import DiffusionLM, DiffusionLMOutput
from spiffy.models.kv import KVCache


@dataclass
class ForwardTimer:
    """Seconds spent in model calls and in building attention masks / position ids; query rows sent."""

    model_s: float = 0.0
    mask_s: float = 0.0
    query_tokens: int = 0
    draft_query_tokens: int = 0
    _events: list = field(default_factory=list, repr=False)

    def resolve(self) -> None:
        """Add the elapsed time of recorded CUDA event pairs (one synchronisation, at the end)."""
        if self._events:
            self._events[-1][1].synchronize()
            self.model_s += sum(a.elapsed_time(b) for a, b in self._events) / 1000
            self._events.clear()


@dataclass
class Verification:
    """One forward's distributions: block logits (N, Lb, V) per state, and with the look-ahead the next
    block's logits (N, Lb', V) per state (docs/algorithm.md §5.4 optional continuation), else None."""

    logits: torch.Tensor
    lookahead: torch.Tensor | None = None


@dataclass
class Pending:
    """A model call a strategy made (not yet run) and `finish`, which turns its output into the call's result
    (and updates the strategy's cache, if the call fills one)."""

    call: ModelCall
    finish: Callable[[DiffusionLMOutput], Any]


class ForwardStrategy:
    """Base class: owns the model, the timer and the cache of the current block.

    Capabilities: `returns_kv` (the block-start forward fills a cache), `stores_blocks` (SDAR's exact cache:
    a prefill and one store per finished block, `prefill_call` / `store_call`). `block_length` is the
    decoder's (used by the block-causal cache only)."""

    name = "none"
    returns_kv = False
    stores_blocks = False

    def __init__(
        self,
        model: DiffusionLM,
        *,
        profile: bool = False,
        compile: bool = False,
        min_rows: int = 0,
        keep_kv: bool = False,
        block_length: int | None = None,
        invariant: bool = False,
    ):
        if keep_kv and not self.stores_blocks:
            raise ValueError(f"keep_kv=True needs a block-causal cache, got cache={self.name!r}")
        self.model = model
        self.min_rows = min_rows
        call = torch.compile(model, dynamic=None) if compile else model
        self._call_model = numerics.wrap(call, invariant)  # invariant numerics: docs/numerics.md
        self.timer = ForwardTimer()
        self.cache: KVCache | None = None
        self.profile = profile

    def _call(self, input_ids: torch.Tensor, draft_rows: int = 0, **kwargs) -> ModelCall:
        """One model call (one NFE), not run yet; `draft_rows` of its query rows belong to drafts."""
        self.timer.draft_query_tokens += draft_rows
        self.timer.query_tokens += input_ids.numel()
        return ModelCall(0, input_ids, kwargs)

    def execute(self, call: ModelCall) -> DiffusionLMOutput:
        """Run one call alone (timed) and keep its output on the call (`call.out`)."""
        on_gpu = call.input_ids.device.type == "cuda"
        if on_gpu and not self.profile:
            self.timer.model_s = float("nan")
            with torch.no_grad():
                call.out = self._call_model(call.input_ids, **call.kwargs)
            return call.out
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            with torch.no_grad():
                call.out = self._call_model(call.input_ids, **call.kwargs)
            end.record()
            self.timer._events.append((start, end))
            return call.out
        t = time.perf_counter()
        with torch.no_grad():
            call.out = self._call_model(call.input_ids, **call.kwargs)
        self.timer.model_s += time.perf_counter() - t
        return call.out

    def run(self, pending: Pending | None):
        """The result of a pending call, run alone now (None: no call was needed)."""
        return None if pending is None else pending.finish(self.execute(pending.call))

    def _timed_mask(self, build, *args):
        t = time.perf_counter()
        out = build(*args)
        self.timer.mask_s += time.perf_counter() - t
        return out

    def begin_block(self, canvas: torch.Tensor, block: slice) -> torch.Tensor:
        """Full-canvas forward at block start; returns block logits (Lb, V)."""
        return self.run(self.begin_block_call(canvas, block))

    def begin_block_call(self, canvas: torch.Tensor, block: slice) -> Pending:
        """`begin_block` as a pending call."""

        def finish(out: DiffusionLMOutput) -> torch.Tensor:
            logits = out.logits[0]
            self._keep_cache(out, block, logits[0])
            return logits

        return Pending(self._call(canvas[None], return_kv=self.returns_kv, logits_at=block), finish)

    def _keep_cache(self, out, block: slice, boundary: torch.Tensor) -> None:
        self.cache = None

    def verify(self, *args, **kwargs) -> Verification:
        """`verify_call` (same arguments) run alone now: the distributions of the block states."""
        return self.run(self.verify_call(*args, **kwargs))

    def verify_call(
        self,
        canvas: torch.Tensor,
        block: slice,
        states: torch.Tensor,
        layout: str = "exact",
        lookahead: int = 0,
    ) -> Pending:
        """The pending call of the distributions of the block states `states` (N, Lb); `canvas` holds row 0's
        state (`verify` runs it alone).

        `lookahead` (no cache, exact layout only): also return the logits of the next `lookahead` positions
        (the next block) of every row. A complete draft's next-block logits are that block's first-forward
        distribution (docs/algorithm.md §5.4, optional cross-block continuation).
        """
        raise NotImplementedError

    def block_logits(self, canvas, block, states, verify: str = "exact") -> torch.Tensor:
        """Logits (N, Lb, V) of the block states (`verify(...).logits`)."""
        return self.verify(canvas, block, states, verify).logits

    def _padded(self, states: torch.Tensor, rows_per_state: int) -> torch.Tensor:
        """`states` plus inert copies of row 0 up to `min_rows` query rows: every forward then multiplies
        matrices of at least that many rows, where this CPU's BLAS gives each row the same result whatever
        the row count (smaller products take another kernel; see `scripts/numerics.py`)."""
        missing = -(-self.min_rows // rows_per_state) - states.shape[0]
        return torch.cat([states, states[:1].expand(missing, -1)]) if missing > 0 else states

    def _no_lookahead(self, lookahead: int) -> None:
        if lookahead:
            raise ValueError(f"cache={self.name!r}: cross-block lookahead needs cache='none'")


def shared_layout_mask(
    n_context: int, blocked: slice, n_drafts: int, block_len: int, n_prefix: int = 0
) -> torch.Tensor:
    """Attention mask (Q, K) of the appended-drafts layout (docs/algorithm.md §5.3 `shared`).

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
    """Ids (1, Q), positions (1, Q), mask (1, Q, K) and the rows to project: the real block, then the drafts."""
    n_drafts, block_len = drafts.shape
    ids = torch.cat([context, drafts.reshape(-1)])[None]  # (1, Q)
    pos = torch.cat([context_pos, block_pos.repeat(n_drafts)])[None]  # (1, Q)
    mask = shared_layout_mask(context.numel(), block_rel, n_drafts, block_len, n_prefix)
    device = context.device
    rows = torch.cat(
        [
            torch.arange(block_rel.start, block_rel.stop, device=device),
            torch.arange(context.numel(), ids.shape[1], device=device),
        ]
    )
    return ids, pos, mask.to(device)[None], rows


class NoCache(ForwardStrategy):
    """Full-canvas recomputation at every step (the reference decoders)."""

    name = "none"

    def verify_call(self, canvas, block, states, layout="exact", lookahead=0):
        n, lb = states.shape
        if lookahead and layout != "exact":
            raise ValueError(f"verify={layout!r}: cross-block lookahead needs the exact layout")
        if layout == "shared" and n > 1:
            positions = torch.arange(canvas.numel(), device=canvas.device)
            ids, pos, mask, rows = self._timed_mask(
                _shared_inputs, canvas, positions, block, states[1:], positions[block], 0
            )
            call = self._call(
                ids, (n - 1) * lb, position_ids=pos, attention_mask=mask, logits_at=rows
            )
            return Pending(call, lambda out: Verification(out.logits[0].view(n, lb, -1)))
        rows = canvas.repeat(n, 1)  # (N, L)
        rows[:, block] = states
        stop = min(block.stop + lookahead, canvas.numel())
        call = self._call(rows, (n - 1) * canvas.numel(), logits_at=slice(block.start, stop))

        def finish(out: DiffusionLMOutput) -> Verification:
            logits = out.logits
            return Verification(logits[:, :lb], logits[:, lb:] if lookahead else None)

        return Pending(call, finish)


class PrefixCache(ForwardStrategy):
    """Fast-dLLM prefix cache: keep the block-start forward's K/V of positions before the block."""

    name = "prefix"
    returns_kv = True

    def _keep_cache(self, out, block, boundary):
        cache = KVCache(tuple(out.present), insert_at=0, boundary_logits=boundary)
        self.cache = cache.slice_positions(block.start)

    def verify_call(self, canvas, block, states, layout="exact", lookahead=0):
        self._no_lookahead(lookahead)
        n, lb = states.shape
        s, length = block.start, canvas.numel()
        if layout == "shared" and n > 1:
            positions = torch.arange(s, length, device=canvas.device)
            ids, pos, mask, rows = self._timed_mask(
                _shared_inputs, canvas[s:], positions, slice(0, lb), states[1:], positions[:lb], s
            )
            call = self._call(
                ids,
                (n - 1) * lb,
                position_ids=pos,
                attention_mask=mask,
                kv_cache=self.cache,
                logits_at=rows,
            )
            return Pending(call, lambda out: Verification(out.logits[0].view(n, lb, -1)))
        padded = self._padded(states, length - s)
        rows = canvas[s:].repeat(padded.shape[0], 1)  # (N, L - s)
        rows[:, :lb] = padded
        call = self._call(
            rows,
            (n - 1) * rows.shape[1],
            position_ids=range(s, length),
            kv_cache=self.cache,
            logits_at=slice(0, lb),
        )
        return Pending(call, lambda out: Verification(out.logits[:n]))


class DualCache(ForwardStrategy):
    """Fast-dLLM dual cache: queries are block states against frozen prefix and suffix K/V."""

    name = "dual"
    returns_kv = True

    def _keep_cache(self, out, block, boundary):
        self.cache = KVCache(
            tuple(out.present),
            insert_at=block.start,
            replace=block.stop - block.start,
            boundary_logits=boundary,
        )

    def verify_call(self, canvas, block, states, layout="exact", lookahead=0):
        self._no_lookahead(lookahead)
        n, lb = states.shape
        call = self._call(
            self._padded(states, lb),
            (n - 1) * lb,
            position_ids=range(block.start, block.stop),
            kv_cache=self.cache,
        )
        return Pending(call, lambda out: Verification(out.logits[:n]))
