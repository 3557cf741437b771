"""Keyed randomness (docs/algorithm.md §2.1): every draw is a pure function of (seed, request, block, step, purpose).

Any decoder performing the same transition therefore draws the same noise, whatever its forward schedule; this
is what makes losslessness at temperature > 0 an exact, testable property. Draw shapes are fixed:
`(block_length, V)` float64 for Gumbel and `(block_length,)` float64 for remasking.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

PURPOSES = ("gumbel", "remask")


def stable_key(seed: int, request_id: int | str, block: int, step: int, purpose: str) -> int:
    """A 63-bit integer from SHA-256 of the key tuple (never Python's salted `hash`)."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose={purpose!r} must be one of {PURPOSES}")
    text = f"{seed}|{request_id}|{block}|{step}|{purpose}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") & (2**63 - 1)


@dataclass(frozen=True)
class NoiseKey:
    """The caller-supplied part of the key; `block` and `step` are added per transition."""

    seed: int = 0
    request_id: int | str = 0

    def __post_init__(self) -> None:
        """Both are part of every draw's key: a float, None or negative value is a mistake, not a key."""
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be an integer >= 0")
        rid = self.request_id
        if isinstance(rid, str):
            if not rid:
                raise ValueError("request_id='' must be an integer >= 0 or a non-empty string")
        elif not isinstance(rid, int) or isinstance(rid, bool) or rid < 0:
            raise ValueError(f"request_id={rid!r} must be an integer >= 0 or a non-empty string")

    def uniforms(
        self, block: int, step: int, purpose: str, shape: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        """Float64 U(0, 1) draws of `shape` for one transition and purpose."""
        gen = torch.Generator(device=device)
        gen.manual_seed(stable_key(self.seed, self.request_id, block, step, purpose))
        return torch.rand(shape, generator=gen, dtype=torch.float64, device=device)
