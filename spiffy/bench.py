"""Side-by-side benchmarks in one process (SPEC §7): decoders interleaved per prompt, and the cost curve.

Decoder specs are `<base>` or `<base>+spiffy[@<graph>][/shared|/cross]`, where `<base>` names a preset of `BASES` and
`<graph>` is a spec string (`chain:10`, `fig2`), a JSON path, or `calibrated:<D>[:<rule>]` (calibrated for that
base on the task's calibration split, cached in results/graphs/); `/shared` is the paper's near-lossless layout,
`/cross` continues the walk across blocks (SPEC §5.4). Ratios are against the first spec's decoder.
`cost_curve` times one forward against the number of query rows (1 + D drafts) for the exact layout (full
canvases) and the dual cache (block rows): the curve that decides when fewer NFE means less wall-clock.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from spiffy.api import build_decoder
from spiffy.decoding.block_decoder import BlockDecoder
from spiffy.decoding.config import GenerationConfig
from spiffy.decoding.forward import STRATEGIES
from spiffy.decoding.speculative import Speculation
from spiffy.eval.offline import completion_text, encode
from spiffy.graph.store import load_or_calibrate
from spiffy.tasks.arith import format_prompt
from spiffy.tasks.registry import TASKS, task_generation
from spiffy.tasks.scoring import is_correct

BASES: dict[str, dict] = {
    "vanilla": {},
    "fixed_k2": dict(rule="fixed_k", k=2),
    "fixed_k4": dict(rule="fixed_k", k=4),
    "threshold0.9": dict(rule="threshold", tau=0.9),
    "threshold0.8": dict(rule="threshold", tau=0.8),
    "threshold0.7": dict(rule="threshold", tau=0.7),
    "factor1": dict(rule="factor", factor=1.0),
    "prefix": dict(cache="prefix"),
    "dual": dict(cache="dual"),
    "dual_threshold0.9": dict(cache="dual", rule="threshold", tau=0.9),
}


@dataclass
class DecoderSpec:
    """A parsed decoder spec."""

    label: str
    base: str
    graph: str | None = None
    verify: str = "exact"
    cross_block: bool = False

    @classmethod
    def parse(cls, text: str, default_graph: str) -> DecoderSpec:
        base, _, spiffy = text.partition("+")
        if base not in BASES:
            raise ValueError(f"decoder spec {text!r}: base {base!r} not in {sorted(BASES)}")
        if not spiffy:
            return cls(text, base)
        if not spiffy.startswith("spiffy"):
            raise ValueError(
                f"decoder spec {text!r}: expected '<base>+spiffy[@graph][/shared|/cross]'"
            )
        rest, layout = spiffy[len("spiffy") :], ""
        for option in ("shared", "cross"):  # a suffix: graph JSON paths contain '/' too
            if rest.endswith(f"/{option}"):
                rest, layout = rest.removesuffix(f"/{option}"), option
        if rest and not rest.startswith("@"):
            raise ValueError(
                f"decoder spec {text!r}: expected '<base>+spiffy[@graph][/shared|/cross]'"
            )
        graph = rest[1:] if rest.startswith("@") else default_graph
        verify = "shared" if layout == "shared" else "exact"
        return cls(text, base, graph, verify, cross_block=layout == "cross")


def generation_for(task: str, base: str, temperature: float) -> dict:
    return task_generation(task, temperature=temperature, **BASES[base])


def make_decoder(
    model,
    tok,
    spec: DecoderSpec,
    *,
    task: str,
    temperature: float,
    model_name: str,
    n_calib: int = 20,
) -> BlockDecoder:
    gen = generation_for(task, spec.base, temperature)
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
            GenerationConfig(**gen),
            prompts,
            model_name=model_name,
            task=task,
            n_samples=n_calib,
            budget=budget,
            rule=rule,
            cross_block=spec.cross_block,
            progress=False,
        )
    return build_decoder(
        model,
        **gen,
        speculate=Speculation(graph, verify=spec.verify, cross_block=spec.cross_block),
    )


@dataclass
class BenchRow:
    label: str
    nfe: list[int] = field(default_factory=list)
    transitions: list[int] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
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
    for i, (prompt, problem) in enumerate(tqdm(list(zip(prompts, problems)), desc="bench")):
        for label, decoder in decoders.items():
            result = decoder.generate(prompt, request_id=i, seed=seed)
            s, row = result.stats, rows[label]
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
                "tokens_per_s": sum(row.tokens) / sum(row.wall_s),
                "model_share_of_wall": row.model_s / sum(row.wall_s),
                "overhead_share_of_model": row.overhead_s / row.model_s if row.model_s else 0.0,
                "agreement_with_base": agree,
            }
        )
    return out


def cost_curve(
    model, canvas_len: int, block_len: int, drafts: list[int], *, repeats: int = 15
) -> list[dict]:
    """Median time of one in-block verification forward with 1 + D states, per layout (exact = no cache, and
    the dual cache), and of the layout's block-start forward (full canvas, no drafts).

    Every round times each D once, in a fresh order, so that a slow phase of the machine (other processes,
    frequency changes) hits all D alike instead of a contiguous run of them; the first round warms up.
    """
    mask_id = int(model.config.mask_token_id)
    device = next(model.parameters()).device
    canvas = torch.randint(0, mask_id, (canvas_len,), device=device)
    block = slice(canvas_len - 2 * block_len, canvas_len - block_len)
    order = torch.Generator().manual_seed(0)

    def timed(fn, *args) -> float:
        _sync(device)
        t = time.perf_counter()
        fn(*args)
        _sync(device)
        return time.perf_counter() - t

    rows = []
    for cache in ("none", "dual"):
        strategy = STRATEGIES[cache](model)
        starts: list[float] = []
        times: dict[int, list[float]] = {d: [] for d in drafts}
        for _ in range(repeats + 1):
            starts.append(timed(strategy.begin_block, canvas, block))
            for k in torch.randperm(len(drafts), generator=order).tolist():
                states = canvas[block].repeat(drafts[k] + 1, 1)
                times[drafts[k]].append(timed(strategy.block_logits, canvas, block, states))
        for d in drafts:
            rows.append(
                {
                    "layout": "exact" if cache == "none" else "dual",
                    "drafts": d,
                    "query_rows": (d + 1) * (canvas_len if cache == "none" else block_len),
                    "forward_ms": 1000 * statistics.median(times[d][1:]),
                    "block_start_ms": 1000 * statistics.median(starts[1:]),
                }
            )
    for r in rows:
        first = next(x for x in rows if x["layout"] == r["layout"] and x["drafts"] == drafts[0])
        r["cost_vs_no_drafts"] = r["forward_ms"] / first["forward_ms"]
    return rows


def _sync(device: torch.device) -> None:
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
