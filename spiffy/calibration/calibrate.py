"""Offline draft-graph calibration: selection rules and an exact NFE evaluator (docs/algorithm.md §5.5; paper Alg. 2).

From recorded trajectories (`spiffy.calibration.trajectories`) every rule grows the graph from the root, adding one
formula at a time that has a parent already in the graph (or hangs off the root), until `D` nodes are in:

* `degree0`: key frequency;  `degree1` (the paper's): count + counts of its parents;
* `total`: count + counts of all its ancestors;
* `greedy` (ours): the node that most reduces the exact simulated NFE, i.e. maximises accepted transitions
  per forward on the recorded trajectories;
* `phased` (ours, `spiffy.calibration.phases`): one greedy graph per phase of the block (masked count);
* `best` (ours, the default, `spiffy.calibration.selection`): the cross-validated choice among all of the above and
  the built-in chain, fig2 and topk graphs, never worse than `chain:D` on the calibration data.

With `cross_block=True` the complete state's key joins each recorded sequence, and the evaluator credits the
next block's saved first forward when the complete state was a verified draft.

`evaluate` replays the acceptance walk (docs/algorithm.md §5.4) on the trajectories without running the model; for a
lossless configuration on the same prompts its NFE equals the decoder's NFE exactly (a test checks this).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace

from spiffy.calibration.replay import EMPTY, Prediction, Replay, evaluate, node_sets, walk_block
from spiffy.calibration.trajectories import Trajectories
from spiffy.graph.draft_graph import ROOT, DraftGraph, Formula

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
    from spiffy.calibration.selection import select_best

    return select_best(trajectories, budget, cross_block=cross_block, provenance=provenance)


def _select_phased(trajectories, budget, *, cross_block, max_candidates, provenance) -> DraftGraph:
    from spiffy.calibration.phases import select_phased

    graph = select_phased(trajectories, budget, cross_block=cross_block)
    return replace(graph, provenance=provenance or {})


def _static_selector(rule: str):
    def select(trajectories, budget, *, cross_block, max_candidates, provenance) -> DraftGraph:
        counts, parents = key_statistics(trajectories, cross_block=cross_block)
        chosen = _grow(budget, counts, parents, _static_scores(rule, counts, parents))
        return graph_from_keys(chosen, parents, budget, rule, provenance)

    return select


def _select_greedy(trajectories, budget, *, cross_block, max_candidates, provenance) -> DraftGraph:
    counts, parents = key_statistics(trajectories, cross_block=cross_block)
    chosen = _greedy(trajectories, budget, counts, parents, max_candidates, cross_block)
    return graph_from_keys(chosen, parents, budget, "greedy", provenance)


# The selection-rule registry (docs/extending.md): name -> selector(trajectories, budget, *, cross_block,
# max_candidates, provenance) -> DraftGraph. A new rule is one entry here.
SELECTORS: dict = {
    "best": _select_best,
    "degree0": _static_selector("degree0"),
    "degree1": _static_selector("degree1"),
    "total": _static_selector("total"),
    "greedy": _select_greedy,
    "phased": _select_phased,
}
SELECTION_RULES = tuple(SELECTORS)


def key_statistics(
    trajectories: Trajectories, *, cross_block: bool = False
) -> tuple[Counter, dict[Formula, set[Formula]]]:
    """Key counts and recorded parent links (which key directly preceded which; the root is `()`).
    With `cross_block`, the complete state's key (within the horizon, not in a prompt's last block) ends
    each sequence: the cross-block walk accepts it as a draft."""
    counts: Counter = Counter()
    parents: dict[Formula, set[Formula]] = defaultdict(set)
    for block in trajectories.blocks:
        for seq, complete in zip(block.keys, block.complete):
            if cross_block and complete is not None and not block.last:
                seq = [*seq, complete]
            previous = EMPTY
            for key in seq:
                if key != previous:
                    counts[key] += 1
                    parents[key].add(previous)
                previous = key
    return counts, parents


def _ancestor_sets(parents: dict[Formula, set[Formula]]) -> dict[Formula, frozenset[Formula]]:
    """Every key's recorded ancestors (the root excluded), smallest keys first: parents are strict subsets."""
    out: dict[Formula, frozenset[Formula]] = {}
    for key in sorted(parents, key=len):
        found: set[Formula] = set()
        for p in parents[key]:
            if p != EMPTY:
                found.add(p)
                found |= out.get(p, frozenset())
        out[key] = frozenset(found)
    return out


def _static_scores(rule: str, counts: Counter, parents) -> dict[Formula, float]:
    """Scores of the count-based rules: `degree0`, `degree1` (the paper's) and `total`."""
    if rule == "degree0":
        return {k: float(c) for k, c in counts.items()}
    if rule == "degree1":
        return {k: c + sum(counts[p] for p in parents[k] if p != EMPTY) for k, c in counts.items()}
    if rule != "total":
        raise ValueError(f"selection rule={rule!r} has no count-based score")
    ancestors = _ancestor_sets(parents)
    return {k: c + sum(counts[a] for a in ancestors.get(k, ())) for k, c in counts.items()}


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


def graph_from_keys(
    chosen: list[Formula], parents, budget: int, rule: str, provenance: dict | None = None
) -> DraftGraph:
    """The `DraftGraph` of selected keys, with the recorded parent links that stay inside it."""
    inside = set(chosen) | {EMPTY}
    index = {k: n for n, k in enumerate(chosen)}
    node_parents = [
        tuple(sorted(ROOT if p == EMPTY else index[p] for p in parents[k] if p in inside))
        for k in chosen
    ]
    return DraftGraph(tuple(chosen), tuple(node_parents), budget, rule, provenance or {})


def _eligible(counts: Counter, parents, inside: set[Formula]) -> list[Formula]:
    return [k for k in counts if k not in inside and parents[k] & inside]


def _grow(budget: int, counts: Counter, parents, score: dict[Formula, float]) -> list[Formula]:
    """Add the best-scoring reachable formula until `budget` nodes are in (docs/algorithm.md §5.5 step 2)."""
    chosen: list[Formula] = []
    while len(chosen) < budget:
        eligible = _eligible(counts, parents, set(chosen) | {EMPTY})
        if not eligible:
            break
        chosen.append(max(eligible, key=lambda k: (score[k], counts[k], _order(k))))
    return chosen


def _greedy(
    trajectories: Trajectories,
    budget: int,
    counts: Counter,
    parents,
    max_candidates: int,
    cross_block: bool = False,
) -> list[Formula]:
    """Minimise the simulated NFE: greedy growth, then the best of it and the static rules' graphs is
    refined by reachability-preserving swaps until no swap helps (so it never loses to them on the
    calibration trajectories)."""

    replay = Replay(trajectories, cross_block)

    def nfe(nodes) -> int:
        return replay.set(node_sets(set(nodes)))

    def trial(
        nodes, changed
    ) -> int:  # NFE of `nodes`, which differ from the last `nfe` set by `changed`
        return replay.trial(node_sets(set(nodes)), changed)

    def candidates(inside: set[Formula], exclude: Formula = EMPTY) -> list[Formula]:
        eligible = [k for k in _eligible(counts, parents, inside | {EMPTY}) if k != exclude]
        eligible.sort(key=lambda k: (-counts[k], _order_key(k)))
        return eligible[:max_candidates]

    grown: list[Formula] = []
    while len(grown) < budget:
        options = candidates(set(grown))
        if not options:
            break
        nfe(grown)
        grown.append(
            min(options, key=lambda k: (trial(grown + [k], (k,)), -counts[k], _order_key(k)))
        )
    starts = [grown] + [
        _grow(budget, counts, parents, _static_scores(r, counts, parents))
        for r in ("degree0", "degree1", "total")
    ]
    chosen = min(starts, key=nfe)
    best, improved, rounds = nfe(chosen), True, 0
    while improved and rounds < 4 * budget:
        improved, rounds = False, rounds + 1
        for out in list(chosen):
            rest = [k for k in chosen if k != out]
            if not _reachable(rest, parents):
                continue
            for cand in candidates(set(rest), exclude=out):
                value = trial(rest + [cand], (out, cand))
                if value < best:
                    chosen, best, improved = rest + [cand], value, True
                    nfe(chosen)
                    break
            if improved:
                break
    return chosen


def _reachable(nodes: list[Formula], parents) -> bool:
    reached, changed = {EMPTY}, True
    while changed:
        changed = False
        for k in nodes:
            if k not in reached and parents[k] & reached:
                reached.add(k)
                changed = True
    return len(reached) == len(nodes) + 1


def _order_key(key: Formula) -> tuple:
    return (len(key), key)


def _order(key: Formula) -> tuple:
    """Deterministic tie-break that prefers small, low-rank formulas under `max`."""
    return tuple(-v for pair in key for v in pair) + (-len(key),)
