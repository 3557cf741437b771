"""The oracle bounds (docs/algorithm.md §5.9): their replay equals decoding with the drafts they describe, and
they bound every static graph."""

from __future__ import annotations

import math

import pytest
import torch

from spiffy.calibration.calibrate import evaluate, select_graph
from spiffy.calibration.oracle import anchor_oracle, trajectory_oracle
from spiffy.calibration.trajectories import record_trajectories
from spiffy.decoding.block_decoder import BlockDecoder
from spiffy.decoding.config import GenerationConfig
from spiffy.decoding.drafting import Drafts
from spiffy.graph.builtin import chain
from tests.calibration.test_calibrate import prompts
from tests.helpers.scripted_model import ScriptedModel

SETTINGS = dict(gen_length=32, block_length=8, steps=32)


class StateLog(BlockDecoder):
    """The base decoder, logging the block state after every transition."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.states: dict[tuple[int, int], torch.Tensor] = {}

    def propose(self, anchor, state, ctx, step):
        self.states[(ctx.block, step)] = state.clone()
        return None


class TrajectoryOracleDecoder(BlockDecoder):
    """Drafts, at every forward, the base's next `budget` (incomplete) states, read from a log of the base."""

    def __init__(self, model, cfg, states, budget):
        super().__init__(model, cfg)
        self.states, self.budget = states, budget

    def propose(self, anchor, state, ctx, step):
        future = [self.states.get((ctx.block, step + k)) for k in range(1, self.budget + 1)]
        future = [s for s in future if s is not None]
        if not future:
            return None
        levels = tuple(range(1, len(future) + 1))
        return Drafts(
            torch.stack(future),
            torch.ones(len(future), dtype=torch.bool),
            torch.tensor(levels),
            levels,
        )


@pytest.mark.parametrize("budget", [1, 3, 6])
def test_trajectory_oracle_replay_equals_decoding_with_the_true_future(fixture_model, budget):
    cfg = GenerationConfig(**SETTINGS)
    prompt = prompts(1, seed=3)[0]
    log = StateLog(fixture_model, cfg)
    base = log.generate(prompt, request_id=0)
    oracle = TrajectoryOracleDecoder(fixture_model, cfg, log.states, budget)
    result = oracle.generate(prompt, request_id=0)
    assert torch.equal(result.tokens, base.tokens)
    traj = record_trajectories(fixture_model, cfg, [prompt], horizon=8, progress=False)
    assert trajectory_oracle(traj, budget).nfe == result.stats.nfe < base.stats.nfe


@pytest.mark.parametrize("budget", [1, 2, 5, 10])
def test_on_a_predictable_model_both_oracles_take_d_plus_one_transitions_per_forward(budget):
    # the stable scripted model commits (1,1), (2,1), ... relative to every anchor: nothing to guess
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16)
    traj = record_trajectories(
        ScriptedModel(), cfg, [torch.tensor([1, 2])], horizon=10, progress=False
    )
    per_block = 1 + math.ceil(7 / (budget + 1))  # the block start, then D + 1 transitions a forward
    assert trajectory_oracle(traj, budget).nfe == 2 * per_block
    assert anchor_oracle(traj, budget, top=1).nfe == 2 * per_block


def test_oracles_bound_every_static_graph(fixture_model):
    cfg = GenerationConfig(**SETTINGS)
    traj = record_trajectories(fixture_model, cfg, prompts(6), horizon=10, progress=False)
    for budget in (2, 5, 10):
        best = trajectory_oracle(traj, budget).nfe
        anchor = anchor_oracle(traj, budget, top=3)
        # a rank bound above every recorded rank drafts the true future itself
        assert anchor_oracle(traj, budget, top=10**6).nfe == best
        assert best <= anchor.nfe
        for graph in (chain(budget), select_graph(traj, budget, "greedy")):
            assert best <= evaluate(graph, traj).nfe


def test_oracles_refuse_budgets_beyond_the_horizon(fixture_model):
    traj = record_trajectories(
        fixture_model, GenerationConfig(**SETTINGS), prompts(1), horizon=4, progress=False
    )
    with pytest.raises(ValueError, match="horizon=4"):
        trajectory_oracle(traj, 5)
    with pytest.raises(ValueError, match="top=0"):
        anchor_oracle(traj, 3, top=0)
