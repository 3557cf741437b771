"""Draft graphs: data, hand-built graphs, calibration and storage (docs/algorithm.md §5.2, §5.5, §5.6)."""

from spiffy.graph.builtin import chain, fig2, parse_graph_spec, resolve_graph, two_level_topk
from spiffy.graph.draft_graph import DraftGraph

__all__ = ["DraftGraph", "chain", "fig2", "parse_graph_spec", "resolve_graph", "two_level_topk"]
