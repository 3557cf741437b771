"""Auto-speculative drafting: instantiate every graph node into a draft block state (SPEC §5.1).

Ranks come from the anchor (the distribution the real state was sampled from), processed exactly as the
transition processes logits: position rank orders the real state's masked positions by the rule's confidence
(the T=0 top-1 probability, after the EOS/EoT options), ties to the lower position; token rank orders the sampling
logits, ties to the lower id. Only the top `J = max j` tokens are ranked. Everything is vectorised over nodes;
invalid instantiations (rank beyond the masked count, the mask id) and complete drafts are dropped, and identical
draft states are kept once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spiffy.decoding.sampling import (
    TransitionContext,
    confidence,
    confidence_probs,
    noised_scores,
    sampling_logits,
)
from spiffy.graph.draft_graph import DraftGraph


@dataclass(frozen=True)
class GraphTensors:
    """A graph as padded tensors, one row per node (per node and insertion path with keyed drafting):
    ranks (R, P), pair validity (R, P), pair insertion levels (R, P), node levels (R,), node index (R,)."""

    pos_rank: torch.Tensor
    tok_rank: torch.Tensor
    valid: torch.Tensor
    levels: torch.Tensor
    max_token_rank: int
    pair_level: torch.Tensor
    node: torch.Tensor

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
        levels = torch.tensor(graph.levels, dtype=torch.long)[node]
        return cls(
            pos.to(device),
            tok.to(device),
            valid.to(device),
            levels.to(device),
            graph.max_token_rank,
            pair_level.to(device),
            node.to(device),
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
    anchor_logits: torch.Tensor, ctx: TransitionContext, step: int, keyed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token scores (Lb, V) and position confidences (Lb,) predicting transition `step` from the anchor.

    `keyed=False` (the paper): the anchor's un-noised scores and its greedy confidence, whatever the step.
    `keyed=True` (SPEC §5.7): the anchor's scores noised with transition `step`'s own keyed Gumbel draw, the
    confidence of that noisy prediction, and with `random` remasking that step's remasking uniforms; exactly
    what the rule would pick at `step` if the distribution did not move.
    """
    scores = (
        noised_scores(anchor_logits, ctx, step) if keyed else sampling_logits(anchor_logits, ctx)
    )
    x0 = scores.argmax(dim=-1)
    if keyed or ctx.cfg.remasking != "random":  # the rule's own confidence of that prediction
        conf = confidence(anchor_logits, x0, step, ctx)
    else:  # un-keyed random remasking: the paper's anchor confidence
        conf = confidence_probs(anchor_logits, ctx).gather(-1, x0[:, None]).squeeze(-1)
    return scores, conf


def top_ranked(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (R, k) of the k largest scores per row, ties to the lower index, without a full sort."""
    vocab = scores.shape[-1]
    k = min(k, vocab)
    width = min(vocab, k + 8)
    vals, idx = scores.topk(width, dim=-1)  # (R, width), tie order unspecified
    order = idx.argsort(dim=-1)
    vals, idx = vals.gather(-1, order), idx.gather(-1, order)
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    vals, idx = vals.gather(-1, order), idx.gather(-1, order)
    if width < vocab:  # a tie at the window's edge may continue beyond it: sort those rows fully
        edge = vals[:, k - 1] == vals[:, width - 1]
        if edge.any():
            full = torch.sort(scores[edge], dim=-1, descending=True, stable=True).indices
            idx[edge, :k] = full[:, :k]
    return idx[:, :k]


def rank_tables(
    anchor_logits: torch.Tensor,
    state: torch.Tensor,
    ctx: TransitionContext,
    max_token_rank: int,
    *,
    step: int = 0,
    levels: int = 1,
    keyed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position order and token tables from the anchor, per draft level.

    Returns:
        pos_by_rank: (levels, |M|) block positions of the real state's masked set, best first.
        top_tokens: (levels, Lb, J) token ids per position, best first.
    Without keyed noise every level shares one table (computed once). With it, token ranks use each
    level's own step key, while the position order is the first drafted step's for every level: one
    consistent order of M keeps a formula's position ranks distinct (SPEC §5.1).
    """
    masked = (state == ctx.spec.mask_id).nonzero().squeeze(-1)  # (|M|,)
    orders, tokens = [], []
    for level in range(1, (levels if keyed else 1) + 1):
        scores, conf = level_scores(anchor_logits, ctx, step + level - 1, keyed)
        if not orders:
            order = masked[torch.sort(conf[masked], descending=True, stable=True).indices]
        orders.append(order)
        tokens.append(top_ranked(scores, max_token_rank))
    return torch.stack(orders), torch.stack(tokens)


def instantiate(
    graph: GraphTensors,
    pos_by_rank: torch.Tensor,
    top_tokens: torch.Tensor,
    state: torch.Tensor,
    mask_id: int,
    *,
    keep_complete: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft states (K, Lb) of the valid, distinct, incomplete instantiations, and their levels (K,).

    `keep_complete` also keeps drafts with no mask left: the cross-block continuation (SPEC §5.4) uses their
    logits over the next block; otherwise they are never needed (SPEC §5.1)."""
    n_masked = pos_by_rank.shape[1]
    empty = state.new_empty((0, state.numel())), graph.levels.new_empty(0)
    if n_masked == 0:
        return empty
    ok = ((graph.pos_rank <= n_masked) | ~graph.valid).all(dim=1)  # (N,)
    level = (graph.pair_level - 1).clamp(max=pos_by_rank.shape[0] - 1)  # (N, P)
    pos = pos_by_rank[level, (graph.pos_rank - 1).clamp(max=n_masked - 1)]  # (N, P)
    tok_rank = (graph.tok_rank - 1).clamp(max=top_tokens.shape[2] - 1)
    tok = top_tokens[level, pos, tok_rank]  # (N, P)
    ok &= ~((tok == mask_id) & graph.valid).any(dim=1)
    pos = torch.where(graph.valid, pos, pos[:, :1])  # padding rewrites the first pair
    tok = torch.where(graph.valid, tok, tok[:, :1])
    drafts = state.repeat(pos.shape[0], 1).scatter_(1, pos, tok)  # (N, Lb)
    if not keep_complete:
        ok &= (drafts == mask_id).any(dim=1)  # complete drafts are never needed (SPEC §5.1)
    drafts, levels = drafts[ok], graph.levels[ok]
    if drafts.shape[0] == 0:
        return empty
    unique, inverse = torch.unique(drafts, dim=0, return_inverse=True)
    best = torch.full(
        (unique.shape[0],), int(levels.max()) + 1, dtype=levels.dtype, device=levels.device
    )
    best.scatter_reduce_(0, inverse, levels, reduce="amin")
    return unique, best


def pair_probabilities(
    graph: GraphTensors, pos_by_rank: torch.Tensor, top_tokens: torch.Tensor, probs: torch.Tensor
) -> torch.Tensor:
    """Anchor probability `a(c_ij)` of every pair (N, P); 0 where the rank is out of range."""
    n_masked = pos_by_rank.shape[1]
    if n_masked == 0:
        return torch.zeros(graph.pos_rank.shape, dtype=probs.dtype, device=probs.device)
    level = (graph.pair_level - 1).clamp(max=pos_by_rank.shape[0] - 1)
    pos = pos_by_rank[level, (graph.pos_rank - 1).clamp(max=n_masked - 1)]
    tok = top_tokens[level, pos, (graph.tok_rank - 1).clamp(max=top_tokens.shape[2] - 1)]
    p = probs[pos, tok]
    return torch.where(graph.pos_rank <= n_masked, p, torch.zeros_like(p))


def prune_rows(
    tensors: GraphTensors, pair_probs: torch.Tensor, graph: DraftGraph, keep: int
) -> list[int]:
    """Dynamic pruning (SPEC §5.6): the rows of the `keep` best nodes by the geometric-mean score,
    closed under reachability (a node's score uses its first row's pair probabilities)."""
    n = len(graph.nodes)
    node = tensors.node.tolist()
    first = {}
    for r, q in enumerate(node):
        first.setdefault(q, r)
    valid = tensors.valid[[first[q] for q in range(n)]]
    probs = pair_probs[[first[q] for q in range(n)]]
    logp = torch.where(valid, probs.clamp_min(1e-300).log(), torch.zeros_like(probs))
    local = (logp.sum(1) / valid.sum(1)).tolist()  # log of the geometric mean
    children = graph.children()
    score = [0.0] * n
    for q in sorted(range(n), key=lambda q: -len(graph.nodes[q])):  # leaves (largest) first
        kids = children[q]
        child = sum(score[c] for c in kids) / len(kids) if kids else local[q]
        score[q] = 0.5 * (local[q] + child)
    kept: list[int] = []
    while len(kept) < keep:
        admissible = [
            q
            for q in range(n)
            if q not in kept and any(p == -1 or p in kept for p in graph.parents[q])
        ]
        if not admissible:
            break
        kept.append(max(admissible, key=lambda q: (score[q], -q)))
    return [r for r, q in enumerate(node) if q in kept]


def subset(graph: GraphTensors, rows: list[int]) -> GraphTensors:
    """The graph tensors of the node rows `rows`."""
    index = torch.tensor(rows, dtype=torch.long, device=graph.pos_rank.device)
    return GraphTensors(
        graph.pos_rank[index],
        graph.tok_rank[index],
        graph.valid[index],
        graph.levels[index],
        graph.max_token_rank,
        graph.pair_level[index],
        graph.node[index],
    )
