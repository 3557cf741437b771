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


@pytest.mark.parametrize("rank", [1.7, True, "2", None])
def test_a_rank_must_be_an_integer_never_rounded(rank):
    with pytest.raises(TypeError, match="is not an integer"):
        DraftGraph.from_formulas([[(rank, 1)]])
    payload = json.loads(DraftGraph.from_formulas([[(1, 1)]]).to_json())
    payload["nodes"] = [[[1, rank]]]
    with pytest.raises(ValueError, match="is not an integer"):
        DraftGraph.from_json(json.dumps(payload))


def test_graph_files_are_size_capped(tmp_path):
    path = tmp_path / "huge.json"
    DraftGraph.from_formulas([[(1, 1)]]).save(path)
    with pytest.raises(ValueError, match=r"huge.json'?: \d+ bytes, over the 10-byte cap"):
        DraftGraph.load(path, max_bytes=10)
    assert DraftGraph.load(path).budget == 1


def test_a_graph_must_fit_the_block_and_the_vocabulary():
    from spiffy.graph.draft_graph import check_graph_fits

    graph = DraftGraph.from_formulas([[(1, 1)], [(1, 1), (9, 5)]])
    check_graph_fits(graph, block_length=9, vocab_size=5)
    with pytest.raises(
        ValueError, match=r"node 1 \[\(1, 1\), \(9, 5\)\] has position rank 9.*maximum"
    ):
        check_graph_fits(graph, block_length=8, vocab_size=5, source="g.json")
    with pytest.raises(
        ValueError, match=r"draft graph g.json: node 1 .* token rank 5, but the vocabulary has 4"
    ):
        check_graph_fits(graph, block_length=9, vocab_size=4, source="g.json")


def test_a_decoder_refuses_a_graph_whose_ranks_it_cannot_index():
    """A token rank beyond the vocabulary used to surface as a raw IndexError in the first forward."""
    from tests.conftest import tiny_random_model

    graph = DraftGraph.from_formulas([[(1, 10**6)]])
    with pytest.raises(ValueError, match="token rank 1000000, but the vocabulary has 24 tokens"):
        spiffy.build_decoder(
            tiny_random_model(),
            gen_length=8,
            block_length=8,
            steps=8,
            speculate=spiffy.Speculation(graph),
        )


def test_chain_is_built_in_linear_time():
    """chain(n) used to infer parents by an all-pairs subset search (cubic: chain(400) took 5 s). Its parents are
    explicit now; 2000 levels build well inside the alarm, which the old construction would overrun by far."""
    import signal

    def too_slow(signum, frame):
        raise TimeoutError("chain(2000) took over 60 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(60)
    try:
        graph = spiffy.chain(2000)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert graph.parents[:3] == ((-1,), (0,), (1,)) and graph.levels[-1] == 2000
    assert graph.nodes[-1] == tuple((i, 1) for i in range(1, 2001))
