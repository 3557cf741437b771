"""Offline draft-graph calibration: the selection-rule registry and `select_graph` (docs/algorithm.md §5.5; paper Alg. 2).

From recorded trajectories (`spiffy.calibration.trajectories`) every rule grows the graph from the root, adding one
formula at a time that has a parent already in the graph (or hangs off the root), until `D` nodes are in
(`spiffy.calibration.growth`):

* `degree0`: key frequency;  `degree1` (the paper's): count + counts of its parents;
* `total`: count + counts of all its ancestors;
* `greedy` (ours): the node that most reduces the exact simulated NFE, i.e. maximises accepted transitions
  per forward on the recorded trajectories;
* `phased` (ours, `spiffy.calibration.phases`): one greedy graph per phase of the block (masked count);
* `best` (ours, the default, `spiffy.calibration.selection`): the cross-validated choice among all of the above and
  the built-in chain, fig2 and topk graphs, never worse than `chain:D` on the calibration data.

With `cross_block=True` the complete state's key joins each recorded sequence, and the evaluator credits the
next block's saved first forward when the complete state was a verified draft.

`evaluate` (`spiffy.calibration.replay`) replays the acceptance walk (docs/algorithm.md §5.4) on the trajectories without running the model; for a
lossless configuration on the same prompts its NFE equals the decoder's NFE exactly (a test checks this).
"""

from __future__ import annotations

from dataclasses import replace

from spiffy.calibration.growth import GROWTH_RULES, grow_graph, key_statistics
from spiffy.calibration.phases import select_phased
from spiffy.calibration.replay import Prediction, evaluate, node_sets, walk_block
from spiffy.calibration.selection import select_best
from spiffy.calibration.trajectories import Trajectories
from spiffy.graph.draft_graph import DraftGraph

__all__ = [
    "SELECTION_RULES",
    "Prediction",
    "evaluate",
    "key_statistics",
    "node_sets",
    "select_graph",
    "walk_block",
]


def _select_best(trajectories, budget, *, cross_block, max_candidates, provenance) -> DraftGraph:
    return select_best(trajectories, budget, cross_block=cross_block, provenance=provenance)


def _select_phased(trajectories, budget, *, cross_block, max_candidates, provenance) -> DraftGraph:
    graph = select_phased(trajectories, budget, cross_block=cross_block)
    return replace(graph, provenance=provenance or {})


def _growth_selector(rule: str):
    def select(trajectories, budget, *, cross_block, max_candidates, provenance) -> DraftGraph:
        return grow_graph(
            trajectories,
            budget,
            rule,
            cross_block=cross_block,
            max_candidates=max_candidates,
            provenance=provenance,
        )

    return select


# The selection-rule registry (docs/extending.md): name -> selector(trajectories, budget, *, cross_block,
# max_candidates, provenance) -> DraftGraph. A new rule is one entry here.
SELECTORS: dict = {
    "best": _select_best,
    **{rule: _growth_selector(rule) for rule in GROWTH_RULES},
    "phased": _select_phased,
}
SELECTION_RULES = tuple(SELECTORS)


def select_graph(
    trajectories: Trajectories,
    budget: int,
    rule: str = "degree1",
    *,
    cross_block: bool = False,
    max_candidates: int = 64,
    provenance: dict | None = None,
) -> DraftGraph:
    """Grow a graph of at most `budget` nodes with a selection rule, respecting reachability.

    `best` (the default of the runner) is `spiffy.calibration.selection.select_best`: the cross-validated choice
    among every other rule and the built-in graphs; `phased` is `spiffy.calibration.phases.select_phased`."""
    if rule not in SELECTORS:
        raise ValueError(f"selection rule={rule!r} must be one of {list(SELECTORS)}")
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget={budget!r} must be a positive integer")
    return SELECTORS[rule](
        trajectories,
        budget,
        cross_block=cross_block,
        max_candidates=max_candidates,
        provenance=provenance,
    )
