"""Typed schemas of every config group, registered with Hydra's ConfigStore (docs/architecture.md, the lab).

`spiffy/conf/config.yaml` starts its defaults list with `run_schema`, so Hydra merges every YAML option and command-line
override into these dataclasses at composition time: an unknown key or a wrongly typed value (`graph.budget=ten`)
fails before any model loads, naming the key. Semantic checks (allowed choices, ranges) run in `__post_init__`
when `pipeline.run` converts the config with `OmegaConf.to_object`, also before any model loads.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from spiffy.calibration.calibrate import SELECTION_RULES
from spiffy.decoding.batching import parse_batch_size
from spiffy.decoding.config import GenerationConfig
from spiffy.decoding.modes import check_cross_block, get_cache_mode, is_lossless
from spiffy.decoding.speculative import Speculation, check_speculation_options

DTYPES = ("float32", "float64", "bfloat16", "float16")
GRAPH_SOURCES = ("calibrate", "chain", "fig2", "topk", "file", "dynamic")
TRACKING_MODES = ("offline", "online", "disabled")
TASKS_DIR = Path(__file__).resolve().parents[1] / "eval" / "tasks"  # the lm-eval task YAMLs


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
    # block-causal models (SDAR) only: the attention block size of config.json. Such a model decodes in
    # blocks of this length (it replaces task.block_length) with the SDAR rules; the SDAR presets read it.
    block_size: int | None = None

    def __post_init__(self) -> None:
        _choice("model", "dtype", self.dtype, DTYPES)
        check_device_name(self.device)
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"model.block_size={self.block_size} must be >= 1 or null")


@dataclass
class TaskConfig:
    """A task: its lm-eval name and evaluation settings. Generation lengths default to the task's preset in
    `spiffy.tasks.registry.TASKS` (the one place they live); `task.gen_length=...` overrides them."""

    name: str = MISSING
    lm_eval_task: str = MISSING  # the task name registered from spiffy/eval/tasks/
    num_fewshot: int = 0
    limit: int | None = None  # number of test documents (None = all)
    gen_length: int | None = None  # None: the task preset's
    block_length: int | None = None  # None: the task preset's
    # code-executing tasks (HumanEval) refuse to start unless this is true; README: "Running generated code"
    allow_code_execution: bool = False
    # also run generated code where isolation (spiffy/eval/sandbox.py) does not work: unsafe, see README
    allow_unisolated_execution: bool = False
    calibration_task: str | None = None  # task whose prompts calibrate the graph (None = this task)

    def __post_init__(self) -> None:
        from spiffy.tasks.registry import TASKS

        if self.limit is not None and self.limit < 1:
            raise ValueError(f"task.limit={self.limit} must be >= 1 or null")
        if self.allow_unisolated_execution and not self.allow_code_execution:
            raise ValueError(
                "task.allow_unisolated_execution=true needs task.allow_code_execution=true"
            )
        if self.name == MISSING:  # the schema's placeholder instance
            return
        if self.name not in TASKS:
            raise ValueError(f"task.name={self.name!r} has no preset; known: {sorted(TASKS)}")
        if self.num_fewshot < 0:
            raise ValueError(f"task.num_fewshot={self.num_fewshot} must be >= 0")
        if self.num_fewshot and not TASKS[self.name].fewshot:
            raise ValueError(
                f"task.num_fewshot={self.num_fewshot}: task {self.name!r} has no split to draw exemplars from "
                "(use 0)"
            )
        known = lm_eval_tasks()
        if self.lm_eval_task not in known:
            raise ValueError(
                f"task.lm_eval_task={self.lm_eval_task!r} is not a task; known: {known}"
            )
        calibrating = sorted(name for name, t in TASKS.items() if t.calibration is not None)
        if self.calibration_task is not None and self.calibration_task not in calibrating:
            raise ValueError(
                f"task.calibration_task={self.calibration_task!r} has no calibration prompts; "
                f"known: {calibrating} (or null: this task's)"
            )
        preset = TASKS[self.name].generation
        for key in ("gen_length", "block_length"):
            if getattr(self, key) is None:
                setattr(self, key, preset[key])
            elif getattr(self, key) < 1:
                raise ValueError(f"task.{key}={getattr(self, key)} must be >= 1")


# The decoder group is derived from the library's own dataclasses, so a new `GenerationConfig` field or
# `Speculation` option is a new `decoder.<name>` key with no edit here. Task-owned lengths and the graph-owned
# speculation fields are excluded; `steps` is derived from `decoder.steps_per_token`.
TASK_OWNED = ("gen_length", "block_length", "steps")
GRAPH_OWNED = ("graph", "prune")


def _derived_fields(cls, exclude: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(cls)
    return [
        (f.name, hints[f.name], field(default=f.default))
        for f in dataclasses.fields(cls)
        if f.name not in exclude
    ]


def _decoder_post_init(self) -> None:
    """Semantic checks of the decoder group (the full combination is checked by `RunConfig`)."""
    if not isinstance(self.steps_per_token, int) or self.steps_per_token < 1:
        raise ValueError(f"decoder.steps_per_token={self.steps_per_token} must be >= 1")
    try:
        check_speculation_options(
            verify=self.verify,
            draft_noise=self.draft_noise,
            cross_block=self.cross_block,
            fuse_store=self.fuse_store,
        )
        if self.cross_block:
            check_cross_block(self.cache, self.verify)
    except ValueError as e:
        raise ValueError(f"decoder.{e}") from None


def make_decoder_schema(generation=GenerationConfig, speculation=Speculation) -> type:
    """The decoder group's dataclass, derived from the library's settings classes."""
    schema = dataclasses.make_dataclass(
        "DecoderConfig",
        [
            ("name", str, field(default=MISSING)),
            *_derived_fields(generation, TASK_OWNED),
            ("steps_per_token", int, field(default=1)),  # steps = gen_length / steps_per_token
            ("speculate", bool, field(default=False)),  # wrap the base decoder with Spiffy
            (
                "compile",
                bool,
                field(default=False),
            ),  # torch.compile the block forward (DecoderOptions)
            ("invariant", bool, field(default=False)),  # invariant numerics (DecoderOptions)
            *_derived_fields(speculation, GRAPH_OWNED),
        ],
        namespace={"__post_init__": _decoder_post_init, "__module__": __name__},
    )
    schema.__doc__ = (
        "The decoder group: `GenerationConfig`'s fields (minus task-owned lengths), `steps_per_token`, "
        "`speculate`, and `Speculation`'s options (minus the graph group's)."
    )
    return schema


DecoderConfig = make_decoder_schema()


def decoder_settings(decoder, task: TaskConfig, generation=GenerationConfig) -> dict:
    """`GenerationConfig` keyword arguments of a decoder group on a task (the one mapping)."""
    from spiffy.decoding.rules import get_rule

    settings = {
        name: getattr(decoder, name) for name in generation.field_names() if name not in TASK_OWNED
    }
    settings.update(gen_length=task.gen_length, block_length=task.block_length)
    if "steps" in get_rule(decoder.rule).params:
        if task.gen_length % decoder.steps_per_token:
            raise ValueError(
                f"decoder.steps_per_token={decoder.steps_per_token} must divide "
                f"task.gen_length={task.gen_length} (steps = gen_length / steps_per_token)"
            )
        settings["steps"] = task.gen_length // decoder.steps_per_token
    elif decoder.steps_per_token != 1:
        raise ValueError(
            f"decoder.steps_per_token={decoder.steps_per_token} is only read by rules with steps, "
            f"not decoder.rule={decoder.rule!r}"
        )
    return settings


def speculation_settings(decoder) -> dict:
    """`Speculation` keyword arguments of a decoder group (graph and prune come from the graph group)."""
    return {
        f.name: getattr(decoder, f.name)
        for f in dataclasses.fields(Speculation)
        if f.name not in GRAPH_OWNED
    }


AUTO = "auto"


@dataclass
class GraphConfig:
    source: str = "calibrate"
    # D; 0 runs the base decoder (the paper's D = 0 column); "auto": the D* in 0..max_budget and the lossless
    # layout predicted fastest on this device (spiffy.calibration.autotune). `Any`: OmegaConf has no int | str.
    budget: Any = AUTO
    max_budget: int = 10  # the largest D that budget=auto considers
    auto_margin: float = (
        0.03  # budget=auto keeps the base unless a graph is predicted this much faster
    )
    rule: str = "best"  # selection rule for source=calibrate
    n_samples: int = 20  # calibration prompts
    prune: int | None = None  # dynamic pruning: keep D* of the budget per forward
    path: str | None = None  # source=file
    horizon: int = 16
    root: str = (
        "runs/graphs"  # untracked; the committed graphs (results/graphs) are passed explicitly
    )

    def __post_init__(self) -> None:
        _choice("graph", "source", self.source, GRAPH_SOURCES)
        _choice("graph", "rule", self.rule, SELECTION_RULES)
        if self.budget == AUTO:
            if self.source not in ("calibrate", "dynamic"):
                raise ValueError(
                    f"graph.budget='auto' replays calibration trajectories: it needs graph.source='calibrate' "
                    f"(or 'dynamic', which adds dynamic graphs), not {self.source!r} (or give graph.budget=D)"
                )
            if self.prune is not None:
                raise ValueError(
                    f"graph.budget='auto' chooses the graph itself: graph.prune={self.prune} must be null "
                    "(or give graph.budget=D)"
                )
        elif not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 0:
            raise ValueError(f"graph.budget={self.budget!r} must be 'auto' or an integer >= 0")
        if not isinstance(self.max_budget, int) or self.max_budget < 1:
            raise ValueError(f"graph.max_budget={self.max_budget!r} must be an integer >= 1")
        if not 0 <= self.auto_margin < 1:
            raise ValueError(f"graph.auto_margin={self.auto_margin!r} must be in [0, 1)")
        if self.n_samples < 1:
            raise ValueError(f"graph.n_samples={self.n_samples} must be >= 1")
        if self.prune is not None:
            if self.prune < 1:
                raise ValueError(f"graph.prune={self.prune} must be >= 1 or null")
            if self.budget != AUTO and self.prune > self.budget:
                raise ValueError(
                    f"graph.prune={self.prune} keeps more nodes than graph.budget={self.budget} has "
                    f"(the maximum is {self.budget}, or null)"
                )
        if self.source == "file" and not self.path:
            raise ValueError("graph.source='file' needs graph.path")
        from spiffy.graph.builtin import check_budget

        budget = (
            self.max_budget if self.budget == AUTO else self.budget
        )  # auto calibrates up to max_budget
        check_budget(self.source, budget, self.rule, self.horizon)


@dataclass
class TrackingConfig:
    mode: str = "offline"
    project: str = "spiffy"
    entity: str | None = None
    dir: str = "runs/wandb"  # one folder per job key: <dir>/<job_key>/wandb/offline-run-*

    def __post_init__(self) -> None:
        _choice("tracking", "mode", self.mode, TRACKING_MODES)


@dataclass
class EvalConfig:
    compare_base: bool = True  # also run the base decoder per request: agreement and wall speedup
    threads: int = (
        1  # torch threads (0 = torch's default); recorded in every row (env.torch_threads)
    )
    progress: bool = True
    # requests decoded per forward (docs/algorithm.md §13; outputs unchanged): a positive integer, or "auto" (all
    # of lm-eval's requests in flight, up to 64). docs/results.md "Batched decoding" measures which is fastest here.
    batch_size: Any = 1
    # seconds any rank of a multi-process job (torchrun run.py, docs/distributed.md) waits for the others before
    # the job fails: it must cover rank 0's calibration and the slowest rank's share of the requests
    dist_timeout_s: int = 1800
    # the largest estimated memory of one verification forward (GiB; spiffy.lab.preflight): a graph budget whose
    # drafts need more is refused before the model loads, naming the largest budget that fits
    max_verify_gib: float = 8.0

    def __post_init__(self) -> None:
        if self.dist_timeout_s <= 0:
            raise ValueError(f"eval.dist_timeout_s={self.dist_timeout_s} must be > 0 (seconds)")
        if not self.max_verify_gib > 0 or self.max_verify_gib == float("inf"):
            raise ValueError(
                f"eval.max_verify_gib={self.max_verify_gib} must be a finite number > 0"
            )
        if self.threads < 0:
            raise ValueError(f"eval.threads={self.threads} must be >= 0 (0 = torch's default)")
        try:
            parse_batch_size(self.batch_size)
        except ValueError as error:
            raise ValueError(f"eval.{error}") from None


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
    # the user's result store (untracked): <results_dir>/<experiment_name>/<job_key>.json
    results_dir: str = "runs/results"
    force: bool = False  # rerun a job whose result row already exists

    def __post_init__(self) -> None:
        """Check the experiment name (a folder of the result store) and the decoder on this task (lengths,
        steps, rule parameters) before any model loads."""
        from spiffy.decoding.rules import RULES

        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(
                f"seed={self.seed!r} must be an integer in [0, 2**32) (numpy's seed range)"
            )
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.=,+-]*", self.experiment_name):
            raise ValueError(
                f"experiment_name={self.experiment_name!r} must be a folder name: letters, digits and "
                "_ . = , + - (not starting with '.' or '-')"
            )
        if self.model.block_size is not None:  # a block-causal model decodes in its own blocks
            self.task.block_length = self.model.block_size
        block_causal = self.model.block_size is not None
        rule = RULES.get(self.decoder.rule)  # an unknown rule is reported below
        if rule is not None and rule.block_causal != block_causal:
            kind = "block-causal (model.block_size is set)" if block_causal else "bidirectional"
            raise ValueError(
                f"decoder.rule={self.decoder.rule!r} does not fit model {self.model.name!r}, which is "
                f"{kind}: SDAR models take decoder=sdar|sdar_dynamic|spiffy_sdar_dynamic, others the rest"
            )
        try:
            GenerationConfig(**decoder_settings(self.decoder, self.task))
        except ValueError as e:
            msg = str(e)
            prefix = "task." if msg.split("=")[0] in TASK_OWNED[:2] else "decoder."
            raise ValueError(
                prefix + msg if not msg.startswith(("decoder.", "task.")) else msg
            ) from None
        if self.graph.budget == AUTO and self.decoder.speculate:
            check_auto(self.decoder)
        if isinstance(self.graph.budget, int) and self.decoder.speculate:
            check_budget_bound(self)


def check_device_name(device: str) -> None:
    """`model.device` must be a device torch can name (whether it is present is checked before loading)."""
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"model.device={device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)"
        ) from None


def lm_eval_tasks() -> list[str]:
    """The lm-eval task names a job can evaluate (the YAMLs in spiffy/eval/tasks/)."""
    from spiffy.eval.sandbox import task_specs

    return sorted(task_specs(TASKS_DIR))


def steps_per_block(cfg: RunConfig) -> int:
    """The most steps (transitions) a block of this job's decoder takes: the rule's per-block steps, else one
    token per step (`block_length`)."""
    gen = GenerationConfig(**decoder_settings(cfg.decoder, cfg.task))
    if gen.steps_per_block is not None:
        return min(gen.steps_per_block, gen.block_length)
    if gen.schedule_steps_per_block is not None:
        return min(gen.schedule_steps_per_block, gen.block_length)
    return gen.block_length


def check_budget_bound(cfg: RunConfig) -> None:
    """A graph budget no block can use is an error naming the maximum (never a silent clamp).

    `chain:D` drafts D steps ahead: deeper than a block's steps it can never be accepted (with
    `decoder.cross_block` a verified complete state carries into the next block, so the bound is the job's
    steps). A calibrated graph's nodes are (anchor, later state) pairs recorded on the calibration prompts: at
    most `n_samples x blocks x steps-per-block x min(horizon, steps-per-block)` distinct ones exist.
    """
    g, budget = cfg.graph, cfg.graph.budget
    if budget == 0:
        return
    steps = steps_per_block(cfg)
    blocks = -(-cfg.task.gen_length // cfg.task.block_length)
    if g.source == "chain":
        most = steps * blocks if cfg.decoder.cross_block else steps
        if budget > most:
            where = (
                "the job's steps (cross-block)" if cfg.decoder.cross_block else "a block's steps"
            )
            raise ValueError(
                f"graph.budget={budget} with graph.source='chain': chain:D drafts D steps ahead, and {where} "
                f"number {most}: the maximum is graph.budget={most}"
            )
    if g.source == "calibrate":
        most = g.n_samples * blocks * steps * min(g.horizon, steps)
        if g.rule == "best":
            most = max(most, g.horizon)  # 'best' also scores chain:D, recorded up to the horizon
        if budget > most:
            raise ValueError(
                f"graph.budget={budget}: calibration records at most {most} distinct draft states here "
                f"(graph.n_samples={g.n_samples} prompts x {blocks} blocks x {steps} steps x "
                f"{min(g.horizon, steps)} later states): the maximum is graph.budget={most}"
            )


def check_auto(decoder) -> None:
    """`graph.budget=auto` chooses among lossless layouts, for the plain walk: refuse what it cannot honour."""
    if not is_lossless(decoder.cache, decoder.verify):
        raise ValueError(
            f"graph.budget='auto' chooses among lossless layouts, but decoder.verify={decoder.verify!r} is "
            f"lossy with decoder.cache={decoder.cache!r} (use decoder.verify=exact or give graph.budget=D)"
        )
    if decoder.cross_block:
        raise ValueError(
            "graph.budget='auto' predicts the plain walk; decoder.cross_block=true needs graph.budget=D"
        )
    if get_cache_mode(decoder.cache).stores_blocks and (decoder.fuse_next or decoder.fuse_store):
        raise ValueError(
            f"graph.budget='auto' does not model the block-causal fusions (decoder.fuse_next="
            f"{decoder.fuse_next}, decoder.fuse_store={decoder.fuse_store}) yet: give graph.budget=D"
        )


def register_configs() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
