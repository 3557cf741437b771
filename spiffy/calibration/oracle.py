"""Oracle bounds on drafting, computed from the base's recorded trajectories (docs/algorithm.md §5.9).

Both oracles know the base decoder's future and draft, at every forward, the D states that save the most
forwards; they differ in which states they may draft.

* The **trajectory oracle** drafts the base's next D states X_{t+1..t+D} (and, with the cross-block walk, the
  complete state if it is among them). No drafting rule can accept more: the walk only continues through states
  the base reaches, so this is the bound for any drafting with D drafts per forward.
* The **anchor oracle** drafts the best D states whose committed tokens are each among the anchor's top-`top`
  predictions at their positions (any positions): the bound for drafting from one forward's predictions. Keys are
  nested along a trajectory, so the accepted states are the longest prefix of X_{t+1..} whose every token rank is
  at most `top`, up to D of them.

Both are replays (`replay.evaluate_at`), exact on the trajectories they are given; the trajectories' horizon
must reach D (a state beyond it is unknown, so an oracle with D > horizon would be understated).
"""

from __future__ import annotations

from spiffy.calibration.replay import Prediction, evaluate_at
from spiffy.calibration.trajectories import BlockTrajectory, Trajectories
from spiffy.graph.draft_graph import Formula


def _check(trajectories: Trajectories, budget: int, top: int = 1) -> None:
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"budget={budget!r} must be a positive integer")
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise ValueError(f"top={top!r} must be a positive integer")
    if trajectories.horizon < budget:
        raise ValueError(
            f"budget={budget} exceeds the trajectories' horizon={trajectories.horizon}: the oracle "
            f"needs the next {budget} states (record with horizon >= {budget})"
        )


def future_states(block: BlockTrajectory, t: int, cross_block: bool) -> list[Formula]:
    """The distinct keys of the states after X_t, in order (the complete state last, with `cross_block`)."""
    seq = list(block.keys[t - 1])
    if cross_block and block.complete[t - 1] is not None:
        seq.append(block.complete[t - 1])
    return list(dict.fromkeys(seq))


def trajectory_oracle(
    trajectories: Trajectories, budget: int, *, cross_block: bool = False
) -> Prediction:
    """NFE when every forward drafts the base's next `budget` states."""
    _check(trajectories, budget)
    return evaluate_at(
        lambda block, t: set(future_states(block, t, cross_block)[:budget]),
        trajectories,
        cross_block=cross_block,
    )


def anchor_oracle(
    trajectories: Trajectories, budget: int, *, top: int = 4, cross_block: bool = False
) -> Prediction:
    """NFE when every forward drafts the best `budget` states whose tokens are each among the anchor's
    top-`top` at their positions."""
    _check(trajectories, budget, top)

    def nodes(block: BlockTrajectory, t: int) -> set[Formula]:
        reachable = [
            key for key in future_states(block, t, cross_block) if max(j for _, j in key) <= top
        ]
        return set(reachable[:budget])

    return evaluate_at(nodes, trajectories, cross_block=cross_block)
