"""Offline draft-graph calibration: selection rules and an exact NFE evaluator (SPEC §5.5; paper Alg. 2).

From recorded trajectories (`spiffy.graph.trajectories`) every rule grows the graph from the root, adding one
formula at a time that has a parent already in the graph (or hangs off the root), until `D` nodes are in:

* `degree0`: key frequency;  `degree1` (the paper's): count + counts of its parents;
* `total`: count + counts of all its ancestors;
* `greedy` (ours): the node that most reduces the exact simulated NFE, i.e. maximises accepted transitions
  per forward on the recorded trajectories.

`evaluate` replays the acceptance walk (SPEC §5.4) on the trajectories without running the model; for a
lossless configuration on the same prompts its NFE equals the decoder's NFE exactly (a test checks this).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from spiffy.graph.draft_graph import ROOT, DraftGraph, Formula
from spiffy.graph.trajectories import Trajectories

SELECTION_RULES = ("degree0", "degree1", "total", "greedy")
EMPTY: Formula = ()


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


def _block_nfe(transitions: int, keys: list[list[Formula]], nodes: set[Formula]) -> int:
    nfe, t = 1, 1  # the block-start forward performs the first transition
    while t < transitions:
        nfe += 1  # a forward at X_t verifying the drafts
        seq, accepted, previous = keys[t - 1], 0, EMPTY
        while accepted < len(seq) and (seq[accepted] in nodes or seq[accepted] == previous):
            previous = seq[accepted]
            accepted += 1
        t += accepted + 1
    return nfe


def evaluate(graph: DraftGraph | set[Formula], trajectories: Trajectories) -> Prediction:
    """Exact NFE the acceptance walk would need with `graph` on these trajectories."""
    nodes = set(graph.nodes) if isinstance(graph, DraftGraph) else set(graph)
    blocks = trajectories.blocks
    extra = sum(b.extra_calls for b in blocks)
    nfe = sum(_block_nfe(b.transitions, b.keys, nodes) for b in blocks) + extra
    base_extra = sum(b.base_extra_calls for b in blocks)
    return Prediction(nfe, sum(b.transitions for b in blocks), base_extra, extra)


def key_statistics(trajectories: Trajectories) -> tuple[Counter, dict[Formula, set[Formula]]]:
    """Key counts and recorded parent links (which key directly preceded which; the root is `()`)."""
    counts: Counter = Counter()
    parents: dict[Formula, set[Formula]] = defaultdict(set)
    for block in trajectories.blocks:
        for seq in block.keys:
            previous = EMPTY
            for key in seq:
                if key != previous:
                    counts[key] += 1
                    parents[key].add(previous)
                previous = key
    return counts, parents


def _ancestors(key: Formula, parents: dict[Formula, set[Formula]]) -> set[Formula]:
    seen: set[Formula] = set()
    stack = list(parents.get(key, ()))
    while stack:
        p = stack.pop()
        if p != EMPTY and p not in seen:
            seen.add(p)
            stack.extend(parents.get(p, ()))
    return seen


def _static_scores(rule: str, counts: Counter, parents) -> dict[Formula, float]:
    if rule == "degree0":
        return {k: float(c) for k, c in counts.items()}
    if rule == "degree1":
        return {k: c + sum(counts[p] for p in parents[k] if p != EMPTY) for k, c in counts.items()}
    return {k: c + sum(counts[a] for a in _ancestors(k, parents)) for k, c in counts.items()}


def select_graph(
    trajectories: Trajectories,
    budget: int,
    rule: str = "degree1",
    *,
    max_candidates: int = 64,
    provenance: dict | None = None,
) -> DraftGraph:
    """Grow a graph of at most `budget` nodes with a selection rule, respecting reachability."""
    if rule not in SELECTION_RULES:
        raise ValueError(f"selection rule={rule!r} must be one of {list(SELECTION_RULES)}")
    if budget < 1:
        raise ValueError(f"budget={budget} must be >= 1")
    counts, parents = key_statistics(trajectories)
    if rule == "greedy":
        chosen = _greedy(trajectories, budget, counts, parents, max_candidates)
    else:
        chosen = _grow(budget, counts, parents, _static_scores(rule, counts, parents))
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
    """Add the best-scoring reachable formula until `budget` nodes are in (SPEC §5.5 step 2)."""
    chosen: list[Formula] = []
    while len(chosen) < budget:
        eligible = _eligible(counts, parents, set(chosen) | {EMPTY})
        if not eligible:
            break
        chosen.append(max(eligible, key=lambda k: (score[k], counts[k], _order(k))))
    return chosen


def _greedy(
    trajectories: Trajectories, budget: int, counts: Counter, parents, max_candidates: int
) -> list[Formula]:
    """Minimise the simulated NFE: greedy growth, then the best of it and the static rules' graphs is
    refined by reachability-preserving swaps until no swap helps (so it never loses to them on the
    calibration trajectories)."""

    def nfe(nodes) -> int:
        return evaluate(set(nodes), trajectories).nfe

    def candidates(inside: set[Formula], exclude: Formula = EMPTY) -> list[Formula]:
        eligible = [k for k in _eligible(counts, parents, inside | {EMPTY}) if k != exclude]
        eligible.sort(key=lambda k: (-counts[k], _order_key(k)))
        return eligible[:max_candidates]

    grown: list[Formula] = []
    while len(grown) < budget:
        options = candidates(set(grown))
        if not options:
            break
        grown.append(min(options, key=lambda k: (nfe(grown + [k]), -counts[k], _order_key(k))))
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
                value = nfe(rest + [cand])
                if value < best:
                    chosen, best, improved = rest + [cand], value, True
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
