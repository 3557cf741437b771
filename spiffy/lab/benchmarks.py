"""Side-by-side benchmarks in one process (docs/algorithm.md §7): decoders interleaved per prompt, and the cost curve.

Decoder specs are `<base>` or `<base>+spiffy[@<graph>][/shared|/cross|/fused]`, where `<base>` is a decoder preset
of spiffy/conf/decoder with optional overrides, `<preset>[:key=value,...]` (`spiffy.lab.presets`; e.g.
`multi_token:tau=0.8`, `kv_cache:cache=prefix`, `sdar:fuse_next=true`), and `<graph>` is a spec string (`chain:10`, `fig2`), a JSON path, or `calibrated:<D>[:<rule>]`
(calibrated for that base on the task's calibration split, cached in `$GRAPH_ROOT`, default runs/graphs;
scripts/reproduce_results.sh sets results/graphs); `/shared` is the paper's
near-lossless layout, `/cross` continues the walk across blocks (docs/algorithm.md §5.4), `/fused` (SDAR) stores a finished
block from the forward that verified it (docs/algorithm.md §12). Ratios are against the first spec's decoder.
`cost_curve` times one forward against the number of query rows (1 + D drafts) for the exact layout (full
canvases) and the dual cache (block rows): the curve that decides when fewer NFE means less wall-clock.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field

import pandas as pd
import torch
from tqdm.auto import tqdm

from spiffy.calibration.store import load_or_calibrate
from spiffy.decoding.batching import CallStacker
from spiffy.decoding.block_decoder import BlockDecoder, DecoderOptions
from spiffy.decoding.build import build_decoder
from spiffy.decoding.config import GenerationConfig
from spiffy.decoding.speculative import Speculation
from spiffy.decoding.strategies import STRATEGIES
from spiffy.eval.offline import completion_text, encode
from spiffy.lab.presets import preset_generation, preset_settings
from spiffy.lab.profiling import peak_memory, reads_between_forwards
from spiffy.models.loading import model_spec
from spiffy.tasks.arith import format_prompt
from spiffy.tasks.registry import TASKS
from spiffy.tasks.scoring import is_correct


@dataclass
class DecoderSpec:
    """A parsed decoder spec."""

    label: str
    base: str
    graph: str | None = None
    verify: str = "exact"
    cross_block: bool = False
    fuse_store: bool = False

    @classmethod
    def parse(cls, text: str, default_graph: str) -> DecoderSpec:
        base, _, spiffy = text.partition("+")
        _, speculation = preset_settings(base)  # raises for an unknown preset or key, naming it
        if speculation.get("speculate") and not spiffy:
            raise ValueError(
                f"decoder spec {text!r}: that preset speculates; the bench writes Spiffy over a base "
                "as '<base>+spiffy[@graph]' (e.g. kv_cache+spiffy for spiffy_kv_cache)"
            )
        if not spiffy:
            return cls(text, base)
        if not spiffy.startswith("spiffy"):
            raise ValueError(
                f"decoder spec {text!r}: expected '<base>+spiffy[@graph][/shared|/cross|/fused]'"
            )
        rest, layout = spiffy[len("spiffy") :], ""
        for option in ("shared", "cross", "fused"):  # a suffix: graph JSON paths contain '/' too
            if rest.endswith(f"/{option}"):
                rest, layout = rest.removesuffix(f"/{option}"), option
        if rest and not rest.startswith("@"):
            raise ValueError(
                f"decoder spec {text!r}: expected '<base>+spiffy[@graph][/shared|/cross|/fused]'"
            )
        graph = rest[1:] if rest.startswith("@") else default_graph
        verify = "shared" if layout == "shared" else "exact"
        return cls(
            text, base, graph, verify, cross_block=layout == "cross", fuse_store=layout == "fused"
        )


def generation_for(task: str, base: str, temperature: float, **overrides) -> dict:
    """The task's preset with the base decoder's settings (`<preset>[:key=value,...]`, a preset of
    spiffy/conf/decoder) and `overrides` (GenerationConfig fields): `spiffy.lab.presets.preset_generation`."""
    return preset_generation(task, base, temperature, **overrides)


def make_decoder(
    model,
    tok,
    spec: DecoderSpec,
    *,
    task: str,
    temperature: float,
    model_name: str,
    n_calib: int = 20,
    overrides: dict | None = None,
) -> BlockDecoder:
    """The decoder of `spec` around `model`, timing the model through CUDA events on a GPU."""
    gen = generation_for(task, spec.base, temperature, **(overrides or {}))
    gen["options"] = DecoderOptions(profile=True)
    if spec.graph is None:
        return build_decoder(model, **gen)
    graph = spec.graph
    if graph.startswith("calibrated:"):
        parts = graph.split(":")
        budget, rule = int(parts[1]), parts[2] if len(parts) > 2 else "degree1"

        def prompts():
            return [encode(tok, t) for t in TASKS[task].calibration(n_calib, 0)]

        graph = load_or_calibrate(
            model,
            GenerationConfig(**{k: v for k, v in gen.items() if k != "options"}),
            prompts,
            model_name=model_name,
            task=task,
            n_samples=n_calib,
            budget=budget,
            rule=rule,
            cross_block=spec.cross_block,
            root=os.environ.get("GRAPH_ROOT", "runs/graphs"),
            progress=False,
        )
    speculation = Speculation(
        graph, verify=spec.verify, cross_block=spec.cross_block, fuse_store=spec.fuse_store
    )
    return build_decoder(model, **gen, speculate=speculation)


@dataclass
class BenchRow:
    label: str
    nfe: list[int] = field(default_factory=list)
    transitions: list[int] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(
        default_factory=list
    )  # this thread's CPU time: robust on a shared machine
    tokens: list[int] = field(default_factory=list)
    model_s: float = 0.0
    overhead_s: float = 0.0
    correct: list[bool] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)


def run_side_by_side(
    decoders: dict[str, BlockDecoder], tok, problems: list[dict], *, seed: int = 0, warmup: int = 1
) -> dict[str, BenchRow]:
    """Decode every problem with every decoder, interleaved per problem (same noise, same prompts)."""
    prompts = [encode(tok, format_prompt(p["question"])) for p in problems]
    for decoder in decoders.values():  # warm up allocators and kernels
        for prompt in prompts[:warmup]:
            decoder.generate(prompt, request_id="warmup", seed=seed)
    rows = {label: BenchRow(label) for label in decoders}
    order = torch.Generator().manual_seed(seed)
    labels = list(decoders)
    for i, (prompt, problem) in enumerate(tqdm(list(zip(prompts, problems)), desc="bench")):
        for k in torch.randperm(len(labels), generator=order).tolist():  # a fresh order per prompt
            label, decoder = labels[k], decoders[labels[k]]
            cpu = time.thread_time()
            result = decoder.generate(prompt, request_id=i, seed=seed)
            s, row = result.stats, rows[label]
            row.cpu_s.append(time.thread_time() - cpu)
            row.nfe.append(s.nfe)
            row.transitions.append(s.nfe_base)  # the base's calls: transitions (+ SDAR's)
            row.wall_s.append(s.wall_s)
            row.tokens.append(s.generated_tokens)
            row.model_s += s.model_s
            row.overhead_s += s.overhead_s
            text = completion_text(tok, result.tokens, decoder.spec.eos_id)
            row.correct.append(is_correct(text, problem["target"]))
            row.outputs.append(result.tokens)
    return rows


def summarize_rows(rows: dict[str, BenchRow], bases: dict[str, str]) -> list[dict]:
    """One dict per decoder; ratios against the first row; agreement against the row's own base."""
    ref = next(iter(rows.values()))
    ref_nfe, ref_wall = sum(ref.nfe), sum(ref.wall_s)
    out = []
    for label, row in rows.items():
        base_row = rows.get(bases.get(label, ""), None)
        agree = (
            (
                sum(torch.equal(a, b) for a, b in zip(row.outputs, base_row.outputs))
                / len(row.outputs)
            )
            if base_row is not None and base_row is not row
            else None
        )
        out.append(
            {
                "decoder": label,
                "accuracy": sum(row.correct) / len(row.correct),
                "nfe_mean": statistics.mean(row.nfe),
                "speedup_nfe_vs_first": ref_nfe / sum(row.nfe),
                "speedup_nfe_vs_own_base": sum(row.transitions) / sum(row.nfe),
                "wall_ms_median": 1000 * statistics.median(row.wall_s),
                "speedup_wall_vs_first": ref_wall / sum(row.wall_s),
                "speedup_wall_vs_own_base": (
                    sum(base_row.wall_s) / sum(row.wall_s) if base_row is not None else None
                ),
                "cpu_ms_median": 1000 * statistics.median(row.cpu_s),
                "speedup_cpu_vs_own_base": (
                    sum(base_row.cpu_s) / sum(row.cpu_s) if base_row is not None else None
                ),
                "tokens_per_s": sum(row.tokens) / sum(row.wall_s),
                "model_share_of_wall": row.model_s / sum(row.wall_s),
                "overhead_share_of_model": row.overhead_s / row.model_s if row.model_s else 0.0,
                "agreement_with_base": agree,
            }
        )
    return out


LAYOUTS = {  # cost-curve layout -> (cache mode, verification layout); docs/algorithm.md §5.3
    "exact": ("none", "exact"),
    "shared": ("none", "shared"),
    "prefix": ("prefix", "exact"),
    "dual": ("dual", "exact"),
    "block_causal": ("block_causal", "exact"),  # SDAR: one block of rows against its exact cache
}


def cost_curve(
    model,
    canvas_len: int,
    block_len: int,
    drafts: list[int],
    *,
    repeats: int = 15,
    layouts: tuple[str, ...] = ("exact", "dual"),
    warmup: int = 1,
) -> list[dict]:
    """Median time of one in-block verification forward with 1 + D states, per layout (`LAYOUTS`), and of the
    layout's block-start forward (full canvas, no drafts).

    Every round times each D once, in a fresh order, so that a slow phase of the machine (other processes,
    frequency changes) hits all D alike instead of a contiguous run of them; the first `warmup` rounds only
    warm up. On a CPU the clock is the thread's CPU time (torch at one thread), which other processes on a
    shared machine do not inflate; on a GPU it is wall time.
    """
    mask_id = int(model.config.mask_token_id)
    device = next(model.parameters()).device
    canvas = torch.randint(0, mask_id, (canvas_len,), device=device)
    block = slice(canvas_len - 2 * block_len, canvas_len - block_len)
    order = torch.Generator().manual_seed(0)

    # on a CPU the calling thread's CPU time (the forward runs on it; other processes on a shared machine do
    # not count), on a GPU the wall time between synchronisations
    clock = time.thread_time if device.type == "cpu" else time.perf_counter

    def timed(fn, *args) -> float:
        synchronize(device)
        t = clock()
        fn(*args)
        synchronize(device)
        return clock() - t

    rows = []
    for layout in layouts:
        cache, verify = LAYOUTS[layout]
        # (LLaDA2's block-causal mask comes from the block length)
        strategy = STRATEGIES[cache](model, block_length=block_len)
        if strategy.stores_blocks:  # SDAR: the positions before the block are stored first
            strategy.prefill(canvas, block.start)
        starts: list[float] = []
        times: dict[int, list[float]] = {d: [] for d in drafts}
        for _ in range(repeats + warmup):
            starts.append(timed(strategy.begin_block, canvas, block))
            for k in torch.randperm(len(drafts), generator=order).tolist():
                states = canvas[block].repeat(drafts[k] + 1, 1)
                times[drafts[k]].append(timed(strategy.verify, canvas, block, states, verify))
        suffix = canvas_len - block.start
        real = {"exact": canvas_len, "shared": canvas_len, "prefix": suffix}.get(layout, block_len)
        per_draft = {"exact": canvas_len, "prefix": suffix}.get(layout, block_len)
        for d in drafts:
            rows.append(
                {
                    "layout": layout,
                    "drafts": d,
                    "query_rows": real + d * per_draft,
                    "forward_ms": 1000 * statistics.median(times[d][warmup:]),
                    "block_start_ms": 1000 * statistics.median(starts[warmup:]),
                }
            )
    for r in rows:
        first = next(x for x in rows if x["layout"] == r["layout"] and x["drafts"] == drafts[0])
        r["cost_vs_no_drafts"] = r["forward_ms"] / first["forward_ms"]
    return rows


def synchronize(device: torch.device) -> None:
    """Wait for the device (timing edges only; decoders never call this)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(model, device: torch.device) -> dict:
    import transformers

    if device.type == "cuda":
        name, peak = torch.cuda.get_device_name(device), torch.cuda.max_memory_allocated(device)
    else:
        name = platform.processor() or platform.machine()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "device": str(device),
        "device_name": name,
        "dtype": str(next(model.parameters()).dtype),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "peak_memory_mb": peak / 2**20,
    }


# docs/algorithm.md §10: LLaDA, gen 256, block 32, one token per step: the paper's NFE speedup range per D (midpoints used)
PAPER_NFE_SPEEDUP = {3: (2.24, 2.40), 5: (2.50, 2.71), 8: (2.74, 3.00), 10: (2.80, 3.07)}


def paper_runs(gen_length: int = 256, block_length: int = 32) -> pd.DataFrame:
    """Runs in `spiffy.lab.report.budget_recommendation`'s format from the paper's NFE speedups (midpoints of
    docs/algorithm.md §10's ranges), for the exact layout and the dual cache alike (on the embedded model Spiffy's NFE gain
    over the dual cache equals its gain without a cache). No drafts-per-forward measurement: every in-block
    forward is assumed to send all D drafts (the conservative fallback)."""
    rows = []
    for cache in ("none", "dual"):
        rows.append(
            {"decoder.cache": cache, "graph.budget": 0, "nfe_mean": gen_length, "speedup_nfe": 1.0}
        )
        for d, (lo, hi) in PAPER_NFE_SPEEDUP.items():
            s = (lo + hi) / 2
            rows.append(
                {
                    "decoder.cache": cache,
                    "graph.budget": d,
                    "nfe_mean": gen_length / s,
                    "speedup_nfe": s,
                }
            )
    return pd.DataFrame(rows)


def count_reads(decoder, model, prompts: list, *, seed: int = 0) -> dict:
    """Host reads (device synchronisations) per transition and per forward of `decoder` on `prompts`."""
    reads = transitions = nfe = worst = 0
    for i, prompt in enumerate(prompts):
        result = {}
        between, within, total = reads_between_forwards(
            model,
            lambda p=prompt, i=i: result.setdefault(
                "r", decoder.generate(p, request_id=i, seed=seed)
            ),
        )
        stats = result["r"].stats
        reads, transitions, nfe = reads + total, transitions + stats.transitions, nfe + stats.nfe
        worst = max([worst, *between[:-1]])
    return {
        "reads_per_transition": reads / transitions,
        "reads_per_forward": reads / nfe,
        "max_reads_between_forwards": worst,
    }


def verification_peak_memory(
    model, strategies, canvas_len: int, block_len: int, drafts: int
) -> int:
    """Peak memory (bytes above the start) of one exact-layout verification forward with 1 + `drafts` full
    canvases; `strategies` is a checkout's `STRATEGIES` (old checkouts call it `block_logits`)."""
    mask_id = int(model.config.mask_token_id)
    device = next(model.parameters()).device
    canvas = torch.randint(0, mask_id, (canvas_len,), device=device)
    block = slice(canvas_len - 2 * block_len, canvas_len - block_len)
    states = canvas[block].repeat(drafts + 1, 1)
    strategy = strategies["none"](model)
    verify = getattr(strategy, "verify", None) or strategy.block_logits
    return peak_memory(lambda: verify(canvas, block, states, "exact"), device)


def batch_throughput(
    decoders: dict[str, BlockDecoder],
    prompts: list[torch.Tensor],
    batch_sizes: list[int],
    *,
    seed: int = 0,
    repeats: int = 1,
    max_tokens: int | None | str = "auto",
) -> list[dict]:
    """Generated tokens/s of every decoder at every batch size (docs/algorithm.md §13), over the same prompts
    (`max_tokens`: query tokens per forward, as in `generate_batch`).

    Runs interleave (repeat → batch size → decoder, a fresh decoder order each time) so machine noise hits
    every cell alike. Each cell also checks that every request's tokens and NFE equal the batch-of-one run's
    (`identical`) and reports forwards, requests (calls) and query rows per forward, the model's share of the
    wall-clock and Spiffy's host overhead (drafting, masks, walks over drafts) against model time.
    """
    order = torch.Generator().manual_seed(seed)
    labels = list(decoders)
    for d in decoders.values():  # warm up allocators and kernels
        d.generate_batch(
            prompts[: max(batch_sizes)],
            seed=seed,
            batch_size=max(batch_sizes),
            max_tokens=max_tokens,
        )
    cells: dict[tuple[str, int], dict] = {}
    reference: dict[str, list] = {}
    bar = tqdm(total=repeats * len(batch_sizes) * len(labels), desc="throughput")
    for _ in range(repeats):
        for size in batch_sizes:
            for k in torch.randperm(len(labels), generator=order).tolist():
                label = labels[k]
                bar.update()
                t, cpu = time.perf_counter(), time.process_time()
                out = decoders[label].generate_batch(
                    prompts, seed=seed, batch_size=size, max_tokens=max_tokens
                )
                wall, cpu = time.perf_counter() - t, time.process_time() - cpu
                got = [(r.tokens, r.stats.nfe) for r in out]
                ref = reference.setdefault(label, got) if size == 1 else reference.get(label)
                cell = cells.setdefault(
                    (label, size), {"wall_s": [], "identical": True, "batch": out.batch}
                )
                cell["wall_s"].append(wall)
                cell.setdefault("cpu_s", []).append(cpu)
                cell["tokens"] = sum(r.stats.generated_tokens for r in out)
                cell["nfe"] = statistics.mean(r.stats.nfe for r in out)
                cell["overhead_s"] = sum(r.stats.overhead_s for r in out)
                if ref is not None:
                    cell["identical"] &= all(
                        torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(ref, got)
                    )
    bar.close()
    rows = []
    for (label, size), cell in cells.items():
        wall, cpu = statistics.median(cell["wall_s"]), statistics.median(cell["cpu_s"])
        batch = cell["batch"].summary()
        rows.append(
            {
                "decoder": label,
                "batch_size": size,
                "tokens_per_s": cell["tokens"] / wall,
                "wall_s": wall,
                # the process's own CPU time: on a shared, loaded machine the steadier measure of its work
                "tokens_per_cpu_s": cell["tokens"] / cpu,
                "nfe_mean": cell["nfe"],
                "forwards": batch["forwards"],
                "calls_per_forward": batch["calls_per_forward"],
                "rows_per_forward": batch["rows_per_forward"],
                "model_share": batch["model_s"] / batch["wall_s"] if batch["wall_s"] else 0.0,
                # Spiffy's drafting, masks and walk over drafts, against the batch's model time
                "overhead_vs_model": cell["overhead_s"] / batch["model_s"]
                if batch["model_s"]
                else 0.0,
                "identical_to_batch_1": cell["identical"] if 1 in batch_sizes else None,
            }
        )
    frame = pd.DataFrame(rows)
    first = frame.groupby("decoder")["tokens_per_s"].transform(
        lambda s: s.iloc[0] if len(s) else float("nan")
    )
    frame["throughput_vs_smallest_batch"] = frame["tokens_per_s"] / first
    first_cpu = frame.groupby("decoder")["tokens_per_cpu_s"].transform(
        lambda s: s.iloc[0] if len(s) else float("nan")
    )
    frame["cpu_throughput_vs_smallest_batch"] = frame["tokens_per_cpu_s"] / first_cpu
    frame["decoder"] = pd.Categorical(frame["decoder"], labels, ordered=True)
    return frame.sort_values(["decoder", "batch_size"]).to_dict("records")


def batched_cost_curve(
    model,
    canvas_len: int,
    block_len: int,
    drafts: list[int],
    batch_sizes: list[int],
    *,
    repeats: int = 5,
    layouts: tuple[str, ...] = ("exact", "dual"),
) -> list[dict]:
    """The cost curve with a batch axis (docs/algorithm.md §13): median time of one stacked in-block
    verification forward of `b` requests with `1 + D` states each, per layout, and the block-start forward of
    `b` requests. `cost_vs_no_drafts` is against the same batch without drafts: drafts pay while it stays below
    the NFE speedup they bring. Requests have their own random canvases (and caches); rounds visit every
    (b, D) in a fresh order; the clock is as in `cost_curve`."""
    spec = model_spec(model)
    device = next(model.parameters()).device
    block = slice(canvas_len - 2 * block_len, canvas_len - block_len)
    clock = time.thread_time if device.type == "cpu" else time.perf_counter
    order = torch.Generator().manual_seed(0)
    rows = []
    for layout in layouts:
        cache, verify = LAYOUTS[layout]
        starts, verifies = [], {d: [] for d in drafts}
        for r in range(max(batch_sizes)):
            canvas = torch.randint(0, spec.mask_id, (canvas_len,), device=device)
            strategy = STRATEGIES[cache](model, block_length=block_len)
            if strategy.stores_blocks:
                strategy.prefill(canvas, block.start)
            start = strategy.begin_block_call(canvas, block)
            strategy.run(start)
            starts.append(start.call)
            for d in drafts:
                pending = strategy.verify_call(
                    canvas, block, canvas[block].repeat(d + 1, 1), verify
                )
                strategy.run(pending)
                verifies[d].append(pending.call)
        stacker = CallStacker(model, block_causal=spec.block_causal)
        cells = [(b, d) for b in batch_sizes for d in [None, *drafts]]
        times: dict[tuple, list[float]] = {c: [] for c in cells}
        for _ in range(repeats + 1):  # the first round warms up
            for k in torch.randperm(len(cells), generator=order).tolist():
                b, d = cells[k]
                calls = (starts if d is None else verifies[d])[:b]
                with torch.no_grad():
                    synchronize(device)
                    t = clock()
                    stacker.run(calls)
                    synchronize(device)
                times[cells[k]].append(clock() - t)
        for b in batch_sizes:
            none = statistics.median(times[b, drafts[0]][1:])
            for d in drafts:
                ms = 1000 * statistics.median(times[b, d][1:])
                rows.append(
                    {
                        "layout": layout,
                        "batch": b,
                        "drafts": d,
                        "forward_ms": ms,
                        "ms_per_request": ms / b,
                        "block_start_ms_per_request": 1000
                        * statistics.median(times[b, None][1:])
                        / b,
                        "cost_vs_no_drafts": ms / (1000 * none),
                    }
                )
    return rows
