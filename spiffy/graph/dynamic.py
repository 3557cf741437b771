"""Dynamic draft graphs as data: a candidate pool, the level of each of the D draft slots, and the acceptance
model's parameters (docs/algorithm.md §5.10).

A `DynamicGraph` does not fix the drafts: at every forward the decoder scores every pool node by its estimated
probability of being the base's next state(s), computed from the live anchor, and fills each slot level with
that level's best nodes. The slots' levels are fixed, so every forward verifies D rows
of known levels (static shapes, no host read to learn them). `dynamic_graph(D)` is the uncalibrated default
(`graph="dynamic:D"`); `spiffy.calibration.dynamic` fits the pool, the slots and the exponents to recorded
trajectories. This module imports nothing from the decoders or calibration.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from spiffy.graph.draft_graph import DraftGraph, Formula

FORMAT = "spiffy.dynamic_graph"
VERSION = 1
# the uncalibrated defaults: fitted on the embedded model's calibration prompts (scripts/dynamic_study.py)
GAP_WEIGHT = 1.0
RANK_BIAS = (0.0, -1.5, -2.2, -3.0)
TOKEN_POWER = 1.3


@dataclass(frozen=True)
class DynamicGraph:
    """The pool (a `DraftGraph` whose nodes are the candidates, parents as usual), the slots (the level of each
    of the D drafts, ascending) and the acceptance model (docs/algorithm.md §5.10): the weight of a position's
    certainty `-log(1 - c)`, the bias of each relative position rank (the last applies to every later rank)
    and the exponent of the token probability."""

    pool: DraftGraph
    slots: tuple[int, ...]
    gap_weight: float = GAP_WEIGHT
    rank_bias: tuple[float, ...] = RANK_BIAS
    token_power: float = TOKEN_POWER
    selection: str = "dynamic"
    provenance: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "slots", tuple(self.slots))
        object.__setattr__(self, "rank_bias", tuple(float(b) for b in self.rank_bias))
        if not self.rank_bias or not all(math.isfinite(b) for b in self.rank_bias):
            raise ValueError(
                f"rank_bias={list(self.rank_bias)} must be a non-empty list of finite numbers"
            )
        if not self.slots or any(not isinstance(s, int) or s < 1 for s in self.slots):
            raise ValueError(f"slots={list(self.slots)} must be a non-empty list of levels >= 1")
        if list(self.slots) != sorted(self.slots):
            raise ValueError(f"slots={list(self.slots)} must ascend (level by level)")
        available = Counter(self.pool.levels)
        for level, n in sorted(Counter(self.slots).items()):
            if available[level] < n:
                raise ValueError(
                    f"slots={list(self.slots)}: {n} slots at level {level} but the pool has "
                    f"{available[level]} nodes there"
                )
        for name in ("gap_weight", "token_power"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r} must be a finite number >= 0")

    @property
    def budget(self) -> int:
        """D: drafts per forward."""
        return len(self.slots)

    @property
    def max_token_rank(self) -> int:
        return self.pool.max_token_rank

    def to_json(self) -> str:
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "slots": list(self.slots),
            "gap_weight": self.gap_weight,
            "rank_bias": list(self.rank_bias),
            "token_power": self.token_power,
            "selection": self.selection,
            "pool": json.loads(self.pool.to_json()),
            "provenance": self.provenance,
        }
        return json.dumps(payload, indent=1)

    @classmethod
    def from_json(cls, text: str, *, source: str = "<string>") -> DynamicGraph:
        """Parse and validate; any problem raises `ValueError` naming `source`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"dynamic graph {source}: not valid JSON: {err}") from err
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"dynamic graph {source}: missing 'format': {FORMAT!r}")
        if data.get("version") != VERSION:
            raise ValueError(
                f"dynamic graph {source}: version={data.get('version')!r}, expected {VERSION}"
            )
        try:
            return cls(
                DraftGraph.from_json(json.dumps(data["pool"]), source=f"{source} pool"),
                tuple(data["slots"]),
                float(data["gap_weight"]),
                tuple(data["rank_bias"]),
                float(data["token_power"]),
                data.get("selection", "dynamic"),
                dict(data.get("provenance", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(
                f"dynamic graph {source}: malformed ({type(err).__name__}: {err})"
            ) from err

    def save(self, path: str | Path) -> None:
        from spiffy.graph.files import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> DynamicGraph:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"dynamic graph file {str(path)!r} does not exist")
        return cls.from_json(path.read_text(encoding="utf-8"), source=repr(str(path)))


def is_dynamic_file(path: str | Path) -> bool:
    """Whether a graph JSON file holds a dynamic graph (by its format field)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def generic_pool(
    levels: int, *, max_excess: int = 2, max_token_rank: int = 3, token_swaps: int = 1
) -> DraftGraph:
    """Candidates for one-token transitions up to `levels` deep: every formula of `l` pairs (distinct position
    ranks) whose ranks exceed the chain's `{(1,1)..(l,1)}` by at most `max_excess` in total (a position rank
    above the chain's counts its difference, a token rank j counts j - 1), with at most `token_swaps` pairs of
    token rank above 1."""
    if levels < 1:
        raise ValueError(f"levels={levels} must be >= 1")
    nodes: list[Formula] = []
    for size in range(1, levels + 1):
        floor = size * (size + 1) // 2
        for positions in combinations(range(1, size + max_excess + 1), size):
            slack = max_excess - (sum(positions) - floor)
            if slack < 0:
                continue
            for tokens in _token_ranks(size, slack, max_token_rank, token_swaps):
                nodes.append(tuple(zip(positions, tokens)))
    return DraftGraph.from_formulas(nodes, selection="pool")


def _token_ranks(size: int, slack: int, top: int, swaps: int):
    """Every tuple of `size` token ranks in 1..top with excess sum(j - 1) at most `slack` and at most
    `swaps` ranks above 1."""
    if size == 0:
        yield ()
        return
    for j in range(1, min(top, slack + 1) + 1):
        if j > 1 and swaps == 0:
            break
        for rest in _token_ranks(size - 1, slack - (j - 1), top, swaps - (j > 1)):
            yield (j, *rest)


def default_slots(budget: int) -> tuple[int, ...]:
    """The uncalibrated slot levels for D drafts: two candidates at each of the first (D - 2) // 2 levels,
    then one per level (D = 10: 1 1 2 2 3 3 4 4 5 6), the shape calibrated static graphs take here."""
    if budget < 1:
        raise ValueError(f"dynamic budget={budget} must be >= 1")
    doubled = max(0, (budget - 2) // 2)
    slots = [lv for lv in range(1, doubled + 1) for _ in range(2)]
    slots += range(doubled + 1, doubled + 1 + budget - len(slots))
    return tuple(slots)


def dynamic_graph(budget: int) -> DynamicGraph:
    """`graph="dynamic:D"`: the generic pool, the default slots and model parameters."""
    slots = default_slots(budget)
    return DynamicGraph(generic_pool(max(slots)), slots, selection="dynamic")
