"""Transition rules: how many of a block's masked positions one transition commits (SPEC §2 step 2, §3).

Each rule sees the masked positions' confidences sorted in descending order and returns a count; the caller
commits that many top positions. Rules are stateless; `schedule` reads the block's initial mask count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spiffy.decoding.config import STEP_RULES, GenerationConfig


def schedule_counts(masked_at_start: int, steps: int) -> list[int]:
    """LLaDA's per-block schedule: steps `0..rem-1` commit `base+1`, the rest `base` (SPEC §2 step 2)."""
    base, rem = divmod(masked_at_start, steps)
    return [base + 1 if i < rem else base for i in range(steps)]


def factor_count(sorted_conf: torch.Tensor, f: float) -> int:
    """Fast-dLLM's `factor` rule (SPEC §3), including the reference's last-rank quirk."""
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


@dataclass(frozen=True)
class TransitionRule:
    """A rule as data; `count` and `is_complete` implement it."""

    name: str
    steps_per_block: int | None = None
    k: int | None = None
    tau: float | None = None
    factor: float | None = None

    @classmethod
    def from_config(cls, cfg: GenerationConfig) -> TransitionRule:
        return cls(
            cfg.rule,
            cfg.schedule_steps_per_block if cfg.rule in STEP_RULES else cfg.steps_per_block,
            cfg.k,
            cfg.tau,
            cfg.factor,
        )

    def count(self, sorted_conf: torch.Tensor, step: int, masked_at_start: int) -> int:
        """How many of the top positions transition `step` commits (`sorted_conf` descending, float64)."""
        n = sorted_conf.numel()
        if n == 0:
            return 0
        if self.name == "schedule":
            return min(n, schedule_counts(masked_at_start, self.steps_per_block)[step])
        if self.name == "fixed_k":
            return min(self.k, n)
        if self.name == "threshold":  # the most confident always, plus every other conf >= tau
            return max(1, int((sorted_conf >= self.tau).sum()))
        if self.name == "dream_steps":
            return dream_steps_count(n, step, self.steps_per_block)
        if self.name == "dream_threshold":
            quota = dream_quota(n, step, masked_at_start, self.steps_per_block)
            return min(quota, 1 + int((sorted_conf[1:quota] >= self.tau).sum())) if quota else 0
        return factor_count(sorted_conf, self.factor)

    def is_complete(self, has_mask: bool, step: int) -> bool:
        """A `schedule` block ends after its steps; the other rules when no mask is left."""
        if self.name in ("schedule", "dream_steps"):
            return step >= self.steps_per_block
        return not has_mask

    @property
    def bounded(self) -> bool:
        """Whether the block ends after a fixed number of steps (else: when no mask is left)."""
        return self.name in ("schedule", "dream_steps")
