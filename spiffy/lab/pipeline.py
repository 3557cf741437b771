"""`run(cfg)`: the one place that wires a job together (docs/architecture.md, the lab): model → graph → lm-eval → metrics → logs.

1. validate the composed config (`OmegaConf.to_object` runs every `__post_init__`) before loading anything;
2. skip the job if the result store already has its row (unless `force`), printing the stored summary;
   otherwise claim its key so that an identical job started elsewhere skips;
3. load model and tokenizer (cached across the jobs of one multirun);
4. calibrate the draft graph or load it from the provenance-keyed cache;
5. evaluate the task through lm-eval with `SpiffyLM` (and the base decoder beside it, for agreement);
6. summarise, mirror to W&B (started before step 3, so a W&B that cannot start fails at once), write the
   result row (its own file, atomically: `spiffy.lab.results`), print a summary table and where the row went.

Under `torchrun --nproc-per-node N run.py` (docs/distributed.md) rank 0 decides skip/claim, calibrates, logs and
writes the one row; every rank loads the model on its own device and evaluates its share of the requests, whose
records rank 0 gathers (`spiffy.eval.distributed`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import time
import typing
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from spiffy.calibration.store import load_or_calibrate
from spiffy.decoding.block_decoder import DecoderOptions
from spiffy.decoding.build import build_decoder
from spiffy.decoding.speculative import Speculation
from spiffy.eval import distributed
from spiffy.eval.offline import MAX_BATCH_SIZE, resolve_batch_size
from spiffy.graph.builtin import chain, fig2, two_level_topk
from spiffy.graph.draft_graph import DraftGraph
from spiffy.lab import results as store
from spiffy.lab import tracking
from spiffy.lab.claims import Claim, try_claim
from spiffy.lab.preflight import preflight
from spiffy.lab.schema import (
    AUTO,
    TASKS_DIR,
    RunConfig,
    decoder_settings,
    speculation_settings,
)
from spiffy.models.loading import load_model, load_tokenizer

_MODELS: dict[tuple, tuple] = {}


def generation_kwargs(cfg: RunConfig) -> dict:
    """Base-decoder settings of a job: the decoder group on the task's lengths (`spiffy.lab.schema.decoder_settings`)."""
    return decoder_settings(cfg.decoder, cfg.task)


def load(cfg: RunConfig, device: str | None = None):
    """Model and tokenizer, cached per (path, dtype, device) across multirun jobs (`device`: this rank's)."""

    device = device or cfg.model.device
    key = (cfg.model.path, cfg.model.dtype, device)
    if key not in _MODELS:
        model = load_model(cfg.model.path, dtype=cfg.model.dtype, device=device)
        tokenizer = load_tokenizer(cfg.model.path)
        _MODELS[key] = (model, tokenizer)
    return _MODELS[key]


def calibration_prompts(cfg: RunConfig, tokenizer):
    """The calibration task's name and a callable returning its `graph.n_samples` encoded prompts.

    The prompts carry `task.num_fewshot` exemplars, as the evaluation's requests do (docs/conventions.md
    "Few-shot"); the name then ends in `-<k>shot`, so graphs calibrated on other prompts are not reused."""
    from spiffy.eval.offline import encode
    from spiffy.tasks.registry import TASKS

    calib_task = cfg.task.calibration_task or cfg.task.name
    if calib_task not in TASKS or TASKS[calib_task].calibration is None:
        raise ValueError(f"task.calibration_task={calib_task!r} has no calibration prompts")
    source, shots = TASKS[calib_task].calibration, cfg.task.num_fewshot
    if shots and not TASKS[calib_task].fewshot:
        raise ValueError(
            f"task.num_fewshot={shots}: calibration task {calib_task!r} has no few-shot exemplars"
        )

    def prompts():
        texts = source(cfg.graph.n_samples, cfg.seed, num_fewshot=shots)
        return [encode(tokenizer, text) for text in texts]

    return calib_task + (f"-{shots}shot" if shots else ""), prompts


def calibration_args(cfg: RunConfig, model, tokenizer, gen: dict) -> tuple[tuple, dict]:
    """The arguments `load_or_calibrate` and `autotune` share: model, base settings, calibration prompts and
    the `graph.*` settings that key the calibration."""
    from spiffy.decoding.config import GenerationConfig

    g = cfg.graph
    calib_task, prompts = calibration_prompts(cfg, tokenizer)
    shared = {
        "model_name": cfg.model.name,
        "task": calib_task,
        "n_samples": g.n_samples,
        "rule": g.rule,
        "seed": cfg.seed,
        "horizon": g.horizon,
        "draft_noise": cfg.decoder.draft_noise,
        "root": g.root,
        "force": cfg.force,
        "progress": cfg.eval.progress,
    }
    return (model, GenerationConfig(**gen), prompts), shared


def build_auto(cfg: RunConfig, model, tokenizer, gen: dict):
    """`graph.budget=auto`: the D* and lossless layout predicted fastest on this device (an `AutoChoice`);
    with `graph.source=dynamic`, among static and dynamic graphs."""
    from spiffy.calibration.autotune import autotune

    args, shared = calibration_args(cfg, model, tokenizer, gen)
    return autotune(
        *args,
        **shared,
        max_budget=cfg.graph.max_budget,
        margin=cfg.graph.auto_margin,
        batch_size=eval_batch(cfg),
        dynamic=cfg.graph.source == "dynamic",
    )


def eval_batch(cfg: RunConfig) -> int:
    """The batch size the evaluation decodes with (`eval.batch_size`; "auto": the task's requests, up to
    `spiffy.eval.offline.MAX_BATCH_SIZE`)."""
    return resolve_batch_size(cfg.eval.batch_size, cfg.task.limit or MAX_BATCH_SIZE)


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
    if g.source == "dynamic":  # drafts chosen per forward (docs/algorithm.md §5.10)
        return calibrate_dynamic_graph(cfg, model, tokenizer, gen)
    if g.source == "file":
        graph = DraftGraph.load(g.path)
        if graph.budget != g.budget:  # the row is named after graph.budget
            raise ValueError(
                f"graph.budget={g.budget} but graph.path={g.path!r} holds a graph of budget {graph.budget}"
            )
        return graph
    args, shared = calibration_args(cfg, model, tokenizer, gen)
    return load_or_calibrate(*args, **shared, budget=g.budget, cross_block=cfg.decoder.cross_block)


def calibrate_dynamic_graph(cfg: RunConfig, model, tokenizer, gen: dict):
    """`graph.source=dynamic`: a dynamic graph fitted to trajectories recorded on the calibration prompts."""
    from spiffy.calibration.dynamic import calibrate_dynamic
    from spiffy.calibration.trajectories import record_trajectories
    from spiffy.decoding.config import GenerationConfig

    t0 = time.perf_counter()
    calib_task, prompts = calibration_prompts(cfg, tokenizer)
    traj = record_trajectories(
        model,
        GenerationConfig(**gen),
        prompts(),
        horizon=max(cfg.graph.horizon, cfg.graph.budget),
        seed=cfg.seed,
        progress=cfg.eval.progress,
        draft_noise=cfg.decoder.draft_noise,
        features=3,
    )
    graph = calibrate_dynamic(traj, cfg.graph.budget, cross_block=cfg.decoder.cross_block)
    provenance = {"task": calib_task, "n_samples": cfg.graph.n_samples}
    provenance["calibration_s"] = time.perf_counter() - t0
    return dataclasses.replace(graph, provenance=provenance)


def sampling_kwargs(decoder) -> dict:
    """The decoder group's sampling as lm-eval `gen_kwargs`: they replace the task file's (`do_sample: false`,
    `temperature: 0.0`), which `SpiffyLM` honours per request, so the configured decoder is what runs."""
    out = {"do_sample": decoder.temperature > 0, "temperature": float(decoder.temperature)}
    out.update(
        {k: getattr(decoder, k) for k in ("top_k", "top_p") if getattr(decoder, k) is not None}
    )
    return out


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
        gen_kwargs=sampling_kwargs(cfg.decoder),
        log_samples=True,
        apply_chat_template=cfg.model.chat_template,
        bootstrap_iters=0,
    )


def unknown_keys(node: DictConfig, schema: type = RunConfig, prefix: str = "") -> list[str]:
    """Keys of a composed config that its schema lacks. Hydra adds `+key=value` overrides even to a typed
    config, and converting to the dataclass then drops them silently: a typo would run (and be keyed) as if
    it were not there."""
    hints = typing.get_type_hints(schema)
    found = []
    for key in node.keys():
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            found.append(f"{prefix}{key}{hint}")
        elif dataclasses.is_dataclass(hints[key]) and isinstance(node.get(key), DictConfig):
            found += unknown_keys(node.get(key), hints[key], f"{prefix}{key}.")
    return found


def typed_job(dict_cfg: DictConfig) -> tuple[RunConfig, dict]:
    """The validated typed config (every `__post_init__` runs: before any model loads) and, as a plain dict with
    the task presets filled in, what the job key and the result row record."""
    unknown = unknown_keys(dict_cfg)
    if unknown:
        raise ValueError(
            f"unknown config key{'s' * (len(unknown) > 1)} {', '.join(unknown)}: not in the schema "
            "(spiffy/lab/schema.py); a '+' cannot add settings spiffy does not read"
        )
    cfg: RunConfig = OmegaConf.to_object(dict_cfg)
    return cfg, OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def check_code_execution(cfg: RunConfig) -> None:
    """A task that executes generated code needs `task.allow_code_execution=true` (checked before loading)."""
    from spiffy.eval import sandbox

    sandbox.check_consent(
        cfg.task.lm_eval_task,
        TASKS_DIR,
        allow=cfg.task.allow_code_execution,
        allow_unisolated=cfg.task.allow_unisolated_execution,
    )


class ConfigError(ValueError):
    """A job refused before any model loads: a bad key or value, a model or graph file, the device, the store.
    Its message names the key and the value (or the path); `run.py` prints it as one line."""


def checked_job(dict_cfg: DictConfig) -> tuple[RunConfig, dict, str, Path]:
    """Every check that needs no model (schema, code-execution consent, `spiffy.lab.preflight`, a writable
    store): the typed config, its resolved dict, its job key and its experiment folder; else ConfigError."""
    try:
        cfg, resolved = typed_job(dict_cfg)
        check_code_execution(cfg)
        preflight(cfg)
        key = store.job_key(resolved)
        folder = store.experiment_dir(cfg.results_dir, cfg.experiment_name)
        store.check_writable(
            folder
        )  # a full disk or a read-only store fails now, not after the evaluation
    except (ValueError, OSError) as err:
        raise ConfigError(user_message(err)) from err
    return cfg, resolved, key, folder


def user_message(err: BaseException) -> str:
    """The innermost message of a validation error (OmegaConf wraps `__post_init__`'s ValueError)."""
    from omegaconf.errors import OmegaConfBaseException

    while isinstance(err, OmegaConfBaseException) and err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def run(dict_cfg: DictConfig) -> float:
    """Run one job and return its headline accuracy (the sweep objective; NaN while another process runs it).

    A job whose row is already stored is not rerun (unless `force`): its stored summary is printed. Otherwise it
    claims its key (`spiffy.lab.claims`), so an identical job started elsewhere skips instead of duplicating it.
    """
    cfg, resolved, key, folder = checked_job(
        dict_cfg
    )  # every rank: nothing is loaded before these pass
    ranks = distributed.join(cfg.model.device, timeout_s=cfg.eval.dist_timeout_s)
    if not ranks.is_main:  # rank 0 decides whether the job runs (store, claim) and tells the others
        go = distributed.share_from_rank0(ranks, "the job's start", lambda: None)
        return run_claimed(cfg, resolved, key, ranks) if go else float("nan")
    decide = lambda go: distributed.share_from_rank0(ranks, "the job's start", lambda: go)  # noqa: E731
    if not cfg.force and (found := store.finished(cfg.results_dir, cfg.experiment_name, key)):
        decide(False)
        return report_stored(cfg, key, *found)
    held = try_claim(folder, key)
    if not isinstance(held, Claim):
        decide(False)
        print(
            f"skip: job {key} is being run by pid {held.get('pid')} on {held.get('host')} "
            f"(claim {held['path']}); its row will be {store.row_path(folder.parent, folder.name, key)}"
        )
        return float("nan")
    with held:
        if not cfg.force and (found := store.finished(cfg.results_dir, cfg.experiment_name, key)):
            decide(False)
            return report_stored(cfg, key, *found)  # finished between the first look and the claim
        decide(True)
        return run_claimed(cfg, resolved, key, ranks)


def report_stored(cfg: RunConfig, key: str, row: dict, path: Path) -> float:
    """A finished job: print its stored summary (re-uploading it to W&B if its logging had failed)."""
    print(f"skip: job {key} already done; its row is in {path} (force=true reruns it)")
    wandb_info = row.get("wandb")
    if (wandb_info or {}).get("status") == "failed" and cfg.tracking.mode != "disabled":
        tracker = tracking.start(cfg.tracking, **tracking_args(cfg, row["config"], key, row["env"]))
        try:
            wandb_info = tracker.log_job(row["metrics"])
        except Exception as err:
            raise tracking.TrackingError(
                f"W&B logging of the stored row {path} failed again: {err}"
            ) from err
        store.write_row(cfg.results_dir, {**row, "wandb": wandb_info})
    env = {
        "dtype": row.get("dtype"),
        **(row.get("env") or {}),
    }  # rows before 2026-11 kept dtype outside env
    print_summary(row.get("name", key), row["metrics"], env)
    print(tracking.describe(wandb_info))
    return float(row["metrics"].get("accuracy", float("nan")))


def tracking_args(cfg: RunConfig, resolved: dict, key: str, env: dict) -> dict:
    return dict(
        config=tracking.run_config(resolved, job_key=key, env=env),
        name=f"{resolved['model']['name']}-{job_name(resolved)}",  # the row's name, model first
        run_id=key,
        group=cfg.experiment_name,
        job_type=cfg.decoder.name,
        tags=tracking.run_tags(resolved, speculates=store.speculates(resolved)),
        job_dir=Path(cfg.tracking.dir) / key,
    )


def job_name(resolved: dict) -> str:
    budget = resolved["graph"]["budget"] if store.speculates(resolved) else 0
    return f"{resolved['task']['name']}-{resolved['decoder']['name']}-D{budget}"


def run_claimed(
    cfg: RunConfig, resolved: dict, key: str, ranks: distributed.Ranks | None = None
) -> float:
    """Evaluate a claimed job: W&B first (fail fast), then model, graph, lm-eval, the row, the summary.

    With several processes every rank evaluates its share; only rank 0 opens W&B, writes the row and prints."""
    ranks = ranks or distributed.Ranks(device=cfg.model.device)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if cfg.eval.threads:
        torch.set_num_threads(cfg.eval.threads)
    torch.manual_seed(cfg.seed)
    env = store.environment(ranks.device, cfg.model.dtype, cfg.decoder.invariant)
    if ranks.distributed:  # one row for the whole job: where each rank ran
        env = {**env, **distributed_env(ranks, env)}
    tracker = distributed.checked(  # rank 0 alone logs; a W&B that cannot start stops every rank
        ranks,
        "starting W&B",
        lambda: (
            tracking.start(cfg.tracking, **tracking_args(cfg, resolved, key, env))
            if ranks.is_main
            else None
        ),
    )
    if not ranks.is_main:
        evaluate_job(cfg, ranks)
        return float("nan")
    try:
        metrics, graph, records, *extra = evaluate_job(cfg, ranks)
    except BaseException:
        tracker.abort()
        raise
    auto = extra[0] if extra else None  # graph.budget=auto: the AutoChoice
    lm_results = extra[1] if len(extra) > 1 else None
    name = job_name(resolved) + (str(auto.budget) if auto is not None else "")
    row = {
        "job_key": key,
        "experiment": cfg.experiment_name,
        "name": name,
        "config": resolved,
        "metrics": metrics,
        "env": env,
        "dtype": cfg.model.dtype,
        "softmax_dtype": cfg.decoder.softmax_dtype,
        "graph": graph.to_json() if graph is not None else None,
        "auto": auto.to_dict() if auto is not None else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "requests": request_rows(records),
    }
    if (
        lm_results is not None
    ):  # lm-eval's own files beside the row (tracking=disabled keeps them too)
        row["lm_eval"] = write_lm_eval_files(cfg, key, lm_results)
    samples = [
        {
            "request_id": r.request_id,
            "completion": r.completion,
            "nfe": r.stats.nfe,
            "agrees": r.agrees,
        }
        for r in records
    ]
    try:
        row["wandb"] = tracker.log_job(metrics, samples)
    except Exception as err:
        row["wandb"] = tracker.failed(err)
        path = store.write_row(cfg.results_dir, row)
        raise tracking.TrackingError(
            f"job {key} finished and its row is saved in {path}, but W&B logging failed "
            f"({type(err).__name__}: {err}). The row is marked wandb.status=failed: rerunning the same "
            "command uploads it from the row without re-evaluating (tracking=disabled skips W&B)."
        ) from err
    path = store.write_row(cfg.results_dir, row)
    print_summary(name, metrics, env)
    if auto is not None:  # the chosen D* and why, in one line, under the measured ratio
        print(auto.reason)
    print(f"row: {path}")
    print(tracking.describe(row["wandb"]))
    return float(metrics["accuracy"])


def distributed_env(ranks: distributed.Ranks, env: dict) -> dict:
    """The row's `env` additions of a multi-process job: world size, and every rank's device, its name and host."""
    where = distributed.all_gather(ranks, (ranks.device, env["device_name"], env["host"]))
    return {
        "world_size": ranks.world_size,
        "devices": [device for device, _, _ in where],
        "device_names": [name for _, name, _ in where],
        "hosts": [host for _, _, host in where],
    }


def choose_graph(cfg: RunConfig, model, tokenizer, gen: dict):
    """The job's graph and, with `graph.budget=auto`, the `AutoChoice` (graph None: the base decoder)."""
    if cfg.decoder.speculate and cfg.graph.budget == AUTO:
        auto = build_auto(cfg, model, tokenizer, gen)
        return auto.graph, auto
    return (build_graph(cfg, model, tokenizer, gen) if cfg.decoder.speculate else None), None


def job_decoder(cfg: RunConfig, model, gen: dict, graph, auto, prune: int | None = None):
    """The job's decoder on `gen` (its base settings, possibly changed): Spiffy over it with `graph` (the
    layout `auto` chose, and `prune`, default `graph.prune`), or the base decoder for graph None."""
    options = DecoderOptions(compile=cfg.decoder.compile, invariant=cfg.decoder.invariant)
    if graph is None:
        return build_decoder(model, **gen, options=options)
    spec_options = speculation_settings(cfg.decoder)
    if auto is not None:
        spec_options["verify"] = auto.layout
    prune = cfg.graph.prune if prune is None else prune
    speculate = Speculation(graph, prune=prune, **spec_options)
    return build_decoder(model, **gen, options=options, speculate=speculate)


def request_rows(records) -> list[dict]:
    """Per-request records for the row (request order, whatever the number of processes): what two runs compare."""
    return [
        {
            "request_id": r.request_id,
            "tokens_sha256": r.tokens_sha256,
            "nfe": r.stats.nfe,
            "nfe_base": r.stats.nfe_base,
            "base_nfe": r.base_stats.nfe if r.base_stats is not None else None,
            "agrees": r.agrees,
            "wall_s": r.stats.wall_s,
            "completion": r.completion,
        }
        for r in records
    ]


def evaluate_job(cfg: RunConfig, ranks: distributed.Ranks | None = None):
    """Model -> graph -> lm-eval: the job's metrics, its graph (None without drafts), per-request records, and
    with `graph.budget=auto` the `AutoChoice` (D* = 0 runs the base, still measured beside a second instance).

    With several processes (`ranks`), rank 0 alone calibrates (or loads) the graph and sends it to the others,
    every rank evaluates its share of the requests, and rank 0 gathers the records and returns the job's
    results; the other ranks return None."""
    from spiffy.eval.harness import SpiffyLM, spiffy_metrics
    from spiffy.lab.metrics import summarize, task_scores

    ranks = ranks or distributed.Ranks(device=cfg.model.device)
    t_load = time.perf_counter()
    model, tokenizer = distributed.checked(ranks, "model loading", lambda: load(cfg, ranks.device))
    load_s = time.perf_counter() - t_load
    gen = generation_kwargs(cfg)
    t0 = time.perf_counter()
    graph, auto = distributed.share_from_rank0(
        ranks, "calibration", lambda: choose_graph(cfg, model, tokenizer, gen)
    )
    graph_s = time.perf_counter() - t0
    if (
        isinstance(graph, DraftGraph) and auto is None and len(graph.nodes) < graph.budget
    ):  # said, not clamped
        print(
            f"note: graph.budget={graph.budget}, but calibration found {len(graph.nodes)} nodes worth drafting: "
            f"the graph has {len(graph.nodes)} (the row records it as graph_nodes)"
        )
    base = job_decoder(cfg, model, gen, None, None)
    decoder = base
    if graph is not None or auto is not None:
        decoder = job_decoder(cfg, model, gen, graph, auto)
    lm = SpiffyLM(
        decoder,
        tokenizer,
        base=base if cfg.eval.compare_base and decoder is not base else None,
        seed=cfg.seed,
        chat_template=cfg.model.chat_template,
        progress=cfg.eval.progress,
        batch_size=eval_batch(cfg),
        ranks=ranks,
    )
    t_eval = time.perf_counter()
    results = evaluate_task(cfg, lm)
    rank_eval_s = time.perf_counter() - t_eval
    shares = distributed.gather(ranks, (lm.records, lm.batches, rank_eval_s))
    eval_s = time.perf_counter() - t_eval  # the phase ends when the slowest rank's records arrive
    if not ranks.is_main:
        return None
    records = distributed.merge_in_request_order([r for r, _, _ in shares])
    batches = [b for _, rank_batches, _ in shares for b in rank_batches]
    metrics = summarize(records, task_scores(results, cfg.task.lm_eval_task))
    metrics["world_size"] = ranks.world_size
    metrics["load_s"] = load_s
    metrics["eval_s"] = (
        eval_s  # wall-clock of the evaluation phase (all ranks; startup and calibration apart)
    )
    metrics["eval_s_max_rank"] = max(s for _, _, s in shares)
    lm.records = records  # every rank's, in request order
    spiffy_metrics(results, lm)  # Spiffy's numbers in lm-eval's own results and samples
    metrics["batch_size"] = eval_batch(cfg)
    if batches:  # batched decoding (docs/algorithm.md §13): forwards and what each carried
        forwards = sum(b.forwards for b in batches)
        metrics["batch_forwards"] = forwards
        metrics["batch_calls_per_forward"] = (
            sum(sum(b.calls_per_forward) for b in batches) / forwards
        )
        metrics["batch_rows_per_forward"] = sum(sum(b.rows_per_forward) for b in batches) / forwards
    # a cached graph loads in milliseconds: report the calibration it came from (docs/algorithm.md §5.5 step 3 provenance)
    provenance = graph.provenance if graph is not None else {}
    metrics["graph_load_s"] = graph_s
    metrics["calibration_s"] = provenance.get("calibration_s", graph_s)
    if "predicted_speedup_nfe" in provenance:
        metrics["calibration_speedup_nfe"] = provenance["predicted_speedup_nfe"]
    # a dynamic graph drafts `budget` of its pool's nodes per forward
    metrics["graph_nodes"] = (
        0 if graph is None else len(graph.nodes) if isinstance(graph, DraftGraph) else graph.budget
    )
    if auto is not None:
        metrics["auto_budget"] = auto.budget
        metrics["predicted_speedup_wall"] = auto.predicted_speedup_wall
        metrics["predicted_speedup_nfe"] = auto.predicted_speedup_nfe
    return metrics, graph, records, auto, results


def write_lm_eval_files(cfg: RunConfig, key: str, results: dict) -> dict:
    """lm-eval's `results_<time>.json` and `samples_<task>_<time>.jsonl` (as its CLI names them, with Spiffy's
    numbers added by `spiffy_metrics`) in `<results_dir>/<experiment>/<job_key>.lm_eval/`; returns their paths."""
    import json

    from lm_eval.utils import handle_non_serializable

    folder = store.row_path(cfg.results_dir, cfg.experiment_name, key).with_suffix(".lm_eval")
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
    samples = results.get("samples", {})
    summary = {k: v for k, v in results.items() if k != "samples"}
    paths = {"results": folder / f"results_{stamp}.json", "samples": []}
    dump = lambda obj: json.dumps(obj, default=handle_non_serializable, ensure_ascii=False)  # noqa: E731
    store.atomic_write_text(paths["results"], json.dumps(json.loads(dump(summary)), indent=2))
    for task, rows in samples.items():
        path = folder / f"samples_{task}_{stamp}.jsonl"
        store.atomic_write_text(path, "".join(dump(r) + "\n" for r in rows))
        paths["samples"].append(path)
    return {"results": str(paths["results"]), "samples": [str(p) for p in paths["samples"]]}


def print_summary(name: str, metrics: dict, env: dict | None = None) -> None:
    """The job's headline metrics as a table, captioned with where they were measured."""
    from rich.console import Console
    from rich.table import Table

    env = env or {}
    caption = (
        f"{env.get('device', '?')} ({env.get('device_name', '?')}), {env.get('dtype') or '?'}, "
        f"{env.get('torch_threads', '?')} torch thread(s)"
    )
    table = Table(title=f"spiffy: {name}", caption=caption)
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
    Console(width=120).print(table)
