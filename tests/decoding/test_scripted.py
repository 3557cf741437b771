"""Exact NFE of Spiffy on scripted models: drafts always, never, or up to a known level accepted."""

from __future__ import annotations

import math

import pytest
import torch

import spiffy
from spiffy.graph import DraftGraph
from tests.helpers.scripted_model import ScriptedModel

PROMPT = torch.tensor([3, 4, 5])
GEN, BLOCK = 32, 8


def decode(model, graph):
    kwargs = dict(gen_length=GEN, block_length=BLOCK, steps=GEN)
    base = spiffy.build_decoder(model, **kwargs).generate(PROMPT)
    spec = spiffy.build_decoder(model, speculate=spiffy.Speculation(graph), **kwargs).generate(
        PROMPT
    )
    assert torch.equal(base.tokens, spec.tokens)
    assert base.stats.nfe == GEN and spec.stats.transitions == GEN
    return spec.stats


@pytest.mark.parametrize("depth", [1, 3, 7])
def test_always_accepted_chain(depth):
    # block start: 1 forward, 1 transition; then every forward advances depth + 1 transitions
    stats = decode(ScriptedModel(), spiffy.chain(depth))
    per_block = 1 + math.ceil((BLOCK - 1) / (depth + 1))
    assert stats.nfe == (GEN // BLOCK) * per_block


def test_never_accepted():
    stats = decode(ScriptedModel(drifting=True), spiffy.chain(4))
    assert stats.nfe == GEN
    assert sum(stats.accepted_per_level.values()) == 0
    assert stats.accepted_per_forward == {0: GEN}


@pytest.mark.parametrize("good", [1, 2, 3])
def test_accepted_up_to_a_known_level(good):
    # levels 1..good use the top token (right); the next level bets on the 2nd token (always wrong)
    nodes = [[(i, 1) for i in range(1, d + 1)] for d in range(1, good + 1)]
    nodes.append(nodes[-1] + [(good + 1, 2)])
    stats = decode(ScriptedModel(), DraftGraph.from_formulas(nodes))
    per_block = 1 + math.ceil((BLOCK - 1) / (good + 1))
    assert stats.nfe == (GEN // BLOCK) * per_block
    assert good + 1 not in stats.accepted_per_level
    assert stats.accepted_per_level[good] > 0


def test_an_empty_graph_is_the_base_decoder():
    stats = decode(ScriptedModel(), DraftGraph((), (), 3))
    assert stats.nfe == GEN and stats.drafts_verified == 0
