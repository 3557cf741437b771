"""Dynamic drafting: the D drafts of each forward chosen from the live anchor (docs/algorithm.md §5.10).

Every pool node (a formula, `spiffy.graph.dynamic`) gets an estimated log-probability of being the state the
base reaches after as many transitions as the node's level, from the anchor only. The base fills masked
positions in an order that the anchor predicts imperfectly; we model that order as a race (Plackett-Luce): each
masked position s of rank r has the weight

    w_s = exp(gap_weight * -log(1 - c_s) + rank_bias[r])

(`c` the rule's confidences that define the position ranks), and a node filling the set A of positions is the
state after |A| transitions when every position of A finishes before every other masked one:

    P(A) = integral_0^inf  W_B e^(-W_B t) prod_(a in A) (1 - e^(-w_a t)) dt,    W_B = sum of w outside A,

computed by Gauss-Laguerre quadrature; its tokens add `token_power * log a(i, j)`, with `a(i, j)` the anchor's
probability of the rank-j token at the rank-i position. The slots are then filled level by level: at level l,
the best nodes of that level whose parent (or the root) is drafted, ties to the lower pool index (a stable
sort). Everything is tensor work on the anchor's device with static shapes (D rows, their levels fixed by the
slots): no host read. Verification is the ordinary walk, so the output is the base decoder's whichever drafts
are chosen (docs/algorithm.md §5.4).

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
        if keyed:  # rank tables per level: each pair reads its own level's table (first insertion path)
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
        levels = torch.tensor(pool.levels, dtype=torch.long)
        self.candidates = []  # per slot level: (pool nodes at that level, number of slots)
        for lv in sorted(set(graph.slots)):
            nodes = (levels == lv).nonzero().squeeze(-1).to(device)
            self.candidates.append((nodes, graph.slots.count(lv)))
        self.slot_levels = torch.tensor(graph.slots, dtype=torch.long, device=device)
        slot, lv = torch.arange(len(graph.slots)), torch.tensor(graph.slots)
        same = (lv[None] == lv[:, None]) & (slot[None] < slot[:, None])
        self.earlier = ((lv[None] < lv[:, None]) | same).to(device)  # instantiate's dedupe order

    def weights(self, features: AnchorFeatures) -> torch.Tensor:
        """Log race weight (..., Lb) of every position rank (-inf where not masked)."""
        g, conf = self.graph, features.conf
        lb = conf.shape[-1]
        rank = torch.arange(lb, device=conf.device).clamp(max=self.bias.numel() - 1)
        certainty = -torch.log((1 - conf.clamp(0.0, 1.0)).clamp_min(1e-12))
        logw = g.gap_weight * certainty + self.bias[rank]
        return torch.where(torch.isfinite(conf), logw, float("-inf"))

    def scores(self, features: AnchorFeatures) -> torch.Tensor:
        """Estimated log-probability (..., n) of every pool node being the base's state at its level."""
        g, rows = self.graph, self.rows
        logw = self.weights(features)
        lb = logw.shape[-1]
        top = logw.amax(-1, keepdim=True).clamp_min(-1e300)
        w = (logw - top).exp()  # (..., Lb), relative weights (the race is scale-free)
        total = _ordered_sum(w)
        pos = (rows.pos_rank - 1).clamp(max=lb - 1)
        ok = rows.valid & (rows.pos_rank <= lb)
        wa = torch.where(ok, w[..., pos], 0.0)  # (..., n, P)
        outside = (total[..., None] - _ordered_sum(wa)).clamp_min(0.0)  # W_B (..., n)
        x, logweight = self._quadrature(w.device)
        rate = wa[..., None] / outside[..., None, None] * x  # (..., n, P, Q) (inf when W_B = 0)
        logfinish = torch.log(-torch.expm1(-rate))  # log(1 - e^(-w_a t)); padding pairs: rate 0 ...
        logfinish = torch.where(ok[..., None], logfinish, 0.0)  # ... count as certain
        log_set = torch.logsumexp(logweight + _ordered_sum(logfinish.transpose(-1, -2)), dim=-1)
        masked = torch.isfinite(logw)[..., pos] | ~rows.valid  # every pair on a masked position
        log_set = torch.where((masked & (rows.pos_rank <= lb)).all(-1), log_set, float("-inf"))
        if g.token_power > 0:  # (0 * log 0 would be nan)
            tok = probs_of(features, pos, rows.tok_rank - 1).log()
            log_set = log_set + g.token_power * _ordered_sum(torch.where(ok, tok, 0.0))
        return log_set

    def _quadrature(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Gauss-Laguerre nodes and log weights (Q,) for integrals of e^(-x) f(x) over [0, inf)."""
        if not hasattr(self, "_gl"):
            from numpy.polynomial.laguerre import laggauss

            x, wt = laggauss(QUADRATURE)
            self._gl = (
                torch.tensor(x, dtype=torch.float64, device=device),
                torch.tensor(wt, dtype=torch.float64, device=device).log(),
            )
        return self._gl

    def select(self, features: AnchorFeatures, score: torch.Tensor | None = None) -> torch.Tensor:
        """Pool node per slot (..., D): level by level, the best nodes whose parent is drafted (`score`:
        the nodes' scores when already computed)."""
        score = self.scores(features) if score is None else score
        rows = self.rows
        kept = torch.zeros_like(score, dtype=torch.bool)
        picks = []
        for nodes, count in self.candidates:
            reach = rows.root_child[nodes] | (rows.parent[nodes] & kept[..., None, :]).any(-1)
            s = torch.where(reach, score[..., nodes], float("-inf"))
            order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :count]
            chosen = nodes[order]
            picks.append(chosen)
            kept = kept.scatter(-1, chosen, True)
        return torch.cat(picks, dim=-1)

    def select_global(self, features: AnchorFeatures, budget: int) -> torch.Tensor:
        """The `budget` best nodes whatever their levels (..., budget) (analysis only: their levels vary
        per forward, which a static-shape forward cannot take)."""
        score = self.scores(features)
        return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :budget]


QUADRATURE = 24  # Gauss-Laguerre points: P(A) to ~1e-4 relative for the weights seen here


def probs_of(features: AnchorFeatures, pos: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """The anchor's probability (..., n, P) of the token ranks `tok` at the position ranks `pos`."""
    return features.probs[..., pos, tok]


def _ordered_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension in a fixed left-to-right order, so that one state's value does not depend
    on how many states are scored together (the calibration replays the selection batched)."""
    acc = x[..., 0]
    for k in range(1, x.shape[-1]):
        acc = acc + x[..., k]
    return acc


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
