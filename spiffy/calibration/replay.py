"""The exact replay of the acceptance walk on recorded trajectories (docs/algorithm.md §5.4), and its incremental form.

`evaluate` counts the forwards the walk needs with a graph on recorded trajectories, without running the model;
for a lossless configuration on the same prompts it equals the decoder's NFE exactly (tests/graph checks this for
the plain and the cross-block walk and for phased graphs). `Replay` serves the selection rules, which score many
node sets that differ from the current one by a node or two: a block's forwards depend only on the keys it
contains, so only the blocks that contain a changed key are replayed again.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from spiffy.calibration.trajectories import BlockTrajectory, Trajectories
from spiffy.decoding.walk import follow
from spiffy.graph.draft_graph import DraftGraph, Formula

EMPTY: Formula = ()
NodeSets = Callable[[int], set[Formula]]


@dataclass(frozen=True)
class Prediction:
    """Simulated NFE of a graph on recorded trajectories (model calls: SDAR's prefill and stores included)."""

    nfe: int
    transitions: int
    # the published base's calls that perform no transition (SDAR's prefill and stores), and this decoder's
    base_extra_calls: int = 0
    extra_calls: int = 0

    @property
    def nfe_base(self) -> int:
        return self.transitions + self.base_extra_calls

    @property
    def speedup_nfe(self) -> float:
        return self.nfe_base / self.nfe

    @property
    def accepted_per_forward(self) -> float:
        """Transitions per forward that performed any, minus one (as `DecodeStats`)."""
        return self.transitions / (self.nfe - self.extra_calls) - 1


def node_sets(graph: DraftGraph | set[Formula]) -> NodeSets:
    """The graph's node set for a forward whose real state has `m` masked positions (phases, if any)."""
    if not isinstance(graph, DraftGraph):
        nodes = set(graph)
        return lambda m: nodes
    phases = graph.phase_graphs()
    los, sets = [lo for lo, _ in phases], [set(g.nodes) for _, g in phases]
    if len(sets) == 1:
        return lambda m: sets[0]
    return lambda m: sets[bisect_right(los, m) - 1]


def walk_block(
    block: BlockTrajectory, nodes_of: NodeSets, cross_block: bool = False
) -> tuple[int, bool]:
    """Forwards one block needs with these nodes, and whether its last forward verified the complete state
    as a draft (the cross-block walk then skips the next block's first forward)."""
    return walk_block_at(block, lambda t: nodes_of(block.masked[t - 1]), cross_block)


def walk_block_at(
    block: BlockTrajectory, nodes_at: Callable[[int], set[Formula]], cross_block: bool = False
) -> tuple[int, bool]:
    """`walk_block` with the drafts of each forward given by the forward's origin: `nodes_at(t)` is the
    node set verified by the forward at state X_t (t = 1..T-1). Static graphs depend only on the masked
    count; dynamic drafting and the oracles depend on the origin itself."""
    nfe, t, completed = 1, 1, False  # the block-start forward performs the first transition
    while t < block.transitions:
        nfe += 1  # a forward at X_t verifying the drafts
        nodes = nodes_at(t)
        accepted = follow(
            block.keys[t - 1], nodes, EMPTY
        )  # the decoder's walk (spiffy.decoding.walk)
        if cross_block and t + accepted + 1 == block.transitions:
            completed = block.complete[t - 1] in nodes
        t += accepted + 1
    return nfe, completed


def _cost(block: BlockTrajectory, nodes_of: NodeSets, cross_block: bool) -> int:
    """The block's model calls (its walk's forwards and SDAR's extra calls), minus the next block's start
    when this block hands it over (cross-block)."""
    forwards, completed = walk_block(block, nodes_of, cross_block)
    return forwards + block.extra_calls - (completed and not block.last)


def evaluate(
    graph: DraftGraph | set[Formula], trajectories: Trajectories, *, cross_block: bool = False
) -> Prediction:
    """Exact NFE the acceptance walk would need with `graph` on these trajectories (docs/algorithm.md §5.4); with
    `cross_block`, a block whose complete state was a verified draft saves the next block's first forward."""
    nodes_of = node_sets(graph)
    return evaluate_at(
        lambda block, t: nodes_of(block.masked[t - 1]), trajectories, cross_block=cross_block
    )


def evaluate_at(
    nodes_at: Callable[[BlockTrajectory, int], set[Formula]],
    trajectories: Trajectories,
    *,
    cross_block: bool = False,
) -> Prediction:
    """`evaluate` with the drafts of each forward chosen per origin: `nodes_at(block, t)` is the node set
    the forward at state X_t of `block` verifies (dynamic drafting, the oracles)."""
    blocks = trajectories.blocks
    nfe = 0
    for b in blocks:
        forwards, completed = walk_block_at(b, lambda t, b=b: nodes_at(b, t), cross_block)
        nfe += forwards + b.extra_calls - (completed and not b.last)
    return Prediction(
        nfe,
        sum(b.transitions for b in blocks),
        sum(b.base_extra_calls for b in blocks),
        sum(b.extra_calls for b in blocks),
    )


class Replay:
    """Exact NFE of many node sets on one set of trajectories, replaying only the blocks a change touches."""

    def __init__(self, trajectories: Trajectories, cross_block: bool = False):
        self.blocks, self.cross_block = trajectories.blocks, cross_block
        self.touches: dict[Formula, set[int]] = defaultdict(set)  # key -> blocks containing it
        for n, block in enumerate(self.blocks):
            for seq in block.keys:
                for key in seq:
                    self.touches[key].add(n)
            if cross_block:
                for key in block.complete:
                    if key is not None:
                        self.touches[key].add(n)
        self.costs: list[int] = []
        self.total = 0

    def set(self, nodes_of: NodeSets) -> int:
        """Replay every block with `nodes_of` and make it the reference for `trial`."""
        self.costs = [_cost(b, nodes_of, self.cross_block) for b in self.blocks]
        self.total = sum(self.costs)
        return self.total

    def trial(self, nodes_of: NodeSets, changed: Iterable[Formula]) -> int:
        """NFE with `nodes_of`, which differs from the reference only in the keys `changed`."""
        touched = set().union(*(self.touches.get(k, ()) for k in changed))
        return self.total + sum(
            _cost(self.blocks[n], nodes_of, self.cross_block) - self.costs[n] for n in touched
        )
