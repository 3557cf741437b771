"""Validated generation settings shared by every decoder (SPEC §2 step 1, §3, §4).

`GenerationConfig` is the single source of truth for what a base decoder does; invalid combinations raise
`ValueError` naming the argument and its value, and nothing is silently rounded or clamped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

RULES = ("schedule", "fixed_k", "threshold", "factor", "dream_steps", "dream_threshold")
STEP_RULES = ("schedule", "dream_steps", "dream_threshold")  # rules that need `steps`
CACHE_MODES = ("none", "prefix", "dual")
REMASKING = ("low_confidence", "random", "topk_margin", "entropy")
SOFTMAX_DTYPES = ("float64", "model")


@dataclass(frozen=True)
class GenerationConfig:
    """Base-decoder settings. `steps` drives only the `schedule` rule; `k`/`tau`/`factor` their own rules."""

    gen_length: int = 128
    block_length: int = 32
    rule: str = "schedule"
    steps: int | None = None
    k: int | None = None
    tau: float | None = None
    factor: float | None = None
    cache: str = "none"
    temperature: float = 0.0
    remasking: str = "low_confidence"
    softmax_dtype: str = "float64"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    cfg_scale: float = 0.0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r}: {why}")

        for name in ("gen_length", "block_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(name, "must be a positive integer")
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length={self.gen_length} must be a multiple of "
                f"block_length={self.block_length}"
            )
        for name, choices in (
            ("rule", RULES),
            ("cache", CACHE_MODES),
            ("remasking", REMASKING),
            ("softmax_dtype", SOFTMAX_DTYPES),
        ):
            if getattr(self, name) not in choices:
                raise bad(name, f"must be one of {list(choices)}")
        if self.rule in STEP_RULES and self.steps is None:
            raise bad("steps", f"rule={self.rule!r} needs steps")
        if self.steps is not None:
            nb = self.num_blocks
            if not isinstance(self.steps, int) or not nb <= self.steps <= self.gen_length:
                raise bad(
                    "steps",
                    f"must satisfy num_blocks={nb} <= steps <= gen_length={self.gen_length}",
                )
            if self.steps % nb:
                raise bad("steps", f"must be a multiple of num_blocks={nb}")
        owners = {"k": ("fixed_k",), "tau": ("threshold", "dream_threshold"), "factor": ("factor",)}
        for name, rules in owners.items():
            value = getattr(self, name)
            if self.rule in rules and value is None:
                raise bad(name, f"rule={self.rule!r} needs {name}")
            if self.rule not in rules and value is not None:
                raise bad(name, f"only used by rule={rules[0]!r}, but rule={self.rule!r}")
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise bad("k", "must be a positive integer")
        if self.tau is not None and not 0.0 < self.tau <= 1.0:
            raise bad("tau", "must be in (0, 1]")
        if self.factor is not None and not self.factor > 0:
            raise bad("factor", "must be positive")
        if not self.temperature >= 0:
            raise bad("temperature", "must be >= 0")
        if self.cfg_scale != 0:
            raise bad("cfg_scale", "classifier-free guidance is out of scope (use 0)")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int | None:
        return None if self.steps is None else self.steps // self.num_blocks

    def to_dict(self) -> dict:
        return asdict(self)
