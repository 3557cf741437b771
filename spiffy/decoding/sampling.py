"""Pure functions of one transition: logit processing, keyed sampling, confidence, position choice (docs/algorithm.md §2).

`transition` is *the* output rule: the base decoders and Spiffy's acceptance walk call exactly this function
(`transition_rows` is the same rule on a batch of states, each with its own step), with the same keyed noise,
which is why Spiffy's output equals the base decoder's. A forward's logits are processed once (`Distributions`:
one float64 conversion, confidence probabilities on demand) and shared by the transition, drafting and pruning.
Nothing here reads a device value back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spiffy.decoding.config import GenerationConfig
from spiffy.decoding.llada2_rules import PostCounter
from spiffy.decoding.randomness import NoiseKey
from spiffy.decoding.rules import TransitionRule
from spiffy.models.loading import ModelSpec

NEG_INF = float("-inf")


@dataclass(frozen=True)
class TransitionContext:
    """Everything a transition needs besides the distribution and the state."""

    cfg: GenerationConfig
    rule: TransitionRule
    spec: ModelSpec
    noise: NoiseKey
    block: int
    masked_at_start: int
    post: PostCounter | None = None  # LLaDA2.1's post calls of this block (rules that count them)


def sampling_logits(logits: torch.Tensor, ctx: TransitionContext) -> torch.Tensor:
    """Float64 logits the token is sampled from (after `logits_eos_inf`; docs/algorithm.md §2 step 6)."""
    out = logits.to(torch.float64)
    if ctx.cfg.logits_eos_inf and ctx.spec.eos_id is not None:
        out = out.clone()
        out[..., ctx.spec.eos_id] = NEG_INF
    return out


def _confidence_probs(sampling: torch.Tensor, dtype: torch.dtype, ctx: TransitionContext):
    cfg, spec = ctx.cfg, ctx.spec
    out = sampling
    if cfg.confidence_eos_eot_inf:
        out = out.clone()
        if spec.eot_id is not None:
            out[..., spec.eot_id] = NEG_INF
        if cfg.temperature == 0 and spec.eos_id is not None:
            out[..., spec.eos_id] = NEG_INF
    if cfg.softmax_dtype == "model":  # LLaDA's current `generate`: softmax in the logits' dtype
        return torch.softmax(out.to(dtype), dim=-1).to(torch.float64)
    return torch.softmax(out, dim=-1)


def top_k_filter(scaled: torch.Tensor, k: int) -> torch.Tensor:
    """-inf below the k-th largest value of each row (ties at the cut are kept), as Dream and SDAR do."""
    kth = scaled.topk(min(k, scaled.shape[-1]), dim=-1).values[..., -1:]
    return scaled.masked_fill(scaled < kth, NEG_INF)


def top_p_filter(scaled: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest prefix of the sorted tokens whose probability reaches `p` (the
    token that crosses `p` is kept, the first always), as Dream's and SDAR's `top_p_logits`."""
    values, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    cumulative = torch.softmax(values, dim=-1).cumsum(dim=-1)
    remove = torch.zeros_like(cumulative, dtype=torch.bool)
    remove[..., 1:] = cumulative[..., :-1] > p
    return scaled.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), NEG_INF)


def _filtered(sampling: torch.Tensor, ctx: TransitionContext) -> torch.Tensor:
    """The float64 sampling logits with the tokens `top_k`/`top_p` remove set to -inf (temperature > 0).
    Both filters act on `logits / T`, in the reference's order: SDAR filters top-k then top-p, Dream top-p
    then top-k (the two differ: top-p after top-k renormalises over the k kept tokens)."""
    cfg = ctx.cfg
    if cfg.top_k is None and cfg.top_p is None:
        return sampling
    scaled = sampling / cfg.temperature
    filters = [("k", cfg.top_k), ("p", cfg.top_p)]
    if not ctx.rule.spec.block_causal:  # SDAR's sampler filters top-k first, Dream's top-p first
        filters.reverse()
    for kind, value in filters:
        if value is not None:
            scaled = top_k_filter(scaled, value) if kind == "k" else top_p_filter(scaled, value)
    return sampling.masked_fill(scaled == NEG_INF, NEG_INF)


class Distributions:
    """Distributions (..., Lb, V) processed once: float64 sampling logits, confidence probabilities and the
    un-noised prediction with its confidence, each computed on first use and shared by the transition,
    drafting and pruning. `row(i)` views one state's (i an int or a device index, read without a sync): it
    picks what the batch has already computed, and computes the rest for that row only."""

    def __init__(self, logits: torch.Tensor, ctx: TransitionContext, sampling=None, probs=None):
        self._logits = logits
        self.ctx = ctx
        self._sampling = sampling
        self._probs = probs
        self._filtered = None
        self._greedy = None
        self._source: tuple[Distributions, int | torch.Tensor] | None = None

    def _picked(self, name: str) -> torch.Tensor | None:
        """Row `i` of the batch's attribute `name`, if the batch this row views has computed it."""
        if self._source is None:
            return None
        batch, i = self._source
        value = getattr(batch, name)
        return None if value is None else pick(value, i)

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            batch, i = self._source
            self._logits = pick(batch.logits, i)
        return self._logits

    @property
    def sampling(self) -> torch.Tensor:
        """Float64 sampling logits (..., Lb, V) (docs/algorithm.md §2 steps 3, 6)."""
        if self._sampling is None:
            self._sampling = self._picked("_sampling")
            if self._sampling is None:
                self._sampling = sampling_logits(self.logits, self.ctx)
        return self._sampling

    @property
    def filtered(self) -> torch.Tensor:
        """The sampling logits after `top_k` / `top_p` (temperature > 0; the same tensor without them)."""
        if self._filtered is None:
            self._filtered = _filtered(self.sampling, self.ctx)
        return self._filtered

    @property
    def probs(self) -> torch.Tensor:
        """Confidence probabilities (..., Lb, V) float64 (docs/algorithm.md §2 steps 4, 6)."""
        if self._probs is None:
            self._probs = self._picked("_probs")
            if self._probs is None:
                self._probs = _confidence_probs(self.sampling, self.logits.dtype, self.ctx)
        return self._probs

    def greedy(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The un-noised prediction (..., Lb) (the sampling logits' argmax: the T=0 token) and the rule's
        confidence of it (float64), or None for a confidence that reads the step (`random` remasking)."""
        if self._greedy is None:
            if self._source is not None and self._source[0]._greedy is not None:
                batch, i = self._source
                x0, conf = batch._greedy
                self._greedy = (pick(x0, i), None if conf is None else pick(conf, i))
            else:
                x0 = self.sampling.argmax(dim=-1)
                reads_step = _confidence_reads_step(self.ctx)
                conf = None if reads_step else confidence(self, x0, 0, self.ctx)
                self._greedy = (x0, conf)
        return self._greedy

    def row(self, i: int | torch.Tensor) -> Distributions:
        out = Distributions(None, self.ctx)
        out._source = (self, i)
        return out

    def batched(self) -> Distributions:
        """This single state's distribution (Lb, V) as a batch of one (1, Lb, V)."""
        out = Distributions(self.logits[None], self.ctx, self.sampling[None])
        if self._probs is not None:
            out._probs = self._probs[None]
        if self._greedy is not None:
            x0, conf = self._greedy
            out._greedy = (x0[None], None if conf is None else conf[None])
        return out


def pick(t: torch.Tensor, i: int | torch.Tensor) -> torch.Tensor:
    """`t[i]` for a host int or a 0-dim device index, without reading the index back to the host."""
    return t[i] if isinstance(i, int) else t.index_select(0, i.reshape(1))[0]


def _confidence_reads_step(ctx: TransitionContext) -> bool:
    """Whether `confidence` depends on the step index (the keyed draws of `random` remasking)."""
    spec = ctx.rule.spec
    if spec.ranks_by_position or (spec.block_causal and ctx.cfg.temperature > 0):
        return False
    return ctx.cfg.remasking == "random"


def as_distributions(logits: torch.Tensor | Distributions, ctx: TransitionContext) -> Distributions:
    return logits if isinstance(logits, Distributions) else Distributions(logits, ctx)


def _per_row(steps: int | list[int], n: int) -> list[int]:
    return [steps] * n if isinstance(steps, int) else list(steps)


def _keyed(ctx: TransitionContext, purpose: str, steps: list[int], shape, device) -> torch.Tensor:
    """Keyed uniforms (N, *shape), row r drawn under step `steps[r]` (each step drawn once)."""
    draws = {
        s: ctx.noise.uniforms(ctx.block, s, purpose, shape, device) for s in dict.fromkeys(steps)
    }
    if len(steps) == 1:
        return draws[steps[0]][None]
    return torch.stack([draws[s] for s in steps])


def noised_scores(
    logits: torch.Tensor | Distributions, ctx: TransitionContext, step: int | list[int]
) -> torch.Tensor:
    """Scores whose argmax is transition `step`'s token: the logits at T=0, keyed float64 Gumbel-max
    scores `exp(logits) / (-log u)^T` at T>0 (docs/algorithm.md §2 step 3), after `top_k`/`top_p`. With (N, Lb, V)
    distributions, `step` may give each row its own step."""
    d = as_distributions(logits, ctx)
    scores = d.sampling
    if ctx.cfg.temperature > 0:
        scores = d.filtered
        batched = scores.dim() == 3
        rows = _per_row(step, scores.shape[0] if batched else 1)
        u = _keyed(ctx, "gumbel", rows, tuple(scores.shape[-2:]), scores.device)
        scores = scores.exp() / (-torch.log(u if batched else u[0])) ** ctx.cfg.temperature
    return scores


def predict_tokens(
    logits: torch.Tensor | Distributions, ctx: TransitionContext, step: int | list[int]
) -> torch.Tensor:
    """Predicted token per position (..., Lb) of transition `step`."""
    return noised_scores(logits, ctx, step).argmax(dim=-1)


def rank_positions(conf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidences sorted descending and their positions, ties to the lowest index (stable sort,
    never `topk`: it orders equal values arbitrarily)."""
    return torch.sort(conf, dim=-1, descending=True, stable=True)


def top_positions(conf: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest values, ties to the lowest index."""
    return rank_positions(conf)[1][:count]


def confidence(
    logits: torch.Tensor | Distributions,
    x0: torch.Tensor,
    step: int | list[int],
    ctx: TransitionContext,
) -> torch.Tensor:
    """Per-position confidence (..., Lb) float64 of the remasking strategy (docs/algorithm.md §2 step 4; Dream's
    `topk_margin` = top-1 minus top-2 probability, `entropy` = sum p log(p + 1e-10)).

    Block-causal rules (SDAR, docs/algorithm.md §12): the probability of the token under SDAR's sampler, i.e. after
    temperature, `top_k` and `top_p` at T>0 (the float64 softmax of the logits at T=0); a rule that
    `ranks_by_position` (`sdar_sequential`) takes positions left to right: its "confidence" is -position."""
    cfg, rule = ctx.cfg, ctx.rule.spec
    if rule.ranks_by_position:
        lb = x0.shape[-1]
        return -torch.arange(lb, dtype=torch.float64, device=x0.device).expand(x0.shape)
    if rule.block_causal and cfg.temperature > 0:
        d = as_distributions(logits, ctx)
        probs = torch.softmax(d.filtered / cfg.temperature, dim=-1)
        return probs.gather(-1, x0[..., None]).squeeze(-1)
    kind = cfg.remasking
    if kind == "random":
        rows = _per_row(step, x0.shape[0] if x0.dim() == 2 else 1)
        u = _keyed(ctx, "remask", rows, (x0.shape[-1],), x0.device)
        return u if x0.dim() == 2 else u[0]
    probs = as_distributions(logits, ctx).probs
    if kind == "low_confidence":  # Dream's `maskgit_plus`
        return probs.gather(-1, x0[..., None]).squeeze(-1)
    if kind == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    return (probs * torch.log(probs + 1e-10)).sum(-1)


def transition_rows(
    logits: torch.Tensor | Distributions,
    states: torch.Tensor,
    steps: list[int],
    ctx: TransitionContext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One transition of each of N states (N, Lb), row r with distribution `logits[r]` (N, Lb, V) at step
    `steps[r]` (docs/algorithm.md §2 steps 3-5, §3); returns the next states and the confidences the rule ranked
    (float64, -inf at positions that were not masked). No device read."""
    d = as_distributions(logits, ctx)
    masked = states == ctx.spec.mask_id  # (N, Lb)
    x0, conf = d.greedy() if ctx.cfg.temperature == 0 else (None, None)
    if x0 is None:
        x0 = predict_tokens(d, ctx, steps)
    if conf is None:
        conf = confidence(d, x0, steps, ctx)
    raw, conf = conf, torch.where(masked, conf, NEG_INF)
    if (
        ctx.rule.spec.select is not None
    ):  # the rule chooses positions itself (SDAR, docs/algorithm.md §12): host, per row
        new, last = states.clone(), ctx.rule.steps_per_block
        for r, (step, left) in enumerate(zip(steps, masked.sum(1).tolist())):
            if r and (left == 0 or (last is not None and step >= last)):
                continue  # a complete draft, or one past the rule's last step: no walk transitions from it
            chosen = ctx.rule.spec.select(ctx.rule, conf[r], masked[r], step)
            new[r, chosen] = x0[r, chosen]
            if ctx.rule.spec.edit is not None:  # LLaDA2.1: rewrite unmasked positions too
                edited = ctx.rule.spec.edit(ctx.rule, raw[r], x0[r], states[r], masked[r], ctx)
                new[r, edited] = x0[r, edited]
        return new, conf
    # masked confidences are finite and the others -inf, so the masked ones sort first
    values, order = rank_positions(conf)
    count = ctx.rule.counts(values, masked.sum(1), steps, ctx.masked_at_start)
    ranks = _ranks(states.shape[1], states.device)
    # `order` is a permutation of the positions: the scatter writes every entry
    commit = torch.empty_like(masked).scatter_(1, order, ranks < count[:, None])
    return torch.where(commit, x0, states), conf


_RANKS: dict = {}


def _ranks(n: int, device: torch.device) -> torch.Tensor:
    key = (n, device)
    if key not in _RANKS:
        _RANKS[key] = torch.arange(n, device=device)
    return _RANKS[key]


def transition(
    logits: torch.Tensor | Distributions, state: torch.Tensor, step: int, ctx: TransitionContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """One denoising transition of the block state (docs/algorithm.md §2 steps 3-5, §3).

    Args:
        logits: the distribution of `state`, (Lb, V) in any dtype.
        state: block tokens (Lb,), masked positions hold `spec.mask_id`.
        step: the block's transition index (keys the noise and the schedule).
    Returns:
        The next block state (Lb,) (the input is not modified) and the confidences (Lb,) the rule
        ranked (float64, -inf at positions that were not masked).
    """
    new, conf = transition_rows(as_distributions(logits, ctx).batched(), state[None], [step], ctx)
    return new[0], conf[0]
