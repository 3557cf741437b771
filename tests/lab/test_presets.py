"""The bench's decoders are the Hydra decoder presets (`spiffy.lab.presets`): composed as Hydra composes them."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from spiffy.lab.benchmarks import DecoderSpec, generation_for
from spiffy.lab.presets import compose_preset, preset_names
from spiffy.lab.schema import register_configs
from spiffy.lab.sweep import CONF_DIR
from spiffy.tasks.registry import TASKS, task_generation

register_configs()


@pytest.mark.parametrize("name", preset_names())
def test_each_preset_composes_as_hydra_composes_it(name):
    block_causal = "sdar" in name or "llada2" in name
    overrides = [f"decoder={name}"] + (["model=sdar_tiny"] if block_causal else [])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    ours = compose_preset(name, block_size=cfg.model.block_size)
    assert ours and {key: cfg.decoder[key] for key in ours} == ours


def test_presets_with_overrides_give_the_settings_they_name():
    block = TASKS["arith"].generation["block_length"]
    cases = {
        "vanilla": {},
        "vanilla:rule=fixed_k,k=2": dict(rule="fixed_k", k=2),
        "multi_token": dict(rule="threshold", tau=0.9),
        "multi_token:tau=0.8": dict(rule="threshold", tau=0.8),
        "kv_cache:cache=prefix": dict(cache="prefix"),
        "kv_cache:rule=threshold,tau=0.9": dict(cache="dual", rule="threshold", tau=0.9),
        "sdar:fuse_next=true": dict(rule="sdar_static", fuse_next=True, steps_per_block=block),
        "sdar_dynamic": dict(rule="sdar_dynamic", tau=0.9, steps_per_block=block),
        "vanilla:steps_per_token=2": dict(steps=TASKS["arith"].generation["gen_length"] // 2),
        "vanilla:stop_ids=[5,7]": dict(stop_ids=(5, 7)),  # a list value's commas
    }
    for text, settings in cases.items():
        want = task_generation("arith", temperature=0.7, **settings)
        assert generation_for("arith", text, 0.7) == want, text
    assert generation_for("arith", "vanilla:temperature=0.0", 0.7)["temperature"] == 0.0  # its own
    # overrides of the call win; steps_per_block follows an overridden block length
    got = generation_for("arith", "sdar", 0.0, block_length=4, gen_length=16)
    assert (got["block_length"], got["steps_per_block"], got["gen_length"]) == (4, 4, 16)


def test_decoder_specs_parse_presets_and_spiffy_over_them():
    spec = DecoderSpec.parse("multi_token:tau=0.8+spiffy@chain:3/shared", "calibrated:10")
    assert (spec.base, spec.graph, spec.verify) == ("multi_token:tau=0.8", "chain:3", "shared")
    assert DecoderSpec.parse("sdar:fuse_next=true+spiffy/fused", "chain:2").fuse_store


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("threshold0.9", "preset 'threshold0.9' is not one of"),
        ("vanilla:bogus=1", "'bogus=1' must be key=value with a decoder key"),
        ("vanilla:tau", "'tau' must be key=value"),
        ("vanilla:stop_ids=[5", "'stop_ids=\\[5' has no YAML value"),
        ("vanilla:gen_length=64", "'gen_length=64' must be key=value with a decoder"),
        ("spiffy_kv_cache", "that preset speculates"),
        ("vanilla:compile=true", "compile=true is a run option"),
    ],
)
def test_bad_decoder_specs_raise_naming_what(text, match):
    with pytest.raises(ValueError, match=match):
        DecoderSpec.parse(text, "chain:3")
