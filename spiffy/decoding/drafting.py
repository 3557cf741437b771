"""Auto-speculative drafting: instantiate every graph node into a draft block state (docs/algorithm.md §5.1, §5.6).

Ranks come from the anchor (the distribution the real state was sampled from), processed exactly as the
transition processes logits: position rank orders the real state's masked positions by the rule's confidence
(the T=0 top-1 probability, after the EOS/EoT options), ties to the lower position; token rank orders the sampling
logits, ties to the lower id. Only the top `J = max j` tokens are ranked.

Shapes are static and nothing is read back to the host: every graph row yields a draft row, and a validity mask
marks the ones to verify (rank beyond the masked count, the mask id, complete drafts, rows pruned away, and
repeats of an earlier row's state are invalid; of equal states the lowest level, then the first row, is kept).
Dynamic pruning (docs/algorithm.md §5.6) is vectorised over nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spiffy.decoding.sampling import (
    Distributions,
    TransitionContext,
    as_distributions,
    confidence,
    noised_scores,
)
from spiffy.graph.draft_graph import DraftGraph


@dataclass(frozen=True)
class GraphTensors:
    """A graph as padded tensors, one row per node (per node and insertion path with keyed drafting):
    ranks (R, P), pair validity (R, P), pair insertion levels (R, P), node levels (R,) on the device and on
    the host (`row_levels`), node index (R,); plus the node-level structure pruning needs."""

    pos_rank: torch.Tensor
    tok_rank: torch.Tensor
    valid: torch.Tensor
    levels: torch.Tensor
    max_token_rank: int
    pair_level: torch.Tensor
    node: torch.Tensor
    row_levels: tuple[int, ...] = ()
    first_row: torch.Tensor | None = None  # (n,) each node's first row
    parent: torch.Tensor | None = None  # (n, n) bool, parent[q, p]: p is a parent of q
    root_child: torch.Tensor | None = None  # (n,) bool
    children: torch.Tensor | None = None  # (n, C) child indices, padded with 0
    child_ok: torch.Tensor | None = None  # (n, C) bool
    size_groups: tuple[torch.Tensor, ...] = ()  # node indices by formula size, largest first
    # instantiation constants: pair indices into the rank tables (padding slots repeat pair 0), the pair
    # each padding slot repeats, the dedupe order (lower level, then lower row, wins), whether rows can
    # repeat a state at all, and the fewest masked positions a row needs to be drafted: its largest
    # position rank, and one more than its size when complete drafts are dropped (docs/algorithm.md §5.1)
    level_idx: torch.Tensor | None = None
    pos_idx: torch.Tensor | None = None
    tok_idx: torch.Tensor | None = None
    pad_src: torch.Tensor | None = None
    earlier: torch.Tensor | None = None
    max_position_rank: int = 1
    can_repeat: bool = False
    min_masked: torch.Tensor | None = None  # (R,)
    min_masked_incomplete: torch.Tensor | None = None  # (R,)

    @property
    def rows(self) -> int:
        return self.pos_rank.shape[0]

    @property
    def max_level(self) -> int:
        return max(self.row_levels, default=1)

    @classmethod
    def from_graph(
        cls, graph: DraftGraph, device: torch.device | str = "cpu", *, keyed: bool = False
    ) -> GraphTensors:
        """Without keyed noise every level shares one rank table, so one row per node suffices; with
        it, the same formula reached along different parent paths adds its pairs at different levels
        (different noise), so each distinct path is its own row."""
        rows = [
            (q, a)
            for q, assignments in enumerate(insertion_levels(graph))
            for a in (assignments if keyed else assignments[:1])
        ]
        width = max((len(node) for node in graph.nodes), default=1)
        shape = (len(rows), width)
        pos, tok = torch.ones(shape, dtype=torch.long), torch.ones(shape, dtype=torch.long)
        pair_level = torch.ones(shape, dtype=torch.long)
        valid = torch.zeros(shape, dtype=torch.bool)
        for r, (q, assignment) in enumerate(rows):
            for c, (i, j) in enumerate(graph.nodes[q]):
                pos[r, c], tok[r, c], valid[r, c] = i, j, True
                pair_level[r, c] = assignment[(i, j)] if keyed else 1
        node = torch.tensor([q for q, _ in rows], dtype=torch.long)
        row_levels = tuple(graph.levels[q] for q, _ in rows)
        n = len(graph.nodes)
        first = {}
        for r, (q, _) in enumerate(rows):
            first.setdefault(q, r)
        parent = torch.zeros(n, n, dtype=torch.bool)
        root_child = torch.zeros(n, dtype=torch.bool)
        for q, ps in enumerate(graph.parents):
            for p in ps:
                if p == -1:
                    root_child[q] = True
                else:
                    parent[q, p] = True
        kids = graph.children()
        width_c = max((len(k) for k in kids), default=0)
        children = torch.zeros(n, width_c, dtype=torch.long)
        child_ok = torch.zeros(n, width_c, dtype=torch.bool)
        for q, ks in enumerate(kids):
            children[q, : len(ks)] = torch.tensor(ks, dtype=torch.long)
            child_ok[q, : len(ks)] = True
        lv = torch.tensor(row_levels, dtype=torch.long)
        row = torch.arange(len(rows))
        earlier = (lv[None, :] < lv[:, None]) | (
            (lv[None, :] == lv[:, None]) & (row[None] < row[:, None])
        )
        pad_src = torch.where(valid, torch.arange(shape[1]).expand(shape), 0)
        max_rank = torch.where(valid, pos, 0).amax(1)  # (R,) (every formula has a pair)
        size = valid.sum(1)
        level_idx = (pair_level - 1 if keyed else torch.zeros_like(pair_level)).gather(1, pad_src)
        sizes = sorted({len(f) for f in graph.nodes}, reverse=True)
        groups = tuple(
            torch.tensor([q for q in range(n) if len(graph.nodes[q]) == s], device=device)
            for s in sizes
        )
        return cls(
            pos.to(device),
            tok.to(device),
            valid.to(device),
            torch.tensor(row_levels, dtype=torch.long, device=device),
            graph.max_token_rank,
            pair_level.to(device),
            node.to(device),
            row_levels,
            torch.tensor([first[q] for q in range(n)], dtype=torch.long, device=device),
            parent.to(device),
            root_child.to(device),
            children.to(device),
            child_ok.to(device),
            groups,
            level_idx.to(device),
            (pos - 1).gather(1, pad_src).to(device),
            (tok - 1).gather(1, pad_src).to(device),
            pad_src.to(device),
            earlier.to(device),
            graph.max_position_rank,
            keyed,  # without keyed noise distinct nodes give distinct states (distinct pairs)
            max_rank.to(torch.long).to(device),
            torch.maximum(max_rank, size + 1).to(torch.long).to(device),
        )


def insertion_levels(graph: DraftGraph) -> list[list[dict[tuple[int, int], int]]]:
    """Per node, every distinct assignment of its pairs to the level (transition) that adds them, one
    per parent path from the root: a node adds its new pairs one level after its parent's deepest."""
    out: list[list[dict] | None] = [None] * len(graph.nodes)
    for q in sorted(range(len(graph.nodes)), key=lambda q: len(graph.nodes[q])):
        found: list[dict] = []
        for p in graph.parents[q]:
            bases = [{}] if p == -1 else out[p]
            for base in bases:
                depth = max(base.values(), default=0) + 1
                a = {pair: base.get(pair, depth) for pair in graph.nodes[q]}
                if a not in found:
                    found.append(a)
        out[q] = found
    return out


def level_scores(
    anchor: torch.Tensor | Distributions, ctx: TransitionContext, step: int, keyed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token scores (Lb, V) and position confidences (Lb,) predicting transition `step` from the anchor.

    `keyed=False` (the paper): the anchor's un-noised scores and its greedy confidence, whatever the step.
    `keyed=True` (docs/algorithm.md §5.7): the anchor's scores noised with transition `step`'s own keyed Gumbel draw, the
    confidence of that noisy prediction, and with `random` remasking that step's remasking uniforms; exactly
    what the rule would pick at `step` if the distribution did not move.
    """
    d = as_distributions(anchor, ctx)
    scores, _, conf = _level_predictions(d, ctx, step, keyed)
    return d.sampling if scores is None else scores, conf


def _level_predictions(d: Distributions, ctx: TransitionContext, step: int, keyed: bool):
    """`level_scores` plus the scores' argmax (Lb,); un-keyed, the scores are the anchor's sampling logits
    (returned as None: a row view picks them only if used) and the prediction and its confidence are those
    the transition computed (once per forward, `Distributions.greedy`)."""
    if not keyed:
        x0, conf = d.greedy()
        if conf is None:  # un-keyed random remasking: the paper's anchor confidence
            conf = d.probs.gather(-1, x0[:, None]).squeeze(-1)
        return None, x0, conf
    scores = noised_scores(d, ctx, step)
    x0 = scores.argmax(dim=-1)
    return scores, x0, confidence(d, x0, step, ctx)  # the rule's own confidence of that prediction


def top_ranked(scores: torch.Tensor, k: int, *, first: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (R, k) of the k largest scores per row, ties to the lower index, without a sort or a device
    read: k rounds of argmax (which returns the first maximum), each taking its pick out of the next round.
    -inf scores (tokens of probability 0) rank after every finite one, among themselves by id. `first` (R,),
    when the caller has it, is the rows' argmax (the first round)."""
    k = min(k, scores.shape[-1])
    pick = scores.argmax(dim=-1) if first is None else first
    if k == 1:
        return pick[..., None]
    lowest = torch.finfo(scores.dtype).min  # -inf scores rank here, above the picks' -inf
    inf = float("inf")
    s = torch.nan_to_num(scores, nan=float("nan"), posinf=inf, neginf=lowest)  # a copy: -inf only
    picks = [pick[..., None]]
    for t in range(1, k):
        s.scatter_(-1, picks[-1], float("-inf"))
        picks.append(s.argmax(dim=-1, keepdim=True))
    return torch.cat(picks, dim=-1)


def rank_tables(
    anchor: torch.Tensor | Distributions,
    state: torch.Tensor,
    ctx: TransitionContext,
    max_token_rank: int,
    *,
    step: int = 0,
    levels: int = 1,
    keyed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Position order and token tables from the anchor, per draft level.

    Returns:
        pos_by_rank: (levels, Lb) block positions, the real state's masked ones first, best first.
        top_tokens: (levels, Lb, J) token ids per position, best first.
        n_masked: 0-dim tensor, the number of masked positions (valid entries of `pos_by_rank`).
    Without keyed noise every level shares one table (computed once). With it, token ranks use each
    level's own step key, while the position order is the first drafted step's for every level: one
    consistent order of M keeps a formula's position ranks distinct (docs/algorithm.md §5.1).
    """
    d = as_distributions(anchor, ctx)
    masked = state == ctx.spec.mask_id
    n_levels = levels if keyed else 1
    order, tokens = None, []
    for level in range(1, n_levels + 1):
        scores, x0, conf = _level_predictions(d, ctx, step + level - 1, keyed)
        if order is None:
            key = torch.where(masked, conf, float("-inf"))
            order = torch.sort(key, descending=True, stable=True).indices
        if max_token_rank == 1:  # the prediction itself
            tokens.append(x0[:, None])
        else:
            scores = d.sampling if scores is None else scores
            tokens.append(top_ranked(scores, max_token_rank, first=x0))
    n_masked = masked.sum()
    if n_levels == 1:
        return order[None], tokens[0][None], n_masked
    return order.expand(n_levels, -1), torch.stack(tokens), n_masked


@dataclass(frozen=True)
class Drafts:
    """Draft states (R, Lb), which rows to verify (R,) and their graph levels (R,) on the device and the host:
    static shapes."""

    states: torch.Tensor
    valid: torch.Tensor
    levels: torch.Tensor
    row_levels: tuple[int, ...] = ()


def instantiate(
    graph: GraphTensors,
    pos_by_rank: torch.Tensor,
    top_tokens: torch.Tensor,
    n_masked: torch.Tensor,
    state: torch.Tensor,
    mask_id: int,
    *,
    keep_complete: bool = False,
    keep_rows: torch.Tensor | None = None,
) -> Drafts:
    """One draft row per graph row; `valid` marks the valid, distinct, incomplete, kept ones.

    `keep_complete` also keeps drafts with no mask left: the cross-block continuation (docs/algorithm.md §5.4) uses their
    logits over the next block; otherwise they are never needed (docs/algorithm.md §5.1). `keep_rows` (R,) is the pruning
    mask (docs/algorithm.md §5.6)."""
    lb = state.numel()
    pos_idx = graph.pos_idx if graph.max_position_rank <= lb else graph.pos_idx.clamp(max=lb - 1)
    # every rank exists; and unless kept, the draft leaves a mask: its ranks are distinct masked positions,
    # so it fills exactly its size of them (complete drafts are never needed, docs/algorithm.md §5.1)
    ok = (graph.min_masked if keep_complete else graph.min_masked_incomplete) <= n_masked  # (R,)
    if pos_by_rank.shape[0] == 1:  # one table for every level: plain lookups
        pos = pos_by_rank[0].take(pos_idx)  # (R, P), padding repeats pair 0
        one = top_tokens.shape[2] == 1
        tok = top_tokens[0, :, 0].take(pos) if one else top_tokens[0][pos, graph.tok_idx]
    else:
        pos = pos_by_rank[graph.level_idx, pos_idx]
        tok = top_tokens[graph.level_idx, pos, graph.tok_idx]  # (R, P)
    ok &= (tok != mask_id).all(dim=1)
    drafts = state.expand(pos.shape[0], -1).scatter(1, pos, tok)  # (R, Lb)
    if keep_rows is not None:
        ok &= keep_rows
    if graph.can_repeat:
        same = (drafts[:, None, :] == drafts[None, :, :]).all(-1)  # (R, R)
        ok &= ~(same & graph.earlier & ok[None, :]).any(dim=1)
    return Drafts(drafts, ok, graph.levels, graph.row_levels)


def pair_probabilities(
    graph: GraphTensors,
    pos_by_rank: torch.Tensor,
    top_tokens: torch.Tensor,
    n_masked: torch.Tensor,
    probs: torch.Tensor,
) -> torch.Tensor:
    """Anchor probability `a(c_ij)` of every pair (R, P); 0 where the rank is out of range."""
    lb = pos_by_rank.shape[1]
    pos = pos_by_rank[graph.level_idx, graph.pos_idx.clamp(max=lb - 1)]
    tok = top_tokens[graph.level_idx, pos, graph.tok_idx]
    p = probs[pos, tok]
    return torch.where(graph.pos_rank <= n_masked, p, torch.zeros_like(p))


def prune_rows(tensors: GraphTensors, pair_probs: torch.Tensor, keep: int) -> torch.Tensor:
    """Dynamic pruning (docs/algorithm.md §5.6): a row mask (R,) of the `keep` best nodes by the geometric-mean score,
    closed under reachability (a node's score uses its first row's pair probabilities). Vectorised over
    nodes; the arithmetic (sums in child order, then halving) is the reference's, so ties break alike."""
    first = tensors.first_row
    valid = tensors.valid[first]
    probs = pair_probs[first]
    logp = torch.where(valid, probs.clamp_min(1e-300).log(), torch.zeros_like(probs))
    local = logp.sum(1) / valid.sum(1)  # log of the geometric mean
    n = local.shape[0]
    score = torch.zeros_like(local)
    n_kids = tensors.child_ok.sum(1)
    for (
        group
    ) in tensors.size_groups:  # leaves (largest formulas) first: children are computed before
        acc = torch.zeros(group.shape[0], dtype=local.dtype, device=local.device)
        for c in range(tensors.children.shape[1]):
            acc = torch.where(
                tensors.child_ok[group, c], acc + score[tensors.children[group, c]], acc
            )
        kids = n_kids[group]
        child = torch.where(kids > 0, acc / kids.clamp_min(1), local[group])
        score[group] = 0.5 * (local[group] + child)
    kept = torch.zeros(n, dtype=torch.bool, device=local.device)
    for _ in range(min(keep, n)):
        admissible = ~kept & (tensors.root_child | (tensors.parent & kept[None, :]).any(1))
        pick = torch.where(admissible, score, float("-inf")).argmax()
        kept = kept | ((torch.arange(n, device=kept.device) == pick) & admissible.any())
    return kept[tensors.node]
