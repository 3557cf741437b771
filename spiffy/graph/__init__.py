"""Draft graphs: validated data, hand-built graphs and spec strings, graph files (docs/algorithm.md §5.2, §11)."""

from spiffy.graph.builtin import chain, fig2, parse_graph_spec, resolve_graph, two_level_topk
from spiffy.graph.draft_graph import DraftGraph

__all__ = ["DraftGraph", "chain", "fig2", "parse_graph_spec", "resolve_graph", "two_level_topk"]
