"""`run(cfg)`: the one place that wires a job together (STYLE §4): model → graph → lm-eval → metrics → logs.

1. validate the composed config (`OmegaConf.to_object` runs every `__post_init__`) before loading anything;
2. skip the job if the result store already has its row (unless `force`);
3. load model and tokenizer (cached across the jobs of one multirun);
4. calibrate the draft graph or load it from the provenance-keyed cache;
5. evaluate the task through lm-eval with `SpiffyLM` (and the base decoder beside it, for agreement);
6. summarise, append the result row, mirror to W&B, print a summary table.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from spiffy import results as store
from spiffy.api import build_decoder
from spiffy.config import AUTO, RunConfig, decoder_settings, speculation_settings
from spiffy.decoding.speculative import Speculation
from spiffy.graph.builtin import chain, fig2, two_level_topk
from spiffy.graph.draft_graph import DraftGraph
from spiffy.graph.store import load_or_calibrate
from spiffy.models.loading import load_model, load_tokenizer

TASKS_DIR = Path(__file__).resolve().parent / "eval" / "tasks"
_MODELS: dict[tuple, tuple] = {}


def generation_kwargs(cfg: RunConfig) -> dict:
    """Base-decoder settings of a job: the decoder group on the task's lengths (`spiffy.config.decoder_settings`)."""
    return decoder_settings(cfg.decoder, cfg.task)


def load(cfg: RunConfig):
    """Model and tokenizer, cached per (path, dtype, device) across multirun jobs."""

    key = (cfg.model.path, cfg.model.dtype, cfg.model.device)
    if key not in _MODELS:
        model = load_model(cfg.model.path, dtype=cfg.model.dtype, device=cfg.model.device)
        tokenizer = load_tokenizer(cfg.model.path)
        _MODELS[key] = (model, tokenizer)
    return _MODELS[key]


def calibration_prompts(cfg: RunConfig, tokenizer):
    """The calibration task's name and a callable returning its `graph.n_samples` encoded prompts."""
    from spiffy.eval.offline import encode
    from spiffy.tasks.registry import TASKS

    calib_task = cfg.task.calibration_task or cfg.task.name
    if calib_task not in TASKS or TASKS[calib_task].calibration is None:
        raise ValueError(f"task.calibration_task={calib_task!r} has no calibration prompts")
    source = TASKS[calib_task].calibration

    def prompts():
        return [encode(tokenizer, text) for text in source(cfg.graph.n_samples, cfg.seed)]

    return calib_task, prompts


def build_auto(cfg: RunConfig, model, tokenizer, gen: dict):
    """`graph.budget=auto`: the D* and lossless layout predicted fastest on this device (an `AutoChoice`)."""
    from spiffy.decoding.config import GenerationConfig
    from spiffy.graph.autotune import autotune

    g = cfg.graph
    calib_task, prompts = calibration_prompts(cfg, tokenizer)
    return autotune(
        model,
        GenerationConfig(**gen),
        prompts,
        model_name=cfg.model.name,
        task=calib_task,
        n_samples=g.n_samples,
        max_budget=g.max_budget,
        margin=g.auto_margin,
        rule=g.rule,
        seed=cfg.seed,
        horizon=g.horizon,
        draft_noise=cfg.decoder.draft_noise,
        root=g.root,
        force=cfg.force,
        progress=cfg.eval.progress,
    )


def build_graph(cfg: RunConfig, model, tokenizer, gen: dict) -> DraftGraph | None:
    """The job's draft graph, or None for budget 0 (the base decoder)."""
    g = cfg.graph
    if g.budget == 0:
        return None
    if g.source == "chain":
        return chain(g.budget)
    if g.source == "topk":
        return two_level_topk(max(1, g.budget // 2))
    if g.source == "fig2":
        return fig2()
    if g.source == "file":
        return DraftGraph.load(g.path)
    from spiffy.decoding.config import GenerationConfig

    calib_task, prompts = calibration_prompts(cfg, tokenizer)
    return load_or_calibrate(
        model,
        GenerationConfig(**gen),
        prompts,
        model_name=cfg.model.name,
        task=calib_task,
        n_samples=g.n_samples,
        budget=g.budget,
        rule=g.rule,
        draft_noise=cfg.decoder.draft_noise,
        seed=cfg.seed,
        horizon=g.horizon,
        root=g.root,
        force=cfg.force,
        progress=cfg.eval.progress,
    )


def evaluate_task(cfg: RunConfig, lm) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    return simple_evaluate(
        model=lm,
        tasks=[cfg.task.lm_eval_task],
        num_fewshot=cfg.task.num_fewshot,
        limit=cfg.task.limit,
        task_manager=manager,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
        confirm_run_unsafe_code=cfg.task.allow_code_execution,
        log_samples=False,
        apply_chat_template=cfg.model.chat_template,
        bootstrap_iters=0,
    )


def check_code_execution(cfg: RunConfig) -> None:
    """A task that executes generated code needs `task.allow_code_execution=true` (checked before loading)."""
    from spiffy.eval import sandbox

    sandbox.check_consent(
        cfg.task.lm_eval_task,
        TASKS_DIR,
        allow=cfg.task.allow_code_execution,
        allow_unisolated=cfg.task.allow_unisolated_execution,
    )


def run(dict_cfg: DictConfig) -> float:
    """Run one job and return its headline accuracy (the sweep objective)."""
    cfg: RunConfig = OmegaConf.to_object(dict_cfg)  # semantic validation, before any model loads
    check_code_execution(cfg)
    # the typed config, task presets filled in: what the job key and the result row record
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    results_path = Path(cfg.results_dir) / f"{cfg.experiment_name}.jsonl"
    key = store.job_key(resolved)
    if not cfg.force and (row := store.finished(results_path, key)) is not None:
        print(f"skip: job {key} already in {results_path} (force=true reruns it)")
        return float(row["metrics"].get("accuracy", float("nan")))
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if cfg.eval.threads:
        torch.set_num_threads(cfg.eval.threads)
    torch.manual_seed(cfg.seed)
    from spiffy.eval.harness import SpiffyLM
    from spiffy.metrics import summarize, task_scores
    from spiffy.tracking import track

    model, tokenizer = load(cfg)
    gen = generation_kwargs(cfg)
    t0 = time.perf_counter()
    auto = None  # graph.budget=auto: the graph and layout chosen for this device
    if cfg.decoder.speculate and cfg.graph.budget == AUTO:
        auto = build_auto(cfg, model, tokenizer, gen)
        graph = auto.graph
    else:
        graph = build_graph(cfg, model, tokenizer, gen) if cfg.decoder.speculate else None
    graph_s = time.perf_counter() - t0
    base = build_decoder(model, **gen)
    decoder = base
    if graph is not None:
        options = speculation_settings(cfg.decoder)
        if auto is not None:
            options["verify"] = auto.layout
        decoder = build_decoder(
            model, **gen, speculate=Speculation(graph, prune=cfg.graph.prune, **options)
        )
    elif auto is not None:  # D* = 0 is the base itself; a second instance still measures the ratio
        decoder = build_decoder(model, **gen)
    lm = SpiffyLM(
        decoder,
        tokenizer,
        base=base if cfg.eval.compare_base and decoder is not base else None,
        seed=cfg.seed,
        chat_template=cfg.model.chat_template,
        progress=cfg.eval.progress,
    )
    results = evaluate_task(cfg, lm)
    metrics = summarize(lm.records, task_scores(results, cfg.task.lm_eval_task))
    # a cached graph loads in milliseconds: report the calibration it came from (SPEC §5.5 step 3 provenance)
    provenance = graph.provenance if graph is not None else {}
    metrics["graph_load_s"] = graph_s
    metrics["calibration_s"] = provenance.get("calibration_s", graph_s)
    if "predicted_speedup_nfe" in provenance:
        metrics["calibration_speedup_nfe"] = provenance["predicted_speedup_nfe"]
    metrics["graph_nodes"] = len(graph.nodes) if graph is not None else 0
    budget = f"auto{auto.budget}" if auto is not None else (cfg.graph.budget if graph else 0)
    name = f"{cfg.task.name}-{cfg.decoder.name}-D{budget}"
    if auto is not None:
        metrics["auto_budget"] = auto.budget
        metrics["predicted_speedup_wall"] = auto.predicted_speedup_wall
        metrics["predicted_speedup_nfe"] = auto.predicted_speedup_nfe
    row = {
        "job_key": key,
        "experiment": cfg.experiment_name,
        "name": name,
        "config": resolved,
        "metrics": metrics,
        "env": store.environment(cfg.model.device),
        "dtype": cfg.model.dtype,
        "softmax_dtype": cfg.decoder.softmax_dtype,
        "graph": graph.to_json() if graph is not None else None,
        "auto": auto.to_dict() if auto is not None else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    store.append_row(results_path, row)
    job_dir = Path(cfg.tracking.dir) / "wandb_jobs" / key
    with track(
        cfg.tracking, config=resolved, name=name, group=cfg.experiment_name, job_dir=job_dir
    ) as log:
        log(
            metrics,
            [
                {
                    "request_id": r.request_id,
                    "completion": r.completion,
                    "nfe": r.stats.nfe,
                    "agrees": r.agrees,
                }
                for r in lm.records
            ],
        )
    print_summary(name, metrics, auto.reason if auto is not None else None)
    return float(metrics["accuracy"])


def print_summary(name: str, metrics: dict, note: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"spiffy: {name}")
    for column in (
        "accuracy",
        "nfe",
        "nfe base",
        "NFE speedup",
        "tokens/s",
        "wall speedup",
        "agreement",
        "overhead",
    ):
        table.add_column(column, justify="right")

    def fmt(key, spec):
        value = metrics.get(key)
        return "-" if value is None else format(value, spec)

    table.add_row(
        fmt("accuracy", ".3f"),
        fmt("nfe_mean", ".1f"),
        fmt("nfe_base_mean", ".1f"),
        fmt("speedup_nfe", ".2f") + "x",
        fmt("tokens_per_s", ".1f"),
        fmt("speedup_wall", ".2f") + "x",
        fmt("agreement", ".3f"),
        fmt("overhead_share", ".1%"),
    )
    console = Console(width=120)
    console.print(table)
    if note:  # graph.budget=auto: the chosen D* and why, next to the measured ratio above
        console.print(note, soft_wrap=True, markup=False)
