"""Spiffy (arXiv 2509.18085): auto-speculative drafts from a directed draft graph, verified in one forward.

`SpiffyDecoder` is any base `BlockDecoder` plus its drafting hooks (docs/algorithm.md §5.4): `propose` / `propose_early`
instantiate the graph from the anchor (docs/algorithm.md §5.1); the base loop's walk looks each new real state up among the
states verified in the last forward. Because every committed token comes from `transition` on the true
distribution of the current state, under the same keyed noise, the output equals the base decoder's (docs/algorithm.md §6) in
the lossless layouts (`exact`, and any layout with the dual cache); `shared` is the paper's near-lossless layout.
With `cross_block=True` (no cache, `exact`), `lookahead` asks the verification forward for the next block's logits
too, and the walk carries a verified complete draft's into the next block, saving its first forward (docs/algorithm.md §5.4,
optional).

On SDAR (block-causal, docs/algorithm.md §12) drafts are extra block rows against the exact cache, so every layout is exact.
`fuse_store=True` keeps complete drafts: when the block finishes on one, its K/V come from the verifying forward
instead of a store forward (`stored_row`), and with the base option `fuse_next` that forward also carries the next
block's rows, so the next block starts without a forward of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spiffy.decoding.block_decoder import BlockDecoder, DecoderOptions
from spiffy.decoding.config import GenerationConfig
from spiffy.decoding.drafting import (
    Drafts,
    GraphTensors,
    instantiate,
    pair_probabilities,
    prune_rows,
    rank_tables,
)
from spiffy.decoding.dynamic import DynamicDrafter
from spiffy.decoding.modes import check_cross_block, effective_layout, get_cache_mode, get_layout
from spiffy.decoding.provenance import warn_if_mismatched
from spiffy.decoding.sampling import Distributions
from spiffy.graph.builtin import resolve_graph
from spiffy.graph.draft_graph import DraftGraph, check_graph_fits
from spiffy.graph.dynamic import DynamicGraph
from spiffy.models.base import DiffusionLM
from spiffy.models.loading import ModelSpec

DRAFT_NOISE = ("none", "keyed")


@dataclass(frozen=True)
class Speculation:
    """Spiffy's settings: the draft graph (a `DraftGraph`, a `DynamicGraph`, a JSON path or a spec such as
    `"chain:5"` or `"dynamic:10"`) and the verification layout."""

    graph: DraftGraph | DynamicGraph | str
    verify: str = "exact"
    prune: int | None = (
        None  # keep only the best `prune` nodes per forward (docs/algorithm.md §5.6)
    )
    # "keyed": rank tokens/positions under future steps' keyed noise (§5.7)
    draft_noise: str = "none"
    # continue the walk across a block boundary when the complete state was a verified draft (docs/algorithm.md §5.4,
    # optional; cache="none" with verify="exact" only): saves the next block's first forward
    cross_block: bool = False
    # SDAR only (docs/algorithm.md §12): store a finished block's K/V from the forward that verified it as a draft
    fuse_store: bool = False

    def __post_init__(self) -> None:
        check_speculation_options(
            verify=self.verify,
            prune=self.prune,
            draft_noise=self.draft_noise,
            cross_block=self.cross_block,
            fuse_store=self.fuse_store,
        )
        object.__setattr__(self, "graph", resolve_graph(self.graph))
        if isinstance(self.graph, DynamicGraph) and self.prune is not None:
            raise ValueError(
                f"prune={self.prune} with a dynamic graph: it already chooses its "
                f"{self.graph.budget} drafts per forward (docs/algorithm.md §5.10)"
            )


def check_speculation_options(**options) -> None:
    """Check `Speculation`'s options other than the graph (ValueError naming the option and its value); the
    Hydra schema calls it too, so a bad `decoder.draft_noise` fails before any model loads."""
    if "verify" in options:
        get_layout(options["verify"])
    noise = options.get("draft_noise", "none")
    if noise not in DRAFT_NOISE:
        raise ValueError(f"draft_noise={noise!r} must be one of {list(DRAFT_NOISE)}")
    prune = options.get("prune")
    if prune is not None and (not isinstance(prune, int) or isinstance(prune, bool) or prune < 1):
        raise ValueError(f"prune={prune!r} must be None or a positive integer")
    for name in ("cross_block", "fuse_store"):
        if not isinstance(options.get(name, False), bool):
            raise ValueError(f"{name}={options[name]!r} must be True or False")


class SpiffyDecoder(BlockDecoder):
    """Speculative wrapper over the base configuration `cfg`; same output, fewer forwards."""

    drafting = True

    def __init__(
        self,
        model: DiffusionLM,
        cfg: GenerationConfig,
        speculation: Speculation,
        spec: ModelSpec | None = None,
        options: DecoderOptions | None = None,
    ):
        super().__init__(model, cfg, spec, options)
        self.speculation = speculation
        self.graph = speculation.graph
        # a token rank beyond the vocabulary fails here, naming the node and the maximum, not as an IndexError
        # in the first forward (a position rank beyond the block is never drafted: harmless, not checked here)
        check_graph_fits(
            self.graph.pool if isinstance(self.graph, DynamicGraph) else self.graph,
            block_length=None,
            vocab_size=self.spec.vocab_size,
            source=f"(selection={self.graph.selection!r}, budget={self.graph.budget})",
        )
        warn_if_mismatched(self.graph, cfg, speculation.draft_noise)
        # the layout the cache mode runs (the dual cache verifies each draft as its own query block)
        self.verify = effective_layout(cfg.cache, speculation.verify)
        if speculation.cross_block:
            check_cross_block(cfg.cache, speculation.verify)
        if speculation.fuse_store and not get_cache_mode(cfg.cache).stores_blocks:
            raise ValueError(
                f"fuse_store=True needs a block-causal (SDAR) model and rule, got rule={cfg.rule!r}"
            )
        if speculation.fuse_store and self.rule.spec.edit is not None:
            raise ValueError(
                f"fuse_store=True with rule={cfg.rule!r}: a complete draft does not end a LLaDA2.1 block "
                "(post calls may still edit it), so drafts keep a mask (docs/llada2.md)"
            )
        self.keep_kv = (
            speculation.fuse_store
        )  # keep the verified rows' K/V to store a finished draft
        self.keyed = speculation.draft_noise == "keyed"
        self._dynamic = None
        if isinstance(
            self.graph, DynamicGraph
        ):  # drafts chosen per forward (docs/algorithm.md §5.10)
            self._dynamic = DynamicDrafter(self.graph, self.device, keyed=self.keyed)
            return
        # one (graph, tensors) per phase of a phased graph (drafts chosen by the masked count), else one
        self._phases = [
            (lo, g, GraphTensors.from_graph(g, self.device, keyed=self.keyed))
            for lo, g in self.graph.phase_graphs()
        ]
        self._tensors = self._phases[0][2]

    def propose(self, anchor, state, ctx, step):
        if self._dynamic is not None:
            return self._dynamic.draft(
                anchor, state, ctx, step, self.spec.mask_id, keep_complete=self._keep_complete(ctx)
            )
        graph, tensors = self.graph, self._tensors
        if (
            len(self._phases) > 1
        ):  # the phase of the masked count: one host read (phased graphs only)
            masked = int((state == self.spec.mask_id).sum())
            _, graph, tensors = next(p for p in reversed(self._phases) if p[0] <= masked)
        return self._draft(anchor, state, ctx, step, graph, tensors)

    def propose_early(self, anchor, state, ctx):
        # un-keyed drafting reads no step-keyed noise: the drafts can be built before the step is known
        if self.keyed:
            return None
        if self._dynamic is not None:
            return self.propose(anchor, state, ctx, 0)
        if len(self._phases) > 1:
            return None
        return self._draft(anchor, state, ctx, 0, self.graph, self._tensors)

    def _draft(self, anchor: Distributions, state, ctx, step: int, graph, tensors) -> Drafts:
        pos_by_rank, top_tokens, n_masked = rank_tables(
            anchor,
            state,
            ctx,
            tensors.max_token_rank,
            step=step,
            levels=tensors.max_level,
            keyed=self.keyed,
        )
        keep, rows = self.speculation.prune, None
        if keep is not None and keep < len(graph.nodes):  # dynamic pruning (docs/algorithm.md §5.6)
            probs = torch.softmax(anchor.sampling, dim=-1)
            pair_probs = pair_probabilities(tensors, pos_by_rank, top_tokens, n_masked, probs)
            rows = prune_rows(tensors, pair_probs, keep)
        drafts = instantiate(
            tensors,
            pos_by_rank,
            top_tokens,
            n_masked,
            state,
            self.spec.mask_id,
            keep_complete=self._keep_complete(ctx),
            keep_rows=rows,
        )
        return drafts

    def _keep_complete(self, ctx) -> bool:
        """Keep complete drafts: to store a block from them (SDAR) or continue into the next block."""
        return self.speculation.fuse_store or (
            self.speculation.cross_block and ctx.block < self.cfg.num_blocks - 1
        )

    def stored_row(self, end):
        if not self.speculation.fuse_store or end.match < 1:
            return None
        return end.match  # row 0 is the real state

    def lookahead(self, canvas_len, block, n_drafts):
        if n_drafts == 0 or block.stop >= canvas_len:
            return 0
        if get_cache_mode(self.cfg.cache).stores_blocks:  # SDAR: both fusions carry the next block
            return (
                self.cfg.block_length if self.speculation.fuse_store and self.cfg.fuse_next else 0
            )
        return self.cfg.block_length if self.speculation.cross_block else 0
