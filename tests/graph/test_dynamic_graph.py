"""Dynamic graphs as data (docs/algorithm.md §5.10): validation naming the bad value, JSON round trip, specs."""

from __future__ import annotations

import pytest

from spiffy.graph.builtin import resolve_graph
from spiffy.graph.draft_graph import DraftGraph
from spiffy.graph.dynamic import DynamicGraph, default_slots, dynamic_graph, generic_pool


def test_spec_and_file_round_trip(tmp_path):
    graph = resolve_graph("dynamic:10")
    assert isinstance(graph, DynamicGraph) and graph.budget == 10
    assert graph.slots == default_slots(10)
    path = tmp_path / "dyn.json"
    graph.save(path)
    again = resolve_graph(str(path))
    assert again == graph and again.pool.nodes == graph.pool.nodes
    assert isinstance(resolve_graph("chain:3"), DraftGraph)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(slots=()), "slots=\\[\\]"),
        (dict(slots=(2, 1)), "must ascend"),
        (dict(slots=(1, 1, 1, 1, 1, 1, 1, 1, 1)), "9 slots at level 1"),
        (dict(gap_weight=-1.0), "gap_weight=-1.0"),
        (dict(token_power=float("nan")), "token_power=nan"),
        (dict(rank_bias=()), "rank_bias=\\[\\]"),
    ],
)
def test_invalid_dynamic_graphs_name_the_value(kwargs, message):
    pool = generic_pool(3)
    with pytest.raises(ValueError, match=message):
        DynamicGraph(pool, **{"slots": (1, 2), **kwargs})


@pytest.mark.parametrize("spec", ["dynamic:0", "dynamic:x", "dynamic:"])
def test_bad_dynamic_specs_are_refused(spec):
    with pytest.raises(ValueError, match="graph="):
        resolve_graph(spec)


def test_malformed_files_are_refused(tmp_path):
    path = tmp_path / "dyn.json"
    path.write_text(dynamic_graph(3).to_json().replace('"slots": [', '"slots": [0, '))
    with pytest.raises(ValueError, match="malformed"):
        DynamicGraph.load(path)


@pytest.mark.parametrize("levels", [1, 4, 7])
def test_generic_pool_holds_the_chain_and_its_near_misses(levels):
    pool = generic_pool(levels)
    nodes = set(pool.nodes)
    for size in range(1, levels + 1):
        chain = tuple((i, 1) for i in range(1, size + 1))
        assert chain in nodes
        skipped = tuple((i, 1) for i in range(1, size)) + ((size + 1, 1),)
        assert skipped in nodes
    assert max(pool.levels) == levels
    assert all(len(node) == level for node, level in zip(pool.nodes, pool.levels, strict=True))


@pytest.mark.parametrize("budget", range(1, 17))
def test_default_slots_fill_the_budget_level_by_level(budget):
    slots = default_slots(budget)
    assert len(slots) == budget and slots[0] == 1
    assert all(b - a in (0, 1) for a, b in zip(slots, slots[1:]))
    DynamicGraph(generic_pool(max(slots)), slots)  # the pool has room for them
