"""Phased graphs (drafts conditioned on the masked count): validation, JSON, exact prediction, losslessness."""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import spiffy
from spiffy.calibration.calibrate import evaluate, select_graph
from spiffy.calibration.phases import phase_starts, select_phased
from spiffy.calibration.trajectories import record_trajectories
from spiffy.decoding.config import GenerationConfig
from spiffy.graph.draft_graph import DraftGraph
from tests.calibration.test_calibrate import prompts
from tests.conftest import tiny_random_model
from tests.helpers.lossless import RULES, assert_lossless, draft_graphs


def phased(*graphs: DraftGraph, starts=None) -> DraftGraph:
    """One phased graph from per-phase graphs (the first from masked count 1, then `starts`)."""
    nodes = list(dict.fromkeys(n for g in graphs for n in g.nodes))
    index = {n: q for q, n in enumerate(nodes)}
    parents = [
        tuple(sorted({p for g in graphs if n in g.nodes for p in _parents(g, n, index)}))
        for n in nodes
    ]
    starts = starts or [1 + 3 * p for p in range(len(graphs))]
    phases = tuple((lo, tuple(index[n] for n in g.nodes)) for lo, g in zip(starts, graphs))
    budget = max(max(len(g.nodes) for g in graphs), 1)
    return DraftGraph(tuple(nodes), tuple(parents), budget, "phased", {}, phases)


def _parents(graph: DraftGraph, node, index) -> list[int]:
    q = graph.nodes.index(node)
    return [-1 if p == -1 else index[graph.nodes[p]] for p in graph.parents[q]]


def test_phased_graph_validates_and_round_trips(tmp_path):
    graph = phased(spiffy.chain(4), spiffy.fig2())
    assert len(graph.nodes) > graph.budget == 5  # the union may exceed D, each phase may not
    assert [(lo, len(g.nodes)) for lo, g in graph.phase_graphs()] == [(1, 4), (4, 5)]
    graph.save(tmp_path / "g.json")
    again = DraftGraph.load(tmp_path / "g.json")
    assert again == graph and again.phases == graph.phases
    with pytest.raises(ValueError, match="must ascend from 1"):
        DraftGraph(graph.nodes, graph.parents, 5, phases=((2, (0,)), (4, (1,))))
    with pytest.raises(ValueError, match=r"phase lo=1: .*exceed budget=2"):
        DraftGraph(graph.nodes, graph.parents, 2, phases=((1, (0, 1, 2)),))
    with pytest.raises(ValueError, match="in no phase"):
        DraftGraph(graph.nodes, graph.parents, 5, phases=((1, (0, 1)),))
    with pytest.raises(ValueError, match=r"phase lo=1: node 0 .* not reachable"):
        DraftGraph(graph.nodes, graph.parents, 5, phases=((1, (1,)), (3, (0, 1, 2, 3))))


def test_phase_starts_split_the_masked_counts():
    traj = record_trajectories(
        tiny_random_model(),
        GenerationConfig(gen_length=16, block_length=8, steps=16),
        [torch.tensor([1, 2, 3])],
        progress=False,
    )
    assert phase_starts(traj, 3) == [1, 4, 7] and phase_starts(traj, 1) == [1]


@pytest.mark.parametrize("cross_block", [False, True])
def test_phased_selection_predicts_decoding_exactly(fixture_model, cross_block):
    settings = dict(gen_length=32, block_length=8, steps=32)
    calib = prompts(8)
    traj = record_trajectories(fixture_model, GenerationConfig(**settings), calib, progress=False)
    graph = select_phased(traj, 4, phases=3, cross_block=cross_block)
    assert len({g.nodes for _, g in graph.phase_graphs()}) > 1  # the phases do differ here
    static = select_graph(traj, 4, "greedy", cross_block=cross_block)
    assert (
        evaluate(graph, traj, cross_block=cross_block).nfe
        <= evaluate(static, traj, cross_block=cross_block).nfe
    )
    decoder = spiffy.build_decoder(
        fixture_model, speculate=spiffy.Speculation(graph, cross_block=cross_block), **settings
    )
    measured = sum(decoder.generate(p, request_id=i).stats.nfe for i, p in enumerate(calib))
    assert measured == evaluate(graph, traj, cross_block=cross_block).nfe


@settings(max_examples=30, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate])
@given(
    graphs=st.lists(draft_graphs(), min_size=2, max_size=3),
    rule=st.sampled_from(list(RULES)),
    cache=st.sampled_from(["none", "prefix", "dual"]),
    temperature=st.sampled_from([0.0, 1.0]),
    seed=st.integers(0, 1000),
    cross_block=st.booleans(),
)
def test_property_phased_graphs_are_lossless(graphs, rule, cache, temperature, seed, cross_block):
    """The losslessness property test of tests/decoding, with a graph per phase."""
    graph = phased(*graphs, starts=[1, 3, 6][: len(graphs)])
    assert_lossless(
        tiny_random_model(seed=seed % 3),
        torch.tensor([seed % 20, 3, 7]),
        graph,
        request_id=seed % 5,
        seed=seed,
        gen_length=16,
        block_length=8,
        rule=rule,
        cache=cache,
        temperature=temperature,
        cross_block=cross_block and cache == "none",
        **RULES[rule],
    )
