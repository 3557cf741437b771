"""Pure functions of one transition: logit processing, keyed sampling, confidence, position choice (SPEC §2).

`transition` is *the* output rule: the base decoders and Spiffy's acceptance walk call exactly this function,
with the same keyed noise, which is why Spiffy's output equals the base decoder's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spiffy.decoding.config import GenerationConfig
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


def sampling_logits(logits: torch.Tensor, ctx: TransitionContext) -> torch.Tensor:
    """Float64 logits the token is sampled from (after `logits_eos_inf`; SPEC §2 step 6)."""
    out = logits.to(torch.float64)
    if ctx.cfg.logits_eos_inf and ctx.spec.eos_id is not None:
        out = out.clone()
        out[..., ctx.spec.eos_id] = NEG_INF
    return out


def confidence_probs(logits: torch.Tensor, ctx: TransitionContext) -> torch.Tensor:
    """Probabilities used for confidence, with the optional EoT/EOS removal (SPEC §2 steps 4, 6)."""
    cfg, spec = ctx.cfg, ctx.spec
    out = sampling_logits(logits, ctx)
    if cfg.confidence_eos_eot_inf:
        out = out.clone()
        if spec.eot_id is not None:
            out[..., spec.eot_id] = NEG_INF
        if cfg.temperature == 0 and spec.eos_id is not None:
            out[..., spec.eos_id] = NEG_INF
    if cfg.softmax_dtype == "model":  # LLaDA's current `generate`: softmax in the logits' dtype
        return torch.softmax(out.to(logits.dtype), dim=-1).to(torch.float64)
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


def filtered_logits(logits: torch.Tensor, ctx: TransitionContext) -> torch.Tensor:
    """The float64 sampling logits with the tokens `top_k`/`top_p` remove set to -inf (temperature > 0).

    Both filters act on `logits / T`, in the reference's order: SDAR filters top-k then top-p, Dream top-p
    then top-k (the two differ: top-p after top-k renormalises over the k kept tokens).
    """
    out = sampling_logits(logits, ctx)
    cfg = ctx.cfg
    if cfg.top_k is None and cfg.top_p is None:
        return out
    scaled = out / cfg.temperature
    filters = [("k", cfg.top_k), ("p", cfg.top_p)]
    if not ctx.rule.spec.block_causal:  # SDAR's sampler filters top-k first, Dream's top-p first
        filters.reverse()
    for kind, value in filters:
        if value is not None:
            scaled = top_k_filter(scaled, value) if kind == "k" else top_p_filter(scaled, value)
    return out.masked_fill(scaled == NEG_INF, NEG_INF)


def noised_scores(logits: torch.Tensor, ctx: TransitionContext, step: int) -> torch.Tensor:
    """Scores whose argmax is transition `step`'s token: the logits at T=0, keyed float64 Gumbel-max
    scores `exp(logits) / (-log u)^T` at T>0 (SPEC §2 step 3), after `top_k`/`top_p`."""
    if ctx.cfg.temperature > 0:
        scores = filtered_logits(logits, ctx)  # (Lb, V)
        u = ctx.noise.uniforms(ctx.block, step, "gumbel", tuple(scores.shape), scores.device)
        return scores.exp() / (-torch.log(u)) ** ctx.cfg.temperature
    return sampling_logits(logits, ctx)


def predict_tokens(logits: torch.Tensor, ctx: TransitionContext, step: int) -> torch.Tensor:
    """Predicted token per position (Lb,) of transition `step`."""
    return noised_scores(logits, ctx, step).argmax(dim=-1)


def rank_positions(conf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidences sorted descending and their positions, ties to the lowest index (stable sort,
    never `topk`: it orders equal values arbitrarily)."""
    return torch.sort(conf, descending=True, stable=True)


def top_positions(conf: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest values, ties to the lowest index."""
    return rank_positions(conf)[1][:count]


def confidence(
    logits: torch.Tensor, x0: torch.Tensor, step: int, ctx: TransitionContext
) -> torch.Tensor:
    """Per-position confidence (Lb,) float64 of the remasking strategy (SPEC §2 step 4; Dream's
    `topk_margin` = top-1 minus top-2 probability, `entropy` = sum p log(p + 1e-10)).

    Block-causal rules (SDAR, SPEC §12): the probability of the token under SDAR's sampler, i.e. after
    temperature, `top_k` and `top_p` at T>0 (the float64 softmax of the logits at T=0); a rule that
    `ranks_by_position` (`sdar_sequential`) takes positions left to right: its "confidence" is -position."""
    cfg, rule = ctx.cfg, ctx.rule.spec
    if rule.ranks_by_position:
        return -torch.arange(x0.numel(), dtype=torch.float64, device=x0.device)
    if rule.block_causal and cfg.temperature > 0:
        probs = torch.softmax(filtered_logits(logits, ctx) / cfg.temperature, dim=-1)
        return probs.gather(-1, x0[:, None]).squeeze(-1)
    kind = cfg.remasking
    if kind == "random":
        return ctx.noise.uniforms(ctx.block, step, "remask", (x0.numel(),), x0.device)
    probs = confidence_probs(logits, ctx)
    if kind == "low_confidence":  # Dream's `maskgit_plus`
        return probs.gather(-1, x0[:, None]).squeeze(-1)
    if kind == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    return (probs * torch.log(probs + 1e-10)).sum(-1)


def transition(
    logits: torch.Tensor, state: torch.Tensor, step: int, ctx: TransitionContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """One denoising transition of the block state (SPEC §2 steps 3-5, §3).

    Args:
        logits: the distribution of `state`, (Lb, V) in any dtype.
        state: block tokens (Lb,), masked positions hold `spec.mask_id`.
        step: the block's transition index (keys the noise and the schedule).
    Returns:
        The next block state (Lb,) (the input is not modified) and the confidences (Lb,) the rule
        ranked (float64, -inf at positions that were not masked).
    """
    masked = state == ctx.spec.mask_id  # (Lb,)
    x0 = predict_tokens(logits, ctx, step)  # (Lb,)
    conf = confidence(logits, x0, step, ctx)
    conf = torch.where(masked, conf, torch.full_like(conf, NEG_INF))
    if ctx.rule.spec.select is not None:  # the rule chooses positions itself (SDAR, SPEC §12)
        chosen = ctx.rule.spec.select(ctx.rule, conf, masked, step)
        new_state = state.clone()
        new_state[chosen] = x0[chosen]
        return new_state, conf
    # masked confidences are finite and the others -inf, so the masked ones sort first
    values, order = rank_positions(conf)
    count = ctx.rule.count(values[: int(masked.sum())], step, ctx.masked_at_start)
    chosen = order[:count]
    new_state = state.clone()
    new_state[chosen] = x0[chosen]
    return new_state, conf
