"""Hand-built draft graphs and the graph spec strings of the public API (docs/algorithm.md §11; paper Fig. 2).

* `chain:D`    — `{(1,1)}, {(1,1),(2,1)}, ...`: bets on the anchor's confidence order, one token per level.
* `topk:K`     — two levels: the top-K tokens at the most confident position, each followed by the top token
  at the second position (D = 2K).
* `fig2`       — the paper's Figure-2 graph `{c11}, {c21}, {c11,c21}, {c11,c31}, {c11,c21,c31}`.
* `dynamic:D`  — D drafts chosen at every forward from the live anchor (`spiffy.graph.dynamic`).
"""

from __future__ import annotations

import os
from pathlib import Path

from spiffy.graph.draft_graph import ROOT, DraftGraph
from spiffy.graph.dynamic import DynamicGraph, dynamic_graph, is_dynamic_file


def chain(depth: int) -> DraftGraph:
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"chain depth={depth!r} must be an integer >= 1")
    # parents given, not inferred: node d's only parent is node d-1 (from_formulas' subset search is cubic)
    nodes = tuple(tuple((i, 1) for i in range(1, d + 1)) for d in range(1, depth + 1))
    parents = ((ROOT,),) + tuple((d - 1,) for d in range(1, depth))
    return DraftGraph(nodes, parents, depth, selection="chain")


def two_level_topk(k: int) -> DraftGraph:
    if k < 1:
        raise ValueError(f"topk k={k} must be >= 1")
    level1 = [[(1, j)] for j in range(1, k + 1)]
    level2 = [[(1, j), (2, 1)] for j in range(1, k + 1)]
    return DraftGraph.from_formulas(level1 + level2, selection="topk")


def fig2() -> DraftGraph:
    return DraftGraph.from_formulas(
        [[(1, 1)], [(2, 1)], [(1, 1), (2, 1)], [(1, 1), (3, 1)], [(1, 1), (2, 1), (3, 1)]],
        selection="fig2",
    )


SPECS = {"chain": chain, "topk": two_level_topk, "dynamic": dynamic_graph}


def parse_graph_spec(spec: str) -> DraftGraph | DynamicGraph:
    """`"chain:5"`, `"topk:3"`, `"dynamic:10"` or `"fig2"`."""
    if spec == "fig2":
        return fig2()
    name, _, arg = spec.partition(":")
    if name not in SPECS or not arg.isdigit():
        raise ValueError(
            f"graph={spec!r} is not a graph spec ('chain:D', 'topk:K', 'dynamic:D', 'fig2') or an "
            "existing file"
        )
    if int(arg) < 1:
        raise ValueError(f"graph={spec!r}: {name} needs a positive integer")
    return SPECS[name](int(arg))


def resolve_graph(
    graph: DraftGraph | DynamicGraph | str | os.PathLike,
) -> DraftGraph | DynamicGraph:
    """A graph from a graph, a path to a graph JSON (static or dynamic), or a spec string."""
    if isinstance(graph, (DraftGraph, DynamicGraph)):
        return graph
    if isinstance(graph, os.PathLike) or str(graph).endswith(".json"):
        if is_dynamic_file(graph):
            return DynamicGraph.load(Path(graph))
        return DraftGraph.load(Path(graph))
    if isinstance(graph, str):
        return parse_graph_spec(graph)
    raise ValueError(f"graph={graph!r} must be a DraftGraph, a JSON path or a spec string")


def check_budget(source: str, budget: int, rule: str, horizon: int) -> None:
    """Reject graph settings whose graph would not match its label (the `graph.*` config group)."""
    if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
        raise ValueError(f"graph.horizon={horizon!r} must be a positive integer")
    if budget == 0:
        return
    if source == "fig2" and budget != len(fig2().nodes):
        raise ValueError(
            f"graph.budget={budget} with graph.source='fig2': the Figure-2 graph has "
            f"{len(fig2().nodes)} nodes (use graph.budget={len(fig2().nodes)}, or 0 for the base)"
        )
    if source == "topk" and budget % 2:
        raise ValueError(
            f"graph.budget={budget} with graph.source='topk': topk:K has 2K nodes (use an even budget)"
        )
    if source == "calibrate" and rule == "best" and horizon < budget:
        raise ValueError(
            f"graph.horizon={horizon} < graph.budget={budget}: rule 'best' scores chain:{budget}, which "
            f"needs trajectories recorded at least {budget} transitions deep (set graph.horizon>={budget})"
        )
