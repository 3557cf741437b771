"""The `best` selection rule: the cross-validated choice among every candidate graph (ours; docs/algorithm.md §5.5).

A selection rule is a bet that what was frequent on the calibration prompts stays frequent; which bet wins
depends on the model, the base decoder and the budget, and the paper's `degree1` can lose to a plain chain.
`select_best` therefore scores every graph it can build of the budget — each selection rule (degree0, degree1,
total, greedy, phased) fitted on the other folds, and the built-in `chain:D`, `fig2` and `topk:D/2` — on
calibration prompts it did not select on (k-fold cross-validation over whole prompts, exact NFE by the replay
evaluator). It keeps the candidate with the fewest held-out forwards (a tie goes to the simpler one), refits it
on every calibration prompt, and falls back to `chain:D` if the refit needs more forwards than the chain on the
full calibration set. So on its calibration data it never loses to the chain, held-out or in-sample; the scores
of every candidate go into the graph's provenance.
"""

from __future__ import annotations

from spiffy.calibration.growth import GROWTH_RULES, grow_graph
from spiffy.calibration.phases import select_phased
from spiffy.calibration.replay import evaluate
from spiffy.calibration.trajectories import Trajectories
from spiffy.graph.builtin import chain, fig2, two_level_topk
from spiffy.graph.draft_graph import DraftGraph

CANDIDATE_RULES = (*GROWTH_RULES, "phased")  # simplest first


def fit_rule(trajectories: Trajectories, budget: int, rule: str, cross_block: bool) -> DraftGraph:
    """The graph a candidate selection rule fits on `trajectories`."""
    if rule == "phased":
        return select_phased(trajectories, budget, cross_block=cross_block)
    return grow_graph(trajectories, budget, rule, cross_block=cross_block)


def builtin_candidates(budget: int) -> dict[str, DraftGraph]:
    """The hand-built graphs that fit the budget, by spec string."""
    out = {f"chain:{budget}": chain(budget)}
    if budget >= 2:
        out[f"topk:{budget // 2}"] = two_level_topk(budget // 2)
    if budget >= len(fig2().nodes):
        out["fig2"] = fig2()
    return out


def folds_of(trajectories: Trajectories, folds: int) -> list[tuple[Trajectories, Trajectories]]:
    """(train, held-out) pairs of a k-fold split over whole prompts (prompt n goes to fold n mod k)."""
    prompts = trajectories.prompts
    k = min(folds, len(prompts))
    return [
        (
            trajectories.subset(p for n, p in enumerate(prompts) if n % k != f),
            trajectories.subset(p for n, p in enumerate(prompts) if n % k == f),
        )
        for f in range(k)
    ]


def cross_validated_nfe(
    trajectories: Trajectories, budget: int, *, cross_block: bool = False, folds: int = 5
) -> dict[str, int]:
    """Held-out NFE of every candidate, summed over the folds (a fixed graph's is its full-set NFE)."""
    if folds < 2:
        raise ValueError(f"folds={folds!r} must be >= 2")
    if len(trajectories.prompts) < 2:
        raise ValueError(
            f"cross-validation needs >= 2 calibration prompts, got {len(trajectories.prompts)}"
        )
    scores = {rule: 0 for rule in CANDIDATE_RULES}
    for train, held_out in folds_of(trajectories, folds):
        for rule in CANDIDATE_RULES:
            graph = fit_rule(train, budget, rule, cross_block)
            scores[rule] += evaluate(graph, held_out, cross_block=cross_block).nfe
    for name, graph in builtin_candidates(budget).items():
        scores[name] = evaluate(graph, trajectories, cross_block=cross_block).nfe
    return scores


def select_best(
    trajectories: Trajectories,
    budget: int,
    *,
    cross_block: bool = False,
    folds: int = 5,
    provenance: dict | None = None,
) -> DraftGraph:
    """The candidate with the fewest held-out forwards, refitted on all prompts; never worse than
    `chain:budget` on the calibration trajectories (see the module docstring)."""
    if budget > trajectories.horizon:
        raise ValueError(
            f"budget={budget} exceeds the trajectories' horizon={trajectories.horizon}: the "
            f"chain:{budget} candidate is deeper than what was recorded (record with horizon >= budget)"
        )
    scores = cross_validated_nfe(trajectories, budget, cross_block=cross_block, folds=folds)
    builtins = builtin_candidates(budget)

    def fit(name: str) -> DraftGraph:
        if name in builtins:
            return builtins[name]
        return fit_rule(trajectories, budget, name, cross_block)

    full = {}

    def full_nfe(name: str) -> int:
        if name not in full:
            full[name] = evaluate(fit(name), trajectories, cross_block=cross_block).nfe
        return full[name]

    # a tie on held-out prompts goes to the simpler candidate (built-in, then static rules, greedy, phased):
    # the in-sample NFE would favour whichever fits the calibration prompts most closely
    order = list(builtins) + list(CANDIDATE_RULES)
    chosen = min(order, key=lambda name: (scores[name], order.index(name)))
    reference = f"chain:{budget}"
    if full_nfe(chosen) > full_nfe(reference):
        chosen = reference
    graph = fit(chosen)
    info = {
        "chosen": chosen,
        "folds": min(folds, len(trajectories.prompts)),
        "cv_nfe": scores,
        "full_nfe": {name: full_nfe(name) for name in order},
        "transitions": sum(b.transitions for b in trajectories.blocks),
        "cross_block": cross_block,
    }
    return DraftGraph(
        graph.nodes,
        graph.parents,
        budget,
        "best",
        {**(provenance or {}), "best": info},
        graph.phases,
    )
