"""The device cost model of speculation (docs/algorithm.md §5.8): what a forward and Spiffy's own work cost on this device.

`measure_costs` times, in one process and on the job's shape (the calibration prompts' median length plus
`gen_length`), everything the wall-clock of a request is made of:

* the block-start forward (full canvas, no drafts; Spiffy never saves it), and the base's own in-block forward,
  timed as the base runs it: a burst of single-state forwards right after the block start;
* one in-block verification forward with `n = 1 + drafts` states, for every lossless verification layout of the
  base's cache mode (`spiffy.decoding.modes`: no cache = full-canvas rows, prefix = `[block + suffix]` rows, dual =
  block rows), at the first, middle and last block (the prefix layout's rows shrink along the request). Every round
  visits every (block, layout, n) in a fresh random order, so a slow phase of a shared machine hits them alike;
  medians of model time (`ForwardTimer`, the same clock as `DecodeStats.model_s`). As in the acceptance walk, the
  previous forward's logits stay alive during the next one (the same memory pattern);
* the time outside the model, from the real decoders on a calibration prompt or two: the base decoder's per
  transition, and `SpiffyDecoder`'s extra per verification forward (drafting, acceptance bookkeeping, building the
  rows) for graphs of a few sizes;
* with the exact block-causal cache (SDAR, LLaDA2, docs/algorithm.md §12), block queries run against the stored
  blocks before them, and the prefill of the prompt's whole blocks is timed too (`meta["prefill_ms"]`); a store
  forward is one block query, charged as a block start.

`load_or_measure` caches the result as JSON beside the graph store, one file per model x device x dtype x torch
threads x shape x decoder settings x graphs (the key hashes them), written atomically; a malformed file raises a
`ValueError` naming its path.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from spiffy.decoding.batching import CallStacker
from spiffy.decoding.block_decoder import BlockDecoder
from spiffy.decoding.config import GenerationConfig
from spiffy.decoding.modes import VERIFY_LAYOUTS, effective_layout, get_cache_mode, is_lossless
from spiffy.decoding.speculative import Speculation, SpiffyDecoder
from spiffy.decoding.strategies import STRATEGIES
from spiffy.graph.draft_graph import DraftGraph
from spiffy.graph.dynamic import DynamicGraph
from spiffy.graph.files import atomic_write_text, slug

FORMAT, VERSION = "spiffy.calibration.costs", 2


def lossless_layouts(cache: str) -> list[str]:
    """The `verify` values that are lossless under `cache`, one per layout the cache actually runs."""
    out: dict[str, str] = {}
    for verify in VERIFY_LAYOUTS:
        if is_lossless(cache, verify):
            out.setdefault(effective_layout(cache, verify), verify)
    return list(out.values())


def state_grid(max_states: int) -> list[int]:
    """States per forward to time: 1-4, then roughly x1.5 steps, and `max_states` itself."""
    grid, n = [1, 2, 3, 4], 4
    while n < max_states:
        n = max(n + 1, round(n * 1.5))
        grid.append(min(n, max_states))
    return sorted({g for g in grid if g <= max(max_states, 1)})


@dataclass(frozen=True)
class CostModel:
    """Measured costs (milliseconds) of one decoder configuration on one device.

    `forward_ms[layout][k][s]` is an in-block forward at block `blocks[k]` with `states[s]` states, amid forwards
    of every size as in Spiffy's walk; `base_forward_ms[k]` the base decoder's in-block forward (one state, amid
    its own); `overhead_ms` maps a layout to `{graph nodes: Spiffy's extra time per verification forward}`;
    `step_ms` is the base's time outside the model per transition (sampling, bookkeeping, per-request setup spread
    over its transitions).
    """

    states: list[int]
    blocks: list[int]
    forward_ms: dict[str, list[list[float]]]
    base_forward_ms: list[float]
    block_start_ms: float
    step_ms: float
    overhead_ms: dict[str, dict[int, float]]
    meta: dict = field(default_factory=dict)

    def forward(self, layout: str, block: int, n: int) -> float:
        """Interpolated ms of an in-block forward with `n` states at block index `block` (clamped to the grid)."""
        rows = [np.interp(n, self.states, per_block) for per_block in self.forward_ms[layout]]
        return float(np.interp(block, self.blocks, rows))

    def base_forward(self, block: int) -> float:
        """Interpolated ms of the base decoder's in-block forward at block index `block`."""
        return float(np.interp(block, self.blocks, self.base_forward_ms))

    def overhead(self, layout: str, nodes: int) -> float:
        """Spiffy's extra ms per verification forward with a graph of `nodes` nodes (interpolated)."""
        sizes = sorted(self.overhead_ms[layout])
        return float(np.interp(nodes, sizes, [self.overhead_ms[layout][s] for s in sizes]))

    def to_json(self) -> str:
        payload = {"format": FORMAT, "version": VERSION, **asdict(self)}
        return json.dumps(payload, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> CostModel:
        """Parse a cost-model file; anything malformed raises `ValueError` naming `where`."""
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT or data.get("version") != VERSION:
                raise ValueError(f"format/version {data.get('format')!r}/{data.get('version')!r}")
            model = cls(
                [int(n) for n in data["states"]],
                [int(b) for b in data["blocks"]],
                {k: [[float(x) for x in row] for row in v] for k, v in data["forward_ms"].items()},
                [float(x) for x in data["base_forward_ms"]],
                float(data["block_start_ms"]),
                float(data["step_ms"]),
                {
                    k: {int(n): float(x) for n, x in v.items()}
                    for k, v in data["overhead_ms"].items()
                },
                dict(data.get("meta", {})),
            )
            if len(model.base_forward_ms) != len(model.blocks):
                raise ValueError("base_forward_ms does not match blocks")
            for layout, table in model.forward_ms.items():
                if len(table) != len(model.blocks) or any(
                    len(r) != len(model.states) for r in table
                ):
                    raise ValueError(f"forward_ms[{layout!r}] does not match blocks x states")
                if not model.overhead_ms.get(layout):
                    raise ValueError(f"no overhead_ms for layout {layout!r}")
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(
                f"cost model file {where!r} is malformed ({type(err).__name__}: {err}); delete it "
                "(or rerun with force) to measure again"
            ) from None
        return model


def _median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


TIMING_ROUNDS = 7  # timed rounds of `time_forwards` (after a warm-up round)


def time_forwards(
    model: torch.nn.Module,
    cfg: GenerationConfig,
    prompt_len: int,
    layouts: list[str],
    states: list[int],
    *,
    rounds: int = TIMING_ROUNDS,
    burst: int = 3,
    seed: int = 0,
    batch: int = 1,
    on_round=None,
) -> tuple[list[int], dict[str, list[list[float]]], list[float], float]:
    """Blocks timed, median in-block forward ms per layout x block x states, the base's in-block forward ms per
    block (`burst` single-state forwards after each block start), and the block-start ms.

    With `batch` > 1 every time is per request of a stacked forward of `batch` requests, each with the same
    number of states (docs/algorithm.md §13): the cost a request pays in batched decoding. `on_round()` is called
    after each round (a progress bar)."""
    if batch > 1:
        return _time_batched_forwards(
            model, cfg, prompt_len, layouts, states, rounds, seed, batch, on_round
        )
    mask_id = int(model.config.mask_token_id)
    device = next(model.parameters()).device
    length, lb, nb = prompt_len + cfg.gen_length, cfg.block_length, cfg.num_blocks
    gen = torch.Generator().manual_seed(seed)
    canvas = torch.randint(0, mask_id, (length,), generator=gen).to(device)
    blocks = sorted({0, nb // 2, nb - 1})
    strategy = STRATEGIES[cfg.cache](model, block_length=lb)
    stored = None
    if strategy.stores_blocks:  # block-causal: every block queries the stored blocks before it
        strategy.prefill(canvas, prompt_len + blocks[-1] * lb)
        stored = strategy.cache
    timer = strategy.timer
    starts: list[float] = []
    times = {(lay, b, n): [] for lay in layouts for b in blocks for n in states}
    plain: dict[int, list[float]] = {b: [] for b in blocks}
    held = (
        None  # as in the acceptance walk, the last forward's logits stay alive during the next one
    )
    for r in range(rounds + 1):  # round 0 warms up
        for b in [blocks[i] for i in torch.randperm(len(blocks), generator=gen).tolist()]:
            block = slice(prompt_len + b * lb, prompt_len + (b + 1) * lb)
            if stored is not None:
                strategy.cache = stored.slice_positions(block.start)
            before = timer.model_s
            held = strategy.begin_block(canvas, block)
            if r:
                starts.append(timer.model_s - before)
            for _ in range(burst):
                before = timer.model_s
                held = strategy.block_logits(canvas, block, canvas[block][None], layouts[0])
                if r:
                    plain[b].append(timer.model_s - before)
            cells = [(lay, n) for lay in layouts for n in states]
            for k in torch.randperm(len(cells), generator=gen).tolist():
                lay, n = cells[k]
                before = timer.model_s
                held = strategy.block_logits(canvas, block, canvas[block].repeat(n, 1), lay)
                if r:
                    times[(lay, b, n)].append(timer.model_s - before)
        if on_round is not None:
            on_round()
    del held
    table = {
        lay: [[_median_ms(times[(lay, b, n)]) for n in states] for b in blocks] for lay in layouts
    }
    return blocks, table, [_median_ms(plain[b]) for b in blocks], _median_ms(starts)


def time_prefill(
    model: torch.nn.Module, cfg: GenerationConfig, prompt_len: int, rounds: int = 3
) -> float:
    """Median ms of the block-causal prefill of a prompt of `prompt_len` tokens (its whole blocks)."""
    end = prompt_len // cfg.block_length * cfg.block_length
    if end == 0:
        return 0.0
    mask_id = int(model.config.mask_token_id)
    device = next(model.parameters()).device
    canvas = torch.randint(0, mask_id, (end,), generator=torch.Generator().manual_seed(0)).to(
        device
    )
    strategy = STRATEGIES[cfg.cache](model, block_length=cfg.block_length)
    times = []
    for r in range(rounds + 1):  # round 0 warms up
        before = strategy.timer.model_s
        strategy.prefill(canvas, end)
        if r:
            times.append(strategy.timer.model_s - before)
    return _median_ms(times)


def _time_batched_forwards(
    model, cfg, prompt_len, layouts, states, rounds, seed, batch, on_round=None
):
    """`time_forwards` per request of stacked forwards of `batch` requests (their own random canvases).

    Cheaper than the one-request measurement, which a batch multiplies: at most 3 rounds, and one block
    unless the prefix cache makes the cost depend on the block (its rows shrink along the request)."""
    mask_id = int(model.config.mask_token_id)
    device = next(model.parameters()).device
    length, lb, nb = prompt_len + cfg.gen_length, cfg.block_length, cfg.num_blocks
    gen = torch.Generator().manual_seed(seed)
    blocks = sorted({0, nb // 2, nb - 1}) if get_cache_mode(cfg.cache).suffix_queries else [nb // 2]
    rounds = min(rounds, 3)
    stacker = CallStacker(model, block_causal=False)
    clock = time.thread_time if device.type == "cpu" else time.perf_counter
    calls: dict[tuple, list] = {}
    for _ in range(
        batch
    ):  # record every request's calls once: block start, plain and verify forwards
        canvas = torch.randint(0, mask_id, (length,), generator=gen).to(device)
        strategy = STRATEGIES[cfg.cache](model)
        for b in blocks:
            block = slice(prompt_len + b * lb, prompt_len + (b + 1) * lb)
            start = strategy.begin_block_call(canvas, block)
            strategy.run(start)
            calls.setdefault(("start", b, 0), []).append(start.call)
            for lay, n in ((lay, n) for lay in layouts for n in states):
                pending = strategy.verify_call(canvas, block, canvas[block].repeat(n, 1), lay)
                strategy.run(pending)
                calls.setdefault((lay, b, n), []).append(pending.call)
    keys = list(calls)
    times: dict[tuple, list[float]] = {k: [] for k in keys}
    for r in range(rounds + 1):  # round 0 warms up
        for k in torch.randperm(len(keys), generator=gen).tolist():
            with torch.no_grad():
                t = clock()
                stacker.run(calls[keys[k]])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            if r:
                times[keys[k]].append((clock() - t) / batch)
        if on_round is not None:
            on_round()
    table = {
        lay: [[_median_ms(times[(lay, b, n)]) for n in states] for b in blocks] for lay in layouts
    }
    plain = [_median_ms(times[(layouts[0], b, 1)]) for b in blocks]
    start = _median_ms([t for b in blocks for t in times[("start", b, 0)]])
    return blocks, table, plain, start


def time_outside_model(
    model: torch.nn.Module,
    cfg: GenerationConfig,
    prompts: list[torch.Tensor],
    graphs: list[DraftGraph | DynamicGraph],
    layouts: list[str],
    *,
    rounds: int = 2,
    draft_noise: str = "none",
    seed: int = 0,
) -> tuple[float, dict[str, dict[int, float]], float, int]:
    """Time outside the model, from the real decoders on `prompts` (interleaved, random order, medians per prompt).

    Returns the base's ms per transition, Spiffy's extra ms per verification forward per layout and graph size,
    and the base's measured model ms and in-block forwards (to relate this phase's load to the forward timings).
    """
    decoders: dict[tuple, BlockDecoder] = {("base", 0): BlockDecoder(model, cfg)}
    for lay in layouts:
        for g in graphs:
            speculation = Speculation(g, verify=lay, draft_noise=draft_noise)
            decoders[overhead_key(lay, g)] = SpiffyDecoder(model, cfg, speculation)
    order = torch.Generator().manual_seed(seed)
    outside: dict[tuple, list[list[float]]] = {k: [[] for _ in prompts] for k in decoders}
    model_s: list[list[float]] = [[] for _ in prompts]
    forwards: dict[tuple, list[int]] = {k: [0] * len(prompts) for k in decoders}
    transitions = [0] * len(prompts)
    keys = list(decoders)
    for r in range(rounds + 1):  # round 0 warms up
        for p, prompt in enumerate(prompts):
            for k in torch.randperm(len(keys), generator=order).tolist():
                s = decoders[keys[k]].generate(prompt, request_id=f"cost:{p}", seed=seed).stats
                if r:
                    outside[keys[k]][p].append(s.wall_s - s.model_s)
                    forwards[keys[k]][p] = s.nfe - cfg.num_blocks
                    transitions[p] = s.transitions
                    if keys[k][0] == "base":
                        model_s[p].append(s.model_s)
    per_prompt = {k: [statistics.median(v) for v in outside[k]] for k in decoders}
    base = per_prompt[("base", 0)]
    step_ms = 1000 * sum(base) / sum(transitions)
    overhead: dict[str, dict[int, float]] = {lay: {} for lay in layouts}
    for (lay, nodes), values in per_prompt.items():
        if lay == "base":
            continue
        overhead.setdefault(lay, {})
        extra = sum(values) - sum(
            base
        )  # noise can make it slightly negative: no overhead is the floor
        overhead[lay][nodes] = max(0.0, 1000 * extra / max(1, sum(forwards[(lay, nodes)])))
    base_model_ms = 1000 * sum(statistics.median(v) for v in model_s)
    return step_ms, overhead, base_model_ms, sum(forwards[("base", 0)])


DYNAMIC = (
    "dynamic:"  # overhead_ms of dynamic graphs: under "dynamic:<layout>", keyed by their budget
)


def overhead_key(layout: str, graph: DraftGraph | DynamicGraph) -> tuple[str, int]:
    """Where a graph's measured overhead lives in `overhead_ms`: a static graph's under its layout by its node
    count, a dynamic graph's (which scores its pool at every forward, docs/algorithm.md §5.10) under
    `dynamic:<layout>` by its budget."""
    if isinstance(graph, DynamicGraph):
        return DYNAMIC + layout, graph.budget
    return layout, len(graph.nodes)


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU's model name (Linux `/proc/cpuinfo`) and its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} x{os.cpu_count()}"


def cost_key(model: torch.nn.Module, cfg: GenerationConfig, prompt_len: int, extra: dict) -> dict:
    """Everything a cost model depends on: model, device, dtype, threads, shape, decoder settings, graphs."""
    param = next(model.parameters())
    return {
        "format": FORMAT,
        "version": VERSION,
        "device": param.device.type,
        "device_name": device_name(param.device),
        "dtype": str(param.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "prompt_len": prompt_len,
        "decoder": cfg.to_dict(),
        **extra,
    }


def graphs_digest(graphs: list[DraftGraph | DynamicGraph]) -> str:
    text = json.dumps(
        [
            g.to_json() if isinstance(g, DynamicGraph) else [list(map(list, n)) for n in g.nodes]
            for g in graphs
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_or_measure(
    model: torch.nn.Module,
    cfg: GenerationConfig,
    prompts: list[torch.Tensor],
    graphs: list[DraftGraph | DynamicGraph],
    *,
    model_name: str,
    root: str | Path = "runs/graphs",
    max_states: int | None = None,
    draft_noise: str = "none",
    overhead_prompts: int = 2,
    force: bool = False,
    batch: int = 1,
    progress: bool = True,
) -> tuple[CostModel, Path]:
    """The cached cost model of this configuration on this device, or a fresh measurement (seconds).

    `graphs` (non-empty, e.g. the smallest and largest candidate) are the graphs whose overhead is measured
    (dynamic graphs too, `overhead_key`); `max_states` bounds the timed states per forward (default: the
    largest graph's rows + 1). `batch`: the
    forwards are timed per request of `batch` stacked requests (batched decoding, docs/algorithm.md §13).
    """
    if not graphs:
        raise ValueError("graphs: at least one draft graph is needed to measure Spiffy's overhead")
    if not prompts:
        raise ValueError("prompts: at least one calibration prompt is needed")
    stores = get_cache_mode(cfg.cache).stores_blocks
    if stores and batch > 1:
        raise ValueError(
            f"batch={batch}: the cost model of cache={cfg.cache!r} is measured one request at a time"
        )
    layouts = lossless_layouts(cfg.cache)
    prompt_len = int(statistics.median(int(p.numel()) for p in prompts))
    max_states = max_states or max(overhead_key("", g)[1] for g in graphs) + 1
    states = state_grid(max_states)
    used = prompts[:overhead_prompts]
    key = cost_key(
        model,
        cfg,
        prompt_len,
        {
            "model": model_name,
            "layouts": layouts,
            "states": states,
            "graphs": graphs_digest(graphs),
            "draft_noise": draft_noise,
            "overhead_prompts": [p.tolist() for p in used],
            **({"batch": batch} if batch > 1 else {}),
        },
    )
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = Path(root) / slug(model_name) / "costs" / f"{slug(key['device_name'])}-{digest}.json"
    if path.exists() and not force:
        return CostModel.from_json(path.read_text(), str(path)), path
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    # one step per timing round (round 0 warms up), one for the time outside the model
    bar = tqdm(total=TIMING_ROUNDS + 2, desc="cost measurement", disable=not progress)
    blocks, table, base_forward, start = time_forwards(
        model,
        cfg,
        prompt_len,
        layouts,
        states,
        rounds=TIMING_ROUNDS,
        batch=batch,
        on_round=bar.update,
    )
    step, overhead, base_ms, base_in_block = time_outside_model(
        model, cfg, used, graphs, layouts, draft_noise=draft_noise
    )
    bar.update(bar.total - bar.n)
    bar.close()
    # The two phases may run under different load (a shared machine): bring the outside-model times to the
    # forward timings' scale by the base's model time, measured in the second phase and predicted by the first.
    plain = statistics.mean(base_forward)
    predicted = len(used) * cfg.num_blocks * start + base_in_block * plain
    prefill = time_prefill(model, cfg, prompt_len) if stores else 0.0
    if stores:  # the base's prefill and one store per block (a block query, as a block start)
        predicted += sum(p.numel() >= cfg.block_length for p in used) * prefill
        predicted += len(used) * cfg.num_blocks * start
    scale = predicted / base_ms
    if (
        batch > 1
    ):  # the forwards were timed per request of a batch: no one-request reference to scale by
        scale = 1.0
    overhead = {lay: {n: ms * scale for n, ms in v.items()} for lay, v in overhead.items()}
    meta = {k: v for k, v in key.items() if k != "overhead_prompts"}
    meta["load_scale"] = scale
    if stores:
        meta["prefill_ms"] = prefill
    meta["measure_s"] = round(time.perf_counter() - t0, 2)
    costs = CostModel(states, blocks, table, base_forward, start, step * scale, overhead, meta)
    atomic_write_text(path, costs.to_json())
    return costs, path
