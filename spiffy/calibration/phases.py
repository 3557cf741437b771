"""The `phased` selection rule: one graph per phase of the block (ours; docs/algorithm.md §5.5).

Which drafts pay off depends on where the walk is: the first drafted forward of a block (almost every position
still masked) gains from a long chain, the last ones from drafts that complete the block (the cross-block walk
accepts them). `select_phased` splits the masked counts seen at drafted forwards into `phases` ranges, starts
every phase from the `greedy` graph and refits one phase at a time (greedy growth plus reachability-preserving
swaps, at most `budget` nodes per phase) to minimise the exact replayed NFE of the whole walk, for `rounds`
rounds. The result is a `DraftGraph` with `phases`: still at most D drafts per forward, and lossless by
construction because drafts never change outputs. `best` keeps it only when it wins on held-out prompts.
"""

from __future__ import annotations

from bisect import bisect_right

from spiffy.calibration.growth import eligible, grow_graph, key_statistics, reachable
from spiffy.calibration.replay import EMPTY, Replay
from spiffy.calibration.trajectories import Trajectories
from spiffy.graph.draft_graph import ROOT, DraftGraph, Formula


def phase_starts(trajectories: Trajectories, phases: int) -> list[int]:
    """Lowest masked count of each phase: equal ranges of 1..max+1, the first always 1."""
    top = max((m for b in trajectories.blocks for m in b.masked), default=1) + 1
    return sorted({1 + -(-p * top // phases) for p in range(phases)})


def select_phased(
    trajectories: Trajectories,
    budget: int,
    *,
    phases: int = 3,
    cross_block: bool = False,
    rounds: int = 2,
    max_candidates: int = 48,
) -> DraftGraph:
    """A phased graph of at most `budget` nodes per phase (see the module docstring)."""
    if not isinstance(phases, int) or phases < 1:
        raise ValueError(f"phases={phases!r} must be a positive integer")
    static = list(grow_graph(trajectories, budget, "greedy", cross_block=cross_block).nodes)
    starts = phase_starts(trajectories, phases)
    bounds = [*starts[1:], 10**9]
    sets = [set(static) for _ in starts]
    chosen: list[list[Formula]] = [list(static) for _ in starts]
    replay = Replay(trajectories, cross_block)
    for _ in range(rounds):
        for p, (lo, hi) in enumerate(zip(starts, bounds)):
            counts, parents = key_statistics(trajectories, cross_block=cross_block, masked=(lo, hi))

            def with_phase(nodes, p=p):
                trial = list(sets)
                trial[p] = set(nodes)
                return lambda m: trial[bisect_right(starts, m) - 1]

            def candidates(inside: set, exclude=None, counts=counts, parents=parents) -> list:
                options = [k for k in eligible(counts, parents, inside | {EMPTY}) if k != exclude]
                options.sort(key=lambda k: (-counts[k], len(k), k))
                return options[:max_candidates]

            grown: list[Formula] = []
            replay.set(with_phase(grown))
            while len(grown) < budget and (options := candidates(set(grown))):
                grown.append(
                    min(
                        options,
                        key=lambda k: (
                            replay.trial(with_phase(grown + [k]), (k,)),
                            -counts[k],
                            len(k),
                            k,
                        ),
                    )
                )
                replay.set(with_phase(grown))
            current = [k for k in chosen[p] if k in counts]
            starts_p = [grown] + ([current] if reachable(current, parents) else [])
            best = min(starts_p, key=lambda nodes: replay.set(with_phase(nodes)))
            value, improved = replay.set(with_phase(best)), True
            while improved:
                improved = False
                for out in list(best):
                    rest = [k for k in best if k != out]
                    if not reachable(rest, parents):
                        continue
                    for cand in candidates(set(rest), exclude=out):
                        trial = replay.trial(with_phase(rest + [cand]), (out, cand))
                        if trial < value:
                            best, value, improved = rest + [cand], trial, True
                            replay.set(with_phase(best))
                            break
                    if improved:
                        break
            chosen[p], sets[p] = best, set(best)
    return _phased_graph(trajectories, chosen, starts, budget, cross_block)


def _phased_graph(trajectories, chosen, starts, budget, cross_block) -> DraftGraph:
    nodes = list(dict.fromkeys(k for phase in chosen for k in phase))
    index = {k: n for n, k in enumerate(nodes)}
    _, parents = key_statistics(trajectories, cross_block=cross_block)
    node_parents = [
        tuple(
            sorted(ROOT if p == EMPTY else index[p] for p in parents[k] if p == EMPTY or p in index)
        )
        for k in nodes
    ]
    phase_nodes = tuple((lo, tuple(index[k] for k in phase)) for lo, phase in zip(starts, chosen))
    return DraftGraph(tuple(nodes), tuple(node_parents), budget, "phased", {}, phase_nodes)
