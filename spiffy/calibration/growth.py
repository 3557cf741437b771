"""Graph growth from recorded key statistics: the count-based rules and `greedy` (docs/algorithm.md §5.5; paper Alg. 2).

From recorded trajectories (`spiffy.calibration.trajectories`) a rule grows the graph from the root, adding one
formula at a time that has a parent already in the graph (or hangs off the root), until `D` nodes are in:
`degree0` scores a key by its frequency, `degree1` (the paper's) adds its parents' counts, `total` all its
ancestors' counts; `greedy` (ours) adds the node that most reduces the exact replayed NFE, then refines by
reachability-preserving swaps. The phased and cross-validated rules build on these
(`spiffy.calibration.phases`, `spiffy.calibration.selection`); the registry of every rule is
`spiffy.calibration.calibrate`.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from spiffy.calibration.replay import EMPTY, Replay, node_sets
from spiffy.calibration.trajectories import Trajectories
from spiffy.graph.draft_graph import ROOT, DraftGraph, Formula

GROWTH_RULES = ("degree0", "degree1", "total", "greedy")


def grow_graph(
    trajectories: Trajectories,
    budget: int,
    rule: str,
    *,
    cross_block: bool = False,
    max_candidates: int = 64,
    provenance: dict | None = None,
) -> DraftGraph:
    """The graph of at most `budget` nodes that rule `rule` (one of `GROWTH_RULES`) grows."""
    counts, parents = key_statistics(trajectories, cross_block=cross_block)
    if rule == "greedy":
        chosen = greedy(trajectories, budget, counts, parents, max_candidates, cross_block)
    else:
        chosen = grow(budget, counts, parents, static_scores(rule, counts, parents))
    return graph_from_keys(chosen, parents, budget, rule, provenance)


def key_statistics(
    trajectories: Trajectories,
    *,
    cross_block: bool = False,
    masked: tuple[int, int] | None = None,
) -> tuple[Counter, dict[Formula, set[Formula]]]:
    """Key counts and recorded parent links (which key directly preceded which; the root is `()`).
    With `cross_block`, the complete state's key (within the horizon, not in a prompt's last block) ends
    each sequence: the cross-block walk accepts it as a draft. `masked = (lo, hi)` counts only the states
    with `lo <= masked positions < hi` (one phase of the block, `spiffy.calibration.phases`)."""
    lo, hi = masked if masked is not None else (0, float("inf"))
    counts: Counter = Counter()
    parents: dict[Formula, set[Formula]] = defaultdict(set)
    for block in trajectories.blocks:
        for seq, complete, n_masked in zip(block.keys, block.complete, block.masked):
            if not lo <= n_masked < hi:
                continue
            if cross_block and complete is not None and not block.last:
                seq = [*seq, complete]
            previous = EMPTY
            for key in seq:
                if key != previous:
                    counts[key] += 1
                    parents[key].add(previous)
                previous = key
    return counts, parents


def ancestor_sets(parents: dict[Formula, set[Formula]]) -> dict[Formula, frozenset[Formula]]:
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


def static_scores(rule: str, counts: Counter, parents) -> dict[Formula, float]:
    """Scores of the count-based rules: `degree0`, `degree1` (the paper's) and `total`."""
    if rule == "degree0":
        return {k: float(c) for k, c in counts.items()}
    if rule == "degree1":
        return {k: c + sum(counts[p] for p in parents[k] if p != EMPTY) for k, c in counts.items()}
    if rule != "total":
        raise ValueError(f"selection rule={rule!r} has no count-based score")
    ancestors = ancestor_sets(parents)
    return {k: c + sum(counts[a] for a in ancestors.get(k, ())) for k, c in counts.items()}


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


def eligible(counts: Counter, parents, inside: set[Formula]) -> list[Formula]:
    """The recorded keys not yet `inside` with a recorded parent inside (reachable if added)."""
    return [k for k in counts if k not in inside and parents[k] & inside]


def grow(budget: int, counts: Counter, parents, score: dict[Formula, float]) -> list[Formula]:
    """Add the best-scoring reachable formula until `budget` nodes are in (docs/algorithm.md §5.5 step 2)."""
    chosen: list[Formula] = []
    while len(chosen) < budget:
        options = eligible(counts, parents, set(chosen) | {EMPTY})
        if not options:
            break
        chosen.append(max(options, key=lambda k: (score[k], counts[k], order(k))))
    return chosen


def greedy(
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
        options = [k for k in eligible(counts, parents, inside | {EMPTY}) if k != exclude]
        options.sort(key=lambda k: (-counts[k], order_key(k)))
        return options[:max_candidates]

    grown: list[Formula] = []
    while len(grown) < budget:
        options = candidates(set(grown))
        if not options:
            break
        nfe(grown)
        grown.append(
            min(options, key=lambda k: (trial(grown + [k], (k,)), -counts[k], order_key(k)))
        )
    starts = [grown] + [
        grow(budget, counts, parents, static_scores(r, counts, parents))
        for r in ("degree0", "degree1", "total")
    ]
    chosen = min(starts, key=nfe)
    best, improved, rounds = nfe(chosen), True, 0
    while improved and rounds < 4 * budget:
        improved, rounds = False, rounds + 1
        for out in list(chosen):
            rest = [k for k in chosen if k != out]
            if not reachable(rest, parents):
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


def reachable(nodes: list[Formula], parents) -> bool:
    """Whether every node reaches the root through recorded parents among `nodes`."""
    reached, changed = {EMPTY}, True
    while changed:
        changed = False
        for k in nodes:
            if k not in reached and parents[k] & reached:
                reached.add(k)
                changed = True
    return len(reached) == len(nodes) + 1


def order_key(key: Formula) -> tuple:
    """Deterministic order: small formulas first."""
    return (len(key), key)


def order(key: Formula) -> tuple:
    """Deterministic tie-break that prefers small, low-rank formulas under `max`."""
    return tuple(-v for pair in key for v in pair) + (-len(key),)
