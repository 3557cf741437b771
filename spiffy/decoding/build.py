"""The stable public API (docs/algorithm.md §11): `load_model`, `build_decoder`, `Speculation`, graph helpers."""

from __future__ import annotations

import torch

from spiffy.decoding.block_decoder import BlockDecoder, DecoderOptions
from spiffy.decoding.config import GenerationConfig, step_rules
from spiffy.decoding.speculative import Speculation, SpiffyDecoder


def generation_config(config: GenerationConfig | None = None, **settings) -> GenerationConfig:
    """A validated `GenerationConfig` from an existing one and/or its fields.

    `steps` defaults to `gen_length` (one token per step) for the rules that read it. Unknown settings raise
    `ValueError` naming them and the known ones.
    """
    known = GenerationConfig.field_names()
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"unknown decoder setting(s) {unknown}; known: {list(known)}")
    values = {**(config.to_dict() if config is not None else {}), **settings}
    if "temperature" in values and isinstance(values["temperature"], int):
        values["temperature"] = float(values["temperature"])
    if values.get("rule", "schedule") in step_rules() and values.get("steps") is None:
        values["steps"] = values.get("gen_length", GenerationConfig.gen_length)
    return GenerationConfig(**values)


def build_decoder(
    model: torch.nn.Module,
    config: GenerationConfig | None = None,
    *,
    speculate: Speculation | None = None,
    options: DecoderOptions | None = None,
    **settings,
) -> BlockDecoder:
    """A base decoder (`speculate=None`) or Spiffy over it. Wrong arguments raise `ValueError`.

    Settings are `GenerationConfig`'s fields, given as a config object, as keywords, or both (keywords win):
    `gen_length`, `block_length`, `rule` (see `spiffy.decoding.rules.RULES`), `steps`, `k`, `tau`, `factor`,
    `cache` (`none` | `prefix` | `dual`), `temperature`, `remasking`, `softmax_dtype`, `logits_eos_inf`,
    `confidence_eos_eot_inf`, `cfg_scale`. `steps` defaults to `gen_length` for the rules that read it.
    `options` (`DecoderOptions`: statistics, profiling, `torch.compile`) never change the output.
    """
    cfg = generation_config(config, **settings)
    if speculate is None:
        return BlockDecoder(model, cfg, options=options)
    if not isinstance(speculate, Speculation):
        raise ValueError(f"speculate={speculate!r} must be None or a spiffy.Speculation")
    return SpiffyDecoder(model, cfg, speculate, options=options)


def _register_model_generate() -> None:
    """`model.generate` (spiffy.models.generate) reaches the decoders through this registration: the models layer
    may not import them."""
    from spiffy.decoding.model_generate import generate_for_model
    from spiffy.models.generate import register_backend

    register_backend(generate_for_model)


_register_model_generate()
