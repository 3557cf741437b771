"""The stable public API (SPEC §11): `load_model`, `build_decoder`, `Speculation`, graph helpers."""

from __future__ import annotations

import torch

from spiffy.decoding.block_decoder import BlockDecoder
from spiffy.decoding.config import GenerationConfig
from spiffy.decoding.speculative import Speculation, SpiffyDecoder


def build_decoder(
    model: torch.nn.Module,
    *,
    gen_length: int = 128,
    block_length: int = 32,
    rule: str = "schedule",
    steps: int | None = None,
    k: int | None = None,
    tau: float | None = None,
    factor: float | None = None,
    cache: str = "none",
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    speculate: Speculation | None = None,
    softmax_dtype: str = "float64",
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    cfg_scale: float = 0.0,
    steps_per_block: int | None = None,
    stop_ids: list[int] | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    fuse_next: bool = False,
) -> BlockDecoder:
    """A base decoder (`speculate=None`) or Spiffy over it. Wrong arguments raise `ValueError`.

    `steps` defaults to `gen_length` (one token per step) for the `schedule` rule. SDAR models take the
    `sdar_*` rules with `steps_per_block` (and `tau` for `sdar_dynamic`); their cache is implied (SPEC §12).
    """
    if rule == "schedule" and steps is None:
        steps = gen_length
    cfg = GenerationConfig(
        gen_length=gen_length,
        block_length=block_length,
        rule=rule,
        steps=steps,
        k=k,
        tau=tau,
        factor=factor,
        cache=cache,
        temperature=float(temperature),
        remasking=remasking,
        softmax_dtype=softmax_dtype,
        logits_eos_inf=logits_eos_inf,
        confidence_eos_eot_inf=confidence_eos_eot_inf,
        cfg_scale=cfg_scale,
        steps_per_block=steps_per_block,
        stop_ids=stop_ids,
        top_k=top_k,
        top_p=top_p,
        fuse_next=fuse_next,
    )
    if speculate is None:
        return BlockDecoder(model, cfg)
    if not isinstance(speculate, Speculation):
        raise ValueError(f"speculate={speculate!r} must be None or a spiffy.Speculation")
    return SpiffyDecoder(model, cfg, speculate)
