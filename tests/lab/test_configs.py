"""Every option of every config group composes against the typed schema; bad overrides fail early."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from spiffy import GenerationConfig, Speculation
from spiffy.lab.pipeline import generation_kwargs
from spiffy.lab.schema import RunConfig, register_configs, speculation_settings
from spiffy.lab.sweep import CONF_DIR

CONF = CONF_DIR
REPO = Path(__file__).resolve().parents[2]
GROUPS = ["model", "task", "decoder", "graph", "tracking", "experiment"]
register_configs()


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def is_sdar(group: str, option: str) -> bool:
    """SDAR's models (block-causal, `model.block_size`) and decoders (its rules) only compose together."""
    if group == "model":
        return OmegaConf.load(CONF / "model" / f"{option}.yaml").get("block_size") is not None
    return group == "decoder" and ("sdar" in option or "llada2" in option)


def companion(group: str, option: str) -> list[str]:
    """The other half of an SDAR combination (the defaults are LLaDA's)."""
    if not is_sdar(group, option):
        return []
    return ["decoder=sdar"] if group == "model" else ["model=sdar_tiny", "graph.budget=10"]


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))],
)
def test_every_option_composes_and_validates(group, option):
    """Each option composes, converts (every `__post_init__` runs) and yields a valid decoder and Speculation."""
    cfg = compose_with(f"{group}={option}", *companion(group, option))
    typed: RunConfig = OmegaConf.to_object(cfg)
    gen = GenerationConfig(**generation_kwargs(typed))
    assert (gen.gen_length, gen.block_length) == (typed.task.gen_length, typed.task.block_length)
    assert gen.rule == typed.decoder.rule and gen.cache == typed.decoder.cache
    spec = Speculation("chain:2", prune=typed.graph.prune, **speculation_settings(typed.decoder))
    assert spec.verify == typed.decoder.verify and spec.cross_block == typed.decoder.cross_block


def test_default_is_spiffy_on_the_embedded_task():
    typed = OmegaConf.to_object(compose_with())
    assert typed.model.path == "embedded" and typed.task.name == "arith"
    assert typed.decoder.speculate and typed.graph.budget == "auto" and typed.graph.max_budget == 10


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ("graph.max_budget=ten", ValidationError, "max_budget"),
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
        ("graph.rule=fastest", "graph.rule='fastest'"),
        ("model.dtype=int8", "model.dtype='int8'"),
        ("graph.budget=-1", "graph.budget=-1"),
        ("graph.budget=ten", "graph.budget='ten' must be 'auto' or an integer >= 0"),
        ("graph.budget=true", "graph.budget=True must be 'auto' or an integer"),
        ("graph.budget=2.5", "graph.budget=2.5 must be 'auto' or an integer"),
        ("graph.max_budget=0", "graph.max_budget=0"),
        ("graph.auto_margin=1.5", "graph.auto_margin=1.5"),
        ("graph=chain graph.budget=auto", "graph.budget='auto' .* needs graph.source='calibrate'"),
        ("graph.prune=2", "graph.budget='auto' chooses the graph itself: graph.prune=2"),
        (
            "decoder=spiffy decoder.verify=shared",
            "decoder.verify='shared' is lossy with decoder.cache='none'",
        ),
        (
            "decoder=spiffy decoder.cross_block=true",
            "decoder.cross_block=true needs graph.budget=D",
        ),
        (
            "model=sdar_tiny decoder=spiffy_sdar_dynamic decoder.fuse_next=true",
            "graph.budget='auto' does not model the block-causal fusions",
        ),
        ("decoder.steps_per_token=7", "decoder.steps_per_token=7 must divide task.gen_length=32"),
        ("task.block_length=5", "task.gen_length=32 must be a multiple of block_length=5"),
        ("decoder.temperature=-0.5", "decoder.temperature=-0.5"),
        ("decoder.rule=threshold", "decoder.tau=None: rule='threshold' needs tau"),
        ("decoder.k=3", "decoder.k=3: only used by rule='fixed_k'"),
        ("decoder.verify=fast", "decoder.verify='fast' is not known"),
    ],
)
def test_bad_values_fail_before_any_model_loads(override, match):
    cfg = compose_with(*override.split())
    with pytest.raises(ValueError, match=match):
        OmegaConf.to_object(cfg)


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_each_experiment_has_a_launcher_and_runs_on_the_published_checkpoint(experiment):
    """Every paper experiment: one launch script (run.py sweep + make_tables), and the same config composes
    for LLaDA-8B on GSM8K (the GPU command is the same with `model=... task=...`)."""
    launch = (REPO / "experiments" / experiment / "launch.sh").read_text()
    assert f"run.py -m experiment={experiment}" in launch
    assert f"make_tables.py --experiment {experiment}" in launch
    model = PUBLISHED.get(experiment, "llada_8b_instruct")
    typed = OmegaConf.to_object(
        compose_with(f"experiment={experiment}", f"model={model}", "task=gsm8k")
    )
    assert typed.experiment_name == experiment and typed.model.name == model
    gen = generation_kwargs(typed)
    assert (gen["gen_length"], gen["block_length"]) == (256, 32)


PUBLISHED = {
    "sdar_v4": "sdar_8b_chat_b32",
    "sdar_v4_embedded": "sdar_8b_chat_b32",
}  # the published checkpoint each experiment is about


SDAR_MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if is_sdar("model", p.stem))
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))


@pytest.mark.parametrize(("model", "task"), [(m, t) for m in SDAR_MODELS for t in TASKS])
def test_sdar_models_compose_with_every_task_and_spiffy(model, task):
    """An SDAR model decodes in blocks of its block size (replacing the task's), one token per step under
    `decoder=sdar`; Spiffy composes over it; LLaDA's decoders are refused before any model loads."""
    for decoder in ("sdar", "sdar_dynamic", "spiffy_sdar_dynamic"):
        typed = OmegaConf.to_object(
            compose_with(
                f"model={model}",
                f"task={task}",
                f"decoder={decoder}",
                "decoder.speculate=true",
                "graph.budget=10",
            )
        )
        gen = GenerationConfig(**generation_kwargs(typed))
        assert gen.block_length == gen.steps_per_block == typed.model.block_size
        assert gen.cache == "block_causal" and typed.decoder.speculate
    with pytest.raises(ValueError, match="does not fit model"):
        OmegaConf.to_object(compose_with(f"model={model}", f"task={task}", "decoder=spiffy"))
    with pytest.raises(ValueError, match="does not fit model"):
        OmegaConf.to_object(compose_with(f"task={task}", "decoder=sdar"))


def test_cross_block_needs_the_no_cache_exact_layout():
    cfg = compose_with("decoder=spiffy_kv_cache", "decoder.cross_block=true")
    with pytest.raises(
        ValueError, match=r"decoder.cross_block=True needs cache in \['none'\] .*got cache='dual'"
    ):
        OmegaConf.to_object(cfg)
    typed = OmegaConf.to_object(
        compose_with("decoder=spiffy", "decoder.cross_block=true", "graph.budget=3")
    )
    assert typed.decoder.cross_block


def test_task_steps_is_not_a_key_and_lengths_come_from_the_task_preset():
    """`task.steps` used to be accepted and ignored; steps now come from `decoder.steps_per_token` only."""
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="steps"):
        compose_with("task.steps=7")
    from spiffy.tasks.registry import TASKS

    for task in ("arith", "gsm8k", "humaneval"):
        typed = OmegaConf.to_object(compose_with(f"task={task}"))
        preset = TASKS[task].generation
        assert (typed.task.gen_length, typed.task.block_length) == (
            preset["gen_length"],
            preset["block_length"],
        )
    typed = OmegaConf.to_object(compose_with("task.gen_length=64", "decoder.steps_per_token=2"))
    assert generation_kwargs(typed)["steps"] == 32


def test_every_rule_that_reads_steps_gets_them():
    """`decoder.rule=dream_steps` (recommended by the Dream configs) used to fail: steps were set for
    `schedule` only."""
    typed = OmegaConf.to_object(
        compose_with("decoder.rule=dream_steps", "decoder.remasking=entropy")
    )
    assert generation_kwargs(typed)["steps"] == 32
    typed = OmegaConf.to_object(compose_with("decoder.rule=dream_threshold", "decoder.tau=0.9"))
    assert GenerationConfig(**generation_kwargs(typed)).steps == 32


def test_graph_budget_is_auto_or_an_explicit_integer():
    """`auto` (the default) or D; an explicit D still means exactly that, with every option it allows."""
    assert OmegaConf.to_object(compose_with("graph.budget=3")).graph.budget == 3
    typed = OmegaConf.to_object(compose_with("graph.budget=auto", "graph.max_budget=4"))
    assert (typed.graph.budget, typed.graph.max_budget) == ("auto", 4)
    explicit = OmegaConf.to_object(
        compose_with("graph.budget=5", "graph.prune=2", "decoder.verify=shared")
    )
    assert (explicit.graph.budget, explicit.graph.prune, explicit.decoder.verify) == (
        5,
        2,
        "shared",
    )
    # the dual cache runs `shared` as exact block queries: lossless, so auto accepts it
    assert OmegaConf.to_object(compose_with("decoder=spiffy_kv_cache", "decoder.verify=shared"))
    # a base decoder ignores the graph group
    assert OmegaConf.to_object(compose_with("decoder=vanilla", "decoder.verify=shared"))
    assert OmegaConf.to_object(compose_with("graph=chain")).graph.budget == 8
