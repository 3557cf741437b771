"""Transition rules: how many of a block's masked positions one transition commits (docs/algorithm.md §3).

Rules form a registry: each entry declares the `GenerationConfig` parameters it needs (`steps`, `k`, `tau`,
`factor`, ...) and whether a block ends after a fixed number of steps. Validation and error messages are derived
from these declarations, so a new rule is one `@register_rule` function here (plus a `GenerationConfig` field if
it brings a new parameter). Each rule sees the masked positions' confidences sorted in descending order and
returns a count; the caller commits that many top positions.

The decode step counts for a batch of states on the device, without reading it back: a rule may register that
batched form (`@register_batched`, held equal to `count` by a test); without one, `TransitionRule.counts` falls
back to `count` row by row (correct, with one host read per row). `reads_step=False` declares that a rule's count
ignores the step index, which lets the acceptance walk continue on any verified row at temperature 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from spiffy.decoding import llada2_rules
from spiffy.decoding.sdar_rules import select_positions


@dataclass(frozen=True)
class RuleSpec:
    """A registered rule: its count function, the settings it needs, and its capabilities.

    `params` are `GenerationConfig` fields the rule requires (given, not None); `bounded` rules end a block after
    `steps_per_block` transitions, the others when no mask is left. A rule with a `select` function chooses the
    positions itself, `select(rule, conf, masked, step) -> positions`, instead of a count of top positions.
    `block_causal` rules decode block-causal models (SDAR, docs/algorithm.md §12): they imply the `block_causal` cache and use
    SDAR's sampler (top-k before top-p; confidence under the tempered, filtered distribution).
    `ranks_by_position`: positions are taken left to right, so drafts rank them that way too.
    `complete(rule, states, new, ctx) -> (N,) bool`: when a block ends, for rules that end it otherwise than
    "no mask left" (LLaDA2, docs/llada2.md); `edit(rule, p, x0, state, masked, ctx) -> (Lb,) bool`: unmasked
    positions the transition also rewrites with `x0` (LLaDA2.1's token editing).
    """

    name: str
    count: Callable[[TransitionRule, torch.Tensor, int, int], int] | None
    params: tuple[str, ...] = ()
    bounded: bool = False
    summary: str = ""
    select: Callable[[TransitionRule, torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
    block_causal: bool = False
    ranks_by_position: bool = False
    reads_step: bool = True
    complete: Callable | None = None
    edit: Callable | None = None


RULES: dict[str, RuleSpec] = {}
BATCHED: dict[str, Callable] = {}


def register_rule(
    name: str,
    *,
    params: tuple[str, ...] = (),
    bounded: bool = False,
    summary: str = "",
    selects: bool = False,
    block_causal: bool = False,
    ranks_by_position: bool = False,
    reads_step: bool = True,
    complete: Callable | None = None,
    edit: Callable | None = None,
) -> Callable:
    """Decorator: register `count(rule, sorted_conf, step, masked_at_start) -> int` under `name`, or with
    `selects=True` a position chooser `select(rule, conf, masked, step) -> positions`."""

    def add(fn: Callable) -> Callable:
        if name in RULES:
            raise ValueError(f"rule {name!r} is already registered")
        count, select = (None, fn) if selects else (fn, None)
        RULES[name] = RuleSpec(
            name,
            count,
            tuple(params),
            bounded,
            summary,
            select,
            block_causal,
            ranks_by_position,
            reads_step,
            complete,
            edit,
        )
        return fn

    return add


def register_batched(name: str) -> Callable:
    """Decorator: register `counts(rule, sorted_conf (N, Lb), n_masked (N,), steps, masked_at_start) -> (N,)`,
    the device form of rule `name`'s count (see `TransitionRule.counts`)."""

    def add(counts: Callable) -> Callable:
        BATCHED[name] = counts
        return counts

    return add


def get_rule(name: str) -> RuleSpec:
    """The registered rule `name`; unknown names raise with the list of known ones."""
    if name not in RULES:
        raise ValueError(f"rule={name!r} is not a known transition rule; known: {sorted(RULES)}")
    return RULES[name]


def rules_needing(param: str) -> tuple[str, ...]:
    """Names of the rules that declare `param`."""
    return tuple(name for name, spec in RULES.items() if param in spec.params)


def schedule_counts(masked_at_start: int, steps: int) -> list[int]:
    """LLaDA's per-block schedule: steps `0..rem-1` commit `base+1`, the rest `base` (docs/algorithm.md §2)."""
    base, rem = divmod(masked_at_start, steps)
    return [base + 1 if i < rem else base for i in range(steps)]


def factor_count(sorted_conf: torch.Tensor, f: float) -> int:
    """Fast-dLLM's `factor` rule, including the reference's last-rank quirk."""
    n = sorted_conf.numel()
    conf = sorted_conf.tolist()  # python floats are float64
    for r in range(2, n + 1):
        if conf[r - 1] < 1 - f / (r + 1):
            return n if r == n else r - 1
    return n


def dream_steps_count(n_masked: int, step: int, steps: int, eps: float = 1e-3) -> int:
    """Dream's `diffusion_generate` schedule: `int(n · (1 - t_{k+1}/t_k))` with float32
    `t = linspace(1, eps, steps + 1)`; the last step commits everything left."""
    if step >= steps - 1:
        return n_masked
    t = torch.linspace(1, eps, steps + 1, dtype=torch.float32)
    return int(torch.tensor(float(n_masked), dtype=torch.float32) * (1 - t[step + 1] / t[step]))


def dream_quota(n_masked: int, step: int, masked_at_start: int, steps: int) -> int:
    """Fast-dLLM's Dream `confidence_threshold` quota: `q = start / steps` per step plus every token
    refused so far; after the last step only the carried-over tokens (all that remain)."""
    if masked_at_start % steps:
        raise ValueError(
            f"rule='dream_threshold' needs masked tokens per block ({masked_at_start}) "
            f"divisible by steps per block ({steps})"
        )
    if step >= steps:
        return n_masked
    return (step + 1) * (masked_at_start // steps) - (masked_at_start - n_masked)


@register_rule(
    "schedule", params=("steps",), bounded=True, summary="LLaDA: top-k, k from the schedule"
)
def _schedule(rule, sorted_conf, step, masked_at_start):
    return min(sorted_conf.numel(), schedule_counts(masked_at_start, rule.steps_per_block)[step])


@register_rule(
    "fixed_k", params=("k",), summary="top-k per step (the last may commit fewer)", reads_step=False
)
def _fixed_k(rule, sorted_conf, step, masked_at_start):
    return min(rule.k, sorted_conf.numel())


@register_rule(
    "threshold",
    params=("tau",),
    summary="Fast-dLLM: the most confident + every conf >= tau",
    reads_step=False,
)
def _threshold(rule, sorted_conf, step, masked_at_start):
    return max(1, int((sorted_conf >= rule.tau).sum()))


@register_rule("factor", params=("factor",), summary="Fast-dLLM's factor rule", reads_step=False)
def _factor(rule, sorted_conf, step, masked_at_start):
    return factor_count(sorted_conf, rule.factor)


@register_rule("dream_steps", params=("steps",), bounded=True, summary="Dream's diffusion_generate")
def _dream_steps(rule, sorted_conf, step, masked_at_start):
    return dream_steps_count(sorted_conf.numel(), step, rule.steps_per_block)


@register_rule(
    "dream_threshold", params=("steps", "tau"), summary="Fast-dLLM's Dream confidence_threshold"
)
def _dream_threshold(rule, sorted_conf, step, masked_at_start):
    quota = dream_quota(sorted_conf.numel(), step, masked_at_start, rule.steps_per_block)
    return min(quota, 1 + int((sorted_conf[1:quota] >= rule.tau).sum())) if quota else 0


_HOST: dict = {}


def _host(values: list, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A tensor of host values on `like`'s device, built once per distinct value list (a walk asks for the
    same few step patterns again and again); callers never modify it."""
    key = (tuple(values), tuple(map(type, values)), like.device, dtype)  # True == 1 as a key
    if key not in _HOST:
        if len(_HOST) > 1024:
            _HOST.clear()
        _HOST[key] = torch.tensor(values, device=like.device, dtype=dtype)
    return _HOST[key]


@register_batched("schedule")
def _schedule_batched(rule, sorted_conf, n, steps, masked_at_start):
    table = schedule_counts(masked_at_start, rule.steps_per_block)
    return torch.minimum(n, _host([table[min(s, len(table) - 1)] for s in steps], n))


@register_batched("fixed_k")
def _fixed_k_batched(rule, sorted_conf, n, steps, masked_at_start):
    return n.clamp_max(rule.k)


@register_batched("threshold")
def _threshold_batched(rule, sorted_conf, n, steps, masked_at_start):
    # the most confident always (none if nothing is masked); -inf (unmasked) never passes
    return (sorted_conf >= rule.tau).sum(1).clamp_min(1).minimum(n)


@register_batched("factor")
def _factor_batched(rule, sorted_conf, n, steps, masked_at_start):
    rank = torch.arange(sorted_conf.shape[1], device=n.device)  # 0-based: r = rank + 1
    bound = _host(
        [1 - rule.factor / (r + 2) for r in range(sorted_conf.shape[1])], n, torch.float64
    )
    fail = (rank >= 1) & (rank < n[:, None]) & (sorted_conf < bound)
    r0 = fail.to(torch.int8).argmax(1) + 1
    return torch.where(fail.any(1), torch.where(r0 == n, n, r0 - 1), n)


@register_batched("dream_steps")
def _dream_steps_batched(rule, sorted_conf, n, steps, masked_at_start, eps: float = 1e-3):
    t = torch.linspace(1, eps, rule.steps_per_block + 1, dtype=torch.float32)
    last = rule.steps_per_block - 1
    fac = torch.stack([(1 - t[s + 1] / t[s]) if s < last else t.new_ones(()) for s in steps])
    scaled = (n.to(torch.float32) * fac.to(n.device)).to(torch.int64)  # float32, as the reference
    return torch.where(_host([s >= last for s in steps], n), n, scaled)


@register_batched("dream_threshold")
def _dream_threshold_batched(rule, sorted_conf, n, steps, masked_at_start):
    dream_quota(0, 0, masked_at_start, rule.steps_per_block)  # raises if not divisible
    per, last = masked_at_start // rule.steps_per_block, rule.steps_per_block
    quota = _host([(s + 1) * per for s in steps], n) - (masked_at_start - n)
    quota = torch.where(_host([s >= last for s in steps], n), n, quota)
    rank = torch.arange(sorted_conf.shape[1], device=n.device)
    counted = (rank >= 1) & (rank < quota[:, None]) & (rank < n[:, None])
    take = 1 + (counted & (sorted_conf >= rule.tau)).sum(1)
    return torch.where(quota != 0, torch.minimum(quota, take), quota)


# SDAR's remasking strategies (docs/algorithm.md §12), one chooser each (`sdar_rules.select_positions`):
# name -> (parameters, ranks by position, summary)
SDAR_STRATEGIES = {
    "sdar_static": (("steps_per_block",), False, "SDAR: the top n[s] positions by confidence"),
    "sdar_dynamic": (
        ("steps_per_block", "tau"),
        False,
        "SDAR: every masked confidence > tau if at least n[s], else the top n[s]",
    ),
    "sdar_sequential": (
        ("steps_per_block",),
        True,
        "SDAR: n[s] positions from the first masked one",
    ),
}


def _sdar_chooser(name: str) -> Callable:
    def select(rule, conf, masked, step):
        tau = rule.tau if "tau" in SDAR_STRATEGIES[name][0] else None
        return select_positions(name, conf, masked, step, rule.steps_per_block, tau)

    return select


for _name, (_params, _by_position, _summary) in SDAR_STRATEGIES.items():
    register_rule(
        _name,
        params=_params,
        selects=True,
        block_causal=True,
        ranks_by_position=_by_position,
        summary=_summary,
    )(_sdar_chooser(_name))


def _llada2_threshold_complete(rule, states, new, ctx):
    done = (new != ctx.spec.mask_id).all(1)
    if not ctx.cfg.eos_early_stop or ctx.spec.eos_id is None:
        return done
    prompt = new.shape[1] - ctx.masked_at_start
    return done | llada2_rules.eos_stop_rows(states, new, ctx.spec.eos_id, ctx.spec.mask_id, prompt)


@register_rule(
    "llada2_threshold",
    params=("steps_per_block", "tau"),
    selects=True,
    block_causal=True,
    summary="LLaDA2.0: every masked p > tau if at least n[s], else the top n[s]",
    complete=_llada2_threshold_complete,
)
def _llada2_threshold(rule, conf, masked, step):
    quota = llada2_rules.threshold_quota(
        conf.numel(), rule.steps_per_block, step, int(masked.sum())
    )
    return llada2_rules.unmask_positions(conf, masked, quota, rule.tau)


def _llada2_edits(rule, p, x0, state, masked, ctx):
    prompt = state.numel() - ctx.masked_at_start
    return llada2_rules.edited_positions(p, x0, state, masked, prompt, rule.editing_threshold)


def _llada2_edit_complete(rule, states, new, ctx):
    return llada2_rules.edit_complete_rows(
        states, new, ctx.spec.mask_id, ctx.post.calls, rule.max_post_steps
    )


@register_rule(
    "llada2_edit",
    params=("tau", "editing_threshold", "max_post_steps", "num_to_transfer"),
    selects=True,
    block_causal=True,
    reads_step=False,
    summary="LLaDA2.1: threshold unmasking of num_to_transfer, plus token editing and post calls",
    complete=_llada2_edit_complete,
    edit=_llada2_edits,
)
def _llada2_edit(rule, conf, masked, step):
    return llada2_rules.unmask_positions(conf, masked, rule.num_to_transfer, rule.tau)


class TransitionRule:
    """A rule with its parameter values (`rule.k`, `rule.tau`, ...: whatever the registry entry declares);
    `count` and `is_complete` dispatch to the registry entry. Unknown names raise, never fall through."""

    def __init__(self, name: str, steps_per_block: int | None = None, **params):
        self.spec = get_rule(name)
        self.name, self.steps_per_block, self.params = name, steps_per_block, params

    def __getattr__(self, key: str):
        params = self.__dict__.get("params", {})
        if key in params:
            return params[key]
        raise AttributeError(f"rule {self.__dict__.get('name')!r} has no parameter {key!r}")

    def __repr__(self) -> str:
        return f"TransitionRule({self.name!r}, steps_per_block={self.steps_per_block}, **{self.params})"

    @classmethod
    def from_config(cls, cfg) -> TransitionRule:
        """The rule of a `GenerationConfig` (or any object with its declared parameters as attributes)."""
        spec = get_rule(cfg.rule)
        params = {p: getattr(cfg, p) for p in spec.params if p not in ("steps", "steps_per_block")}
        if "steps" in spec.params:  # a total over the blocks (docs/algorithm.md §2)
            steps_per_block = cfg.schedule_steps_per_block
        else:  # SDAR's denoising steps, given per block (docs/algorithm.md §12)
            steps_per_block = cfg.steps_per_block if "steps_per_block" in spec.params else None
        return cls(cfg.rule, steps_per_block, **params)

    def count(self, sorted_conf: torch.Tensor, step: int, masked_at_start: int) -> int:
        """How many of the top positions transition `step` commits (`sorted_conf` descending, float64)."""
        if sorted_conf.numel() == 0:
            return 0
        return self.spec.count(self, sorted_conf, step, masked_at_start)

    def counts(
        self,
        sorted_conf: torch.Tensor,
        n_masked: torch.Tensor,
        steps: list[int],
        masked_at_start: int,
    ) -> torch.Tensor:
        """`count` for N states at once: `sorted_conf` (N, Lb) float64 descending with -inf after the
        `n_masked` (N,) masked ones, `steps` the host step of each row; returns (N,) int64. On the device with
        no host read when the rule registered its batched form; steps beyond a bounded rule's last step count
        everything left (a walk never reaches such rows)."""
        batched = BATCHED.get(self.name)
        if (
            batched is not None
        ):  # each batched form counts 0 (or less: nothing) when nothing is masked
            return batched(self, sorted_conf, n_masked, steps, masked_at_start)
        last = (self.steps_per_block or 1) - 1
        counts = [
            self.count(row[:n], min(s, last) if self.spec.bounded else s, masked_at_start)
            for row, n, s in zip(sorted_conf, n_masked.tolist(), steps)
        ]
        return torch.tensor(counts, device=n_masked.device, dtype=torch.int64)

    def complete_rows(self, states: torch.Tensor, new: torch.Tensor, ctx) -> torch.Tensor:
        """(N,) bool: whether the block ends after the transition `states` (N, Lb) -> `new`, for the rules that
        are not bounded (the registry's `complete`, else no mask left in `new`)."""
        if self.spec.complete is not None:
            return self.spec.complete(self, states, new, ctx)
        return (new != ctx.spec.mask_id).all(1)

    def is_complete(self, has_mask: bool, step: int) -> bool:
        """A bounded block ends after its steps; the other rules when no mask is left."""
        if self.spec.bounded:
            return step >= self.steps_per_block
        return not has_mask

    @property
    def bounded(self) -> bool:
        """Whether the block ends after a fixed number of steps (else: when no mask is left)."""
        return self.spec.bounded
