"""Dynamic drafting on trajectories (docs/algorithm.md §5.10): recorded anchor features, the replay against
decoding, and the calibration."""

from __future__ import annotations

import pytest

import spiffy
from spiffy.calibration.dynamic import DynamicReplay, calibrate_dynamic, evaluate_dynamic, fit_model
from spiffy.calibration.trajectories import Trajectories, record_trajectories
from spiffy.decoding.config import GenerationConfig
from spiffy.graph.dynamic import DynamicGraph, dynamic_graph
from tests.calibration.test_calibrate import prompts

SETTINGS = [
    dict(gen_length=32, block_length=8, steps=32),
    dict(gen_length=32, block_length=8, steps=32, cache="dual"),
    dict(gen_length=32, block_length=8, rule="threshold", tau=0.5),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_replay_matches_decoding(fixture_model, settings, tmp_path):
    cfg = GenerationConfig(**settings)
    test = prompts(4, seed=9)
    traj = record_trajectories(fixture_model, cfg, test, progress=False, features=3)
    traj.save(tmp_path / "t.json")
    traj = Trajectories.load(tmp_path / "t.json")  # the features survive the file
    for graph in (dynamic_graph(5), calibrate_dynamic(traj, 6)):
        replayed = evaluate_dynamic(graph, traj).nfe
        measured = 0
        decoder = spiffy.build_decoder(
            fixture_model, speculate=spiffy.Speculation(graph), **settings
        )
        for i, prompt in enumerate(test):
            measured += decoder.generate(prompt, request_id=i).stats.nfe
        # the replay scores all origins in one batch, the decoder one anchor per forward: equal unless two
        # candidates' scores tie to the last bits (float64); no such tie on these prompts
        assert replayed == measured, (graph.slots, settings)


def test_calibration_fits_the_model_and_never_loses_to_its_chain_shape(fixture_model):
    cfg = GenerationConfig(**SETTINGS[0])
    traj = record_trajectories(fixture_model, cfg, prompts(8), progress=False, features=3)
    gap, bias, token = fit_model(traj)
    assert gap >= 0 and token >= 0 and bias[0] == 0.0
    graph = calibrate_dynamic(traj, 6, provenance={"task": "random"})
    assert graph.budget == 6 and graph.provenance == {"task": "random"}
    depth = max(graph.pool.levels)
    chain_shape = DynamicGraph(
        graph.pool, tuple(min(s, depth) for s in range(1, 7)), gap, bias, token
    )
    replay = DynamicReplay(traj)
    assert replay.evaluate(graph).nfe <= replay.evaluate(chain_shape).nfe


def test_replay_needs_recorded_features(fixture_model):
    cfg = GenerationConfig(**SETTINGS[0])
    traj = record_trajectories(fixture_model, cfg, prompts(1), progress=False)
    with pytest.raises(ValueError, match="no anchor features"):
        DynamicReplay(traj)
    with pytest.raises(ValueError, match="features=0"):
        record_trajectories(fixture_model, cfg, prompts(1), progress=False, features=0)


def test_slot_search_moves_one_slot_at_a_time_while_a_move_saves_enough():
    from spiffy.calibration.dynamic import improve_slots
    from spiffy.graph.dynamic import generic_pool

    pool = generic_pool(4)
    target = (1, 1, 2, 3)

    def nfe(shape):  # 10 forwards per slot away from the target shape
        return 100 + 10 * sum(a != b for a, b in zip(sorted(shape), target, strict=True))

    assert improve_slots((1, 2, 3, 4), nfe, pool) == target
    # a move saving less than the margin (here 1 of ~120 forwards, < 2 %) is not taken
    assert improve_slots((1, 2, 3, 4), lambda s: 120 - (s == (1, 1, 2, 3)), pool) == (1, 2, 3, 4)
    # every drafted level keeps the level below it: (1, 1, 3, 4) is never tried
    tried = []
    improve_slots((1, 2, 3, 4), lambda s: tried.append(s) or 100, pool)
    assert tried and all(lv == 1 or lv - 1 in s for s in tried for lv in s)
