"""The one semi-autoregressive block loop as a state machine: transition rule × cache mode (docs/algorithm.md §2-§5.4, §13).

`BlockDecoder` is LLaDA's sampler (`rule="schedule"`, `cache="none"`), Fast-dLLM's (`threshold`/`factor`,
`prefix`/`dual`), SDAR's `block_diffusion_generate` (the `sdar_*` rules with the exact `block_causal` cache,
docs/algorithm.md §12: blocks aligned to absolute positions, a prefill, one store per finished block) and every other
combination; presets are configurations, not forks.

A request's decode is a `RequestState` (canvas, blocks, the block being decoded, its walk state, keyed noise,
statistics) and one step function: `step(state, out)` takes the output of the request's last model call,
advances the request (the acceptance walk of docs/algorithm.md §5.4 over that forward's rows, drafting, block
transitions) and returns its next `ModelCall`, or `Done` with the result. Whoever runs the calls decides how:
`generate` runs each alone (step one request until done: the oracle), `stream` does the same and yields a
`BlockEvent` per committed block, and `spiffy.decoding.engine.Engine` stacks many requests' calls into one
forward (`generate_batch` is a thin wrapper over it). Subclasses plug in through typed hooks: `propose` /
`propose_early` (draft states to verify with the next forward; `drafting` says a decoder drafts), `lookahead` (how
many next-block positions that forward should also project) and `stored_row` (SDAR: the verified row whose K/V
store the finished block). Hooks return values; `StatsRecorder` is the one writer of the statistics.

One forward, one host read (the normal path). The walk applies the transition to every row at the step it
would be reached at (row r of graph level l at `step + l`) in one batched call, links each row to the row its
next state equals (`walk.py`), and follows the links on the device. A single read brings the links and the
draft validity to the host; the host replays the walk in plain Python. The rare cases where a row is reached at
another step (a transition that committed nothing, or a multi-token transition landing on a deeper draft) finish
transition by transition (`_walk_slowly`), which is the loop of docs/algorithm.md §5.4 verbatim. Both walks,
and the replay of recorded trajectories, apply one acceptance rule (`walk.walk_step`). Drafts for the next forward are
built from the device-side end of the walk before the read, so their validity comes with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from spiffy.decoding.batching import ModelCall
from spiffy.decoding.config import SDAR_RULES, GenerationConfig
from spiffy.decoding.drafting import Drafts
from spiffy.decoding.engine import Engine
from spiffy.decoding.forward import ForwardStrategy, Pending, Verification
from spiffy.decoding.llada2_rules import PostCounter, eos_stopped
from spiffy.decoding.modes import get_cache_mode
from spiffy.decoding.randomness import NoiseKey
from spiffy.decoding.rules import TransitionRule
from spiffy.decoding.sampling import Distributions, TransitionContext, pick, transition
from spiffy.decoding.strategies import STRATEGIES
from spiffy.decoding.types import (
    BatchDecodeResult,
    BlockEvent,
    DecodeResult,
    Done,
    StatsRecorder,
)
from spiffy.decoding.walk import (
    COMPLETE,
    STAY,
    STOP,
    Rows,
    WalkLinks,
    link_rows,
    replay,
    row_index,
    walk_step,
)
from spiffy.models.base import DiffusionLM, DiffusionLMOutput
from spiffy.models.loading import ModelSpec, model_spec


@dataclass(frozen=True)
class DecoderOptions:
    """Execution options. Within one setting of `invariant`, none changes which tokens a decoder returns.

    `record_confidence`: keep the confidence of every committed token in the stats (one read per transition).
    `profile`: on a GPU, time model calls with CUDA events (read once per request); else model time is NaN there.
    `compile`: `torch.compile` the model forward; draft rows are then never compacted (a static row count).
    `min_rows`: pad cached verification forwards with inert copies to at least this many query rows, so that
    the base's single-state step runs matrix products of the same kernel class as Spiffy's (batch invariance
    on BLAS libraries that switch kernels for few rows; 16 on this project's CPU, see `scripts/numerics.py`).
    `invariant`: run every model call in invariant numerics (`spiffy.models.numerics`, docs/numerics.md): each
    row's logits are bitwise the same whatever the number of rows, states and requests sharing its forward, so
    Spiffy returns its base's tokens and a batch returns each request's tokens alone in float32 and bfloat16 too,
    not only where a rounding difference cannot move a token (float64). It may change float32/bfloat16 logits
    relative to the default mode (other roundings), and costs time (docs/numerics.md "What is exact, where").
    """

    record_confidence: bool = False
    profile: bool = False
    compile: bool = False
    min_rows: int = 0
    invariant: bool = False

    def __post_init__(self) -> None:
        for name in ("record_confidence", "profile", "compile", "invariant"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be True or False")
        if (
            not isinstance(self.min_rows, int)
            or isinstance(self.min_rows, bool)
            or self.min_rows < 0
        ):
            raise ValueError(f"min_rows={self.min_rows!r}: must be an integer >= 0")


@dataclass
class Carry:
    """The next block's first-forward distribution (Lb, V), computed by the forward that verified the
    complete state, and how many transitions that forward has advanced so far."""

    logits: torch.Tensor
    advanced: int


@dataclass
class WalkEnd:
    """Where one forward's walk stopped: transitions taken, the block state, whether the block is complete,
    the anchor row, the first verified draft row equal to the final state (< 1: none), drafts built early
    with their validity; and what it observed, for the recorder: the graph levels of the verified drafts it
    moved to, the draft validity it read (of the forward's rows 1..), committed confidences, drafting and
    bookkeeping seconds."""

    transitions: int
    state: torch.Tensor
    complete: bool
    anchor: int
    match: int = -1
    drafts: Drafts | None = None
    drafts_valid: list[bool] | None = None
    accepted: list[int] = field(default_factory=list)
    read_valid: list[bool] | None = None
    confidence: list[float] | None = None
    draft_s: float = 0.0
    bookkeeping_s: float = 0.0


@dataclass
class RequestState:
    """One request's decode in progress: everything the step function reads and writes (module docstring).

    `index` is the block being decoded, `step` the transitions taken in it, `advanced` the transitions taken on
    the last forward's distributions; `rows` that forward's verified rows, `sent` the rows of the call in flight
    (states, host levels, device validity, unread validity); `waiting` the call in flight and the step that
    takes its result; `events` the committed blocks not yet collected; `result` is set when done."""

    request_id: int | str
    prompt_len: int
    canvas: torch.Tensor
    blocks: list[slice]
    strategy: ForwardStrategy
    noise: NoiseKey
    recorder: StatsRecorder
    stops: torch.Tensor
    started: float
    index: int = 0
    ctx: TransitionContext | None = None
    rows: Rows | None = None
    step: int = 0
    advanced: int = 0
    sent: tuple | None = None
    waiting: tuple[Pending, Callable] | None = None
    begun: bool = False
    block_mark: tuple[int, int] = (0, 0)  # NFE and accepted drafts when the block began
    events: list[BlockEvent] = field(default_factory=list)
    result: DecodeResult | None = None

    @property
    def stats(self):
        return self.recorder.stats

    @property
    def block(self) -> slice:
        return self.blocks[self.index]

    def take_events(self) -> list[BlockEvent]:
        """The committed blocks since the last call (each returned once)."""
        events, self.events = self.events, []
        return events


class BlockDecoder:
    """Base decoder. `generate(prompt_ids, request_id=, seed=)` returns a `DecodeResult`; `stream(...)` yields
    its blocks as they are committed; `generate_batch(prompts, request_ids, seed)` decodes many prompts per
    forward with the same outputs; `start` / `step` are the state machine all of them run."""

    drafting = (
        False  # the decoder proposes drafts (`propose_early` may give them before the host read)
    )

    def __init__(
        self,
        model: DiffusionLM,
        cfg: GenerationConfig,
        spec: ModelSpec | None = None,
        options: DecoderOptions | None = None,
    ):
        self.model = model
        self.cfg = cfg
        self.spec = spec or model_spec(model)
        self.rule = TransitionRule.from_config(cfg)
        self.options = options or DecoderOptions()
        self.mode = get_cache_mode(cfg.cache)
        self.verify = "exact"  # the verification layout (Spiffy: the one its cache mode runs)
        self.keep_kv = False  # keep verified rows' K/V (Spiffy's `fuse_store`)
        # a transition whose result does not depend on its step index: any verified row may continue the walk
        self.step_free = (
            not self.rule.spec.reads_step and cfg.temperature == 0 and cfg.remasking != "random"
        )
        self._check_family()

    def _check_family(self) -> None:
        """Block-causal models (SDAR) decode with the SDAR rules, in blocks of their attention block size."""
        spec, cfg = self.spec, self.cfg
        if spec.block_causal != self.rule.spec.block_causal:
            kind = "block-causal (SDAR)" if spec.block_causal else "bidirectional"
            need = list(SDAR_RULES) if spec.block_causal else "a rule other than the SDAR rules"
            raise ValueError(f"rule={cfg.rule!r}: the model is {kind}; use {need}")
        # (attention_block_size 0: block-causal at any block length, LLaDA2)
        if (
            spec.block_causal
            and spec.attention_block_size
            and cfg.block_length != spec.attention_block_size
        ):
            raise ValueError(
                f"block_length={cfg.block_length}: this SDAR model's block_size is "
                f"{spec.attention_block_size}"
            )
        bad = [i for i in cfg.stop_ids or () if i >= spec.vocab_size or i == spec.mask_id]
        if bad:
            raise ValueError(
                f"stop_ids={list(cfg.stop_ids)}: {bad} is the mask id {spec.mask_id} or "
                f">= vocab_size={spec.vocab_size}"
            )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prepare_prompt(self, prompt_ids: torch.Tensor | list[int]) -> torch.Tensor:
        """Validate a prompt (P,) or (1, P) of integer token ids and return it as a 1-D LongTensor on the
        model's device. Floats, bools and ids outside the vocabulary raise `ValueError`."""
        raw = torch.as_tensor(prompt_ids)
        if raw.dtype == torch.bool or raw.is_floating_point() or raw.is_complex():
            raise ValueError(f"prompt_ids of dtype {raw.dtype}: expected integer token ids")
        prompt = raw.to(torch.long)
        if (
            prompt.numel()
            and not 0 <= int(prompt.min()) <= int(prompt.max()) < self.spec.vocab_size
        ):
            bad = prompt[(prompt < 0) | (prompt >= self.spec.vocab_size)][0]
            raise ValueError(
                f"prompt_ids contain {int(bad)}, outside the vocabulary [0, {self.spec.vocab_size})"
            )
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1:
            raise ValueError(
                f"prompt_ids of shape {tuple(prompt.shape)}: expected (P,) or (1, P); for a batch use "
                "decoder.generate_batch([prompt, ...]) or model.generate(input_ids, attention_mask=...)"
            )
        if (prompt == self.spec.mask_id).any():
            raise ValueError(f"prompt_ids contain the mask id {self.spec.mask_id}")
        total = self.layout(prompt.numel())[0]
        if total > self.spec.max_length:
            raise ValueError(
                f"prompt length {prompt.numel()} + gen_length {self.cfg.gen_length} = {total} "
                f"exceeds the model's max_length={self.spec.max_length}"
            )
        return prompt.to(self.device)

    def layout(self, p: int) -> tuple[int, list[slice]]:
        """Canvas length and the blocks to decode for a prompt of length `p`.

        Bidirectional families: the prompt, then `gen_length` positions in blocks. Block-causal ones (docs/algorithm.md §12):
        blocks aligned to absolute positions, the canvas rounded up to whole blocks; the prompt's whole blocks
        are prefilled and its partial last block is decoded as part of the first block.
        """
        lb = self.cfg.block_length
        if not self.spec.block_causal:
            return p + self.cfg.gen_length, [
                slice(p + b * lb, p + (b + 1) * lb) for b in range(self.cfg.num_blocks)
            ]
        total = -(-(p + self.cfg.gen_length) // lb) * lb
        return total, [slice(s, s + lb) for s in range(p // lb * lb, total, lb)]

    def make_strategy(self) -> ForwardStrategy:
        """The forward strategy of the cache mode (one per request)."""
        opts = self.options
        return STRATEGIES[self.cfg.cache](
            self.model,
            profile=opts.profile,
            compile=opts.compile,
            min_rows=opts.min_rows,
            keep_kv=self.keep_kv,
            block_length=self.cfg.block_length,
            invariant=opts.invariant,
        )

    # ---- running requests ----------------------------------------------------------------------------

    def generate(
        self, prompt_ids: torch.Tensor | list[int], *, request_id: int | str = 0, seed: int = 0
    ) -> DecodeResult:
        """Decode `gen_length` tokens after the prompt, block by block, left to right: the request stepped
        alone until done, each model call run by itself (the oracle every batched run equals)."""
        state = self.start(prompt_ids, request_id=request_id, seed=seed)
        for _ in self._run_alone(state):
            pass
        return state.result

    def stream(
        self, prompt_ids: torch.Tensor | list[int], *, request_id: int | str = 0, seed: int = 0
    ) -> Iterator[BlockEvent]:
        """`generate`, yielding a `BlockEvent` each time a block is committed (its tokens are final then)."""
        state = self.start(prompt_ids, request_id=request_id, seed=seed)
        yield from self._run_alone(state)

    def _run_alone(self, state: RequestState) -> Iterator[BlockEvent]:
        out = None
        while True:
            nxt = self.step(state, out)
            yield from state.take_events()
            if isinstance(nxt, Done):
                return
            out = state.strategy.execute(nxt)

    def generate_batch(
        self,
        prompts: Sequence[torch.Tensor | list[int]],
        request_ids: Sequence[int | str] | None = None,
        seed: int = 0,
        *,
        batch_size: int | None = None,
        tolerance: float = 0.25,
        max_tokens: int | None | str = "auto",
        on_result: Callable[[int, DecodeResult], None] | None = None,
    ) -> BatchDecodeResult:
        """Decode many prompts, up to `batch_size` at a time (default: all), each exactly as `generate` would
        (docs/algorithm.md §13): every request keeps its own canvas, NFE and keyed noise; forwards carry the rows
        of every live request, bucketed by query length (`tolerance`: the padding allowed, as a fraction of a
        bucket's longest query; `max_tokens`: at most that many query tokens per forward, None = no limit, "auto" =
        `batching.default_max_tokens` of the model's device). A finished request leaves and the next prompt
        joins; `on_result(i, result)` is called as each finishes. `request_ids` default to the prompts'
        indices. Each result's `stats.wall_s` is its share of the batch's wall-clock (its own stepping time plus
        its share of the forwards, by query rows), `stats.latency_s` its own start-to-end time. A thin wrapper
        over `spiffy.decoding.engine.Engine`; the first failing request's error (in prompt order) is raised."""
        ids = list(range(len(prompts))) if request_ids is None else list(request_ids)
        if len(ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(ids)} request_ids")
        for rid in ids:  # before any forward: a bad key fails the call, not the batch halfway
            NoiseKey(seed, rid)
        engine = Engine(
            self,
            max_batch=len(prompts) if batch_size is None else batch_size,
            tolerance=tolerance,
            max_tokens=max_tokens,
        )
        requests = []
        for i, (prompt, r) in enumerate(zip(prompts, ids, strict=True)):
            try:
                requests.append(engine.add_request(prompt, request_id=r, seed=seed))
            except ValueError as error:
                raise ValueError(f"prompts[{i}]: {error}") from None
        index = {id(req): i for i, req in enumerate(requests)}
        while engine.has_unfinished():
            engine.step()
            failed = [req for req in requests if req.error is not None]
            if failed:
                raise failed[0].error
            for req in engine.take_finished():
                if on_result is not None:
                    on_result(index[id(req)], req.result)
        for req in requests:
            req.result.stats.wall_s = req.share
        return BatchDecodeResult([req.result for req in requests], engine.stats)

    # ---- the state machine -----------------------------------------------------------------------------

    def start(
        self, prompt_ids: torch.Tensor | list[int], *, request_id: int | str = 0, seed: int = 0
    ) -> RequestState:
        """A new request's state (the prompt validated, the canvas laid out); `step(state)` begins it."""
        t0 = time.perf_counter()
        prompt = self.prepare_prompt(prompt_ids)
        p = prompt.numel()
        total, blocks = self.layout(p)
        canvas = torch.cat([prompt, prompt.new_full((total - p,), self.spec.mask_id)])
        return RequestState(
            request_id,
            p,
            canvas,
            blocks,
            self.make_strategy(),
            NoiseKey(seed, request_id),
            StatsRecorder(self.options.record_confidence),
            torch.tensor(self.cfg.stop_ids or [], dtype=torch.long, device=canvas.device),
            t0,
        )

    def step(
        self, state: RequestState, out: DiffusionLMOutput | None = None, *, seconds: float = 0.0
    ) -> ModelCall | Done:
        """Advance the request with `out`, the output of its last model call (None on the first step), which
        took `seconds` of model time when run by someone else; return its next model call, or `Done`."""
        if state.result is not None:
            return Done(state.result)
        if not state.begun:
            if out is not None:
                raise ValueError(
                    "the request has made no model call yet: its first step takes no output"
                )
            state.begun = True
            return self._begin(state)
        if out is None:
            raise ValueError("the request waits on its model call: pass the call's output")
        (pending, then), state.waiting = state.waiting, None
        state.strategy.timer.model_s += seconds
        return then(state, pending.finish(out))

    def _wait(self, state: RequestState, pending: Pending, then: Callable) -> ModelCall:
        state.waiting = (pending, then)
        return pending.call

    def _begin(self, state: RequestState) -> ModelCall | Done:
        if self.mode.stores_blocks:  # SDAR's prefill of the whole prompt blocks
            pending = state.strategy.prefill_call(state.canvas, state.blocks[0].start)
            if pending is not None:
                state.recorder.model_call(base_extra=True)
                return self._wait(state, pending, lambda s, _: self.enter_block(s, None))
        return self.enter_block(state, None)

    def enter_block(self, state: RequestState, carry: Carry | None) -> ModelCall | Done:
        """Begin block `state.index`: its first forward, unless the previous block's last forward already
        computed its distribution (`carry`: the optional cross-block continuation, docs/algorithm.md §5.4)."""
        block = state.block
        # positions from the prompt's end start masked
        masked = block.stop - max(block.start, state.prompt_len)
        # LLaDA2.1 counts the calls on a block without masks (docs/llada2.md)
        post = PostCounter() if self.rule.spec.edit is not None else None
        state.ctx = TransitionContext(
            self.cfg,
            self.rule,
            self.spec,
            state.noise,
            state.index,
            masked_at_start=masked,
            post=post,
        )
        state.step = 0
        if (
            carry is None
        ):  # the block-start forward carries no drafts (anchor = none in every cache mode)
            state.advanced = 0
            state.recorder.model_call()
            pending = state.strategy.begin_block_call(state.canvas, block)
            return self._wait(state, pending, self._block_started)
        state.advanced = carry.advanced
        return self._forwarded(state, self._single(state, carry.logits))

    def _single(self, state: RequestState, logits: torch.Tensor) -> Rows:
        return Rows.single(
            state.canvas[state.block].clone(), Distributions(logits[None], state.ctx)
        )

    def _block_started(self, state: RequestState, logits: torch.Tensor) -> ModelCall | Done:
        return self._forwarded(state, self._single(state, logits))

    def _verified(self, state: RequestState, out: Verification) -> ModelCall | Done:
        (states, levels, valid, unread), state.sent = state.sent, None
        dists = Distributions(out.logits, state.ctx)
        return self._forwarded(state, Rows(states, dists, levels, valid, unread, out.lookahead))

    def _forwarded(self, state: RequestState, rows: Rows) -> ModelCall | Done:
        """Walk a forward's rows (docs/algorithm.md §5.4), then draft and send the next verification, or end
        the block."""
        rec, block, canvas = state.recorder, state.block, state.canvas
        state.rows = rows
        if state.ctx.post is not None:  # LLaDA2.1 counts the calls on a block without masks
            state.ctx.post.note_forward(rows.states[0], self.spec.mask_id)
        end = self._walk(rows, state.step, state.ctx)
        rec.accepted(end.accepted)
        if end.read_valid is not None:
            rec.drafts(end.read_valid, rows.levels[1:])
        rec.walked(end.transitions, end.confidence, end.bookkeeping_s)
        rec.drafted(end.draft_s)
        state.step += end.transitions
        state.advanced += end.transitions
        canvas[block] = end.state
        if end.complete:
            if self.cfg.eos_early_stop:  # did the rule end the block at EOS (LLaDA2.0)?
                rec.eos_early_stop(bool(eos_stopped(rows.states[end.anchor], end.state, state.ctx)))
            return self._complete(state, end)
        rec.forward_advanced(state.advanced)
        state.advanced = 0
        # Draft from the anchor (the distribution `end.state` was sampled from), verify in one forward.
        drafts, known = end.drafts, end.drafts_valid
        if drafts is None:
            t = time.perf_counter()
            drafts = self.propose(rows.dists.row(end.anchor), end.state, state.ctx, state.step)
            rec.drafted(time.perf_counter() - t)
            known = None
        if known is not None:
            rec.drafts(known, drafts.row_levels)
        state.sent = self._rows_to_send(end.state, drafts, known)
        states = state.sent[0]
        ahead = self.lookahead(canvas.numel(), block, states.shape[0] - 1)
        rec.model_call()
        pending = state.strategy.verify_call(canvas, block, states, self.verify, lookahead=ahead)
        return self._wait(state, pending, self._verified)

    def _complete(self, state: RequestState, end: WalkEnd) -> ModelCall | Done:
        """End the complete block; carry the next block's first distribution if already known.

        Block-causal models store the block's K/V (docs/algorithm.md §12): from the last forward's row of the
        complete state when it was verified there (`stored_row`), else with a store forward, which with
        `fuse_next` also computes the next block's first distribution. The base's count is the reference's: one
        store call per block. Other families: the optional cross-block continuation (docs/algorithm.md §5.4).
        """
        rows, block, canvas, rec = state.rows, state.block, state.canvas, state.recorder
        has_next = block.stop < canvas.numel()
        if self.mode.stores_blocks:
            rec.stats.base_extra_calls += 1
            row = self.stored_row(end)
            if row is not None:
                rec.accepted([rows.levels[row]])
            with_next = self.cfg.fuse_next and has_next
            pending = state.strategy.store_call(canvas, block, row, with_next)
            if pending is None:  # stored from row `row`, which also carried the next block if asked
                nxt = rows.lookahead[row] if rows.lookahead is not None else None
                return self._stored(state, nxt, calls=0)
            rec.model_call()
            return self._wait(state, pending, lambda s, nxt: self._stored(s, nxt, calls=1))
        if has_next and rows.lookahead is not None and end.match >= 1:  # cross-block continuation
            rec.accepted([rows.levels[end.match]])
            return self.leave_block(state, Carry(rows.lookahead[end.match], state.advanced))
        rec.forward_advanced(state.advanced)
        return self.leave_block(state, None)

    def _stored(
        self, state: RequestState, nxt: torch.Tensor | None, calls: int
    ) -> ModelCall | Done:
        if nxt is None:
            state.recorder.forward_advanced(state.advanced)
            return self.leave_block(state, None)
        advanced = state.advanced
        if calls:  # the store forward starts the next block: a new forward's count begins
            state.recorder.forward_advanced(advanced)
            advanced = 0
        return self.leave_block(state, Carry(nxt, advanced))

    def leave_block(self, state: RequestState, carry: Carry | None) -> ModelCall | Done:
        """The block is committed: emit its `BlockEvent`, then begin the next block (or finish: no block
        left, or a stop id in the generated region, after which later blocks keep the mask id)."""
        stats, block, p = state.stats, state.block, state.prompt_len
        accepted = sum(stats.accepted_per_level.values())
        lo, hi = max(block.start, p), min(block.stop, p + self.cfg.gen_length)
        nfe0, accepted0 = state.block_mark
        state.events.append(
            BlockEvent(
                state.index, state.canvas[lo:hi].clone(), stats.nfe - nfe0, accepted - accepted0
            )
        )
        state.block_mark = (stats.nfe, accepted)
        state.index += 1
        stopped = state.stops.numel() and torch.isin(state.canvas[p:], state.stops).any()
        if stopped or state.index == len(state.blocks):
            return self._finish(state)
        return self.enter_block(state, carry)

    def _finish(self, state: RequestState) -> Done:
        p, stats = state.prompt_len, state.stats
        tokens = state.canvas[p : p + self.cfg.gen_length].clone()
        timer = state.strategy.timer
        timer.resolve()
        stats.model_s, stats.mask_s = timer.model_s, timer.mask_s
        stats.query_tokens, stats.draft_query_tokens = timer.query_tokens, timer.draft_query_tokens
        eos = (tokens == self.spec.eos_id).nonzero() if self.spec.eos_id is not None else []
        stats.generated_tokens = int(eos[0]) if len(eos) else tokens.numel()
        stats.wall_s = stats.latency_s = time.perf_counter() - state.started
        state.result = DecodeResult(tokens=tokens, stats=stats, canvas=state.canvas.clone())
        return Done(state.result)

    # ---- hooks (pure: they return values, the recorder records) ---------------------------------------------

    def stored_row(self, end: WalkEnd) -> int | None:
        """Row of the last forward that computed the complete state (block-causal storing); the base
        decoder's last forward never did (its state still had masks)."""
        return None

    def propose(
        self, anchor: Distributions, state: torch.Tensor, ctx: TransitionContext, step: int
    ) -> Drafts | None:
        """Draft states for the next forward from the anchor (docs/algorithm.md §5.1); the base decoder drafts nothing."""
        return None

    def propose_early(
        self, anchor: Distributions, state: torch.Tensor, ctx: TransitionContext
    ) -> Drafts | None:
        """The same drafts built before the walk's host read, when they do not depend on the step index
        (their validity then comes with that read); None defers drafting to `propose`. Called only when
        `drafting` is set."""
        return None

    def lookahead(self, canvas_len: int, block: slice, n_drafts: int) -> int:
        """How many next-block positions the verification forward should also project (0: none)."""
        return 0

    # ---- the walk ----------------------------------------------------------------------------------------

    def _rows_to_send(self, state, drafts: Drafts | None, known: list[bool] | None):
        """States (N, Lb), host levels, device validity and not-yet-read validity of the next forward.
        Drafts whose validity the host knows are compacted (unless compiling: a static row count);
        otherwise every row is sent and invalid ones stay inert (never matched)."""
        if drafts is None or drafts.states.shape[0] == 0:
            return state[None], [0], None, None
        levels = list(drafts.row_levels)
        if known is not None and not self.options.compile:
            kept = [r for r, ok in enumerate(known) if ok]
            sent = row_index((0, *(r + 1 for r in kept)), state.device)
            states = torch.cat([state[None], drafts.states]).index_select(0, sent)
            return states, [0] + [levels[r] for r in kept], None, None
        valid = torch.cat([drafts.valid.new_ones(1), drafts.valid])
        unread = None if known is not None else drafts.valid
        return torch.cat([state[None], drafts.states]), [0] + levels, valid, unread

    def _walk(self, rows: Rows, step: int, ctx: TransitionContext) -> WalkEnd:
        """Every transition this forward's rows allow, with one host read on the normal path. The time of
        walks over verified drafts is Spiffy's bookkeeping (an upper bound: it includes the real state's
        own transition, which the base decoder pays too); on a GPU these host timings need `profile`."""
        t0 = time.perf_counter()
        end = self._walk_rows(rows, step, ctx)
        if rows.states.shape[0] > 1:
            end.bookkeeping_s = time.perf_counter() - t0 - end.draft_s
        return end

    def _walk_rows(self, rows: Rows, step: int, ctx: TransitionContext) -> WalkEnd:
        links: WalkLinks = link_rows(rows, step, ctx, self.step_free)
        early, draft_s = None, 0.0
        # a bounded rule's block ends after its last step, known on the host: if row 0's transition is
        # that step, the walk ends there and no forward follows to draft for
        last = self.rule.bounded and self.rule.is_complete(True, step + 1)
        if not last and self.drafting:
            t = time.perf_counter()
            early = self.propose_early(rows.dists.row(links.end), pick(links.new, links.end), ctx)
            draft_s = time.perf_counter() - t
        extra = [early.valid] if early is not None else []
        if rows.unread is not None:
            extra.append(rows.unread)
        host = links.read(extra)  # the one device read of this forward
        path, reason = replay(host)
        r = path[-1]
        seen = dict(
            accepted=[rows.levels[q] for q in path[1:]],
            read_valid=host.extra[-1] if rows.unread is not None else None,
            confidence=None,
            draft_s=draft_s,
        )
        if self.options.record_confidence:
            seen["confidence"] = []
            for q in path:
                committed = links.new[q] != rows.states[q]
                seen["confidence"].extend(links.conf[q][committed].tolist())
        new = links.new[r]
        if reason == "complete":
            return WalkEnd(len(path), new, True, r, host.match[r], **seen)
        if reason == "anchor":
            valid = host.extra[0] if early is not None else None
            return WalkEnd(len(path), new, False, r, -1, early, valid, **seen)
        # a row reached at another step than the batched transition assumed: finish one transition at a time
        s = step + len(path)
        if reason == "same":
            return self._walk_slowly(rows, r, rows.states[r], s, 1, len(path), ctx, seen)
        m = host.match[r]
        seen["accepted"].append(rows.levels[m])
        return self._walk_slowly(rows, m, new, s, 0, len(path), ctx, seen)

    def _walk_slowly(self, rows, r, state, step, stalled, taken, ctx, seen: dict) -> WalkEnd:
        """docs/algorithm.md §5.4 verbatim from row `r`'s distribution, `state` and `step`: one read per
        transition. `seen` is what the walk observed so far (`WalkEnd`'s recorder fields)."""
        while True:
            if stalled >= self.cfg.block_length and not self.rule.bounded:
                raise RuntimeError(
                    f"block {ctx.block}: {stalled} consecutive transitions committed nothing "
                    "(the model keeps predicting the mask id)"
                )
            new, conf = transition(rows.dists.row(r), state, step, ctx)
            step, taken = step + 1, taken + 1
            eq = (rows.states == new).all(1)
            eq[0] = False
            if rows.valid is not None:
                eq &= rows.valid
            first = torch.where(eq.any(), eq.to(torch.int8).argmax(), -1)
            has_mask, same, match = torch.stack(
                [(new == self.spec.mask_id).any().long(), (new == state).all().long(), first]
            ).tolist()
            if seen["confidence"] is not None:
                seen["confidence"].extend(conf[new != state].tolist())
            if self.rule.spec.complete is not None:  # LLaDA2: its own end of block (docs/llada2.md)
                done = bool(self.rule.complete_rows(state[None], new[None], ctx)[0])
            else:
                done = self.rule.is_complete(has_mask, step)
            move = walk_step(done, bool(same), match >= 1)
            if move == COMPLETE:
                return WalkEnd(taken, new, True, r, match, **seen)
            stalled = stalled + 1 if move == STAY else 0
            if move == STAY:
                continue
            if move == STOP:
                return WalkEnd(taken, new, False, r, **seen)
            seen["accepted"].append(rows.levels[match])
            r, state = match, new
