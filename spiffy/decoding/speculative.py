"""Spiffy (arXiv 2509.18085): auto-speculative drafts from a directed draft graph, verified in one forward.

`SpiffyDecoder` is any base `BlockDecoder` plus two hooks of its acceptance walk (SPEC §5.4):
`propose` instantiates the graph from the anchor (SPEC §5.1) and `accept` looks the new real state up among the
drafts verified in the last forward. Because every committed token comes from `transition` on the true
distribution of the current state, under the same keyed noise, the output equals the base decoder's (SPEC §6) in
the lossless layouts (`exact`, and any layout with the dual cache); `shared` is the paper's near-lossless layout.
With `cross_block=True` (no cache, `exact`), `lookahead` and `continue_across` carry a verified complete draft's
next-block logits into the next block, saving its first forward (SPEC §5.4, optional).

On SDAR (block-causal, SPEC §12) drafts are extra block rows against the exact cache, so every layout is exact.
`fuse_store=True` keeps complete drafts: when the block finishes on one, its K/V come from the verifying forward
instead of a store forward (`stored_row`), and with the base option `fuse_next` that forward also carries the next
block's rows, so the next block starts without a forward of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from spiffy.decoding.block_decoder import BlockDecoder, Verified
from spiffy.decoding.config import GenerationConfig
from spiffy.decoding.drafting import (
    GraphTensors,
    instantiate,
    pair_probabilities,
    prune_rows,
    rank_tables,
    subset,
)
from spiffy.decoding.modes import check_cross_block, effective_layout, get_cache_mode, get_layout
from spiffy.decoding.sampling import sampling_logits
from spiffy.graph.builtin import resolve_graph
from spiffy.graph.draft_graph import DraftGraph
from spiffy.graph.provenance import warn_if_mismatched
from spiffy.models.loading import ModelSpec

DRAFT_NOISE = ("none", "keyed")


@dataclass(frozen=True)
class Speculation:
    """Spiffy's settings: the draft graph (a `DraftGraph`, a JSON path or a spec such as `"chain:5"`) and the
    verification layout."""

    graph: DraftGraph | str
    verify: str = "exact"
    prune: int | None = None  # keep only the best `prune` nodes per forward (SPEC §5.6)
    # "keyed": rank tokens/positions under future steps' keyed noise (§5.7)
    draft_noise: str = "none"
    # continue the walk across a block boundary when the complete state was a verified draft (SPEC §5.4,
    # optional; cache="none" with verify="exact" only): saves the next block's first forward
    cross_block: bool = False
    # SDAR only (SPEC §12): store a finished block's K/V from the forward that verified it as a draft
    fuse_store: bool = False

    def __post_init__(self) -> None:
        get_layout(self.verify)
        if self.draft_noise not in DRAFT_NOISE:
            raise ValueError(f"draft_noise={self.draft_noise!r} must be one of {list(DRAFT_NOISE)}")
        if self.prune is not None and (not isinstance(self.prune, int) or self.prune < 1):
            raise ValueError(f"prune={self.prune!r} must be None or a positive integer")
        for name in ("cross_block", "fuse_store"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        object.__setattr__(self, "graph", resolve_graph(self.graph))


class SpiffyDecoder(BlockDecoder):
    """Speculative wrapper over the base configuration `cfg`; same output, fewer forwards."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: GenerationConfig,
        speculation: Speculation,
        spec: ModelSpec | None = None,
    ):
        super().__init__(model, cfg, spec)
        self.speculation = speculation
        self.graph = speculation.graph
        warn_if_mismatched(self.graph, cfg, speculation.draft_noise)
        # the layout the cache mode runs (the dual and block-causal caches verify each draft as its own
        # query block)
        self.verify = effective_layout(cfg.cache, speculation.verify)
        if speculation.cross_block:
            check_cross_block(cfg.cache, speculation.verify)
        if speculation.fuse_store and not get_cache_mode(cfg.cache).stores_blocks:
            raise ValueError(
                f"fuse_store=True needs a block-causal (SDAR) model and rule, got rule={cfg.rule!r}"
            )
        # one (graph, tensors) per phase of a phased graph (drafts chosen by the masked count), else one
        keyed = speculation.draft_noise == "keyed"
        self._phases = [
            (lo, g, GraphTensors.from_graph(g, self.device, keyed=keyed))
            for lo, g in self.graph.phase_graphs()
        ]
        self._tensors = self._phases[0][2]
        self._max_level = max(
            (int(t.pair_level.max()) for _, g, t in self._phases if g.nodes), default=1
        )

    def propose(self, anchor, state, ctx, step, stats):
        t = time.perf_counter()
        graph, tensors = self.graph, self._tensors
        if len(self._phases) > 1:
            masked = int((state == self.spec.mask_id).sum())
            _, graph, tensors = next(p for p in reversed(self._phases) if p[0] <= masked)
        pos_by_rank, top_tokens = rank_tables(
            anchor,
            state,
            ctx,
            tensors.max_token_rank,
            step=step,
            levels=self._max_level,
            keyed=self.speculation.draft_noise == "keyed",
        )
        keep = self.speculation.prune
        if keep is not None and keep < len(graph.nodes):  # dynamic pruning (SPEC §5.6)
            probs = torch.softmax(sampling_logits(anchor, ctx), dim=-1)
            pair_probs = pair_probabilities(tensors, pos_by_rank, top_tokens, probs)
            tensors = subset(tensors, prune_rows(tensors, pair_probs, graph, keep))
        keep_complete = self.speculation.fuse_store or (
            self.speculation.cross_block and ctx.block < self.cfg.num_blocks - 1
        )
        drafts, levels = instantiate(
            tensors, pos_by_rank, top_tokens, state, self.spec.mask_id, keep_complete=keep_complete
        )
        for level in levels.tolist():
            stats.drafted_per_level[level] += 1
        stats.drafts_verified += drafts.shape[0]
        stats.draft_s += time.perf_counter() - t
        return drafts, levels

    def _match(self, new, verified: Verified, stats) -> int | None:
        """Index of the verified draft equal to `new` (counted as accepted at its level), or None."""
        if verified.states.shape[0] == 0:
            return None
        match = (verified.states == new).all(dim=1).nonzero()
        if match.numel() == 0:
            return None
        i = int(match[0, 0])
        stats.accepted_per_level[int(verified.levels[i])] += 1
        return i

    def accept(self, new, state, dist, verified: Verified, stats):
        t = time.perf_counter()
        try:
            if torch.equal(new, state):  # nothing committed: same state, same distribution
                return dist
            i = self._match(new, verified, stats)
            return None if i is None else verified.logits[i]
        finally:
            stats.bookkeeping_s += time.perf_counter() - t

    def make_strategy(self):
        strategy = super().make_strategy()
        if self.speculation.fuse_store:  # keep the verified rows' K/V to store a finished draft
            strategy.keep_kv = True
        return strategy

    def stored_row(self, new, verified: Verified, stats):
        if not self.speculation.fuse_store:
            return None
        i = self._match(new, verified, stats)
        return None if i is None else i + 1  # row 0 is the real state

    def lookahead(self, canvas, block, drafts):
        if (
            self.cfg.cache == "block_causal"
        ):  # both fusions: carry the next block where a draft completes
            if not (self.speculation.fuse_store and self.cfg.fuse_next):
                return None
            complete = (drafts != self.spec.mask_id).all(dim=1).any()
            if block.stop >= canvas.numel() or not bool(complete):
                return None
            return slice(block.stop, block.stop + self.cfg.block_length)
        if not self.speculation.cross_block or drafts.shape[0] == 0 or block.stop >= canvas.numel():
            return None
        return slice(block.stop, block.stop + self.cfg.block_length)

    def continue_across(self, new, verified: Verified, strategy, stats):
        if strategy.lookahead_logits is None:
            return None
        t = time.perf_counter()
        i = self._match(new, verified, stats)
        stats.bookkeeping_s += time.perf_counter() - t
        return None if i is None else strategy.lookahead_logits[i]
