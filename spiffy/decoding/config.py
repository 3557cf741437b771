"""Validated generation settings shared by every decoder (docs/algorithm.md §2–§4): the one definition.

`GenerationConfig` is the single source of truth for what a base decoder does. Everything else that enumerates
decoder settings is derived from its fields: `spiffy.build_decoder`'s keywords, the Hydra schema
(`spiffy.config.DecoderConfig`), the calibration provenance (`spiffy.graph.provenance`). Which rule needs which
parameter comes from the rule registry (`spiffy.decoding.rules`), and cache modes from `spiffy.decoding.modes`.
Invalid combinations raise `ValueError` naming the argument and its value; nothing is rounded or clamped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from spiffy.decoding.modes import CACHE_MODES
from spiffy.decoding.rules import RULES, get_rule, rules_needing

REMASKING = ("low_confidence", "random", "topk_margin", "entropy")
SOFTMAX_DTYPES = ("float64", "model")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


# Rule parameters: how each is checked. `steps` may be given to any rule (it is validated, and only the rules that
# declare it read it); every other parameter is exclusive to the rules that declare it.
PARAM_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "steps": (_positive_int, "must be a positive integer"),
    "k": (_positive_int, "must be a positive integer"),
    "tau": (lambda v: isinstance(v, (int, float)) and 0.0 < v <= 1.0, "must be in (0, 1]"),
    "factor": (lambda v: isinstance(v, (int, float)) and v > 0, "must be positive"),
}
SHARED_PARAMS = ("steps",)


def step_rules() -> tuple[str, ...]:
    """Rules that read `steps` (the others run a block until no mask is left)."""
    return rules_needing("steps")


@dataclass(frozen=True)
class GenerationConfig:
    """Base-decoder settings. Rule parameters (`steps`, `k`, `tau`, `factor`) are read only by the rules that
    declare them (see `spiffy.decoding.rules.RULES`)."""

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
        for name in ("gen_length", "block_length"):
            if not _positive_int(getattr(self, name)):
                raise self._bad(name, "must be a positive integer")
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length={self.gen_length} must be a multiple of "
                f"block_length={self.block_length}"
            )
        get_rule(self.rule)
        for name, choices in (
            ("cache", CACHE_MODES),
            ("remasking", REMASKING),
            ("softmax_dtype", SOFTMAX_DTYPES),
        ):
            if getattr(self, name) not in choices:
                raise self._bad(name, f"must be one of {list(choices)}")
        self._check_rule_params()
        if self.steps is not None:
            nb = self.num_blocks
            if not nb <= self.steps <= self.gen_length:
                raise self._bad(
                    "steps", f"must satisfy num_blocks={nb} <= steps <= gen_length={self.gen_length}"
                )
            if self.steps % nb:
                raise self._bad("steps", f"must be a multiple of num_blocks={nb}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise self._bad("temperature", "must be a number >= 0")
        if self.cfg_scale != 0:
            raise self._bad("cfg_scale", "classifier-free guidance is out of scope (use 0)")

    def _bad(self, name: str, why: str) -> ValueError:
        return ValueError(f"{name}={getattr(self, name)!r}: {why}")

    def _check_rule_params(self) -> None:
        """Derived from the registry: a rule's declared parameters are required, the others refused."""
        needed = RULES[self.rule].params
        for name, (ok, why) in PARAM_CHECKS.items():
            value = getattr(self, name)
            if value is None:
                if name in needed:
                    raise self._bad(name, f"rule={self.rule!r} needs {name}")
                continue
            if name not in needed and name not in SHARED_PARAMS:
                owners = rules_needing(name)
                raise self._bad(
                    name, f"only used by rule={owners[0]!r}{' (and others)' * (len(owners) > 1)}, "
                    f"but rule={self.rule!r}"
                )
            if not ok(value):
                raise self._bad(name, why)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int | None:
        return None if self.steps is None else self.steps // self.num_blocks

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every setting, in declaration order (what provenance, Hydra and `build_decoder` derive from)."""
        return tuple(f.name for f in fields(cls))

