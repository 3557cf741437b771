"""Dynamic drafting on recorded trajectories: its replay and its calibration (docs/algorithm.md §5.10).

Trajectories recorded with `features=J` keep, per origin, exactly what dynamic drafting reads from the anchor,
so the drafts every forward would verify, and the walk's NFE, are replayed without the model
(`evaluate_dynamic`). The selection is batched over origins here and per forward in the decoder: the same
arithmetic in a fixed order, so the replay equals decoding except where two candidates' scores tie to the last
bits (tests/calibration/test_dynamic.py measures both). `calibrate_dynamic` fits a dynamic graph to
calibration trajectories: the acceptance model by maximum likelihood on the recorded transitions, the slot
levels by the replay among a few shapes.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from spiffy.calibration.replay import Prediction, evaluate_at
from spiffy.calibration.trajectories import BlockTrajectory, Trajectories
from spiffy.decoding.dynamic import AnchorFeatures, DynamicTensors
from spiffy.graph.draft_graph import DraftGraph, Formula
from spiffy.graph.dynamic import DynamicGraph, default_slots, generic_pool


class DynamicReplay:
    """The recorded origins' features stacked by block length, ready to score many dynamic graphs."""

    def __init__(self, trajectories: Trajectories):
        missing = [b.prompt for b in trajectories.blocks if b.transitions > 1 and not b.anchors]
        if missing:
            raise ValueError(
                f"trajectories of prompts {sorted(set(missing))[:5]} have no anchor features: record "
                "them with features=J (spiffy.calibration.trajectories.record_trajectories)"
            )
        self.trajectories = trajectories
        groups: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        for n, block in enumerate(trajectories.blocks):
            for t, (conf, probs) in enumerate(block.anchors, start=1):
                groups[(len(conf), len(probs[0]))].append((n, t))
        self.groups = []
        for origins in groups.values():
            conf = torch.tensor(
                [trajectories.blocks[n].anchors[t - 1][0] for n, t in origins], dtype=torch.float64
            )
            probs = torch.tensor(
                [trajectories.blocks[n].anchors[t - 1][1] for n, t in origins], dtype=torch.float64
            )
            self.groups.append((origins, AnchorFeatures(conf, probs)))
        self.top = min((f.probs.shape[-1] for _, f in self.groups), default=1)
        self._scores: dict = {}  # the pool's scores per acceptance model (slots do not change them)

    def drafts(self, graph: DynamicGraph) -> dict[tuple[int, int], set[Formula]]:
        """The formulas each origin's forward drafts (`(block index, t)` -> set)."""
        if graph.max_token_rank > self.top:
            raise ValueError(
                f"the graph drafts token rank {graph.max_token_rank} but the trajectories' features "
                f"cover {self.top}"
            )
        tensors = DynamicTensors(graph)
        nodes = graph.pool.nodes
        model = (graph.pool, graph.gap_weight, graph.rank_bias, graph.token_power)
        if model not in self._scores:
            self._scores = {
                model: [tensors.scores(self._features(f, graph)) for _, f in self.groups]
            }
        out = {}
        for (origins, features), score in zip(self.groups, self._scores[model], strict=True):
            chosen = tensors.select(self._features(features, graph), score).tolist()
            for origin, picks in zip(origins, chosen, strict=True):
                out[origin] = {nodes[q] for q in picks}
        return out

    @staticmethod
    def _features(features: AnchorFeatures, graph: DynamicGraph) -> AnchorFeatures:
        return AnchorFeatures(features.conf, features.probs[..., : graph.max_token_rank])

    def evaluate(self, graph: DynamicGraph, *, cross_block: bool = False) -> Prediction:
        drafts = self.drafts(graph)
        index = {id(b): n for n, b in enumerate(self.trajectories.blocks)}

        def nodes_at(block: BlockTrajectory, t: int) -> set[Formula]:
            return drafts[(index[id(block)], t)]

        return evaluate_at(nodes_at, self.trajectories, cross_block=cross_block)


def evaluate_dynamic(
    graph: DynamicGraph, trajectories: Trajectories, *, cross_block: bool = False
) -> Prediction:
    """NFE the walk needs with dynamic drafting on trajectories recorded with anchor features."""
    return DynamicReplay(trajectories).evaluate(graph, cross_block=cross_block)


def choice_events(trajectories: Trajectories, top: int) -> tuple[torch.Tensor, ...]:
    """Every pair the recorded trajectories added, as a choice among the positions still free: certainty
    `-log(1 - c)` (E, Lb), free ranks (E, Lb), ranks (E, Lb), the chosen rank (E,) and the anchor's
    log-probabilities of the top token ranks at the chosen position (E, top) with the chosen token rank (E,)."""
    rows = []
    for block in trajectories.blocks:
        for seq, (conf, probs) in zip(block.keys, block.anchors, strict=True):
            conf_t = torch.tensor(conf, dtype=torch.float64)
            previous: set = set()
            for key in seq:
                taken = {i - 1 for i, _ in previous}
                for i, j in sorted(set(key) - previous):
                    if j <= top and i <= len(conf):
                        rows.append((conf_t, taken, i - 1, probs[i - 1][:top], j - 1))
                previous = set(key)
    if not rows:
        raise ValueError("the trajectories hold no transition to fit dynamic drafting to")
    conf = torch.stack([r[0] for r in rows])
    free = torch.isfinite(conf)
    for e, r in enumerate(rows):
        free[e, list(r[1])] = False
    certainty = -torch.log((1 - conf.clamp(0.0, 1.0)).clamp_min(1e-12))
    # absolute ranks (the race's weights are fixed)
    rel = torch.arange(conf.shape[1]).expand_as(conf)
    chosen = torch.tensor([r[2] for r in rows])
    logp = torch.tensor([r[3] for r in rows], dtype=torch.float64).clamp_min(1e-300).log()
    return certainty, free, rel, chosen, logp, torch.tensor([r[4] for r in rows])


def fit_model(trajectories: Trajectories, *, top: int = 3, ranks: int = 4) -> tuple:
    """Maximum-likelihood `(gap_weight, rank_bias, token_power)` of the acceptance model on the recorded
    choices (docs/algorithm.md §5.10); the first rank's bias is 0 (softmax is shift-invariant)."""
    certainty, free, rel, chosen, logp, token = choice_events(trajectories, top)
    rel = rel.clamp(0, ranks - 1)
    params = torch.zeros(ranks + 1, dtype=torch.float64, requires_grad=True)  # log weight, biases
    gamma = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # log token power

    def nll():
        bias = torch.cat([params.new_zeros(1), params[1:ranks]])
        logit = params[0].exp() * certainty + bias[rel]
        logit = torch.where(free, logit, float("-inf"))
        pos = logit.gather(1, chosen[:, None]).squeeze(1) - logit.logsumexp(1)
        tok = gamma.exp() * logp
        tok = tok.gather(1, token[:, None]).squeeze(1) - tok.logsumexp(1)
        return -(pos.sum() + tok.sum())

    opt = torch.optim.LBFGS([params, gamma], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nll()
        loss.backward()
        return loss

    opt.step(closure)
    p = params.detach()
    bias = (0.0, *(round(float(b), 4) for b in p[1:ranks]))
    return round(float(p[0].exp()), 4), bias, round(float(gamma.detach().exp()), 4)


def calibrate_dynamic(
    trajectories: Trajectories,
    budget: int,
    *,
    cross_block: bool = False,
    pool: DraftGraph | None = None,
    replay: DynamicReplay | None = None,
    provenance: dict | None = None,
) -> DynamicGraph:
    """A dynamic graph of `budget` slots fitted to these trajectories: the acceptance model by maximum
    likelihood, then the slots: the best (replayed NFE, ties to the first) of the default shape, a wider one
    and a chain (capped at the pool's depth), improved by moving one slot at a time to another level while a
    move saves at least `SHAPE_MARGIN` of the replayed NFE (`improve_slots`). `pool` defaults to the generic
    pool one level deeper than the default shape; `replay` (of these trajectories) may be shared between
    budgets, which reuses its scores."""
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"budget={budget!r} must be a positive integer")
    replay = replay or DynamicReplay(trajectories)
    # the default shape's depth and one more level (a chain's deeper slots are capped there)
    pool = pool or generic_pool(max(default_slots(budget)) + 1, max_token_rank=min(3, replay.top))
    gap, bias, token = fit_model(trajectories, top=pool.max_token_rank)
    depth = max(pool.levels)
    shapes = []
    for slots in (default_slots(budget), _wide(budget), tuple(range(1, budget + 1))):
        slots = tuple(min(s, depth) for s in slots)
        if slots not in shapes and _fits(pool, slots):
            shapes.append(slots)

    def nfe(slots) -> int:
        graph = DynamicGraph(pool, tuple(slots), gap, bias, token)
        return replay.evaluate(graph, cross_block=cross_block).nfe

    best = min(shapes, key=nfe)
    slots = improve_slots(best, nfe, pool)
    return DynamicGraph(pool, slots, gap, bias, token, provenance=dict(provenance or {}))


# a slot move must save this share of the calibration prompts' NFE: on the embedded model's 20 calibration
# prompts, smaller savings did not carry over to the 200 test problems (scripts/dynamic_study.py; chosen there)
SHAPE_MARGIN = 0.02


def improve_slots(slots, nfe, pool: DraftGraph, margin: float = SHAPE_MARGIN) -> tuple[int, ...]:
    """Local search over slot shapes from `slots`: move one slot to another level of the pool (each drafted
    level keeps the level below it drafted, the pool has room) and keep the best move while it saves at least
    `margin` of `nfe(slots)`, the replayed NFE; the first best move on ties (levels ascending)."""
    current, value = tuple(slots), nfe(slots)
    depth = max(lv for lv in pool.levels if lv is not None)
    seen = {current}
    while True:
        moves = []
        for a in sorted(set(current)):
            for b in range(1, depth + 1):
                if a == b:
                    continue
                shape = list(current)
                shape.remove(a)
                shape = tuple(sorted([*shape, b]))
                if (
                    shape in seen
                    or not _fits(pool, shape)
                    or any(lv > 1 and lv - 1 not in shape for lv in shape)
                ):
                    continue
                seen.add(shape)
                moves.append((nfe(shape), shape))
        if not moves:
            return current
        best_value, best_shape = min(moves, key=lambda m: m[0])
        if best_value > value * (1 - margin):
            return current
        current, value = best_shape, best_value


def _wide(budget: int) -> tuple[int, ...]:
    """Three candidates at level 1 and two at the next levels: for anchors that predict the order poorly."""
    slots = [1] * min(3, budget)
    level = 2
    while len(slots) < budget:
        slots += [level] * min(2, budget - len(slots))
        level += 1
    return tuple(slots)


def _fits(pool: DraftGraph, slots) -> bool:
    levels = pool.levels
    return all(list(slots).count(lv) <= levels.count(lv) for lv in set(slots))
