"""Trajectory recording for calibration (SPEC §5.5 step 1; the paper's Algorithm 2, first half).

`TrajectoryRecorder` *is* the base decoder B (same rule, cache mode, block length, temperature, EOS options):
it overrides only the `propose` hook, which the base loop calls at every state that has an anchor, to remember
the anchor's ranks. For each such state X_t it records the next `h` states X_{t+1..t+h} of the block as formulas
relative to X_t's anchor: the `(i, j)` pairs of every token added since X_t. Complete states are never drafts,
so they are not recorded. Memory is bounded: only the last `h` anchors are kept.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from spiffy.decoding.block_decoder import BlockDecoder
from spiffy.decoding.config import GenerationConfig
from spiffy.decoding.drafting import level_scores
from spiffy.graph.draft_graph import Formula

FORMAT = "spiffy.trajectories"


@dataclass
class BlockTrajectory:
    """One block: its number of transitions T and, for each state X_t (t = 1..T-1), the keys of
    X_{t+1}, ..., X_{t+h} (complete states excluded). SDAR (SPEC §12): `extra_calls` are the recorded
    decoder's model calls for this block beyond its acceptance walk (the store forward, minus a block start
    that `fuse_next` merged into the previous store; the request's prefill counts on its first block), and
    `base_extra_calls` the published loop's (prefill and one store per block), which `nfe_base` counts."""

    transitions: int
    keys: list[list[Formula]] = field(default_factory=list)
    extra_calls: int = 0
    base_extra_calls: int = 0


@dataclass
class Trajectories:
    """Recorded blocks plus the settings they were recorded under."""

    blocks: list[BlockTrajectory]
    horizon: int
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        payload = {
            "format": FORMAT,
            "horizon": self.horizon,
            "meta": self.meta,
            "blocks": [asdict(b) for b in self.blocks],
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload))

    @classmethod
    def load(cls, path: str | Path) -> Trajectories:
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a spiffy trajectories file")
        blocks = [
            BlockTrajectory(
                b["transitions"],
                [[tuple(tuple(p) for p in key) for key in ks] for ks in b["keys"]],
                b.get("extra_calls", 0),
                b.get("base_extra_calls", 0),
            )
            for b in data["blocks"]
        ]
        return cls(blocks, data["horizon"], data.get("meta", {}))


@dataclass
class _Origin:
    """A state X_t with an anchor, and the keys of the states after it."""

    state: torch.Tensor
    anchor: torch.Tensor  # (Lb, V) the anchor's logits
    ctx: object
    step: int
    keyed: bool
    last: torch.Tensor | None = None
    keys: list[Formula] = field(default_factory=list)
    _tables: dict = field(default_factory=dict)

    def tables(self, level: int) -> tuple[dict[int, int], torch.Tensor]:
        """Position ranks and token scores for pairs added at `level` (SPEC §5.1, §5.7)."""
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

    def observe(self, state: torch.Tensor) -> None:
        """Record the key of the next state: the previous key plus the pairs added at this level."""
        level = len(self.keys) + 1
        previous = self.state if self.last is None else self.last
        pos_rank, scores = self.tables(level)
        added = (state != previous).nonzero().squeeze(-1).tolist()
        pairs = {(pos_rank[p], token_rank(scores[p], int(state[p]))) for p in added}
        self.keys.append(tuple(sorted(set(self.keys[-1] if self.keys else ()) | pairs)))
        self.last = state


def token_rank(scores: torch.Tensor, token: int) -> int:
    """1-based rank of `token` in `scores` (V,), ties to the lower id (SPEC §5.1)."""
    s = scores[token]
    ids = torch.arange(scores.numel(), device=scores.device)
    return 1 + int((scores > s).sum()) + int(((scores == s) & (ids < token)).sum())


class TrajectoryRecorder(BlockDecoder):
    """The base decoder, recording every block's trajectory as anchor-relative formulas."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: GenerationConfig,
        horizon: int = 12,
        draft_noise: str = "none",
    ):
        super().__init__(model, cfg)
        self.horizon = horizon
        self.keyed = draft_noise == "keyed"
        self.blocks: list[BlockTrajectory] = []
        self._pending: deque[_Origin] = deque()
        self._done: list[list[Formula]] = []

    def decode_block(self, canvas, block, b, strategy, stats, noise, carry=None):
        self._pending.clear()
        self._done = []
        before = stats.transitions
        # calls made before the first block (SDAR's prefill) count with it
        calls = stats.nfe if b else 0
        base_calls = stats.base_extra_calls if b else 0
        carry = super().decode_block(canvas, block, b, strategy, stats, noise, carry)
        self._done.extend(o.keys for o in self._pending)
        transitions = stats.transitions - before
        self.blocks.append(
            BlockTrajectory(
                transitions,
                self._done,
                stats.nfe - calls - transitions,
                stats.base_extra_calls - base_calls,
            )
        )
        return carry  # None, or SDAR's `fuse_next` start of the next block: the recorder drafts nothing

    def propose(self, anchor, state, ctx, step, stats):
        for origin in self._pending:  # X_step is a later state of every pending origin
            origin.observe(state)
        while self._pending and len(self._pending[0].keys) >= self.horizon:
            self._done.append(self._pending.popleft().keys)
        self._pending.append(_Origin(state.clone(), anchor, ctx, step, self.keyed))
        return super().propose(anchor, state, ctx, step, stats)


def record_trajectories(
    model: torch.nn.Module,
    cfg: GenerationConfig,
    prompts: list[torch.Tensor],
    *,
    horizon: int = 12,
    seed: int = 0,
    progress: bool = True,
    meta: dict | None = None,
    draft_noise: str = "none",
) -> Trajectories:
    """Run the base decoder `cfg` on `prompts` (request ids 0..n-1) and record their trajectories."""
    from tqdm.auto import tqdm

    recorder = TrajectoryRecorder(model, cfg, horizon, draft_noise)
    for request_id, prompt in enumerate(
        tqdm(prompts, desc="calibrate: record", disable=not progress)
    ):
        recorder.generate(prompt, request_id=request_id, seed=seed)
    return Trajectories(recorder.blocks, horizon, meta or {})
