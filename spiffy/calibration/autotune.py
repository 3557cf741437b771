"""`graph.budget=auto`: choose the draft budget D* and lossless layout that this device runs fastest (docs/algorithm.md §5.8).

For every candidate D* in 0..D (0 is the base decoder itself) the graph selected at that budget is replayed on the
calibration trajectories (the exact acceptance walk of `spiffy.calibration.calibrate.evaluate`, whose NFE this replay
reproduces), and every forward is charged what it costs on this device (`spiffy.calibration.cost`):

    wall(D*) = blocks · F_start + Σ_in-block forwards F_layout(block, 1 + drafts) + T · step + N_in · overhead(D*)
    wall(0)  = blocks · F_start + Σ_in-block forwards F_base(block)                + T · step

`drafts` is the number of graph nodes the forward instantiates: the state's masked count `m` (recorded with the
trajectories) admits a node iff its largest position rank is <= m and it leaves a mask (docs/algorithm.md §5.1), among the
nodes of m's phase for a phased graph. The predicted wall-clock speedup is wall(0) / wall(D*); the choice maximises it over
D* and the lossless layouts of the base's cache mode, and keeps the base unless the best beats it by `margin`.
Only the graph (and a lossless layout) is chosen, so the output is the base decoder's whatever is chosen.

With `dynamic=True` (`graph.source=dynamic graph.budget=auto`), dynamic graphs of every D (docs/algorithm.md
§5.10) compete too: trajectories recorded on the same prompts with anchor features give each forward's drafts
by the dynamic replay (`spiffy.calibration.dynamic`), a forward drafts the chosen nodes that instantiate, and
Spiffy's time outside the model is measured for the dynamic graph (it scores its pool at every forward).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from spiffy.calibration.cost import CostModel, load_or_measure, lossless_layouts, overhead_key
from spiffy.calibration.dynamic import DynamicReplay, calibrate_dynamic
from spiffy.calibration.replay import EMPTY, NodeSets, evaluate, node_sets
from spiffy.calibration.store import load_or_calibrate, trajectories_path
from spiffy.calibration.trajectories import Trajectories, record_trajectories
from spiffy.decoding.config import GenerationConfig
from spiffy.decoding.drafting import insertion_levels
from spiffy.decoding.modes import get_cache_mode
from spiffy.decoding.speculative import Speculation
from spiffy.graph.draft_graph import DraftGraph, Formula
from spiffy.graph.dynamic import DynamicGraph

MARGIN = 0.03  # keep the base unless a graph is predicted at least 3 % faster (timing noise on a shared device)


@dataclass(frozen=True)
class Candidate:
    """One (layout, D*) option and its prediction on the calibration trajectories."""

    layout: str
    budget: int
    nodes: int
    speedup_nfe: float
    speedup_wall: float
    states_per_forward: float  # mean states (1 + drafts) per in-block forward
    forward_cost: float  # mean in-block forward time / the base's in-block forward time
    overhead_share: float  # Spiffy's extra time outside the model / predicted wall
    kind: str = "static"  # or "dynamic" (drafts chosen per forward, docs/algorithm.md §5.10)


@dataclass(frozen=True)
class AutoChoice:
    """The chosen budget, layout and graph (None for D* = 0), the prediction, and every candidate."""

    budget: int
    layout: str
    graph: DraftGraph | DynamicGraph | None
    predicted_speedup_wall: float
    predicted_speedup_nfe: float
    reason: str
    candidates: list[Candidate] = field(default_factory=list)
    costs_path: str = ""

    def speculation(self, **options) -> Speculation | None:
        """`Speculation` of the chosen graph and layout (`options`: its other fields), or None for the base."""
        if self.graph is None:
            return None
        return Speculation(self.graph, verify=self.layout, **options)

    def to_dict(self) -> dict:
        """JSON-ready summary for a result row (the graph itself is stored separately)."""
        return {
            "budget": self.budget,
            "layout": self.layout,
            "kind": "dynamic" if isinstance(self.graph, DynamicGraph) else "static",
            "predicted_speedup_wall": self.predicted_speedup_wall,
            "predicted_speedup_nfe": self.predicted_speedup_nfe,
            "reason": self.reason,
            "costs_path": self.costs_path,
            "candidates": [asdict(c) for c in self.candidates],
        }


def forward_states(block, nodes_of: NodeSets) -> list[int]:
    """The states X_t (1-based t) at which the acceptance walk runs an in-block forward (docs/algorithm.md §5.4; the walk of
    `spiffy.calibration.replay.walk_block`, whose forward count `predict` checks it against)."""
    return forward_states_at(block, lambda t: nodes_of(block.masked[t - 1]))


def forward_states_at(block, nodes_at: Callable[[int], set[Formula]]) -> list[int]:
    """`forward_states` with the drafts of the forward at X_t given per state (`nodes_at(t)`: dynamic drafting)."""
    at, t = [], 1  # the block-start forward performs the first transition
    while t < block.transitions:
        at.append(t)
        nodes = nodes_at(t)
        seq, accepted, previous = block.keys[t - 1], 0, EMPTY
        while accepted < len(seq) and (seq[accepted] in nodes or seq[accepted] == previous):
            previous = seq[accepted]
            accepted += 1
        t += accepted + 1
    return at


def drafts_counter(graph: DraftGraph, keyed: bool) -> Callable[[int], int]:
    """drafts(m): the draft rows a forward at a state with m masked positions instantiates. A node is
    instantiated iff its largest position rank is <= m and it leaves a mask (docs/algorithm.md §5.1); a phased graph drafts
    the nodes of the phase of m."""
    phases = graph.phase_graphs()
    los, specs = [lo for lo, _ in phases], []
    for _, g in phases:
        rows = [len(a) if keyed else 1 for a in insertion_levels(g)]
        specs.append([(max(i for i, _ in node), len(node), r) for node, r in zip(g.nodes, rows)])

    def count(m: int) -> int:
        spec = specs[max(0, bisect_right(los, m) - 1)]
        return sum(r for top, size, r in spec if top <= m and size < m)

    return count


def predict(
    trajectories: Trajectories,
    graphs: dict[int, DraftGraph | None],
    costs: CostModel,
    cfg: GenerationConfig,
    *,
    keyed: bool = False,
) -> list[Candidate]:
    """Predicted NFE and wall-clock speedups of every (layout, D*) on the recorded trajectories."""
    nb, blocks = cfg.num_blocks, trajectories.blocks
    transitions = sum(b.transitions for b in blocks)
    extra_calls = sum(b.extra_calls for b in blocks)
    # block-causal caches: the prefills and one store per block, the same calls with or without drafts
    stores = len(blocks) if extra_calls else 0
    common_ms = stores * costs.block_start_ms + (extra_calls - stores) * costs.meta.get(
        "prefill_ms", 0.0
    )
    out = []
    for layout in costs.forward_ms:
        base_ms = len(blocks) * costs.block_start_ms + transitions * costs.step_ms + common_ms
        base_fwd = sum(
            costs.base_forward(k % nb) * (b.transitions - 1) for k, b in enumerate(blocks)
        )
        base_ms += base_fwd
        base_per_fwd = base_fwd / max(1, transitions - len(blocks))
        for budget, graph in sorted(graphs.items()):
            if graph is None:  # D* = 0 is the base decoder itself
                out.append(Candidate(layout, budget, 0, 1.0, 1.0, 1.0, 1.0, 0.0))
                continue
            nodes_of, count = node_sets(graph), drafts_counter(graph, keyed)
            fwd_ms, states, n_in = 0.0, 0, 0
            for k, block in enumerate(blocks):
                for t in forward_states(block, nodes_of):
                    n = 1 + count(block.masked[t - 1])
                    fwd_ms += costs.forward(layout, k % nb, n)
                    states, n_in = states + n, n_in + 1
            nfe = len(blocks) + n_in + extra_calls
            expected = evaluate(graph, trajectories).nfe
            if nfe != expected:  # the replay must be the evaluator's walk
                raise RuntimeError(f"replay NFE {nfe} != evaluate NFE {expected} at D={budget}")
            extra = n_in * costs.overhead(layout, len(graph.nodes))
            ms = len(blocks) * costs.block_start_ms + fwd_ms + transitions * costs.step_ms + extra
            ms += common_ms
            out.append(
                Candidate(
                    layout,
                    budget,
                    len(graph.nodes),
                    (transitions + extra_calls) / nfe,  # the base's calls / these
                    base_ms / ms,
                    states / max(1, n_in),
                    (fwd_ms / max(1, n_in)) / base_per_fwd if n_in else 1.0,
                    extra / ms,
                )
            )
    return out


def instantiated(nodes: set[Formula], m: int) -> int:
    """Draft rows a forward at a state with m masked positions instantiates from these (one row each): a node
    is instantiated iff its largest position rank is <= m and it leaves a mask (docs/algorithm.md §5.1)."""
    return sum(1 for node in nodes if max(i for i, _ in node) <= m and len(node) < m)


def predict_dynamic(
    trajectories: Trajectories,
    graphs: dict[int, DynamicGraph],
    costs: CostModel,
    cfg: GenerationConfig,
    replay: DynamicReplay | None = None,
) -> list[Candidate]:
    """`predict` for dynamic graphs, on trajectories recorded with anchor features: each forward's drafts are
    the replayed selection at its state (the NFE is `DynamicReplay.evaluate`'s, checked), its cost that of
    the rows they instantiate, Spiffy's overhead the one measured for dynamic graphs."""
    if any(b.extra_calls for b in trajectories.blocks):
        raise ValueError("dynamic graphs: autotune does not model block-causal caches' extra calls")
    replay = replay or DynamicReplay(trajectories)
    nb, blocks = cfg.num_blocks, trajectories.blocks
    transitions = sum(b.transitions for b in blocks)
    out = []
    for layout in costs.forward_ms:
        base_fwd = sum(
            costs.base_forward(k % nb) * (b.transitions - 1) for k, b in enumerate(blocks)
        )
        base_ms = len(blocks) * costs.block_start_ms + transitions * costs.step_ms + base_fwd
        base_per_fwd = base_fwd / max(1, transitions - len(blocks))
        for budget, graph in sorted(graphs.items()):
            drafts = replay.drafts(graph)
            fwd_ms, states, n_in = 0.0, 0, 0
            for k, block in enumerate(blocks):
                for t in forward_states_at(block, lambda t, k=k: drafts[(k, t)]):
                    n = 1 + instantiated(drafts[(k, t)], block.masked[t - 1])
                    fwd_ms += costs.forward(layout, k % nb, n)
                    states, n_in = states + n, n_in + 1
            nfe = len(blocks) + n_in
            expected = replay.evaluate(graph).nfe
            if nfe != expected:  # the replay must be the evaluator's walk
                raise RuntimeError(
                    f"dynamic replay NFE {nfe} != evaluate NFE {expected} at D={budget}"
                )
            key = overhead_key(layout, graph)
            extra = n_in * costs.overhead(*key) if key[0] in costs.overhead_ms else 0.0
            ms = len(blocks) * costs.block_start_ms + fwd_ms + transitions * costs.step_ms + extra
            out.append(
                Candidate(
                    layout,
                    budget,
                    graph.budget,
                    transitions / nfe,
                    base_ms / ms,
                    states / max(1, n_in),
                    (fwd_ms / max(1, n_in)) / base_per_fwd if n_in else 1.0,
                    extra / ms,
                    "dynamic",
                )
            )
    return out


def choose(candidates: list[Candidate], margin: float = MARGIN) -> tuple[Candidate, str]:
    """The fastest predicted candidate (ties: fewer nodes), unless none beats the base by `margin`; and why."""
    if not candidates:
        raise ValueError("candidates: nothing to choose from")
    base = next(c for c in candidates if c.budget == 0)
    best = max(candidates, key=lambda c: (round(c.speedup_wall, 6), -c.budget))
    largest = max(candidates, key=lambda c: (c.budget, c.speedup_wall))
    tail = (
        f"D={largest.budget} would be {largest.speedup_wall:.2f}x "
        f"(NFE {largest.speedup_nfe:.2f}x, forwards {largest.forward_cost:.1f}x as costly)"
    )
    if best.budget == 0 or best.speedup_wall < 1.0 + margin:
        why = (
            f"auto: D*=0 (the base decoder): no budget is predicted >= {1 + margin:.2f}x on this device "
            f"(best D={best.budget}: {best.speedup_wall:.2f}x); {tail}"
        )
        return base, why
    kind = " dynamic" if best.kind == "dynamic" else ""
    why = (
        f"auto: D*={best.budget}{kind}, layout {best.layout}: predicted {best.speedup_wall:.2f}x wall-clock "
        f"(NFE {best.speedup_nfe:.2f}x, {best.states_per_forward:.1f} states per forward costing "
        f"{best.forward_cost:.2f}x a plain one, Spiffy overhead {best.overhead_share:.1%}); {tail}"
    )
    return best, why


def autotune(
    model: torch.nn.Module,
    cfg: GenerationConfig,
    prompts: Callable[[], list[torch.Tensor]] | list[torch.Tensor],
    *,
    model_name: str,
    task: str,
    n_samples: int,
    max_budget: int = 10,
    rule: str = "best",
    seed: int = 0,
    horizon: int = 16,
    draft_noise: str = "none",
    root: str = "runs/graphs",
    margin: float = MARGIN,
    force: bool = False,
    remeasure: bool = False,
    progress: bool = True,
    batch_size: int = 1,
    dynamic: bool = False,
) -> AutoChoice:
    """Calibrate graphs of 1..`max_budget` nodes (cached), measure this device's costs (cached), and choose.

    `prompts`: the calibration prompts (token ids), or a callable returning them. `force` recalibrates and
    remeasures, `remeasure` only remeasures the costs. `batch_size`: the costs are those of a request decoded in
    batches of that many (docs/algorithm.md §13), where draft rows compete with batch-mates. `dynamic`: dynamic
    graphs of 1..`max_budget` slots compete too (calibrated on the same prompts, not cached). Use the result with
    `build_decoder(model, cfg, speculate=choice.speculation())`.
    """
    if not isinstance(max_budget, int) or isinstance(max_budget, bool) or max_budget < 1:
        raise ValueError(f"max_budget={max_budget!r} must be a positive integer")
    if not 0 <= margin < 1:
        raise ValueError(f"margin={margin!r} must be in [0, 1)")
    if get_cache_mode(cfg.cache).stores_blocks and cfg.fuse_next:
        raise ValueError(
            "fuse_next=True: autotune does not model a store forward that starts the next block yet"
        )
    listed = list(prompts() if callable(prompts) else prompts)
    graphs: dict[int, DraftGraph | None] = {0: None}
    for budget in range(1, max_budget + 1):
        graphs[budget] = load_or_calibrate(
            model,
            cfg,
            lambda: listed,
            model_name=model_name,
            task=task,
            n_samples=n_samples,
            budget=budget,
            rule=rule,
            seed=seed,
            horizon=horizon,
            draft_noise=draft_noise,
            root=root,
            force=force and budget == 1,
            progress=progress,
        )
    trajectories = Trajectories.load(trajectories_path(graphs[max_budget], root))
    measured = [graphs[1], graphs[max_budget]] if max_budget > 1 else [graphs[1]]
    dynamic_graphs: dict[int, DynamicGraph] = {}
    if dynamic:
        if batch_size > 1:
            raise ValueError(
                f"batch_size={batch_size}: dynamic graphs are autotuned one request at a time"
            )
        featured = record_trajectories(
            model,
            cfg,
            listed,
            horizon=max(horizon, max_budget),
            seed=seed,
            progress=progress,
            draft_noise=draft_noise,
            features=3,
        )
        replay = DynamicReplay(featured)
        for budget in range(1, max_budget + 1):
            dynamic_graphs[budget] = calibrate_dynamic(
                featured, budget, replay=replay, provenance={"task": task, "n_samples": n_samples}
            )
        measured.append(dynamic_graphs[max_budget])
    costs, path = load_or_measure(
        model,
        cfg,
        listed,
        measured,
        model_name=model_name,
        root=root,
        draft_noise=draft_noise,
        force=force or remeasure,
        batch=batch_size,
        progress=progress,
    )
    candidates = predict(trajectories, graphs, costs, cfg, keyed=draft_noise == "keyed")
    if dynamic_graphs:
        candidates += predict_dynamic(featured, dynamic_graphs, costs, cfg, replay)
    candidates = [c for c in candidates if c.layout in lossless_layouts(cfg.cache)]
    best, why = choose(candidates, margin)
    return AutoChoice(
        best.budget,
        best.layout,
        dynamic_graphs[best.budget] if best.kind == "dynamic" else graphs[best.budget],
        best.speedup_wall,
        best.speedup_nfe,
        why,
        candidates,
        str(path),
    )
