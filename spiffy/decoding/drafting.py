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

from spiffy.decoding.sampling import TransitionContext, confidence_probs, sampling_logits
from spiffy.graph.draft_graph import DraftGraph


@dataclass(frozen=True)
class GraphTensors:
    """A graph as padded tensors: ranks (N, P), pair validity (N, P), node levels (N,)."""

    pos_rank: torch.Tensor
    tok_rank: torch.Tensor
    valid: torch.Tensor
    levels: torch.Tensor
    max_token_rank: int

    @classmethod
    def from_graph(cls, graph: DraftGraph, device: torch.device | str = "cpu") -> GraphTensors:
        width = max(len(node) for node in graph.nodes)
        n = len(graph.nodes)
        pos = torch.ones(n, width, dtype=torch.long)
        tok = torch.ones(n, width, dtype=torch.long)
        valid = torch.zeros(n, width, dtype=torch.bool)
        for r, node in enumerate(graph.nodes):
            for c, (i, j) in enumerate(node):
                pos[r, c], tok[r, c], valid[r, c] = i, j, True
        levels = torch.tensor(graph.levels, dtype=torch.long)
        return cls(
            pos.to(device),
            tok.to(device),
            valid.to(device),
            levels.to(device),
            graph.max_token_rank,
        )


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
    anchor_logits: torch.Tensor, state: torch.Tensor, ctx: TransitionContext, max_token_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position order and token tables from the anchor.

    Returns:
        pos_by_rank: (|M|,) block positions of the real state's masked set, best confidence first.
        top_tokens: (Lb, J) token ids per position, best first.
    """
    masked = (state == ctx.spec.mask_id).nonzero().squeeze(-1)  # (|M|,)
    scores = sampling_logits(anchor_logits, ctx)  # (Lb, V) float64
    greedy = scores.argmax(dim=-1, keepdim=True)
    conf = confidence_probs(anchor_logits, ctx).gather(-1, greedy).squeeze(-1)  # (Lb,)
    order = torch.sort(conf[masked], descending=True, stable=True).indices
    return masked[order], top_ranked(scores, max_token_rank)


def instantiate(
    graph: GraphTensors,
    pos_by_rank: torch.Tensor,
    top_tokens: torch.Tensor,
    state: torch.Tensor,
    mask_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draft states (K, Lb) of the valid, distinct, incomplete instantiations, and their levels (K,)."""
    n_masked = pos_by_rank.numel()
    empty = state.new_empty((0, state.numel())), graph.levels.new_empty(0)
    if n_masked == 0:
        return empty
    ok = ((graph.pos_rank <= n_masked) | ~graph.valid).all(dim=1)  # (N,)
    pos = pos_by_rank[(graph.pos_rank - 1).clamp(max=n_masked - 1)]  # (N, P)
    tok_rank = (graph.tok_rank - 1).clamp(max=top_tokens.shape[1] - 1)
    tok = top_tokens[pos, tok_rank]  # (N, P)
    ok &= ~((tok == mask_id) & graph.valid).any(dim=1)
    pos = torch.where(graph.valid, pos, pos[:, :1])  # padding rewrites the first pair
    tok = torch.where(graph.valid, tok, tok[:, :1])
    drafts = state.repeat(pos.shape[0], 1).scatter_(1, pos, tok)  # (N, Lb)
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
    n_masked = pos_by_rank.numel()
    if n_masked == 0:
        return torch.zeros(graph.pos_rank.shape, dtype=probs.dtype, device=probs.device)
    pos = pos_by_rank[(graph.pos_rank - 1).clamp(max=n_masked - 1)]
    tok = top_tokens[pos, (graph.tok_rank - 1).clamp(max=top_tokens.shape[1] - 1)]
    p = probs[pos, tok]
    return torch.where(graph.pos_rank <= n_masked, p, torch.zeros_like(p))


def prune_nodes(
    pair_probs: torch.Tensor, valid: torch.Tensor, graph: DraftGraph, keep: int
) -> list[int]:
    """Dynamic pruning (SPEC §5.6): indices of the `keep` best nodes by the geometric-mean score,
    closed under reachability."""
    n = len(graph.nodes)
    if keep >= n:
        return list(range(n))
    logp = torch.where(valid, pair_probs.clamp_min(1e-300).log(), torch.zeros_like(pair_probs))
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
    return sorted(kept)


def subset(graph: GraphTensors, rows: list[int]) -> GraphTensors:
    """The graph tensors of the node rows `rows`."""
    index = torch.tensor(rows, dtype=torch.long, device=graph.pos_rank.device)
    return GraphTensors(
        graph.pos_rank[index],
        graph.tok_rank[index],
        graph.valid[index],
        graph.levels[index],
        graph.max_token_rank,
    )
