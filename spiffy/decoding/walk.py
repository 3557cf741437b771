"""One forward's acceptance walk (docs/algorithm.md §5.4) as batched device work plus one host read.

The forward verified N block states (row 0 the real state, rows 1.. drafts of graph level `levels[r]`). The
walk from row 0 applies the transition to the state it is at, moves to the verified row equal to the result,
and repeats. Row r is reached, if at all, at step `step + levels[r]`, so one batched `transition_rows` computes
every transition the walk can take. `link_rows` then links each row to the row its result equals (only a row one
level deeper, unless the transition does not depend on the step), marks complete and unchanged results, and
follows the links from row 0 on the device (pointer doubling), so that drafts for the next forward can be built
before the host looks. `WalkLinks.read` is the one device read; `replay` walks the links on the host.

`walk_step` is the acceptance rule every walk applies, one transition at a time: `replay` on the host links,
`BlockDecoder`'s transition-by-transition walk, and `follow`, the walk on states known in advance (recorded
trajectories, `spiffy.calibration.replay`): the walk moves to the next state while it was verified by the last
forward, or equals the current state (a transition that committed nothing), and stops where a forward is needed
or the block is complete.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from spiffy.decoding.sampling import Distributions, TransitionContext, transition_rows


@dataclass
class Rows:
    """The states one forward verified and their distributions: states (N, Lb), levels (host, row 0 = 0),
    validity (N,) of padded draft rows (None: all valid), draft validity the host has not read yet (for the
    statistics), and the next block's logits per row (N, Lb', V) when the look-ahead was computed."""

    states: torch.Tensor
    dists: Distributions
    levels: list[int]
    valid: torch.Tensor | None = None
    unread: torch.Tensor | None = None
    lookahead: torch.Tensor | None = None

    @classmethod
    def single(cls, state: torch.Tensor, dists: Distributions) -> Rows:
        return cls(state[None], dists, [0])


@dataclass
class HostLinks:
    """`WalkLinks` read to the host: per row the next row (itself = stop), completion, no change, the first
    verified row equal to its result (0: none; row 0 is never a match), and any extra boolean vectors read
    along."""

    nxt: list[int]
    complete: list[int]
    same: list[int]
    match: list[int]
    extra: list[list[bool]]


@dataclass
class WalkLinks:
    """Per row r: its transition's result `new[r]` and confidences, the row the walk continues to if it
    continues (itself: it stops; a complete or unchanged result stops it whatever `nxt` says), the first
    verified row equal to its result (0: none), and flags; `end` is where the walk from row 0 stops when no
    complete or unchanged result stops it first (a device index, or 0)."""

    new: torch.Tensor
    conf: torch.Tensor
    nxt: torch.Tensor | None
    complete: torch.Tensor
    same: torch.Tensor
    match: torch.Tensor | None
    end: torch.Tensor | int

    def read(self, extra: list[torch.Tensor]) -> HostLinks:
        """The one host read of a forward: links, flags and `extra` boolean vectors in a single transfer
        (`cat` promotes them all to one integer tensor)."""
        parts = [self.complete, self.same, *extra]
        if self.nxt is not None:
            parts += [self.nxt, self.match]
        flat = torch.cat(parts).tolist()
        out, at = [], 0
        for p in parts:
            out.append(flat[at : at + p.numel()])
            at += p.numel()
        if self.nxt is None:  # one row: its links are known (it stops where it is)
            complete, same, *rest = out
            nxt, match = [0], [0]
        else:
            complete, same, *rest, nxt, match = out
        return HostLinks(nxt, complete, same, match, [[bool(v) for v in e] for e in rest])


def link_rows(rows: Rows, step: int, ctx: TransitionContext, step_free: bool) -> WalkLinks:
    """Batched transitions of every row at the step it would be reached at, and the links between rows."""
    n = rows.states.shape[0]
    steps = [step + level for level in rows.levels]
    new, conf = transition_rows(rows.dists, rows.states, steps, ctx)
    device = new.device
    if ctx.rule.bounded:
        ends = tuple(ctx.rule.is_complete(True, s + 1) for s in steps)
        complete = _constant(("complete", ends, device), lambda: torch.tensor(ends, device=device))
    else:
        complete = ctx.rule.complete_rows(rows.states, new, ctx)
    if n == 1:  # links of a single row are known on the host (`read`)
        return WalkLinks(new, conf, None, complete, (new == rows.states).all(1), None, 0)
    # equal[r, r']: the result of row r is the state of row r' (N, N)
    equal = (new[:, None, :] == rows.states[None, :, :]).all(-1)
    same = equal.diagonal()
    # a later, valid draft (never row 0, so argmax 0 means none)
    eq = equal & _later(rows, device, None)
    match = eq.to(torch.int8).argmax(1)
    # the batched transition of r' is only right if r' is reached at its own level (unless step-free)
    expected = eq if step_free else eq & _later(rows, device, "level")
    # the expected row, else the row itself (the identity's 1 loses to an expected row's 2)
    nxt = torch.where(expected, 2, _eye(n, device)).argmax(1)
    # pointer doubling, end[r] = where r's walk stops: a walk takes at most one link per level (each
    # expected row is one level deeper), and step-free at most n - 1 (each link fills a mask)
    longest = n - 1 if step_free else max(rows.levels)
    end = nxt
    for _ in range(math.ceil(math.log2(longest)) if longest > 1 else 0):
        end = end[end]
    return WalkLinks(new, conf, nxt, complete, same, match, end[:1])


# what the acceptance walk does after one transition (`walk_step`)
COMPLETE, STAY, MOVE, STOP = "complete", "stay", "move", "stop"


def walk_step(complete: bool, same: bool, verified: bool) -> str:
    """The acceptance rule at one transition (docs/algorithm.md §5.4), the one every walk applies: the
    decoder's (`replay`, and `BlockDecoder`'s transition-by-transition walk) and the replay of recorded
    trajectories (`follow`, `spiffy.calibration.replay`). The transition's result `complete`s the block: the
    walk ends (`COMPLETE`); else it equals the state it was applied to (`same`: it committed nothing): the walk
    stays there, one step on (`STAY`); else it is a state the last forward `verified`: the walk moves to it
    (`MOVE`); else a forward is needed (`STOP`)."""
    if complete:
        return COMPLETE
    if same:
        return STAY
    return MOVE if verified else STOP


State = TypeVar("State")


def follow(states: Sequence[State], verified: Container[State], current: State) -> int:
    """How many of the successive next `states` the acceptance walk (`walk_step`) takes from `current` without
    a forward: it moves on while the next state is `verified` (a state the last forward computed the
    distribution of) or equals the state it is at. The states are a block's transitions before its last, so
    none completes it."""
    taken = 0
    while taken < len(states):
        nxt = states[taken]
        if walk_step(False, nxt == current, nxt in verified) == STOP:
            break
        current = nxt
        taken += 1
    return taken


_MEMO: dict = {}


def _constant(key, make) -> torch.Tensor:
    """A small constant tensor built once per key (host-built from host values; never mutated)."""
    if key not in _MEMO:
        if len(_MEMO) > 256:
            _MEMO.clear()
        _MEMO[key] = make()
    return _MEMO[key]


def row_index(rows: tuple[int, ...], device) -> torch.Tensor:
    """The index tensor of host row numbers `rows`, built once per distinct tuple (no copy per forward)."""
    return _constant(("index", rows, device), lambda: torch.tensor(rows, device=device))


def _eye(n: int, device) -> torch.Tensor:
    return _constant(("eye", n, device), lambda: torch.eye(n, dtype=torch.int8, device=device))


def _later(rows: Rows, device, kind: str | None) -> torch.Tensor:
    """(N, N) bool: column r' may follow row r: r' > 0 and valid; with `kind="level"` also exactly one level
    deeper. Host-built from the levels, memoised (the device validity is and-ed in, not memoised)."""
    levels = tuple(rows.levels)
    key = (kind, levels, device)
    out = _MEMO.get(key)
    if out is None:
        n = len(levels)
        allowed = [
            [c > 0 and (kind is None or levels[c] == levels[r] + 1) for c in range(n)]
            for r in range(n)
        ]
        out = _constant(key, lambda: torch.tensor(allowed, device=device))
    return out if rows.valid is None or kind is not None else out & rows.valid[None, :]


def replay(host: HostLinks) -> tuple[list[int], str]:
    """The walk (`walk_step`) on the host: the rows visited from row 0 and why it stopped (`complete`: the
    block is done; `anchor`: a forward is needed; `same` / `offlevel`: a row is reached at another step than
    the batched transitions assumed, so the decoder goes on one transition at a time)."""
    r, path = 0, [0]
    while True:
        step = walk_step(host.complete[r], host.same[r], host.match[r] >= 1)
        if step == COMPLETE:
            return path, "complete"
        if step == STAY:
            return path, "same"
        # a move to the verified row one level deeper, whose transition the batch computed
        if step == MOVE and host.nxt[r] != r:
            r = host.nxt[r]
            path.append(r)
            continue
        return path, ("offlevel" if step == MOVE else "anchor")
