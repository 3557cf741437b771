"""Validated generation settings shared by every decoder (docs/algorithm.md §2–§4): the one definition.

`GenerationConfig` is the single source of truth for what a base decoder does. Everything else that enumerates
decoder settings is derived from its fields: `spiffy.build_decoder`'s keywords, the Hydra schema
(`spiffy.lab.schema.DecoderConfig`), the calibration provenance (`spiffy.decoding.provenance`). Which rule needs which
parameter comes from the rule registry (`spiffy.decoding.rules`), and cache modes from `spiffy.decoding.modes`.
Invalid combinations raise `ValueError` naming the argument and its value; nothing is rounded or clamped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from spiffy.decoding.modes import CACHE_MODES
from spiffy.decoding.rules import RULES, get_rule, rules_needing

# the rules of block-causal models (SDAR, docs/algorithm.md §12), from the registry
SDAR_RULES = tuple(name for name, spec in RULES.items() if spec.block_causal)

REMASKING = ("low_confidence", "random", "topk_margin", "entropy")
SOFTMAX_DTYPES = ("float64", "model")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _token_id(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v) -> bool:
    """A finite int or float; bools are not numbers here (`temperature=True` is a mistake, not 1.0)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Rule parameters: how each is checked. `steps` may be given to any rule (it is validated, and only the rules that
# declare it read it); every other parameter is exclusive to the rules that declare it.
PARAM_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "steps": (_positive_int, "must be a positive integer"),
    "k": (_positive_int, "must be a positive integer"),
    "tau": (lambda v: _number(v) and 0.0 < v <= 1.0, "must be a number in (0, 1]"),
    "factor": (lambda v: _number(v) and v > 0, "must be a finite positive number"),
    "steps_per_block": (_positive_int, "must be a positive integer"),
    "editing_threshold": (lambda v: _number(v) and 0.0 <= v <= 1.0, "must be a number in [0, 1]"),
    "max_post_steps": (lambda v: _positive_int(v) or v == 0, "must be an integer >= 0"),
    "num_to_transfer": (_positive_int, "must be a positive integer"),
}
# per rule: a parameter's own range (LLaDA2 compares `p > threshold`, so 0 and 1 are meaningful)
RULE_PARAM_CHECKS: dict[tuple[str, str], tuple[Callable[[object], bool], str]] = {
    (rule, "tau"): (lambda v: _number(v) and 0.0 <= v <= 1.0, "must be a number in [0, 1]")
    for rule in ("llada2_threshold", "llada2_edit")
}
SHARED_PARAMS = ("steps",)


def step_rules() -> tuple[str, ...]:
    """Rules that read `steps` (the others run a block until no mask is left)."""
    return rules_needing("steps")


@dataclass(frozen=True)
class DecodingConfig:
    """Base-decoder settings (`spiffy.GenerationConfig` is the same class under its earlier name, which collided
    with `transformers.GenerationConfig`; `model.generate` accepts either kind, docs/conventions.md). Rule parameters (`steps`, `k`, `tau`, `factor`, `steps_per_block`) are read only
    by the rules that declare them (see `spiffy.decoding.rules.RULES`).

    SDAR (docs/algorithm.md §12): the block-causal rules take `steps_per_block` (SDAR's `denoising_steps`; `steps` stays the
    total of §2), imply the `block_causal` cache, and round `gen_length` up to whole blocks; `fuse_next` lets
    each block's store forward also start the next block. `stop_ids` (any family) stops after the first block
    whose generated region contains one of them. `top_k`/`top_p` filter sampling at `temperature > 0`.
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
    # LLaDA2 (docs/llada2.md): 2.0's stop inside a block at EOS; 2.1's editing settings
    eos_early_stop: bool = False
    editing_threshold: float | None = None
    max_post_steps: int | None = None
    num_to_transfer: int | None = None

    def __post_init__(self) -> None:
        for name in ("gen_length", "block_length"):
            if not _positive_int(getattr(self, name)):
                raise self._bad(name, "must be a positive integer")
        block_causal = get_rule(self.rule).block_causal
        if block_causal and self.cache == "none":  # implied: the exact block-causal cache
            object.__setattr__(self, "cache", "block_causal")
        if self.gen_length % self.block_length and not block_causal:
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
        self._check_block_causal()
        self._check_rule_params()
        if self.steps is not None:
            nb = self.num_blocks
            if not nb <= self.steps <= self.gen_length:
                raise self._bad(
                    "steps",
                    f"must satisfy num_blocks={nb} <= steps <= gen_length={self.gen_length}",
                )
            if self.steps % nb:
                raise self._bad("steps", f"must be a multiple of num_blocks={nb}")
        if not _number(self.temperature) or not self.temperature >= 0:
            raise self._bad("temperature", "must be a finite number >= 0")
        if not _number(self.cfg_scale) or self.cfg_scale != 0:
            raise self._bad("cfg_scale", "classifier-free guidance is out of scope (use 0)")
        self._check_sampling()

    def _bad(self, name: str, why: str) -> ValueError:
        return ValueError(f"{name}={getattr(self, name)!r}: {why}")

    def _check_block_causal(self) -> None:
        """Block-causal rules and the cache that stores blocks go together (docs/algorithm.md §12)."""
        rule, stores = get_rule(self.rule), CACHE_MODES[self.cache].stores_blocks
        if rule.block_causal and not stores:
            raise self._bad("cache", f"rule={self.rule!r} implies the exact block-causal cache")
        if stores and not rule.block_causal:
            raise self._bad("cache", f"only the block-causal rules {list(SDAR_RULES)} use it")
        if rule.block_causal and self.steps is not None:
            raise self._bad("steps", f"rule={self.rule!r} takes steps_per_block (steps is a total)")
        if rule.block_causal and self.remasking != "low_confidence":
            raise self._bad("remasking", f"rule={self.rule!r} names its own position choice")
        if self.fuse_next and not stores:
            raise self._bad("fuse_next", "only the block-causal rules store finished blocks")
        spb = self.steps_per_block
        if _positive_int(spb) and spb > self.block_length:
            raise self._bad("steps_per_block", f"must be <= block_length={self.block_length}")

    def _check_sampling(self) -> None:
        """`stop_ids`, `top_k`, `top_p` (a list of stop ids becomes a tuple: the config is frozen)."""
        if self.stop_ids is not None:
            ids = None if isinstance(self.stop_ids, (int, str)) else tuple(self.stop_ids)
            if ids is None or not all(_token_id(i) for i in ids):
                raise self._bad("stop_ids", "must be None or a list of token ids (integers >= 0)")
            object.__setattr__(self, "stop_ids", ids)
        if self.top_k is not None and not _positive_int(self.top_k):
            raise self._bad("top_k", "must be None or a positive integer")
        if self.top_p is not None and not (_number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise self._bad("top_p", "must be None or in (0, 1]")
        for name in ("top_k", "top_p"):
            if getattr(self, name) is not None and self.temperature == 0:
                raise self._bad(name, "filters sampling, which needs temperature > 0")
        for name in ("fuse_next", "logits_eos_inf", "confidence_eos_eot_inf", "eos_early_stop"):
            if not isinstance(getattr(self, name), bool):
                raise self._bad(name, "must be True or False")
        if self.eos_early_stop and self.rule != "llada2_threshold":
            raise self._bad(
                "eos_early_stop",
                f"only rule='llada2_threshold' stops inside a block, but rule={self.rule!r} "
                "(stop_ids=[eos] stops after the block)",
            )

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
                    name,
                    f"only used by rule={owners[0]!r}{' (and others)' * (len(owners) > 1)}, "
                    f"but rule={self.rule!r}",
                )
            ok, why = RULE_PARAM_CHECKS.get((self.rule, name), (ok, why))
            if not ok(value):
                raise self._bad(name, why)

    @property
    def num_blocks(self) -> int:
        """Blocks of the generated region (SDAR's also depend on the prompt's length, docs/algorithm.md §12)."""
        return -(-self.gen_length // self.block_length)

    @property
    def schedule_steps_per_block(self) -> int | None:
        """Steps per block of the rules that read the total `steps`."""
        return None if self.steps is None else self.steps // self.num_blocks

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every setting, in declaration order (what provenance, Hydra and `build_decoder` derive from)."""
        return tuple(f.name for f in fields(cls))


# the earlier name, kept (the public API only grows): the same class
GenerationConfig = DecodingConfig
