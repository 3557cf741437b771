"""The `best` selection rule never loses to `chain:D`: held-out (cross-validated) and on the full set."""

from __future__ import annotations

import random

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from spiffy.calibration.calibrate import evaluate, select_graph
from spiffy.calibration.selection import CANDIDATE_RULES, builtin_candidates, folds_of, select_best
from spiffy.calibration.store import load_or_calibrate
from spiffy.calibration.trajectories import BlockTrajectory, Trajectories, record_trajectories
from spiffy.decoding.config import GenerationConfig
from spiffy.decoding.provenance import decoder_settings
from spiffy.graph.builtin import chain
from tests.calibration.test_calibrate import prompts


def synthetic(seed: int, n_prompts: int, blocks: int = 2, lb: int = 8, horizon: int = 10):
    """Trajectories of a one-token-per-step decoder whose commit order drifts randomly from the
    anchor's confidence order (swap probability per step) and whose token is rank 1 or 2."""
    rng = random.Random(seed)
    swap, second = rng.uniform(0, 0.6), rng.uniform(0, 0.3)
    out = []
    for p in range(n_prompts):
        for b in range(blocks):
            keys, complete, masked = [], [], []
            for t in range(1, lb):
                order = list(range(1, lb - t + 1))
                for k in range(len(order) - 1):
                    if rng.random() < swap:
                        order[k], order[k + 1] = order[k + 1], order[k]
                pairs = [(i, 2 if rng.random() < second else 1) for i in order]
                levels = [tuple(sorted(pairs[:level])) for level in range(1, len(pairs) + 1)]
                keys.append(levels[:-1][:horizon])
                complete.append(levels[-1] if len(levels) <= horizon else None)
                masked.append(lb - t)
            out.append(BlockTrajectory(lb, keys, complete, masked, p, b == blocks - 1))
    return Trajectories(out, horizon)


def assert_never_loses(traj: Trajectories, budget: int, cross_block: bool) -> None:
    graph = select_best(traj, budget, cross_block=cross_block, folds=4)
    info = graph.provenance["best"]
    reference = chain(budget)
    # in-sample: the selected graph needs no more forwards than the chain on the full set
    assert (
        evaluate(graph, traj, cross_block=cross_block).nfe
        <= evaluate(reference, traj, cross_block=cross_block).nfe
    )
    # held-out: recompute the chosen candidate's cross-validated NFE independently
    chosen = info["chosen"]
    held_out = 0
    for train, test in folds_of(traj, 4):
        fitted = (
            builtin_candidates(budget)[chosen]
            if chosen in builtin_candidates(budget)
            else select_graph(train, budget, chosen, cross_block=cross_block)
        )
        assert not set(train.prompts) & set(test.prompts)
        held_out += evaluate(fitted, test, cross_block=cross_block).nfe
    assert held_out == info["cv_nfe"][chosen]
    assert held_out <= evaluate(reference, traj, cross_block=cross_block).nfe
    assert set(info["cv_nfe"]) == set(CANDIDATE_RULES) | set(builtin_candidates(budget))
    assert graph.selection == "best"
    assert all(len(g.nodes) <= budget for _, g in graph.phase_graphs())


@settings(max_examples=25, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate])
@given(
    seed=st.integers(0, 10_000),
    n_prompts=st.integers(2, 9),
    budget=st.integers(1, 10),
    cross_block=st.booleans(),
)
def test_property_best_never_loses_to_the_chain(seed, n_prompts, budget, cross_block):
    assert_never_loses(synthetic(seed, n_prompts), budget, cross_block)


BASE_RULES = {
    "schedule": dict(steps=32),
    "fixed_k": dict(k=2),
    "threshold": dict(tau=0.5),
    "factor": dict(factor=1.0),
}


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("rule", list(BASE_RULES))
def test_every_base_calibrates_on_its_own_trajectories_and_never_loses(
    fixture_model, tmp_path, rule, cache
):
    """Per-base calibration (rules x caches): the store records this base's own trajectories, and `best`
    never loses to chain:D on them, held-out or in-sample, for every walk the base allows."""
    cfg = GenerationConfig(
        gen_length=32, block_length=8, rule=rule, cache=cache, **BASE_RULES[rule]
    )
    graph = load_or_calibrate(
        fixture_model,
        cfg,
        lambda: prompts(8),
        model_name="fixture",
        task="random",
        n_samples=8,
        budget=6,
        root=tmp_path,
        progress=False,
    )
    assert graph.provenance["decoder"] == decoder_settings(cfg) and graph.selection == "best"
    (path,) = tmp_path.rglob("trajectories/*.json")
    traj = Trajectories.load(path)
    assert traj.meta["decoder"] == decoder_settings(cfg)
    for cross in (False, True) if cache == "none" else (False,):
        assert_never_loses(traj, 6, cross)


def test_best_never_loses_at_temperature(fixture_model):
    settings = dict(gen_length=32, block_length=8, steps=32, temperature=0.8)
    traj = record_trajectories(
        fixture_model, GenerationConfig(**settings), prompts(8), progress=False
    )
    for budget in (3, 6):
        for cross in (False, True):
            assert_never_loses(traj, budget, cross)


def test_best_refuses_a_budget_deeper_than_the_horizon():
    with pytest.raises(ValueError, match="budget=12 exceeds the trajectories' horizon=10"):
        select_best(synthetic(0, 4), 12)
    with pytest.raises(ValueError, match="needs >= 2 calibration prompts"):
        select_best(synthetic(0, 1), 4)
