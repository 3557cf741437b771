"""The one semi-autoregressive block loop: transition rule × cache mode (docs/algorithm.md §2, §3, §4, §5.4).

`BlockDecoder` is LLaDA's sampler (`rule="schedule"`, `cache="none"`), Fast-dLLM's (`threshold`/`factor`,
`prefix`/`dual`), SDAR's `block_diffusion_generate` (the `sdar_*` rules with the exact `block_causal` cache,
docs/algorithm.md §12: blocks aligned to absolute positions, a prefill, one store per finished block) and every other
combination; presets are configurations, not forks. The loop is Spiffy's
acceptance walk (docs/algorithm.md §5.4) over the rows of one forward (row 0 the real state, rows 1.. verified drafts); the
base decoder verifies row 0 only, so each of its transitions costs exactly one forward. Subclasses plug in
through typed hooks: `propose` / `propose_early` (draft states to verify with the next forward), `lookahead`
(how many next-block positions that forward should also project) and `stored_row` (SDAR: the verified row whose
K/V store the finished block).

One forward, one host read (the normal path). The walk applies the transition to every row at the step it
would be reached at (row r of graph level l at `step + l`) in one batched call, links each row to the row its
next state equals (`walk.py`), and follows the links on the device. A single read brings the links and the
draft validity to the host; the host replays the walk in plain Python. The rare cases where a row is reached at
another step (a transition that committed nothing, or a multi-token transition landing on a deeper draft) finish
transition by transition (`_walk_slowly`), which is the loop of docs/algorithm.md §5.4 verbatim. Drafts for the next forward are
built from the device-side end of the walk before the read, so their validity comes with it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from spiffy.decoding.batching import BatchRunner, default_max_tokens
from spiffy.decoding.block_causal import BlockCausalCache
from spiffy.decoding.config import SDAR_RULES, GenerationConfig
from spiffy.decoding.drafting import Drafts
from spiffy.decoding.forward import STRATEGIES, ForwardStrategy
from spiffy.decoding.llada2_rules import PostCounter, eos_stopped
from spiffy.decoding.randomness import NoiseKey
from spiffy.decoding.rules import TransitionRule
from spiffy.decoding.sampling import Distributions, TransitionContext, pick, transition
from spiffy.decoding.types import BatchDecodeResult, DecodeResult, DecodeStats
from spiffy.decoding.walk import Rows, WalkLinks, link_rows, replay, row_index
from spiffy.models.base import DiffusionLM
from spiffy.models.loading import ModelSpec, model_spec


@dataclass(frozen=True)
class DecoderOptions:
    """Execution options that never change the output.

    `record_confidence`: keep the confidence of every committed token in the stats (one read per transition).
    `profile`: on a GPU, time model calls with CUDA events (read once per request); else model time is NaN there.
    `compile`: `torch.compile` the model forward; draft rows are then never compacted (a static row count).
    `min_rows`: pad cached verification forwards with inert copies to at least this many query rows, so that
    the base's single-state step runs matrix products of the same kernel class as Spiffy's (batch invariance
    on BLAS libraries that switch kernels for few rows; 16 on this project's CPU, see `scripts/numerics.py`).
    """

    record_confidence: bool = False
    profile: bool = False
    compile: bool = False
    min_rows: int = 0


@dataclass
class Carry:
    """The next block's first-forward distribution (Lb, V), computed by the forward that verified the
    complete state, and how many transitions that forward has advanced so far."""

    logits: torch.Tensor
    advanced: int


@dataclass
class WalkEnd:
    """Where one forward's walk stopped: transitions taken, the block state, whether the block is complete,
    the anchor row, the first verified draft row equal to the final state (< 1: none), and drafts built early
    with their validity."""

    transitions: int
    state: torch.Tensor
    complete: bool
    anchor: int
    match: int = -1
    drafts: Drafts | None = None
    drafts_valid: list[bool] | None = None


class BlockDecoder:
    """Base decoder. `generate(prompt_ids, request_id=, seed=)` returns a `DecodeResult`;
    `generate_batch(prompts, request_ids, seed)` decodes many prompts per forward with the same outputs."""

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
        self.verify = "exact"  # the verification layout (Spiffy: the one its cache mode runs)
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
        if spec.block_causal and spec.attention_block_size and cfg.block_length != spec.attention_block_size:
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
        strategy = STRATEGIES[self.cfg.cache](
            self.model, profile=opts.profile, compile=opts.compile, min_rows=opts.min_rows
        )
        if isinstance(strategy, BlockCausalCache):
            strategy.block_length = self.cfg.block_length
        return strategy

    def generate(
        self, prompt_ids: torch.Tensor | list[int], *, request_id: int | str = 0, seed: int = 0
    ) -> DecodeResult:
        """Decode `gen_length` tokens after the prompt, block by block, left to right."""
        t0 = time.perf_counter()
        prompt = self.prepare_prompt(prompt_ids)
        p = prompt.numel()
        total, blocks = self.layout(p)
        canvas = torch.cat([prompt, prompt.new_full((total - p,), self.spec.mask_id)])
        strategy = self.make_strategy()
        stats, noise = DecodeStats(), NoiseKey(seed, request_id)
        if self.options.record_confidence:
            stats.committed_confidence = []
        if isinstance(strategy, BlockCausalCache):  # SDAR's prefill of the whole prompt blocks
            calls = strategy.prefill(canvas, blocks[0].start)
            stats.nfe += calls
            stats.base_extra_calls += calls
        stops = torch.tensor(self.cfg.stop_ids or [], dtype=torch.long, device=canvas.device)
        carry = None
        for b, block in enumerate(blocks):
            masked = block.stop - max(
                block.start, p
            )  # positions from the prompt's end start masked
            carry = self.decode_block(
                canvas, block, b, strategy, stats, noise, carry, masked_at_start=masked
            )
            if stops.numel() and torch.isin(canvas[p:], stops).any():
                break  # a stop id in the generated region: later blocks keep the mask id
        tokens = canvas[p : p + self.cfg.gen_length].clone()
        timer = strategy.timer
        timer.resolve()
        stats.model_s, stats.mask_s = timer.model_s, timer.mask_s
        stats.query_tokens, stats.draft_query_tokens = timer.query_tokens, timer.draft_query_tokens
        eos = (tokens == self.spec.eos_id).nonzero() if self.spec.eos_id is not None else []
        stats.generated_tokens = int(eos[0]) if len(eos) else tokens.numel()
        stats.wall_s = stats.latency_s = time.perf_counter() - t0
        return DecodeResult(tokens=tokens, stats=stats, canvas=canvas.clone())

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
        `batching.default_max_tokens` of the model's device). A
        finished request leaves and the next prompt joins; `on_result(i, result)` is
        called as each finishes. `request_ids` default to the prompts' indices. Each result's `stats.wall_s` is
        its share of the batch's wall-clock (its own walking time plus its share of the forwards, by query
        rows), `stats.latency_s` its own start-to-end time."""
        ids = list(range(len(prompts))) if request_ids is None else list(request_ids)
        if len(ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(ids)} request_ids")
        for rid in ids:  # before any forward: a bad key fails the call, not the batch halfway
            NoiseKey(seed, rid)
        checked = []
        for i, prompt in enumerate(prompts):
            try:
                checked.append(self.prepare_prompt(prompt))
            except ValueError as error:
                raise ValueError(f"prompts[{i}]: {error}") from None
        runner = BatchRunner(
            self.model,
            len(prompts) if batch_size is None else batch_size,
            block_causal=self.spec.block_causal,
            tolerance=tolerance,
            max_tokens=default_max_tokens(self.device) if max_tokens == "auto" else max_tokens,
            on_done=on_result,
        )
        jobs = [
            functools.partial(self.generate, p, request_id=r, seed=seed)
            for p, r in zip(checked, ids, strict=True)
        ]
        results = runner.run(jobs)
        for result, share in zip(results, runner.shares, strict=True):
            result.stats.wall_s = share
        return BatchDecodeResult(results, runner.stats)

    def decode_block(
        self,
        canvas: torch.Tensor,
        block: slice,
        b: int,
        strategy: ForwardStrategy,
        stats: DecodeStats,
        noise: NoiseKey,
        carry: Carry | None = None,
        *,
        masked_at_start: int | None = None,
    ) -> Carry | None:
        """Run one block to completion: the acceptance walk of docs/algorithm.md §5.4 (updates `canvas` in place).

        `carry` is this block's first-forward distribution when the previous block's last forward already
        computed it (optional cross-block continuation, docs/algorithm.md §5.4); the returned `Carry` is the next block's.
        `masked_at_start` (known to `generate` from the prompt length; else read from the canvas) is the
        block's number of masked positions before its first transition.
        """
        state = canvas[block].clone()
        if masked_at_start is None:
            masked_at_start = int((state == self.spec.mask_id).sum())
        post = PostCounter() if self.rule.spec.edit is not None else None
        ctx = TransitionContext(
            self.cfg, self.rule, self.spec, noise, b, masked_at_start=masked_at_start, post=post
        )
        # The block-start forward carries no drafts (anchor = none in every cache mode), unless the previous
        # block ended on a verified draft whose forward also computed this block's distribution.
        if carry is None:
            logits, advanced = strategy.begin_block(canvas, block), 0
            stats.nfe += 1
        else:
            logits, advanced = carry.logits, carry.advanced
        rows = Rows.single(state, Distributions(logits[None], ctx))
        step = 0
        while True:
            if post is not None:  # LLaDA2.1 counts the calls on a block without masks (docs/llada2.md)
                post.note_forward(rows.states[0], self.spec.mask_id)
            end = self._walk(rows, step, ctx, stats)
            step, advanced = step + end.transitions, advanced + end.transitions
            stats.transitions += end.transitions
            canvas[block] = end.state
            if end.complete:
                if self.cfg.eos_early_stop:  # did the rule end the block at EOS (LLaDA2.0)?
                    stats.eos_early_stop = bool(
                        eos_stopped(rows.states[end.anchor], end.state, ctx)
                    )
                carry = self.finish_block(canvas, block, end, rows, strategy, stats, advanced)
                if carry is not None:
                    return carry
                break
            stats.accepted_per_forward[advanced - 1] += 1
            advanced = 0
            # Draft from the anchor (the distribution `end.state` was sampled from), verify in one forward.
            drafts, known = end.drafts, end.drafts_valid
            if drafts is None:
                t = time.perf_counter()
                drafts, known = self.propose(rows.dists.row(end.anchor), end.state, ctx, step), None
                stats.draft_s += time.perf_counter() - t
            states, levels, valid, unread = self._rows_to_send(end.state, drafts, known, stats)
            ahead = self.lookahead(canvas.numel(), block, states.shape[0] - 1)
            out = strategy.verify(canvas, block, states, self.verify, lookahead=ahead)
            stats.nfe += 1
            rows = Rows(
                states, Distributions(out.logits, ctx), levels, valid, unread, out.lookahead
            )
        stats.accepted_per_forward[advanced - 1] += 1
        return None

    def finish_block(
        self, canvas, block, end: WalkEnd, rows: Rows, strategy, stats, advanced: int
    ) -> Carry | None:
        """End the complete block; return the next block's first distribution if already known.

        Block-causal models store the block's K/V (docs/algorithm.md §12): from the last forward's row of the complete state
        when it was verified there (`stored_row`), else with a store forward, which with `fuse_next` also
        computes the next block's first distribution. The base's count is the reference's: one store call per
        block. Other families: the optional cross-block continuation (docs/algorithm.md §5.4).
        """
        has_next = block.stop < canvas.numel()
        if isinstance(strategy, BlockCausalCache):
            stats.base_extra_calls += 1
            row = self.stored_row(end, rows, stats)
            calls, nxt = strategy.store_block(
                canvas, block, row, with_next=self.cfg.fuse_next and has_next
            )
            if calls == 0 and row is not None and rows.lookahead is not None:
                nxt = rows.lookahead[row]  # the verifying forward also carried the next block
            stats.nfe += calls
            if nxt is None:
                return None
            if calls:  # the store forward starts the next block: a new forward's count begins
                stats.accepted_per_forward[advanced - 1] += 1
                advanced = 0
            return Carry(nxt, advanced)
        if has_next and rows.lookahead is not None and end.match >= 1:  # cross-block continuation
            stats.accepted_per_level[rows.levels[end.match]] += 1
            return Carry(rows.lookahead[end.match], advanced)
        return None

    # ---- hooks -------------------------------------------------------------------------------------------

    def stored_row(self, end: WalkEnd, rows: Rows, stats: DecodeStats) -> int | None:
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
        (their validity then comes with that read); None defers drafting to `propose`."""
        return None

    def lookahead(self, canvas_len: int, block: slice, n_drafts: int) -> int:
        """How many next-block positions the verification forward should also project (0: none)."""
        return 0

    # ---- the walk ----------------------------------------------------------------------------------------

    def _rows_to_send(self, state, drafts: Drafts | None, known: list[bool] | None, stats):
        """States (N, Lb), host levels, device validity and not-yet-read validity of the next forward.
        Drafts whose validity the host knows are compacted (unless compiling: a static row count);
        otherwise every row is sent and invalid ones stay inert (never matched)."""
        if drafts is None or drafts.states.shape[0] == 0:
            return state[None], [0], None, None
        levels = list(drafts.row_levels)
        if known is not None:
            self._count_drafts(known, levels, stats)
            if not self.options.compile:
                kept = [r for r, ok in enumerate(known) if ok]
                sent = row_index((0, *(r + 1 for r in kept)), state.device)
                states = torch.cat([state[None], drafts.states]).index_select(0, sent)
                return states, [0] + [levels[r] for r in kept], None, None
        valid = torch.cat([drafts.valid.new_ones(1), drafts.valid])
        unread = None if known is not None else drafts.valid
        return torch.cat([state[None], drafts.states]), [0] + levels, valid, unread

    def _count_drafts(self, valid: list[bool], levels: list[int], stats: DecodeStats) -> None:
        for ok, level in zip(valid, levels):
            if ok:
                stats.drafted_per_level[level] += 1
        stats.drafts_verified += sum(valid)

    def _walk(self, rows: Rows, step: int, ctx: TransitionContext, stats: DecodeStats) -> WalkEnd:
        """Every transition this forward's rows allow, with one host read on the normal path. The time of
        walks over verified drafts is Spiffy's bookkeeping (an upper bound: it includes the real state's
        own transition, which the base decoder pays too); on a GPU these host timings need `profile`."""
        t0 = time.perf_counter()
        draft_s = stats.draft_s
        end = self._walk_rows(rows, step, ctx, stats)
        if rows.states.shape[0] > 1:
            stats.bookkeeping_s += time.perf_counter() - t0 - (stats.draft_s - draft_s)
        return end

    def _walk_rows(
        self, rows: Rows, step: int, ctx: TransitionContext, stats: DecodeStats
    ) -> WalkEnd:
        links: WalkLinks = link_rows(rows, step, ctx, self.step_free)
        early = None
        # a bounded rule's block ends after its last step, known on the host: if row 0's transition is
        # that step, the walk ends there and no forward follows to draft for
        last = self.rule.bounded and self.rule.is_complete(True, step + 1)
        if not last and type(self).propose_early is not BlockDecoder.propose_early:  # drafting
            t = time.perf_counter()
            early = self.propose_early(rows.dists.row(links.end), pick(links.new, links.end), ctx)
            stats.draft_s += time.perf_counter() - t
        extra = [early.valid] if early is not None else []
        if rows.unread is not None:
            extra.append(rows.unread)
        host = links.read(extra)  # the one device read of this forward
        if rows.unread is not None:
            self._count_drafts(host.extra[-1], rows.levels[1:], stats)
        path, reason = replay(host, rows.levels, stats)
        r = path[-1]
        if self.options.record_confidence:
            for p in path:
                committed = links.new[p] != rows.states[p]
                stats.committed_confidence.extend(links.conf[p][committed].tolist())
        new = links.new[r]
        if reason == "complete":
            return WalkEnd(len(path), new, True, r, host.match[r])
        if reason == "anchor":
            valid = host.extra[0] if early is not None else None
            return WalkEnd(len(path), new, False, r, -1, early, valid)
        # a row reached at another step than the batched transition assumed: finish one transition at a time
        s = step + len(path)
        if reason == "same":
            return self._walk_slowly(rows, r, rows.states[r], s, 1, len(path), ctx, stats)
        m = host.match[r]
        stats.accepted_per_level[rows.levels[m]] += 1
        return self._walk_slowly(rows, m, new, s, 0, len(path), ctx, stats)

    def _walk_slowly(self, rows, r, state, step, stalled, taken, ctx, stats) -> WalkEnd:
        """docs/algorithm.md §5.4 verbatim from row `r`'s distribution, `state` and `step`: one read per transition."""
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
            if self.options.record_confidence:
                stats.committed_confidence.extend(conf[new != state].tolist())
            if self.rule.spec.complete is not None:  # LLaDA2: its own end of block (docs/llada2.md)
                done = bool(self.rule.complete_rows(state[None], new[None], ctx)[0])
            else:
                done = self.rule.is_complete(has_mask, step)
            if done:
                return WalkEnd(taken, new, True, r, match)
            stalled = stalled + 1 if same else 0
            if same:
                continue
            if match < 1:
                return WalkEnd(taken, new, False, r)
            stats.accepted_per_level[rows.levels[match]] += 1
            r, state = match, new
