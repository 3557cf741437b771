"""Draft graphs: validation names the bad node, JSON round-trips, spec strings (docs/algorithm.md §5.2, §11)."""

from __future__ import annotations

import json

import pytest

import spiffy
from spiffy.graph import DraftGraph
from spiffy.graph.builtin import resolve_graph


def test_builtin_graphs():
    chain = spiffy.chain(3)
    assert chain.nodes == (((1, 1),), ((1, 1), (2, 1)), ((1, 1), (2, 1), (3, 1)))
    assert chain.levels == [1, 2, 3]
    fig2 = spiffy.fig2()
    assert len(fig2.nodes) == 5 and fig2.levels == [1, 1, 2, 2, 3]
    assert fig2.parents[2] == (0, 1)  # {c11, c21} has two parents: a graph, not a tree
    topk = spiffy.parse_graph_spec("topk:3")
    assert len(topk.nodes) == 6 and topk.max_token_rank == 3


@pytest.mark.parametrize(
    ("nodes", "parents", "budget", "match"),
    [
        ([((1, 1),), ((1, 1),)], [(-1,), (-1,)], 5, "node 1 .* duplicates node 0"),
        ([((1, 1), (1, 2))], [(-1,)], 5, "node 0 .* repeats a position rank"),
        ([((1, 1),), ((1, 1), (2, 1))], [(-1,), ()], 5, "node 1 .* not reachable"),
        ([((0, 1),)], [(-1,)], 5, "node 0 .* rank < 1"),
        ([((1, 1),), ((2, 1),)], [(-1,), (-1,)], 1, "exceed budget=1"),
        ([((1, 1),), ((2, 1),)], [(-1,), (0,)], 5, "node 1 .* not a subset"),
        ([()], [(-1,)], 5, "node 0 is empty"),
    ],
)
def test_validation_names_the_bad_node(nodes, parents, budget, match):
    with pytest.raises(ValueError, match=match):
        DraftGraph(tuple(nodes), tuple(parents), budget)


def test_json_round_trip(tmp_path):
    graph = DraftGraph(spiffy.fig2().nodes, spiffy.fig2().parents, 8, "degree1", {"task": "arith"})
    path = tmp_path / "g.json"
    graph.save(path)
    again = DraftGraph.load(path)
    assert again == graph and again.provenance == {"task": "arith"}
    assert resolve_graph(str(path)) == graph


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": "other"}', "missing 'format'"),
        ('{"format": "spiffy.draft_graph", "version": 99}', "version=99"),
        ('{"format": "spiffy.draft_graph", "version": 1, "budget": 3}', "nodes"),
    ],
)
def test_malformed_files_are_rejected(tmp_path, payload, match):
    path = tmp_path / "bad.json"
    path.write_text(payload)
    with pytest.raises(ValueError, match=match):
        DraftGraph.load(path)


def test_hand_edited_invalid_graph_is_rejected(tmp_path):
    data = json.loads(spiffy.chain(3).to_json())
    data["parents"][1] = []  # cut node 1 off the root
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="node 1 .* not reachable"):
        DraftGraph.load(path)


def test_unknown_spec_and_missing_file():
    with pytest.raises(ValueError, match="graph='tree:3'"):
        spiffy.parse_graph_spec("tree:3")
    with pytest.raises(FileNotFoundError):
        resolve_graph("missing-graph.json")
