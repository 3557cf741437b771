"""Trajectory recording for calibration (docs/algorithm.md §5.5 step 1; the paper's Algorithm 2, first half).

`TrajectoryRecorder` *is* the base decoder B (same rule, cache mode, block length, temperature, EOS options):
it overrides only the `propose` hook, which the base loop calls at every state that has an anchor, to remember
the anchor's ranks. For each such state X_t it records the next `h` states X_{t+1..t+h} of the block as formulas
relative to X_t's anchor: the `(i, j)` pairs of every token added since X_t. The complete state X_T ends the
plain walk, so it is kept apart (`complete`, when T - t <= h): the cross-block walk (docs/algorithm.md §5.4 option) accepts it
as a draft. Each origin also keeps its masked count (the walk's phase). Memory is bounded: only the last `h`
anchors are kept. With `features=J`, each origin also keeps what dynamic drafting reads from its anchor
(`spiffy.decoding.dynamic.anchor_features` over J token ranks), so that dynamic drafting can be replayed too.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spiffy.decoding.block_decoder import BlockDecoder
from spiffy.decoding.config import GenerationConfig
from spiffy.decoding.drafting import level_scores
from spiffy.decoding.dynamic import anchor_features
from spiffy.decoding.sampling import Distributions
from spiffy.graph.draft_graph import Formula
from spiffy.graph.files import atomic_write_text, read_json

FORMAT = "spiffy.trajectories"
VERSION = 2


@dataclass
class BlockTrajectory:
    """One block of one prompt: its number of transitions T and, for each state X_t (t = 1..T-1), the keys of
    X_{t+1}, ..., X_{t+h} (complete states excluded), the key of the complete state X_T (None beyond the
    horizon) and the number of masked positions in X_t. `last` marks the prompt's last block.

    SDAR (docs/algorithm.md §12): `extra_calls` are the recorded decoder's model calls for this block beyond its acceptance
    walk (the store forward, minus a block start that `fuse_next` merged into the previous store; the request's
    prefill counts on its first block), and `base_extra_calls` the published loop's (prefill and one store per
    block), which `nfe_base` counts."""

    transitions: int
    keys: list[list[Formula]] = field(default_factory=list)
    complete: list[Formula | None] = field(default_factory=list)
    masked: list[int] = field(default_factory=list)
    prompt: int = 0
    last: bool = True
    extra_calls: int = 0
    base_extra_calls: int = 0
    # per origin, with `features`: the anchor's ranked confidences (Lb,) and token probabilities (Lb, J)
    anchors: list[tuple[list[float], list[list[float]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        origins = max(self.transitions - 1, 0)
        if self.anchors and len(self.anchors) != origins:
            raise ValueError(
                f"block of prompt {self.prompt}: {len(self.anchors)} anchor features for "
                f"{origins} origins"
            )
        if not (len(self.keys) == len(self.complete) == len(self.masked) == origins):
            raise ValueError(
                f"block of prompt {self.prompt} with transitions={self.transitions} has "
                f"{len(self.keys)} key lists, {len(self.complete)} complete keys and "
                f"{len(self.masked)} masked counts (expected {origins} each)"
            )

    def to_dict(self) -> dict:
        return {
            "transitions": self.transitions,
            "keys": [[[list(p) for p in key] for key in seq] for seq in self.keys],
            "complete": [None if k is None else [list(p) for p in k] for k in self.complete],
            "masked": self.masked,
            "prompt": self.prompt,
            "last": self.last,
            "extra_calls": self.extra_calls,
            "base_extra_calls": self.base_extra_calls,
            **({"anchors": self.anchors} if self.anchors else {}),
        }

    @classmethod
    def from_dict(cls, b: dict) -> BlockTrajectory:
        def formula(key) -> Formula:
            return tuple((int(i), int(j)) for i, j in key)

        return cls(
            int(b["transitions"]),
            [[formula(key) for key in seq] for seq in b["keys"]],
            [None if k is None else formula(k) for k in b["complete"]],
            [int(m) for m in b["masked"]],
            int(b["prompt"]),
            bool(b["last"]),
            int(b.get("extra_calls", 0)),  # SDAR only
            int(b.get("base_extra_calls", 0)),
            [(list(c), [list(r) for r in p]) for c, p in b.get("anchors", [])],
        )


@dataclass
class Trajectories:
    """Recorded blocks (prompt by prompt, blocks in order) plus the settings they were recorded under."""

    blocks: list[BlockTrajectory]
    horizon: int
    meta: dict = field(default_factory=dict)

    @property
    def prompts(self) -> list[int]:
        """Prompt ids in recording order."""
        return list(dict.fromkeys(b.prompt for b in self.blocks))

    def subset(self, prompts) -> Trajectories:
        """The trajectories of the prompts in `prompts` (whole prompts: the cross-block walk spans blocks)."""
        keep = set(prompts)
        return Trajectories([b for b in self.blocks if b.prompt in keep], self.horizon, self.meta)

    def to_json(self) -> str:
        import json

        payload = {
            "format": FORMAT,
            "version": VERSION,
            "horizon": self.horizon,
            "meta": self.meta,
            "blocks": [b.to_dict() for b in self.blocks],
        }
        return json.dumps(payload, separators=(",", ":"))

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Trajectories:
        """Read and validate; any problem raises `ValueError` (or `FileNotFoundError`) naming the path."""
        data = read_json(path, "trajectories")
        where = f"trajectories file {str(path)!r}"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(
                f"{where}: missing 'format': {FORMAT!r} (not a spiffy trajectories file)"
            )
        if data.get("version") != VERSION:
            raise ValueError(
                f"{where}: version={data.get('version')!r}, expected {VERSION} (re-record it)"
            )
        try:
            horizon = data["horizon"]
            if not isinstance(horizon, int) or horizon < 1:
                raise ValueError(f"horizon={horizon!r} must be a positive integer")
            blocks = [BlockTrajectory.from_dict(b) for b in data["blocks"]]
            return cls(blocks, horizon, dict(data.get("meta", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{where}: malformed ({type(err).__name__}: {err})") from err


@dataclass
class _Origin:
    """A state X_t with an anchor, and the keys of the states after it."""

    state: torch.Tensor
    anchor: Distributions  # (Lb, V) the anchor's processed logits
    ctx: object
    step: int
    keyed: bool
    features: tuple | None = None
    last: torch.Tensor | None = None
    keys: list[Formula] = field(default_factory=list)
    # a later state rewrote a position that was not masked here (LLaDA2.1's editing): no draft reaches it
    unreachable: bool = False
    _tables: dict = field(default_factory=dict)

    @property
    def masked(self) -> int:
        return int((self.state == self.ctx.spec.mask_id).sum())

    def tables(self, level: int) -> tuple[dict[int, int], torch.Tensor]:
        """Position ranks and token scores for pairs added at `level` (docs/algorithm.md §5.1, §5.7)."""
        level = level if self.keyed else 1
        if level not in self._tables:
            scores, conf = level_scores(self.anchor, self.ctx, self.step + level - 1, self.keyed)
            if level == 1:  # one position order for every level, as in drafting
                masked = (self.state == self.ctx.spec.mask_id).nonzero().squeeze(-1)
                order = masked[torch.sort(conf[masked], descending=True, stable=True).indices]
                pos_rank = {int(p): r + 1 for r, p in enumerate(order.tolist())}
            else:
                pos_rank = self.tables(1)[0]
            self._tables[level] = (pos_rank, scores)
        return self._tables[level]

    def key_of(self, state: torch.Tensor) -> Formula:
        """The key of the next state: the previous key plus the pairs added at this level."""
        level = len(self.keys) + 1
        previous = self.state if self.last is None else self.last
        pos_rank, scores = self.tables(level)
        added = (state != previous).nonzero().squeeze(-1).tolist()
        pairs = {(pos_rank[p], token_rank(scores[p], int(state[p]))) for p in added}
        return tuple(sorted(set(self.keys[-1] if self.keys else ()) | pairs))

    def complete_key(self, state: torch.Tensor) -> Formula | None:
        """The key of the block's final state, or None if no draft can equal it (it changed a position
        that was not masked at this origin)."""
        previous = self.state if self.last is None else self.last
        if not self.fills_masks(previous, state):
            return None
        return self.key_of(state)

    def fills_masks(self, previous: torch.Tensor, state: torch.Tensor) -> bool:
        """Whether `state` only fills positions still masked in `previous` (drafts can do nothing else)."""
        changed = state != previous
        return not bool((changed & (previous != self.ctx.spec.mask_id)).any())

    def observe(self, state: torch.Tensor) -> None:
        if self.unreachable:
            return
        previous = self.state if self.last is None else self.last
        if not self.fills_masks(previous, state):
            self.unreachable = True
            return
        self.keys.append(self.key_of(state))
        self.last = state


def token_rank(scores: torch.Tensor, token: int) -> int:
    """1-based rank of `token` in `scores` (V,), ties to the lower id (docs/algorithm.md §5.1)."""
    s = scores[token]
    ids = torch.arange(scores.numel(), device=scores.device)
    return 1 + int((scores > s).sum()) + int(((scores == s) & (ids < token)).sum())


class TrajectoryRecorder(BlockDecoder):
    """The base decoder, recording every block's trajectory as anchor-relative formulas."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: GenerationConfig,
        horizon: int = 16,
        draft_noise: str = "none",
        features: int | None = None,
    ):
        if features is not None and (not isinstance(features, int) or features < 1):
            raise ValueError(f"features={features!r} must be None or a positive integer")
        if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
            raise ValueError(f"horizon={horizon!r} must be a positive integer")
        super().__init__(model, cfg)
        self.horizon = horizon
        self.keyed = draft_noise == "keyed"
        self.features = features
        self.blocks: list[BlockTrajectory] = []
        self.prompt = 0
        self._pending: deque[_Origin] = deque()
        self._done: list[tuple] = []

    def enter_block(self, state, carry):
        self._pending.clear()
        self._done = []
        stats = state.stats
        # calls made before the first block (SDAR's prefill) count with it
        self._marks = (
            stats.transitions,
            stats.nfe if state.index else 0,
            stats.base_extra_calls if state.index else 0,
        )
        return super().enter_block(state, carry)

    def leave_block(self, state, carry):
        stats, final = state.stats, state.canvas[state.block]
        before, calls, base_calls = self._marks
        for o in self._pending:  # the complete state is level len(keys) + 1 of every pending origin
            reachable = len(o.keys) < self.horizon and not o.unreachable
            complete = o.complete_key(final) if reachable else None
            self._done.append((o.keys, complete, o.masked, o.features))
        keys, complete, masked, anchors = (
            (list(x) for x in zip(*self._done)) if self._done else ([], [], [], [])
        )
        transitions = stats.transitions - before
        self.blocks.append(
            BlockTrajectory(
                transitions,
                keys,
                complete,
                masked,
                self.prompt,
                last=False,  # `generate` marks the prompt's last decoded block (stop ids may end early)
                extra_calls=stats.nfe - calls - transitions,
                base_extra_calls=stats.base_extra_calls - base_calls,
                anchors=anchors if self.features else [],
            )
        )
        # carry: None, or SDAR's `fuse_next` start of the next block (the recorder drafts nothing)
        return super().leave_block(state, carry)

    def generate(self, prompt_ids, *, request_id=0, seed=0):
        first = len(self.blocks)
        result = super().generate(prompt_ids, request_id=request_id, seed=seed)
        if len(self.blocks) > first:
            self.blocks[-1].last = True  # no next block: a verified complete draft saves nothing
        return result

    def propose(self, anchor, state, ctx, step):
        for origin in self._pending:  # X_step is a later state of every pending origin
            origin.observe(state)
        while self._pending and (
            len(self._pending[0].keys) >= self.horizon or self._pending[0].unreachable
        ):
            o = self._pending.popleft()
            self._done.append((o.keys, None, o.masked, o.features))
        features = None
        if self.features:
            _, _, _, f = anchor_features(anchor, state, ctx, self.features)
            features = (f.conf.tolist(), f.probs.tolist())
        self._pending.append(_Origin(state.clone(), anchor, ctx, step, self.keyed, features))
        return super().propose(anchor, state, ctx, step)


def record_trajectories(
    model: torch.nn.Module,
    cfg: GenerationConfig,
    prompts: list[torch.Tensor],
    *,
    horizon: int = 16,
    seed: int = 0,
    progress: bool = True,
    meta: dict | None = None,
    draft_noise: str = "none",
    features: int | None = None,
) -> Trajectories:
    """Run the base decoder `cfg` on `prompts` (request ids 0..n-1) and record their trajectories (with
    `features=J`, also each origin's anchor features over J token ranks)."""
    from tqdm.auto import tqdm

    recorder = TrajectoryRecorder(model, cfg, horizon, draft_noise, features)
    for request_id, prompt in enumerate(
        tqdm(prompts, desc="calibrate: record", disable=not progress)
    ):
        recorder.prompt = request_id
        recorder.generate(prompt, request_id=request_id, seed=seed)
    return Trajectories(recorder.blocks, horizon, meta or {})
