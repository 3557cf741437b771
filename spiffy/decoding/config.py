"""Validated generation settings shared by every decoder (SPEC §2 step 1, §3, §4).

`GenerationConfig` is the single source of truth for what a base decoder does; invalid combinations raise
`ValueError` naming the argument and its value, and nothing is silently rounded or clamped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SDAR_RULES = ("sdar_static", "sdar_dynamic", "sdar_sequential")  # block-causal models (SPEC §12)
RULES = (
    "schedule",
    "fixed_k",
    "threshold",
    "factor",
    "dream_steps",
    "dream_threshold",
    *SDAR_RULES,
)
STEP_RULES = ("schedule", "dream_steps", "dream_threshold")  # rules that need `steps`
# "block_causal": the exact cache of finished blocks, implied by (and only valid for) the SDAR rules
CACHE_MODES = ("none", "prefix", "dual", "block_causal")
REMASKING = ("low_confidence", "random", "topk_margin", "entropy")
SOFTMAX_DTYPES = ("float64", "model")


@dataclass(frozen=True)
class GenerationConfig:
    """Base-decoder settings. `steps` drives only the `schedule` rule; `k`/`tau`/`factor` their own rules.

    SDAR (SPEC §12): the `sdar_*` rules take `steps_per_block` (SDAR's `denoising_steps`; `steps` stays the
    total of SPEC §2), `sdar_dynamic` also `tau`; `cache` is implied (`block_causal`), `gen_length` is rounded
    up to whole blocks, and `fuse_next` lets each block's store forward also start the next block.
    `stop_ids` (any family) stops after the first block whose generated region contains one of them.
    `top_k`/`top_p` filter the sampling distribution at `temperature > 0`.
    """

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
    steps_per_block: int | None = None
    stop_ids: tuple[int, ...] | None = None
    top_k: int | None = None
    top_p: float | None = None
    fuse_next: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r}: {why}")

        for name in ("gen_length", "block_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(name, "must be a positive integer")
        sdar = self.rule in SDAR_RULES
        if sdar and self.cache == "none":  # implied: the exact block-causal cache
            object.__setattr__(self, "cache", "block_causal")
        if self.gen_length % self.block_length and not sdar:
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
        self._check_sdar(bad)
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
        owners = {
            "k": ("fixed_k",),
            "tau": ("threshold", "dream_threshold", "sdar_dynamic"),
            "factor": ("factor",),
            "steps_per_block": SDAR_RULES,
        }
        for name, rules in owners.items():
            value = getattr(self, name)
            if self.rule in rules and value is None:
                raise bad(name, f"rule={self.rule!r} needs {name}")
            if self.rule not in rules and value is not None:
                owner = f"rule={rules[0]!r}" if len(rules) == 1 else f"the rules {list(rules)}"
                raise bad(name, f"only used by {owner}, but rule={self.rule!r}")
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
        self._check_sampling(bad)

    def _check_sdar(self, bad) -> None:
        """SDAR's rules, its implied cache and its step count (SPEC §12)."""
        sdar = self.rule in SDAR_RULES
        if sdar and self.cache != "block_causal":
            raise bad("cache", f"rule={self.rule!r} implies the exact block-causal cache")
        if not sdar and self.cache == "block_causal":
            raise bad("cache", f"only the SDAR rules {list(SDAR_RULES)} use it")
        if sdar and self.steps is not None:
            raise bad(
                "steps", f"rule={self.rule!r} takes steps_per_block (steps is a total, SPEC §2)"
            )
        if sdar and self.remasking != "low_confidence":
            raise bad("remasking", f"rule={self.rule!r} names its own position choice")
        if self.fuse_next and not sdar:
            raise bad("fuse_next", "only the block-causal SDAR rules store blocks")
        spb = self.steps_per_block
        if spb is not None and (
            not isinstance(spb, int) or isinstance(spb, bool) or not 1 <= spb <= self.block_length
        ):
            raise bad(
                "steps_per_block", f"must be an integer in [1, block_length={self.block_length}]"
            )

    def _check_sampling(self, bad) -> None:
        """`stop_ids`, `top_k`, `top_p`; lists are normalised to tuples (the config is frozen)."""
        if self.stop_ids is not None:
            ids = tuple(self.stop_ids) if not isinstance(self.stop_ids, int) else None
            if ids is None or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise bad("stop_ids", "must be None or a list of token ids")
            object.__setattr__(self, "stop_ids", ids)
        if self.top_k is not None and (
            not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1
        ):
            raise bad("top_k", "must be None or a positive integer")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be None or in (0, 1]")
        for name in ("top_k", "top_p"):
            if getattr(self, name) is not None and self.temperature == 0:
                raise bad(name, "filters sampling, which needs temperature > 0")

    @property
    def num_blocks(self) -> int:
        """Blocks of the generated region (SDAR's count also depends on the prompt, SPEC §12)."""
        return -(-self.gen_length // self.block_length)

    @property
    def schedule_steps_per_block(self) -> int | None:
        """Steps per block of the `steps` rules (`steps / num_blocks`)."""
        return None if self.steps is None else self.steps // self.num_blocks

    def to_dict(self) -> dict:
        return asdict(self)
