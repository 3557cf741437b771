"""Dynamic drafting: the D drafts of each forward chosen from the live anchor (docs/algorithm.md §5.10).

Every pool node (a formula, `spiffy.graph.dynamic`) gets an estimated log-probability of being the state the
base reaches after as many transitions as the node's level, from the anchor only. The base fills masked
positions in an order that the anchor predicts imperfectly; we model that order as a race (Plackett-Luce): each
masked position s of rank r has the weight

    w_s = exp(gap_weight * -log(1 - c_s) + rank_bias[r])

(`c` the rule's confidences that define the position ranks), and a node filling the set A of positions is the
state after |A| transitions when every position of A finishes before every other masked one. Each position
of A beats all of B (the masked positions outside A, total weight W_B) with probability w_a / (w_a + W_B);
the score takes their product,

    log P(A) ~ sum_(a in A) log(w_a / (w_a + W_B)),

exact for |A| = 1 and otherwise an approximation of the race's integral (its Gauss-Laguerre quadrature, with 2
to 24 points, ranked the nodes identically on the embedded model's test problems, docs/algorithm.md §5.10);
its tokens add `token_power * log a(i, j)`, with `a(i, j)` the anchor's probability of the rank-j token at the
rank-i position. Every slot level then takes that level's best nodes, ties to the lower pool index (one stable
sort for all levels; requiring a drafted parent, level by level, chose the same drafts there and cost a
sequential step per level). Everything is tensor work on the anchor's device with static shapes (D rows, their
levels fixed by the slots): no host read. Verification is the ordinary walk, so the output is the base
decoder's whichever drafts are chosen (docs/algorithm.md §5.4).

`anchor_features` is also what the trajectory recorder stores per origin, so that the calibration replays the
selection (`spiffy.calibration.dynamic`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from spiffy.decoding.drafting import (
    Drafts,
    GraphTensors,
    _level_predictions,
    insertion_levels,
    instantiate,
    rank_tables,
)
from spiffy.decoding.sampling import Distributions, TransitionContext, as_distributions
from spiffy.graph.dynamic import DynamicGraph


@dataclass(frozen=True)
class AnchorFeatures:
    """What the selection reads from an anchor: the rule's confidence of the masked positions in position-rank
    order (..., Lb) (-inf beyond the masked count) and the probability of the rank-j token at the rank-i
    position (..., Lb, J), float64."""

    conf: torch.Tensor
    probs: torch.Tensor


def anchor_features(
    anchor: Distributions | torch.Tensor, state: torch.Tensor, ctx: TransitionContext, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AnchorFeatures]:
    """The un-keyed rank tables (docs/algorithm.md §5.1) and the features of the anchor over `top` token ranks."""
    d = as_distributions(anchor, ctx)
    pos_by_rank, top_tokens, n_masked = rank_tables(d, state, ctx, top)
    _, _, conf = _level_predictions(d, ctx, 0, False)
    order = pos_by_rank[0]
    masked = (state == ctx.spec.mask_id)[order]
    conf_ranked = torch.where(masked, conf[order].to(torch.float64), float("-inf"))
    probs = d.probs[order[:, None], top_tokens[0][order]].to(torch.float64)  # (Lb, J)
    return pos_by_rank, top_tokens, n_masked, AnchorFeatures(conf_ranked, probs)


class DynamicTensors:
    """A dynamic graph's pool as tensors, with what scoring and slot filling need."""

    def __init__(self, graph: DynamicGraph, device: torch.device | str = "cpu", *, keyed=False):
        pool = graph.pool
        self.graph, self.device, self.keyed = graph, device, keyed
        self.rows = GraphTensors.from_graph(pool, device)  # one row per node
        if (
            keyed
        ):  # rank tables per level: each pair reads its own level's table (first insertion path)
            paths = [a[0] for a in insertion_levels(pool)]
            level = torch.zeros(len(pool.nodes), self.rows.pos_rank.shape[1], dtype=torch.long)
            for q, node in enumerate(pool.nodes):
                for c, pair in enumerate(node):
                    level[q, c] = paths[q][pair]
            pad = self.rows.pad_src.cpu()
            self.rows = replace(
                self.rows, level_idx=(level - 1).clamp_min(0).gather(1, pad).to(device)
            )
        self.bias = torch.tensor(graph.rank_bias, dtype=torch.float64, device=device)
        self._biases: dict[int, torch.Tensor] = {}
        self._pair_tables: dict[int, tuple] = {}
        levels = torch.tensor(pool.levels, dtype=torch.long)
        self.candidates = []  # per slot level: (pool nodes at that level, number of slots)
        for lv in sorted(set(graph.slots)):
            nodes = (levels == lv).nonzero().squeeze(-1).to(device)
            self.candidates.append((nodes, graph.slots.count(lv)))
        # only nodes at the slots' levels can be drafted: only they are scored
        self.scored = torch.cat([nodes for nodes, _ in self.candidates])
        self.pos_rank = self.rows.pos_rank[self.scored]
        self.tok_rank = self.rows.tok_rank[self.scored]
        self.valid = self.rows.valid[self.scored]
        # the candidates as one (levels, width) table (padding: -inf scores), and where each slot's pick is
        # in the flattened (levels, most) picks
        width = max(len(nodes) for nodes, _ in self.candidates)
        self.most = max(count for _, count in self.candidates)
        self.table = torch.zeros(len(self.candidates), width, dtype=torch.long, device=device)
        self.padding = torch.ones(len(self.candidates), width, dtype=torch.bool, device=device)
        take = []
        for k, (nodes, count) in enumerate(self.candidates):
            self.table[k, : len(nodes)] = nodes
            self.padding[k, : len(nodes)] = False
            take += [k * self.most + c for c in range(count)]
        self.take = torch.tensor(take, dtype=torch.long, device=device)
        self.slot_levels = torch.tensor(graph.slots, dtype=torch.long, device=device)
        slot, lv = torch.arange(len(graph.slots)), torch.tensor(graph.slots)
        same = (lv[None] == lv[:, None]) & (slot[None] < slot[:, None])
        self.earlier = ((lv[None] < lv[:, None]) | same).to(device)  # instantiate's dedupe order

    def weights(self, features: AnchorFeatures) -> torch.Tensor:
        """Log race weight (..., Lb) of every position rank (-inf where not masked)."""
        conf = features.conf
        certainty = -torch.log1p(
            -conf.clamp(max=1.0 - 1e-12)
        )  # -inf conf (not masked): -log(+inf) = -inf
        return torch.where(
            torch.isfinite(conf),
            self.graph.gap_weight * certainty + self._bias(conf.shape[-1]),
            float("-inf"),
        )

    def _bias(self, lb: int) -> torch.Tensor:
        """rank_bias per position rank (Lb,), the last value for every later rank (cached per block length)."""
        if lb not in self._biases:
            rank = torch.arange(lb, device=self.bias.device).clamp(max=self.bias.numel() - 1)
            self._biases[lb] = self.bias[rank]
        return self._biases[lb]

    def scores(self, features: AnchorFeatures) -> torch.Tensor:
        """Estimated log-probability (..., n) of every pool node being the base's state at its level (-inf for
        the nodes at no slot's level, which are never drafted and not scored)."""
        score = self._scores(features)
        full = score.new_full((*score.shape[:-1], len(self.graph.pool.nodes)), float("-inf"))
        return full.index_copy(-1, self.scored, score)

    def _scores(self, features: AnchorFeatures) -> torch.Tensor:
        """The scores (..., m) of the nodes `self.scored`."""
        logw = self.weights(features)
        lb = logw.shape[-1]
        pos, ok, beyond = self._pairs(lb)
        w = (
            logw - logw.amax(-1, keepdim=True).clamp_min(-1e300)
        ).exp()  # relative weights (scale-free race)
        wa = torch.where(ok, w[..., pos], 0.0)  # (..., m, P)
        outside = (_ordered_sum(w)[..., None] - _ordered_sum(wa)).clamp_min(0.0)  # W_B (..., m)
        # log(w_a / (w_a + W_B)) per pair (0 for padding); a pair on a position not masked (w_a = 0) makes the
        # node impossible: -inf, or nan when nothing is left outside either
        log_set = _ordered_sum(torch.where(ok, (wa / (wa + outside[..., None])).log(), 0.0))
        log_set = torch.where(beyond, float("-inf"), log_set.nan_to_num(nan=float("-inf")))
        if self.graph.token_power > 0:  # (0 * log 0 would be nan)
            tok = probs_of(features, pos, self.tok_rank - 1).log()
            log_set = log_set + self.graph.token_power * _ordered_sum(torch.where(ok, tok, 0.0))
        return log_set

    def _pairs(self, lb: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For Lb masked-or-not positions: the scored nodes' pair position indices (m, P), which pairs are real
        and within the block (m, P), and which nodes rank a position beyond it (m,) (cached)."""
        if lb not in self._pair_tables:
            inside = self.pos_rank <= lb
            self._pair_tables[lb] = (
                (self.pos_rank - 1).clamp(max=lb - 1),
                self.valid & inside,
                (self.valid & ~inside).any(-1),
            )
        return self._pair_tables[lb]

    def select(self, features: AnchorFeatures, score: torch.Tensor | None = None) -> torch.Tensor:
        """Pool node per slot (..., D): at every slot level, that level's best nodes (`score`: the nodes'
        scores when already computed). One sort for all levels: no step waits for the previous level."""
        score = self.scores(features) if score is None else score
        s = torch.where(self.padding, float("-inf"), score[..., self.table])  # (..., levels, width)
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., : self.most]
        chosen = self.table.expand(*order.shape[:-1], -1).gather(-1, order)  # (..., levels, most)
        return chosen.flatten(-2)[..., self.take]

    def select_global(self, features: AnchorFeatures, budget: int) -> torch.Tensor:
        """The `budget` best nodes whatever their levels (..., budget) (analysis only: their levels vary
        per forward, which a static-shape forward cannot take)."""
        score = self.scores(features)
        return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :budget]


def probs_of(features: AnchorFeatures, pos: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """The anchor's probability (..., n, P) of the token ranks `tok` at the position ranks `pos`."""
    return features.probs[..., pos, tok]


def _ordered_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension in a fixed order (zero-padded to a power of two, then halves added
    elementwise), so that one state's value does not depend on how many states are scored together (the
    calibration replays the selection batched) and the sum costs log2 steps, not one per term."""
    n = x.shape[-1]
    width = 1 << max(0, n - 1).bit_length()
    if width != n:
        x = torch.nn.functional.pad(x, (0, width - n))
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


class DynamicDrafter:
    """Drafts for one forward: score the pool, fill the slots, instantiate the chosen rows."""

    def __init__(self, graph: DynamicGraph, device, *, keyed: bool = False):
        self.tensors = DynamicTensors(graph, device, keyed=keyed)
        self.keyed = keyed

    def draft(
        self,
        anchor: Distributions,
        state: torch.Tensor,
        ctx: TransitionContext,
        step: int,
        mask_id: int,
        *,
        keep_complete: bool = False,
    ) -> Drafts:
        t = self.tensors
        top = t.graph.max_token_rank
        pos_by_rank, top_tokens, n_masked, features = anchor_features(anchor, state, ctx, top)
        chosen = t.select(features)  # (D,)
        if self.keyed:  # token ranks under each level's keyed noise (docs/algorithm.md §5.7)
            pos_by_rank, top_tokens, n_masked = rank_tables(
                anchor, state, ctx, top, step=step, levels=max(t.graph.slots), keyed=True
            )
        rows = t.rows
        slots = replace(
            rows,
            pos_idx=rows.pos_idx[chosen],
            tok_idx=rows.tok_idx[chosen],
            level_idx=rows.level_idx[chosen],
            min_masked=rows.min_masked[chosen],
            min_masked_incomplete=rows.min_masked_incomplete[chosen],
            levels=t.slot_levels,
            row_levels=t.graph.slots,
            earlier=t.earlier,
            can_repeat=self.keyed,  # un-keyed, distinct nodes are distinct states
        )
        return instantiate(
            slots, pos_by_rank, top_tokens, n_masked, state, mask_id, keep_complete=keep_complete
        )
