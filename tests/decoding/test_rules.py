"""Transition rules and tie handling on hand-made confidences (docs/algorithm.md §2 steps 2 and 5, §3)."""

from __future__ import annotations

import torch

from spiffy.decoding.rules import TransitionRule, factor_count, schedule_counts
from spiffy.decoding.sampling import top_positions


def desc(*values):
    return torch.tensor(sorted(values, reverse=True), dtype=torch.float64)


def test_schedule_spreads_the_remainder_over_the_first_steps():
    assert schedule_counts(10, 4) == [3, 3, 2, 2]
    assert schedule_counts(8, 8) == [1] * 8
    assert sum(schedule_counts(31, 7)) == 31


def test_ties_break_to_the_lowest_position():
    conf = torch.tensor([0.1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert top_positions(conf, 1).tolist() == [1]
    assert top_positions(conf, 3).tolist() == [1, 2, 3]
    conf = torch.tensor([float("-inf"), 0.2, float("-inf"), 0.2])
    assert top_positions(conf, 2).tolist() == [1, 3]


def test_threshold_always_commits_the_most_confident():
    rule = TransitionRule("threshold", tau=0.9)
    assert rule.count(desc(0.5, 0.4), 0, 2) == 1
    assert rule.count(desc(0.95, 0.9, 0.89), 0, 3) == 2  # dropped iff conf < tau
    assert rule.count(desc(0.99, 0.97, 0.93), 0, 3) == 3


def test_factor_rule_hand_cases():
    assert factor_count(desc(0.1), 1.0) == 1  # n = 1
    assert factor_count(desc(0.1, 0.05), 1.0) == 2  # n = 2: both, whatever the values
    # rank 2 threshold 1 - 1/3 = 0.667, rank 3: 0.75, rank 4: 0.8
    assert factor_count(desc(0.99, 0.9, 0.85, 0.1), 1.0) == 4  # only the last rank fails: quirk
    assert factor_count(desc(0.99, 0.99, 0.95, 0.9, 0.5), 1.0) == 5  # fails only at r = n = 5
    assert factor_count(desc(0.99, 0.9, 0.7, 0.6, 0.5), 1.0) == 2  # fails in the middle at r = 3
    assert factor_count(desc(0.99, 0.9, 0.7, 0.6, 0.5), 3.0) == 5  # a larger f is looser
    assert factor_count(desc(0.99, 0.98, 0.97, 0.96), 1.0) == 4  # nothing fails


def test_fixed_k_and_completion():
    rule = TransitionRule("fixed_k", k=3)
    assert rule.count(desc(0.3, 0.2), 0, 2) == 2
    assert not rule.is_complete(True, 5) and rule.is_complete(False, 1)
    sched = TransitionRule("schedule", steps_per_block=4)
    assert not sched.is_complete(False, 3) and sched.is_complete(True, 4)
