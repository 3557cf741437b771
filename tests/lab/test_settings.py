"""One definition per setting: every place that enumerates decoder settings is derived from the library's
dataclasses, so a new rule with a new parameter touches two files (docs/extending.md)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from omegaconf import OmegaConf

import spiffy
from spiffy.decoding import config as gen_config
from spiffy.decoding import rules
from spiffy.decoding.block_decoder import BlockDecoder
from spiffy.decoding.modes import get_cache_mode
from spiffy.decoding.provenance import decoder_settings
from spiffy.lab.schema import GRAPH_OWNED, TASK_OWNED, DecoderConfig, make_decoder_schema


def test_every_setting_reaches_every_consumer():
    decoder_keys = {f.name for f in dataclasses.fields(DecoderConfig)}
    generation = set(spiffy.GenerationConfig.field_names())
    speculation = {f.name for f in dataclasses.fields(spiffy.Speculation)}
    assert generation - set(TASK_OWNED) <= decoder_keys  # Hydra: decoder.<field>
    assert speculation - set(GRAPH_OWNED) <= decoder_keys  # Hydra: decoder.<option>
    assert set(decoder_settings(spiffy.GenerationConfig(steps=128))) == generation  # provenance
    for spec in rules.RULES.values():  # every declared rule parameter is a checked setting
        assert set(spec.params) <= set(gen_config.PARAM_CHECKS) <= generation


def test_unknown_names_raise_with_the_known_ones():
    with pytest.raises(ValueError, match=r"rule='fast' is not a known transition rule; known: \["):
        rules.TransitionRule("fast")
    with pytest.raises(
        ValueError,
        match=r"cache='full' is not known; known: \['block_causal', 'dual', 'none', 'prefix'\]",
    ):
        get_cache_mode("full")
    from spiffy.calibration.calibrate import SELECTORS, select_graph
    from spiffy.calibration.trajectories import Trajectories

    with pytest.raises(ValueError, match=r"selection rule='fancy' must be one of \['best', "):
        select_graph(Trajectories([], horizon=4), 3, "fancy")
    assert set(SELECTORS) >= {"best", "degree0", "degree1", "total", "greedy", "phased"}
    with pytest.raises(ValueError, match=r"unknown decoder setting\(s\) \['turbo'\]"):
        spiffy.build_decoder(torch.nn.Linear(1, 1), turbo=True)


def test_a_new_rule_with_a_new_parameter_needs_two_files(monkeypatch, tiny_model):
    """Simulates adding rule `alpha` with parameter `alpha` (commit ceil(alpha * masked) per step). In the repo
    that is (1) a `@register_rule` function in spiffy/decoding/rules.py and (2) a field plus a `PARAM_CHECKS`
    entry in spiffy/decoding/config.py. Here both edits are made in-test (a registry entry and a subclass);
    nothing else is touched, and the parameter reaches validation, the decoder, Hydra and provenance."""
    monkeypatch.setitem(
        gen_config.PARAM_CHECKS, "alpha", (lambda v: 0 < v <= 1, "must be in (0, 1]")
    )
    monkeypatch.delitem(rules.RULES, "alpha", raising=False)
    rules.register_rule("alpha", params=("alpha",))(
        lambda rule, conf, step, start: math.ceil(rule.alpha * conf.numel())
    )
    try:
        extended = dataclasses.make_dataclass(
            "Extended",
            [("alpha", float | None, None)],
            bases=(spiffy.GenerationConfig,),
            frozen=True,
        )
        cfg = extended(gen_length=16, block_length=8, rule="alpha", alpha=0.5)
        with pytest.raises(ValueError, match="alpha=None: rule='alpha' needs alpha"):
            extended(gen_length=16, block_length=8, rule="alpha")
        with pytest.raises(ValueError, match="alpha=0.5: only used by rule='alpha'"):
            extended(gen_length=16, block_length=8, steps=16, alpha=0.5)
        with pytest.raises(ValueError, match="alpha=2.0: must be in"):
            extended(gen_length=16, block_length=8, rule="alpha", alpha=2.0)
        out = BlockDecoder(tiny_model, cfg).generate(torch.tensor([1, 2]))
        assert out.stats.transitions < 16  # half of the masks per step, not one token per step
        assert decoder_settings(cfg)["alpha"] == 0.5  # the calibration key sees it
        schema = make_decoder_schema(generation=extended)
        node = OmegaConf.merge(OmegaConf.structured(schema), {"name": "x", "alpha": 0.25})
        assert OmegaConf.to_object(node).alpha == 0.25  # Hydra: decoder.alpha=0.25
    finally:
        rules.RULES.pop("alpha", None)
