"""The one acceptance rule (`walk.walk_step`) behind the decoder's host walk and the trajectory replay."""

from __future__ import annotations

import pytest

from spiffy.decoding.walk import COMPLETE, MOVE, STAY, STOP, HostLinks, follow, replay, walk_step


@pytest.mark.parametrize(
    ("complete", "same", "verified", "want"),
    [
        (True, True, True, COMPLETE),  # a complete block ends the walk whatever else holds
        (True, False, False, COMPLETE),
        (False, True, True, STAY),  # a transition that committed nothing stays (before any move)
        (False, True, False, STAY),
        (False, False, True, MOVE),
        (False, False, False, STOP),
    ],
)
def test_walk_step_orders_complete_then_same_then_verified(complete, same, verified, want):
    assert walk_step(complete, same, verified) == want


def _links(nxt, complete=None, same=None, match=None) -> HostLinks:
    n = len(nxt)
    match = match if match is not None else [r if r != i else 0 for i, r in enumerate(nxt)]
    return HostLinks(nxt, complete or [0] * n, same or [0] * n, match, [])


def test_replay_follows_links_and_names_each_stop():
    assert replay(_links([1, 2, 2])) == ([0, 1, 2], "anchor")
    assert replay(_links([1, 1], complete=[0, 1])) == ([0, 1], "complete")
    assert replay(_links([1, 1], same=[0, 1])) == ([0, 1], "same")
    # row 1's result is verified (row 2) but not one level deeper: the walk goes on transition by transition
    assert replay(_links([1, 1, 2], match=[1, 2, 0])) == ([0, 1], "offlevel")
    # a complete result wins over a link (the block is done)
    assert replay(_links([1, 1], complete=[1, 0])) == ([0], "complete")


def test_follow_takes_verified_and_unchanged_states_and_stops_at_the_first_other():
    assert follow(["a", "b", "c"], {"a", "c"}, "x") == 1  # a is verified; b is not, and changed a
    # from a: a, a (unchanged, not verified), c (verified); e needs a forward
    assert follow(["a", "a", "c", "e"], {"c"}, "a") == 3
    assert follow([], {"a"}, "x") == 0
    assert follow(["x", "x"], set(), "x") == 2  # nothing committed twice: no forward needed
