"""Result types every decoder returns (docs/algorithm.md §7): tokens plus typed statistics, never bare dicts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class DecodeStats:
    """Per-request counters and timings.

    `nfe` counts every model call (block starts and verification calls included); `transitions` counts
    denoising transitions. The base decoder's NFE for the same request is `transitions` plus, for SDAR, the
    reference loop's prefill and store calls (`base_extra_calls`, docs/algorithm.md §7, §12).
    `accepted_per_forward[n]` is how many forwards advanced `n + 1` transitions.
    """

    nfe: int = 0
    transitions: int = 0
    base_extra_calls: int = (
        0  # the base's calls that perform no transition: SDAR's prefill and stores
    )
    accepted_per_forward: Counter = field(default_factory=Counter)
    accepted_per_level: Counter = field(default_factory=Counter)
    drafted_per_level: Counter = field(default_factory=Counter)
    drafts_verified: int = 0
    draft_query_tokens: int = 0
    query_tokens: int = 0
    model_s: float = 0.0
    draft_s: float = 0.0
    mask_s: float = 0.0
    bookkeeping_s: float = 0.0
    wall_s: float = (
        0.0  # in a batch: this request's share of the batch's wall-clock (they sum to it)
    )
    latency_s: float = 0.0  # from the request's start to its end (alone: wall_s)
    generated_tokens: int = 0
    committed_confidence: list[float] | None = None
    eos_early_stop: bool = (
        False  # a block ended inside at EOS (LLaDA2.0's `eos_early_stop`, docs/llada2.md)
    )

    @property
    def nfe_base(self) -> int:
        """The base decoder's NFE for this request: one forward per transition, plus SDAR's prefill and
        store calls (the published loop's count, whatever fusions this decoder used)."""
        return self.transitions + self.base_extra_calls

    @property
    def speedup_nfe(self) -> float:
        return self.nfe_base / self.nfe if self.nfe else float("nan")

    @property
    def mean_accepted_per_forward(self) -> float:
        """Transitions per forward minus one, over the forwards that performed transitions (all of them,
        except SDAR's prefill and plain store calls)."""
        forwards = sum(self.accepted_per_forward.values())
        return self.transitions / forwards - 1 if forwards else float("nan")

    @property
    def overhead_s(self) -> float:
        """Time outside the model spent on Spiffy's drafting, masks and bookkeeping."""
        return self.draft_s + self.mask_s + self.bookkeeping_s

    def to_dict(self) -> dict:
        """Flat, JSON-ready view (logging edge only)."""
        return {
            "nfe": self.nfe,
            "nfe_base": self.nfe_base,
            "transitions": self.transitions,
            "base_extra_calls": self.base_extra_calls,
            "speedup_nfe": self.speedup_nfe,
            "accepted_per_forward_mean": self.mean_accepted_per_forward,
            "accepted_per_forward_hist": dict(sorted(self.accepted_per_forward.items())),
            "accepted_per_level": dict(sorted(self.accepted_per_level.items())),
            "drafted_per_level": dict(sorted(self.drafted_per_level.items())),
            "drafts_verified": self.drafts_verified,
            "draft_query_tokens": self.draft_query_tokens,
            "query_tokens": self.query_tokens,
            "model_s": self.model_s,
            "draft_s": self.draft_s,
            "mask_s": self.mask_s,
            "bookkeeping_s": self.bookkeeping_s,
            "wall_s": self.wall_s,
            "latency_s": self.latency_s,
            "generated_tokens": self.generated_tokens,
        }


class StatsRecorder:
    """Records what one request's decode did into its `DecodeStats` (the one writer of the counters): the
    decoder reports events (a model call, a forward's advance, a walk's outcome, drafts verified)."""

    def __init__(self, record_confidence: bool = False):
        self.stats = DecodeStats(committed_confidence=[] if record_confidence else None)

    def model_call(self, *, base_extra: bool = False) -> None:
        """One model call; `base_extra`: one the base decoder also makes without a transition (SDAR)."""
        self.stats.nfe += 1
        self.stats.base_extra_calls += base_extra

    def forward_advanced(self, transitions: int) -> None:
        """A forward's distributions advanced the block by `transitions` transitions."""
        self.stats.accepted_per_forward[transitions - 1] += 1

    def accepted(self, levels) -> None:
        """Transitions taken on verified drafts of these graph levels."""
        for level in levels:
            self.stats.accepted_per_level[level] += 1

    def drafts(self, valid: list[bool], levels) -> None:
        """Drafts sent to verification (`valid`: which of the graph rows were)."""
        for ok, level in zip(valid, levels):
            if ok:
                self.stats.drafted_per_level[level] += 1
        self.stats.drafts_verified += sum(valid)

    def walked(
        self, transitions: int, confidence: list[float] | None, bookkeeping_s: float
    ) -> None:
        """A walk over one forward's rows: its transitions, committed confidences, host bookkeeping time."""
        self.stats.transitions += transitions
        self.stats.bookkeeping_s += bookkeeping_s
        if self.stats.committed_confidence is not None and confidence:
            self.stats.committed_confidence.extend(confidence)

    def drafted(self, seconds: float) -> None:
        self.stats.draft_s += seconds

    def eos_early_stop(self, stopped: bool) -> None:
        """Whether the rule ended the last completed block inside, at EOS (LLaDA2.0)."""
        self.stats.eos_early_stop = stopped


@dataclass(frozen=True)
class BlockEvent:
    """One committed block of a request (streaming, docs/algorithm.md §13): its index in the request's blocks,
    its tokens in the generated region (concatenated in order they are `generate`'s tokens up to where
    decoding ended; the rest, after a stop id, keep the mask id), the model calls this block took (SDAR's
    prefill counts with the first) and the transitions it took on verified drafts (without a forward of
    their own)."""

    block_index: int
    tokens: torch.Tensor
    nfe: int
    accepted: int


@dataclass
class DecodeResult:
    """`tokens` is the generated region only (gen_length,); `stats` its counters; `canvas` (T,) the whole
    canvas, prompt region included (SDAR: rounded up to whole blocks, docs/algorithm.md §12)."""

    tokens: torch.Tensor
    stats: DecodeStats
    canvas: torch.Tensor | None = None


@dataclass
class Done:
    """The step function's answer when a request has finished: its result."""

    result: DecodeResult


@dataclass
class BatchDecodeResult:
    """`generate_batch`'s results, one `DecodeResult` per prompt in prompt order (iterable and indexable like a
    list), and how the batch ran (`spiffy.decoding.batching.BatchStats`: forwards, calls and rows per forward)."""

    results: list[DecodeResult]
    batch: object

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self):
        return iter(self.results)

    def __getitem__(self, i: int) -> DecodeResult:
        return self.results[i]
