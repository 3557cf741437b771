"""Dynamic drafting (docs/algorithm.md §5.10) is lossless like every graph: Spiffy with drafts chosen per forward
returns exactly the base decoder's tokens, for every base decoder, cache, temperature (keyed noise too) and the
cross-block walk, with NFE no larger; and its drafts have static shapes."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import spiffy
from spiffy.decoding.dynamic import DynamicDrafter
from spiffy.graph.dynamic import DynamicGraph, dynamic_graph
from tests.helpers.lossless import (
    FIXTURE_GRID,
    check_llada_case,
    draft_graphs,
    fixture_savings,
    llada_cases,
)


@pytest.mark.parametrize(("rule", "cache", "temperature"), FIXTURE_GRID)
def test_dynamic_drafting_is_lossless_for_every_base_decoder(
    fixture_model, rule, cache, temperature
):
    saved = fixture_savings(fixture_model, ("dynamic:3", "dynamic:10"), rule, cache, temperature)
    if rule == "schedule":
        assert saved > 0  # it must actually save forwards on the one-token-per-step base


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_keyed_dynamic_drafting_and_the_cross_block_walk_are_lossless(
    fixture_model, temperature, cache
):
    prompt = torch.tensor([12, 7, 99])
    kw = dict(gen_length=32, block_length=8, steps=32, temperature=temperature, cache=cache)
    base = spiffy.build_decoder(fixture_model, **kw).generate(prompt, request_id=2, seed=5)
    variants = [dict(draft_noise="keyed")] + ([dict(cross_block=True)] if cache == "none" else [])
    for extra in variants:
        spec = spiffy.build_decoder(
            fixture_model, speculate=spiffy.Speculation("dynamic:6", **extra), **kw
        ).generate(prompt, request_id=2, seed=5)
        assert torch.equal(spec.tokens, base.tokens), extra
        assert spec.stats.nfe < base.stats.nfe, extra


def test_drafts_have_d_rows_of_fixed_levels_every_forward(fixture_model):
    """Static shapes: every forward drafts D rows at the slots' levels, whatever the anchor."""
    graph = dynamic_graph(7)
    seen = []

    class Spy(DynamicDrafter):
        def draft(self, *args, **kwargs):
            drafts = super().draft(*args, **kwargs)
            seen.append((tuple(drafts.states.shape), drafts.row_levels))
            return drafts

    decoder = spiffy.build_decoder(
        fixture_model, gen_length=32, block_length=8, steps=32, speculate=spiffy.Speculation(graph)
    )
    decoder._dynamic.__class__ = Spy
    decoder.generate(torch.tensor([5, 6, 7]), request_id=0)
    assert len(seen) > 5
    assert set(seen) == {((7, 8), graph.slots)}


def test_dynamic_graphs_refuse_pruning():
    with pytest.raises(ValueError, match="prune=3 with a dynamic graph"):
        spiffy.Speculation("dynamic:5", prune=3)


@st.composite
def dynamic_graphs(draw):
    """Random dynamic graphs: a random pool, slots within its levels, random model parameters."""
    pool = draw(draft_graphs())
    available = Counter(pool.levels)
    slots = []
    for level in sorted(available):
        slots += [level] * draw(st.integers(0, available[level]))
    if not slots:
        slots = [1]
    bias = draw(st.lists(st.sampled_from([0.0, -1.0, -3.0, 2.0]), min_size=1, max_size=4))
    return DynamicGraph(
        pool,
        tuple(slots),
        draw(st.sampled_from([0.0, 0.5, 4.0])),
        tuple(bias),
        draw(st.sampled_from([0.0, 1.0, 2.0])),
    )


@settings(
    max_examples=40, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate]
)  # no shrinking: bounded CI time
@given(**llada_cases(dynamic_graphs()))
def test_property_dynamic_spiffy_equals_base(graph, **case):
    check_llada_case(graph, **case)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(graph=dynamic_graphs(), masked=st.integers(1, 8), seed=st.integers(0, 100))
def test_selection_takes_each_slot_levels_best_scored_nodes(graph, masked, seed):
    """One sort for all slot levels = per level, the `count` best scores, ties to the lower pool index; and
    only nodes at slot levels get a score (the others are never drafted)."""
    from spiffy.decoding.dynamic import AnchorFeatures, DynamicTensors

    g = torch.Generator().manual_seed(seed)
    lb = 8
    conf = torch.rand(lb, generator=g, dtype=torch.float64).sort(descending=True).values
    conf = torch.where(torch.arange(lb) < masked, conf, float("-inf"))
    probs = torch.rand(lb, 3, generator=g, dtype=torch.float64).sort(-1, descending=True).values
    features = AnchorFeatures(conf, probs)
    tensors = DynamicTensors(graph)
    score = tensors.scores(features)
    levels = graph.pool.levels
    expected = []
    for level in sorted(set(graph.slots)):
        nodes = [q for q, lv in enumerate(levels) if lv == level]
        ranked = sorted(nodes, key=lambda q: (-score[q].item(), q))
        expected += ranked[: graph.slots.count(level)]
    assert tensors.select(features).tolist() == expected
    off_slots = [q for q, lv in enumerate(levels) if lv not in graph.slots]
    assert all(score[q].item() == float("-inf") for q in off_slots)
