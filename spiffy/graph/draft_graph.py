"""The directed draft graph as plain, validated, serialisable data (docs/algorithm.md §5.1, §5.2; paper §3.2, Fig. 2).

A node is a formula: a set of `(i, j)` rank pairs with distinct position ranks `i` (1-based position rank among
the still-masked positions, ordered by the anchor's confidence; `j` the token rank at that position). The root is
the real state (the empty formula) and is implicit. Parents are explicit (`-1` = root), so multi-token rules can
add several pairs per edge. Construction validates everything and errors name the bad node; `to_json` /
`from_json` round-trip a small versioned format. This module imports nothing from the decoders or calibration.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "spiffy.draft_graph"
VERSION = 1
ROOT = -1
# graph files are parsed only below this size: a 1000-node graph of 16-pair formulas is under 1 MiB
MAX_FILE_BYTES = 16 << 20

Formula = tuple[tuple[int, int], ...]


def _rank(value) -> int:
    """An integer rank (Python, NumPy or 0-d integer tensor); 1.7 or True is an error, never rounded."""
    if isinstance(value, bool):
        raise TypeError(f"rank {value!r} is not an integer")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"rank {value!r} is not an integer") from None


def canonical(formula: Iterable[Sequence[int]]) -> Formula:
    """Sorted tuple of `(i, j)` int pairs."""
    return tuple(sorted((_rank(i), _rank(j)) for i, j in formula))


def check_graph_fits(
    graph: DraftGraph,
    *,
    block_length: int | None,
    vocab_size: int | None,
    source: str = "the graph",
) -> None:
    """A graph's ranks must exist in the decoder it drafts for: position ranks index the masked positions of a
    block (at most `block_length`), token ranks the vocabulary (at most `vocab_size`). ValueError naming
    `source`, the node and the maximum; a None bound is not checked."""
    for n, node in enumerate(graph.nodes):
        for i, j in node:
            if block_length is not None and i > block_length:
                raise ValueError(
                    f"draft graph {source}: node {n} {list(node)} has position rank {i}, but a block has "
                    f"{block_length} positions (block_length={block_length}: the maximum rank)"
                )
            if vocab_size is not None and j > vocab_size:
                raise ValueError(
                    f"draft graph {source}: node {n} {list(node)} has token rank {j}, but the vocabulary "
                    f"has {vocab_size} tokens (the maximum rank)"
                )


@dataclass(frozen=True)
class DraftGraph:
    """Nodes (formulas), their parents (indices, `-1` = root) and the budget D.

    Invariants checked on construction: no empty or duplicate node (a graph may have no nodes, e.g.
    when calibration saw no state with a successor; Spiffy then drafts nothing), ranks >= 1, distinct
    position ranks within a node, parents are strict subsets, every node reachable from the root, and
    `len(nodes) <= budget`.

    `phases` (optional, ours) conditions the drafts on the walk's state: `((lo, node indices), ...)` with
    ascending `lo`, the first 1; a forward whose real state has `m` masked positions drafts only the nodes of
    the last phase with `lo <= m`. Each phase is itself a valid graph of at most `budget` nodes (so D drafts
    per forward still hold); the union may be larger. Drafts never change outputs, so this stays lossless.
    """

    nodes: tuple[Formula, ...]
    parents: tuple[tuple[int, ...], ...]
    budget: int
    selection: str = "manual"
    provenance: dict = field(default_factory=dict, compare=False)
    phases: tuple[tuple[int, tuple[int, ...]], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(canonical(n) for n in self.nodes))
        object.__setattr__(self, "parents", tuple(tuple(int(p) for p in ps) for ps in self.parents))
        object.__setattr__(
            self, "phases", tuple((int(lo), tuple(int(q) for q in qs)) for lo, qs in self.phases)
        )
        if not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"budget={self.budget!r} must be a positive integer")
        if not self.phases and len(self.nodes) > self.budget:
            raise ValueError(f"{len(self.nodes)} nodes exceed budget={self.budget}")
        if len(self.parents) != len(self.nodes):
            raise ValueError(f"{len(self.parents)} parent lists for {len(self.nodes)} nodes")
        seen: dict[Formula, int] = {}
        for n, node in enumerate(self.nodes):
            if not node:
                raise ValueError(f"node {n} is empty (the root is implicit)")
            if any(i < 1 or j < 1 for i, j in node):
                raise ValueError(f"node {n} {list(node)} has a rank < 1 (ranks are 1-based)")
            if len({i for i, _ in node}) != len(node):
                raise ValueError(f"node {n} {list(node)} repeats a position rank i")
            if node in seen:
                raise ValueError(f"node {n} {list(node)} duplicates node {seen[node]}")
            seen[node] = n
            for p in self.parents[n]:
                if p != ROOT and not 0 <= p < len(self.nodes):
                    raise ValueError(f"node {n} {list(node)} has unknown parent {p}")
                if p != ROOT and not set(self.nodes[p]) < set(node):
                    raise ValueError(
                        f"node {n} {list(node)}: parent {p} {list(self.nodes[p])} is not a subset"
                    )
        levels = self.levels
        for n, level in enumerate(levels):
            if level is None:
                raise ValueError(f"node {n} {list(self.nodes[n])} is not reachable from the root")
        if self.phases:
            self._check_phases()

    def _check_phases(self) -> None:
        los = [lo for lo, _ in self.phases]
        if los[0] != 1 or any(b <= a for a, b in zip(los, los[1:])):
            raise ValueError(f"phases start at masked counts {los}: must ascend from 1")
        used = set()
        for lo, qs in self.phases:
            if any(not 0 <= q < len(self.nodes) for q in qs) or len(set(qs)) != len(qs):
                raise ValueError(f"phase lo={lo}: node indices {list(qs)} invalid or repeated")
            try:
                self._subgraph(qs)
            except ValueError as err:
                raise ValueError(f"phase lo={lo}: {err}") from err
            used.update(qs)
        if used != set(range(len(self.nodes))):
            raise ValueError(f"nodes {sorted(set(range(len(self.nodes))) - used)} are in no phase")

    def _subgraph(self, qs: Sequence[int]) -> DraftGraph:
        index = {q: n for n, q in enumerate(qs)}
        parents = tuple(
            tuple(p if p == ROOT else index[p] for p in self.parents[q] if p == ROOT or p in index)
            for q in qs
        )
        nodes = tuple(self.nodes[q] for q in qs)
        return DraftGraph(nodes, parents, self.budget, self.selection, self.provenance)

    def phase_graphs(self) -> list[tuple[int, DraftGraph]]:
        """`(lowest masked count, graph)` per phase: `[(1, self)]` for a graph without phases."""
        if not self.phases:
            return [(1, self)]
        return [(lo, self._subgraph(qs)) for lo, qs in self.phases]

    @property
    def levels(self) -> list[int | None]:
        """Shortest number of edges from the root per node (None if unreachable); breadth-first, O(edges)."""
        levels: list[int | None] = [None] * len(self.nodes)
        children = self.children()
        frontier = [n for n, ps in enumerate(self.parents) if ROOT in ps]
        for n in frontier:
            levels[n] = 1
        while frontier:
            nxt = []
            for p in frontier:
                for c in children[p]:
                    if levels[c] is None:
                        levels[c] = levels[p] + 1
                        nxt.append(c)
            frontier = nxt
        return levels

    @property
    def max_position_rank(self) -> int:
        return max((i for node in self.nodes for i, _ in node), default=1)

    @property
    def max_token_rank(self) -> int:
        return max((j for node in self.nodes for _, j in node), default=1)

    def children(self) -> list[list[int]]:
        """Child indices per node."""
        out: list[list[int]] = [[] for _ in self.nodes]
        for n, ps in enumerate(self.parents):
            for p in ps:
                if p != ROOT:
                    out[p].append(n)
        return out

    @classmethod
    def from_formulas(
        cls,
        formulas: Iterable[Iterable[Sequence[int]]],
        *,
        budget: int | None = None,
        max_added: int = 1,
        selection: str = "manual",
        provenance: dict | None = None,
    ) -> DraftGraph:
        """Build a graph, inferring parents: A is a parent of B iff A is a strict subset of B that adds at
        most `max_added` pairs (one-token rules: exactly one); nodes of size <= `max_added` hang off the root.
        """
        nodes = [canonical(f) for f in formulas]
        parents = []
        for node in nodes:
            ps = [ROOT] if len(node) <= max_added else []
            ps += [
                a
                for a, other in enumerate(nodes)
                if set(other) < set(node) and len(node) - len(other) <= max_added
            ]
            parents.append(tuple(ps))
        return cls(
            tuple(nodes),
            tuple(parents),
            budget if budget is not None else len(nodes),
            selection,
            provenance or {},
        )

    def to_json(self) -> str:
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "budget": self.budget,
            "selection": self.selection,
            "nodes": [[list(p) for p in node] for node in self.nodes],
            "parents": [list(ps) for ps in self.parents],
            "provenance": self.provenance,
        }
        if self.phases:
            payload["phases"] = [[lo, list(qs)] for lo, qs in self.phases]
        return json.dumps(payload, indent=1)

    @classmethod
    def from_json(cls, text: str, *, source: str = "<string>") -> DraftGraph:
        """Parse and validate; any problem raises `ValueError` naming `source`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"draft graph {source}: not valid JSON (truncated or corrupted?): {err}"
            ) from err
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"draft graph {source}: missing 'format': {FORMAT!r}")
        if data.get("version") != VERSION:
            raise ValueError(
                f"draft graph {source}: version={data.get('version')!r}, expected {VERSION}"
            )
        if not isinstance(data.get("provenance", {}), dict):
            raise ValueError(f"draft graph {source}: 'provenance' must be an object")
        try:
            return cls(
                nodes=tuple(tuple(tuple(p) for p in node) for node in data["nodes"]),
                parents=tuple(tuple(ps) for ps in data["parents"]),
                budget=data["budget"],
                selection=data.get("selection", "manual"),
                provenance=data.get("provenance", {}),
                phases=tuple((lo, tuple(qs)) for lo, qs in data.get("phases", [])),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(
                f"draft graph {source}: malformed ({type(err).__name__}: {err})"
            ) from err

    def save(self, path: str | Path) -> None:
        """Write the JSON atomically (temporary file + `os.replace`)."""
        from spiffy.graph.files import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path, *, max_bytes: int = MAX_FILE_BYTES) -> DraftGraph:
        """Read and validate; a missing file raises `FileNotFoundError`, anything malformed (random bytes,
        a truncated file, an invalid graph, a file over `max_bytes`) a `ValueError` naming the path."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"draft graph file {str(path)!r} does not exist")
        size = path.stat().st_size
        if size > max_bytes:
            raise ValueError(
                f"draft graph {str(path)!r}: {size} bytes, over the {max_bytes}-byte cap on graph files "
                "(a graph of any budget a block can verify is far smaller)"
            )
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"draft graph {str(path)!r}: not UTF-8 text ({err})") from err
        return cls.from_json(text, source=repr(str(path)))
