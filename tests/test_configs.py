"""Every option of every config group composes against the typed schema; bad overrides fail early."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from spiffy.config import RunConfig, register_configs
from spiffy.pipeline import generation_kwargs

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ["model", "task", "decoder", "graph", "tracking", "experiment"]
register_configs()


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))],
)
def test_every_option_composes_and_validates(group, option):
    cfg = compose_with(f"{group}={option}")
    typed: RunConfig = OmegaConf.to_object(cfg)
    if typed.decoder.speculate or True:
        import spiffy.decoding.config as dc

        dc.GenerationConfig(**generation_kwargs(typed))


def test_default_is_spiffy_on_the_embedded_task():
    typed = OmegaConf.to_object(compose_with())
    assert typed.model.path == "embedded" and typed.task.name == "arith"
    assert typed.decoder.speculate and typed.graph.budget == 10


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ("graph.budget=ten", ValidationError, "budget"),
        ("decoder.foo=1", ConfigCompositionException, "foo"),
        ("decoder=turbo", ConfigCompositionException, "turbo"),
    ],
)
def test_bad_overrides_fail_at_composition(override, error, match):
    with pytest.raises((error, ConfigKeyError, ConfigCompositionException), match=match):
        compose_with(override)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("decoder.rule=fast", "decoder.rule='fast'"),
        ("graph.rule=best", "graph.rule='best'"),
        ("model.dtype=int8", "model.dtype='int8'"),
        ("graph.budget=-1", "graph.budget=-1"),
    ],
)
def test_bad_values_fail_before_any_model_loads(override, match):
    cfg = compose_with(override)
    with pytest.raises(ValueError, match=match):
        OmegaConf.to_object(cfg)


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_each_experiment_has_a_launcher_and_runs_on_the_published_checkpoint(experiment):
    """Every paper experiment: one launch script (run.py sweep + make_tables), and the same config composes
    for LLaDA-8B on GSM8K (the GPU command is the same with `model=... task=...`)."""
    launch = (CONF.parent / "experiments" / experiment / "launch.sh").read_text()
    assert f"run.py -m experiment={experiment}" in launch
    assert f"make_tables.py --experiment {experiment}" in launch
    typed = OmegaConf.to_object(
        compose_with(f"experiment={experiment}", "model=llada_8b_instruct", "task=gsm8k")
    )
    assert typed.experiment_name == experiment and typed.model.name == "llada_8b_instruct"
    gen = generation_kwargs(typed)
    assert (gen["gen_length"], gen["block_length"]) == (256, 32)


def test_cross_block_needs_the_no_cache_exact_layout():
    cfg = compose_with("decoder=spiffy_kv_cache", "decoder.cross_block=true")
    with pytest.raises(ValueError, match="decoder.cross_block=true needs decoder.cache='none'"):
        OmegaConf.to_object(cfg)
    typed = OmegaConf.to_object(compose_with("decoder=spiffy", "decoder.cross_block=true"))
    assert typed.decoder.cross_block
