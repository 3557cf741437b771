"""The one semi-autoregressive block loop: transition rule × cache mode (SPEC §2, §3, §4, §5.4).

`BlockDecoder` is LLaDA's sampler (`rule="schedule"`, `cache="none"`), Fast-dLLM's (`threshold`/`factor`,
`prefix`/`dual`), SDAR's `block_diffusion_generate` (the `sdar_*` rules with the exact `block_causal` cache,
SPEC §12: blocks aligned to absolute positions, a prefill, one store per finished block) and every other
combination; presets are configurations, not forks. The loop is written as
Spiffy's acceptance walk (SPEC §5.4) with two hooks, `propose` and `accept`; the base decoder proposes no drafts
and accepts nothing, so each of its transitions costs exactly one forward. `SpiffyDecoder` overrides the hooks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from spiffy.decoding.block_causal import BlockCausalCache
from spiffy.decoding.config import SDAR_RULES, GenerationConfig
from spiffy.decoding.forward import STRATEGIES, ForwardStrategy
from spiffy.decoding.randomness import NoiseKey
from spiffy.decoding.rules import TransitionRule
from spiffy.decoding.sampling import TransitionContext, transition
from spiffy.decoding.types import DecodeResult, DecodeStats
from spiffy.models.loading import ModelSpec, model_spec


@dataclass
class Verified:
    """Draft states verified by the last forward, their logits (K, Lb, V) and graph levels (K,)."""

    states: torch.Tensor
    logits: torch.Tensor
    levels: torch.Tensor

    @classmethod
    def none(cls, like: torch.Tensor) -> Verified:
        return cls(like.new_empty((0, like.numel())), like.new_empty(0), like.new_empty(0))


@dataclass
class Carry:
    """The next block's first-forward distribution (Lb, V), computed by the forward that verified the
    complete state, and how many transitions that forward has advanced so far."""

    logits: torch.Tensor
    advanced: int


class BlockDecoder:
    """Base decoder. `generate(prompt_ids, request_id=, seed=)` returns a `DecodeResult`."""

    verify = "exact"
    record_confidence = False  # keep the confidence of every committed token in the stats

    def __init__(
        self, model: torch.nn.Module, cfg: GenerationConfig, spec: ModelSpec | None = None
    ):
        self.model = model
        self.cfg = cfg
        self.spec = spec or model_spec(model)
        self.rule = TransitionRule.from_config(cfg)
        self._check_family()

    def _check_family(self) -> None:
        """Block-causal models (SDAR) decode with the SDAR rules, in blocks of their attention block size."""
        spec, cfg = self.spec, self.cfg
        if spec.block_causal != self.rule.spec.block_causal:
            kind = "block-causal (SDAR)" if spec.block_causal else "bidirectional"
            need = list(SDAR_RULES) if spec.block_causal else "a rule other than the SDAR rules"
            raise ValueError(f"rule={cfg.rule!r}: the model is {kind}; use {need}")
        if spec.block_causal and cfg.block_length != spec.attention_block_size:
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
            raise ValueError(f"prompt_ids of shape {tuple(prompt.shape)}: expected (P,) or (1, P)")
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

        Bidirectional families: the prompt, then `gen_length` positions in blocks. Block-causal ones (SPEC §12):
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
        return STRATEGIES[self.cfg.cache](self.model)

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
        if self.record_confidence:
            stats.committed_confidence = []
        if isinstance(strategy, BlockCausalCache):  # SDAR's prefill of the whole prompt blocks
            calls = strategy.prefill(canvas, blocks[0].start)
            stats.nfe += calls
            stats.base_extra_calls += calls
        stops = torch.tensor(self.cfg.stop_ids or [], dtype=torch.long, device=canvas.device)
        carry = None
        for b, block in enumerate(blocks):
            carry = self.decode_block(canvas, block, b, strategy, stats, noise, carry)
            if stops.numel() and torch.isin(canvas[p:], stops).any():
                break  # a stop id in the generated region: later blocks keep the mask id
        tokens = canvas[p : p + self.cfg.gen_length].clone()
        timer = strategy.timer
        stats.model_s, stats.mask_s = timer.model_s, timer.mask_s
        stats.query_tokens, stats.draft_query_tokens = timer.query_tokens, timer.draft_query_tokens
        stats.wall_s = time.perf_counter() - t0
        eos = (tokens == self.spec.eos_id).nonzero() if self.spec.eos_id is not None else []
        stats.generated_tokens = int(eos[0]) if len(eos) else tokens.numel()
        return DecodeResult(tokens=tokens, stats=stats, canvas=canvas.clone())

    def decode_block(
        self,
        canvas: torch.Tensor,
        block: slice,
        b: int,
        strategy: ForwardStrategy,
        stats: DecodeStats,
        noise: NoiseKey,
        carry: Carry | None = None,
    ) -> Carry | None:
        """Run one block to completion: the acceptance walk of SPEC §5.4 (updates `canvas` in place).

        `carry` is this block's first-forward distribution when the previous block's last forward already
        computed it (optional cross-block continuation, SPEC §5.4); the returned `Carry` is the next block's.
        """
        state = canvas[block].clone()
        ctx = TransitionContext(
            self.cfg,
            self.rule,
            self.spec,
            noise,
            b,
            masked_at_start=int((state == self.spec.mask_id).sum()),
        )
        # Step 1 - the block-start forward carries no drafts (anchor = none in every cache mode), unless the
        # previous block ended on a verified draft whose forward also computed this block's distribution.
        if carry is None:
            dist, advanced = strategy.begin_block(canvas, block), 0
            stats.nfe += 1
        else:
            dist, advanced = carry.logits, carry.advanced
        verified, step, stalled = Verified.none(state), 0, 0
        while True:
            # Step 2 - the ordinary transition, keyed by (block, step): this IS the output.
            new, conf = transition(dist, state, step, ctx)
            if stats.committed_confidence is not None:
                stats.committed_confidence.extend(conf[new != state].tolist())
            step, advanced = step + 1, advanced + 1
            stats.transitions += 1
            canvas[block] = new
            if self.rule.is_complete(bool((new == self.spec.mask_id).any()), step):
                carry = self.finish_block(canvas, block, new, verified, strategy, stats, advanced)
                if carry is not None:
                    return carry
                break
            stalled = stalled + 1 if torch.equal(new, state) else 0
            if stalled >= self.cfg.block_length and not self.rule.bounded:
                raise RuntimeError(
                    f"block {b}: {stalled} consecutive transitions committed nothing "
                    "(the model keeps predicting the mask id)"
                )
            # Step 3 - continue without a forward if the new state's distribution is already known.
            known = self.accept(new, state, dist, verified, stats)
            if known is not None:
                dist, state = known, new
                continue
            stats.accepted_per_forward[advanced - 1] += 1
            advanced = 0
            # Step 4 - draft from the anchor (the distribution `new` was sampled from), verify in one forward.
            anchor, state = dist, new
            drafts, levels = self.propose(anchor, state, ctx, step, stats)
            logits = strategy.block_logits(
                canvas,
                block,
                torch.cat([state[None], drafts]),
                self.verify,
                lookahead=self.lookahead(canvas, block, drafts),
            )
            stats.nfe += 1
            dist, verified = logits[0], Verified(drafts, logits[1:], levels)
        stats.accepted_per_forward[advanced - 1] += 1
        return None

    def finish_block(
        self, canvas, block, new, verified: Verified, strategy, stats, advanced: int
    ) -> Carry | None:
        """End the complete block `new`; return the next block's first distribution if already known.

        Block-causal models store the block's K/V (SPEC §12): from the last forward's row of `new` when it was
        verified there (`stored_row`), else with a store forward, which with `fuse_next` also computes the next
        block's first distribution. The base's count is the reference's: one store call per block.
        Other families: the optional cross-block continuation (SPEC §5.4).
        """
        has_next = block.stop < canvas.numel()
        if isinstance(strategy, BlockCausalCache):
            stats.base_extra_calls += 1
            row = self.stored_row(new, verified, stats)
            calls, nxt = strategy.store_block(
                canvas, block, row, with_next=self.cfg.fuse_next and has_next
            )
            stats.nfe += calls
            if nxt is None:
                return None
            if calls:  # the store forward starts the next block: a new forward's count begins
                stats.accepted_per_forward[advanced - 1] += 1
                advanced = 0
            return Carry(nxt, advanced)
        if has_next:
            nxt = self.continue_across(new, verified, strategy, stats)
            if nxt is not None:
                return Carry(nxt, advanced)
        return None

    def stored_row(self, new, verified: Verified, stats) -> int | None:
        """Row of the last forward that computed the complete state `new` (0 = the real state); the base
        decoder's last forward never did (its state still had masks)."""
        return None

    def propose(self, anchor, state, ctx, step, stats) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft states (K, Lb) and their graph levels; the base decoder drafts nothing."""
        return state.new_empty((0, state.numel())), state.new_empty(0)

    def accept(self, new, state, dist, verified, stats) -> torch.Tensor | None:
        """The distribution of `new` if this forward already computed it; the base decoder never knows."""
        return None

    def lookahead(self, canvas, block, drafts) -> slice | None:
        """Positions whose logits the verification forward should also keep (the next block), or None."""
        return None

    def continue_across(self, new, verified, strategy, stats) -> torch.Tensor | None:
        """The next block's first-forward distribution if the complete state `new` was verified with it."""
        return None
