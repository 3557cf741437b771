"""Batched decoding (docs/algorithm.md §13): many requests per forward, every request's output unchanged.

Each request runs the batch-of-one decoder (`BlockDecoder.generate`) unchanged, in a worker thread of a
`BatchRunner`. Its model calls are not executed by the worker: `ForwardStrategy._call` hands them to the runner
(`submit`) and the worker waits. When every live request is waiting on a call (a *round*), the runner stacks the
calls into as few forwards as it can (`CallStacker`) and gives every request its own rows back. A request's code
never knows it is batched; a finished request leaves at once and the next prompt joins (continuous batching), so
requests finish independently with their own NFE. Only the runner's thread calls the model.

Stacking keeps every call's own shapes: its rows, its query length, its positions, its mask and its cache.

* Calls with a cache (prefix, dual, block-causal) are padded to the round's widest call in rows (inert copies of
  the call's row 0) and their caches are stacked (`spiffy.models.kv.stack_caches`, zero-padded to the longest
  and masked), so attention folds all rows of one request into one product with that request's cache, as alone.
* Query lengths: calls are bucketed by query length (within `tolerance` of the bucket's longest) and padded at the
  end; padded keys are masked out for every row, padded rows are dropped.
* Positions are per row, the attention mask is the call's own (or the model's default made explicit,
  `default_attention_mask`), and the logits rows are per row (`logits_at` of shape (B, P)).

So prompts of different lengths need no left padding: each request keeps its own canvas, its absolute positions
and its block boundaries (block-causal models need them aligned to absolute positions, docs/algorithm.md §12).
Why the output is unchanged: a row's attention reads only its own request's keys (the others are masked out or in
another cache), its positions are its own, and keyed noise (docs/algorithm.md §2.1) depends on the request id, not
on the batch. What can change is rounding: a stacked product may sum in another order than the batch-of-one one
(padding, other kernel shapes), so the equality is tested in float64 (`tests/decoding/test_batching.py`), where a
rounding difference does not move an argmax or a sampled token; a call alone in its bucket runs exactly as alone.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from spiffy.models.base import DiffusionLM, DiffusionLMOutput
from spiffy.models.kv import KVCache, stack_caches

_local = threading.local()


def active_runner() -> BatchRunner | None:
    """The `BatchRunner` whose worker thread this is (None outside batched decoding)."""
    return getattr(_local, "runner", None)


class BatchAborted(RuntimeError):
    """Raised in a waiting request when another request of the batch failed."""


@dataclass
class ModelCall:
    """One request's model call as the decoder made it (`input_ids` (N, Q) and the model's keyword arguments),
    with what stacking reads from it; `out`, `error` and `seconds` are filled by the runner."""

    order: int
    input_ids: torch.Tensor
    kwargs: dict[str, Any]
    out: DiffusionLMOutput | None = None
    error: BaseException | None = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        kw = self.kwargs
        self.cache: KVCache | None = kw.get("kv_cache")
        self.mask: torch.Tensor | None = kw.get("attention_mask")
        self.return_kv = bool(kw.get("return_kv"))
        self.solo = bool(kw.get("store_kv"))  # a call that stores into a cache runs alone
        n, q = self.input_ids.shape
        positions = kw.get("position_ids")
        if positions is None:
            start = self.cache.insert_at if self.cache is not None else 0
            positions = range(start, start + q)
        self.span = positions if isinstance(positions, range) else None
        self._positions = None if self.span is not None else positions
        rows = kw.get("logits_at")
        self.rows_slice = (
            slice(*(slice(0, q) if rows is None else rows).indices(q))
            if (rows is None or isinstance(rows, slice))
            else None
        )
        self._rows = rows if self.rows_slice is None else None

    @property
    def n(self) -> int:
        return self.input_ids.shape[0]

    @property
    def q(self) -> int:
        return self.input_ids.shape[1]

    @property
    def p(self) -> int:
        """Rows projected."""
        if self.rows_slice is not None:
            return len(range(*self.rows_slice.indices(self.q)))
        return self._rows.numel()

    def positions(self) -> torch.Tensor:
        """Positions (N, Q)."""
        pos = self._positions
        if pos is None:
            pos = torch.arange(self.span.start, self.span.stop, device=self.input_ids.device)
        return (pos if pos.dim() == 2 else pos[None]).expand(self.n, self.q)

    def rows(self) -> torch.Tensor:
        """Projected rows (P,)."""
        if self._rows is not None:
            return self._rows
        return torch.arange(*self.rows_slice.indices(self.q), device=self.input_ids.device)


@dataclass
class BatchStats:
    """How a batch ran: forwards, and per forward the requests (calls) and query rows it carried."""

    forwards: int = 0
    calls_per_forward: list[int] = field(default_factory=list)
    rows_per_forward: list[int] = field(default_factory=list)
    model_s: float = 0.0
    wall_s: float = 0.0

    def summary(self) -> dict[str, float]:
        n = max(self.forwards, 1)
        return {
            "forwards": self.forwards,
            "calls_per_forward": sum(self.calls_per_forward) / n,
            "rows_per_forward": sum(self.rows_per_forward) / n,
            "model_s": self.model_s,
            "wall_s": self.wall_s,
        }


class CallStacker:
    """Runs a round's calls as few forwards: bucketed by cache presence and query length, then stacked."""

    def __init__(
        self,
        model: DiffusionLM,
        *,
        block_causal: bool,
        tolerance: float = 0.25,
        max_tokens: int | None = None,
    ):
        if not 0 <= tolerance < 1:
            raise ValueError(f"tolerance={tolerance!r} must be in [0, 1)")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens={max_tokens!r} must be None or a positive integer")
        self.model, self.block_causal, self.tolerance = model, block_causal, tolerance
        self.max_tokens = max_tokens
        self._stacked: OrderedDict[tuple, KVCache] = OrderedDict()

    def buckets(self, calls: list[ModelCall]) -> list[list[ModelCall]]:
        """Groups of calls that share one forward (each call in exactly one, in request order within)."""
        out: list[list[ModelCall]] = []
        kinds: dict[tuple, list[ModelCall]] = {}
        for call in calls:
            if call.solo:
                out.append([call])
            else:
                kinds.setdefault((call.cache is not None, call.return_kv), []).append(call)
        for group in kinds.values():
            group = sorted(group, key=lambda c: (-c.q, c.order))
            while group:
                longest = group[0].q
                take = [c for c in group if c.q >= (1 - self.tolerance) * longest]
                out.extend(self._chunks(sorted(take, key=lambda c: c.order), longest))
                group = group[len(take) :]
        return out

    def _chunks(self, calls: list[ModelCall], q: int) -> list[list[ModelCall]]:
        """`calls` split so that no forward carries more than `max_tokens` query tokens (rows x padded length;
        a call's rows never split)."""
        if self.max_tokens is None:
            return [calls]
        out, chunk, rows = [], [], 0
        for call in calls:
            if chunk and (rows + call.n) * q > self.max_tokens:
                out.append(chunk)
                chunk, rows = [], 0
            chunk.append(call)
            rows += call.n
        return [*out, chunk]

    def run(self, calls: list[ModelCall]) -> None:
        """One forward for `calls`; sets each call's `out` (its own rows, query length and projected rows)."""
        if len(calls) == 1:
            call = calls[0]
            call.out = self.model(call.input_ids, **call.kwargs)
            return
        ids, positions, mask, rows, cache, widths = self._stack(calls)
        out = self.model(
            ids,
            position_ids=positions,
            attention_mask=mask,
            kv_cache=cache,
            return_kv=calls[0].return_kv,
            logits_at=rows,
        )
        start = 0
        for call, width in zip(calls, widths, strict=True):
            stop = start + call.n
            present = None
            if call.return_kv:
                present = tuple(
                    (k[start:stop, :, : call.q], v[start:stop, :, : call.q]) for k, v in out.present
                )
            call.out = DiffusionLMOutput(out.logits[start:stop, : call.p], present)
            start += width

    def _stack(self, calls: list[ModelCall]):
        """Ids (B, Q), positions, mask (B, Q, L + Q) or None, rows, stacked cache and each call's row count."""
        has_cache = calls[0].cache is not None
        q = max(c.q for c in calls)
        group = max(c.n for c in calls) if has_cache else 0
        cache = self._stack_caches([c.cache for c in calls], group) if has_cache else None
        n_cache = cache.length if cache is not None else 0
        widths = [group or c.n for c in calls]
        device = calls[0].input_ids.device
        ids = torch.cat(
            [_pad(_pad_rows(c.input_ids, w - c.n), q, dim=1) for c, w in zip(calls, widths)]
        )
        if all(c.span is not None for c in calls):  # host-known positions: one small product
            starts = [c.span.start for c, w in zip(calls, widths) for _ in range(w)]
            positions = torch.tensor(starts, device=device)[:, None] + torch.arange(
                q, device=device
            )
            for c, w, at in zip(calls, widths, _offsets(widths)):
                if c.q < q:  # padded query rows: any valid position
                    positions[at : at + w, c.q :] = c.span.start
        else:
            positions = torch.cat(
                [
                    _pad(_pad_rows(c.positions(), w - c.n), q, dim=1, value=0)
                    for c, w in zip(calls, widths)
                ]
            )
        shared = calls[0].rows_slice
        if shared is not None and all(c.rows_slice == shared for c in calls):
            rows = shared
        else:
            p = max(c.p for c in calls)
            rows = torch.cat(
                [_pad(c.rows(), p, dim=0, value=0).expand(w, p) for c, w in zip(calls, widths)]
            )
        if (
            not has_cache
            and not self.block_causal
            and all(c.mask is None and c.q == q for c in calls)
        ):
            mask = None  # every key visible: the model's unmasked attention
        elif not self.block_causal and all(c.mask is None for c in calls):
            mask = self._key_mask(calls, widths, q, n_cache)
        else:
            mask = torch.cat([self._mask(c, w, q, n_cache) for c, w in zip(calls, widths)])
        return ids, positions, mask, rows, cache, widths

    def _key_mask(self, calls, widths, q: int, n_cache: int) -> torch.Tensor:
        """Bidirectional default attention (every query row of a call sees the same keys), (B, Q, L + Q):
        a call's visible cached keys (all but a recomputed block, not the padding) and its own fresh keys."""
        device = calls[0].input_ids.device
        key = torch.arange(n_cache + q, device=device)
        bounds = []
        for c in calls:
            length = c.cache.length if c.cache is not None else 0
            lo, hi = (c.cache.insert_at, c.cache.insert_at + c.cache.replace) if length else (0, 0)
            bounds.append((length, lo, hi, n_cache + c.q))
        length, lo, hi, own = torch.tensor(bounds, device=device).T[..., None]
        cached = (key < length) & ((key < lo) | (key >= hi))
        visible = cached | ((key >= n_cache) & (key < own))  # (C, L + Q)
        counts = torch.tensor(widths, device=device)
        return visible.repeat_interleave(counts, dim=0)[:, None].expand(-1, q, -1)

    def _mask(self, call: ModelCall, width: int, q: int, n_cache: int) -> torch.Tensor:
        """The call's mask (width, q, n_cache + q) over the stacked keys `[cache (n_cache), fresh (q)]`."""
        own = call.mask
        if own is None:
            own = self.model.default_attention_mask(call.positions(), call.cache)
        own = own.expand(call.n, -1, -1)
        c = call.cache.length if call.cache is not None else 0
        out = torch.zeros(width, q, n_cache + q, dtype=torch.bool, device=own.device)
        out[: call.n, : call.q, :c] = own[:, :, :c]
        out[: call.n, : call.q, n_cache : n_cache + call.q] = own[:, :, c:]
        out[call.n :] = out[:1]  # inert copies of row 0
        pad = torch.arange(call.q, q, device=own.device)
        out[:, pad, n_cache + pad] = True  # padded query rows see themselves only (dropped)
        return out

    def _stack_caches(self, caches: list[KVCache], group: int) -> KVCache:
        key = tuple(id(c) for c in caches)
        stacked = self._stacked.get(key)
        if stacked is None:
            stacked = stack_caches(caches, group)
            self._stacked[key] = stacked  # holds the parts: their ids stay unique while memoised
            if len(self._stacked) > 2:
                self._stacked.popitem(last=False)
        if stacked.group != group:
            stacked = dataclasses.replace(stacked, group=group, _masks={})
        return stacked


def _offsets(widths: list[int]) -> list[int]:
    out, at = [], 0
    for w in widths:
        out.append(at)
        at += w
    return out


def _pad_rows(t: torch.Tensor, extra: int) -> torch.Tensor:
    return torch.cat([t, t[:1].expand(extra, *t.shape[1:])]) if extra else t


def _pad(t: torch.Tensor, size: int, dim: int, value: int | None = None) -> torch.Tensor:
    """`t` padded at the end of `dim` to `size` with `value` (None: its first element along `dim`)."""
    missing = size - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    fill = t.narrow(dim, 0, 1).expand(shape) if value is None else t.new_full(shape, value)
    return torch.cat([t, fill], dim=dim)


def parse_batch_size(value) -> int | str:
    """A positive integer or "auto" (lm-eval passes strings: "16", "auto"; "auto:N" reads as "auto")."""
    text = str(value)
    if text.startswith("auto"):
        return "auto"
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1 or isinstance(value, bool) or (isinstance(value, float) and value != size):
        raise ValueError(f"batch_size={value!r} must be a positive integer or 'auto'")
    return size


def default_max_tokens(device: torch.device) -> int | None:
    """Query tokens per forward that batched decoding stops at by default: 1024 on a CPU, where a longer stacked
    forward outgrows the caches (docs/results.md "Batched decoding", `results/bench/token_cap_*.md`), and no limit on
    an accelerator, which wants the largest forwards."""
    return 1024 if torch.device(device).type == "cpu" else None


_RUNNING, _WAITING, _DONE = "running", "waiting", "done"


@dataclass
class _Worker:
    index: int
    thread: threading.Thread | None = None
    state: str = _RUNNING
    call: ModelCall | None = None
    result: Any = None
    error: BaseException | None = None
    abort: bool = False
    go: threading.Event = field(default_factory=threading.Event)


class BatchRunner:
    """Runs jobs (each one request's batch-of-one decode) with at most `max_batch` of them live, stacking
    their model calls round by round (module docstring). `run(jobs)` returns the results in job order.

    Only one thread runs at a time: the runner hands a baton to each live job in turn, which walks until its
    next model call (or its end) and hands it back; then the runner runs the round's forwards. So the jobs'
    host work is never slowed by contention for the interpreter, scheduling is deterministic, and each job's
    wall-clock share is exact: its own walking time plus its share of the forwards (by query rows)."""

    def __init__(
        self,
        model: DiffusionLM,
        max_batch: int,
        *,
        block_causal: bool = False,
        tolerance: float = 0.25,
        max_tokens: int | None = None,
        on_done: Callable[[int, Any], None] | None = None,
    ):
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"batch_size={max_batch!r} must be a positive integer")
        self.max_batch = max_batch
        self.stacker = CallStacker(
            model, block_causal=block_causal, tolerance=tolerance, max_tokens=max_tokens
        )
        self.on_done = on_done
        self.stats = BatchStats()
        self.shares: list[float] = []  # each job's share of the wall-clock
        self._back = threading.Event()

    # ---- inside a worker ------------------------------------------------------------------------------

    def submit(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> tuple[Any, float]:
        """Hand one model call to the runner and wait for its output; returns (output, its model seconds)."""
        worker: _Worker = _local.worker
        call = ModelCall(worker.index, input_ids, kwargs)
        worker.call, worker.state = call, _WAITING
        self._pass_baton(worker)
        if worker.abort:
            raise BatchAborted("another request of the batch failed")
        if call.error is not None:
            raise call.error
        return call.out, call.seconds

    def _pass_baton(self, worker: _Worker) -> None:
        self._back.set()
        worker.go.wait()
        worker.go.clear()

    def _work(self, worker: _Worker, job: Callable[[], Any]) -> None:
        _local.runner, _local.worker = self, worker
        worker.go.wait()
        worker.go.clear()
        try:
            worker.result = job()
        except BaseException as error:  # handed to the runner's thread, which re-raises it
            worker.error = error
        finally:
            worker.state = _DONE
            self._back.set()

    # ---- the runner's thread ----------------------------------------------------------------------------

    def _resume(self, worker: _Worker) -> None:
        """Let `worker` walk until its next call or its end."""
        t = time.perf_counter()
        worker.state = _RUNNING
        worker.go.set()
        self._back.wait()
        self._back.clear()
        self.shares[worker.index] += time.perf_counter() - t

    def run(self, jobs: Sequence[Callable[[], Any]]) -> list[Any]:
        """Run every job; re-raises the first failing job's error (in job order) after stopping the rest."""
        t0 = time.perf_counter()
        self.shares = [0.0] * len(jobs)
        results: list[Any] = [None] * len(jobs)
        todo, live = deque(range(len(jobs))), []
        try:
            results = self._run(jobs, todo, live, results)
        except BaseException:  # the runner itself failed (or was interrupted): stop every live job
            for w in live:
                if w.state == _WAITING:
                    w.abort = True
                    self._resume(w)
            raise
        finally:
            self.stats.wall_s += time.perf_counter() - t0
        return results

    def _run(self, jobs, todo: deque, live: list[_Worker], results: list[Any]) -> list[Any]:
        error: BaseException | None = None
        while todo or live:
            while todo and len(live) < self.max_batch:
                live.append(self._start(todo.popleft(), jobs))
            for w in [w for w in live if w.state == _DONE]:
                live.remove(w)
                w.thread.join()
                if w.error is not None:
                    error = w.error
                    break
                results[w.index] = w.result
                if self.on_done is not None:
                    self.on_done(w.index, w.result)
            if error is not None:
                for w in live:  # each raises BatchAborted at the call it waits on
                    w.abort = True
                    self._resume(w)
                    w.thread.join()
                break
            if (len(live) < self.max_batch and todo) or not live:
                continue  # new requests join before the next round
            self._round([w.call for w in live])
            for w in live:
                w.call = None
                self._resume(w)
        if error is not None:
            raise error
        return results

    def _start(self, index: int, jobs) -> _Worker:
        worker = _Worker(index)
        worker.thread = threading.Thread(
            target=self._work,
            args=(worker, jobs[index]),
            name=f"spiffy-request-{index}",
            daemon=True,
        )
        worker.thread.start()
        self._resume(worker)  # walks to its first call
        return worker

    def _round(self, calls: list[ModelCall]) -> None:
        for bucket in self.stacker.buckets(sorted(calls, key=lambda c: c.order)):
            t = time.perf_counter()
            try:
                with torch.no_grad():
                    self.stacker.run(bucket)
                if bucket[0].input_ids.is_cuda:  # the forward's time, not its launch
                    torch.cuda.synchronize(bucket[0].input_ids.device)
            except Exception as error:  # each request of the forward raises it
                for call in bucket:
                    call.error = error
            seconds = time.perf_counter() - t
            rows = sum(c.n * c.q for c in bucket)
            for call in bucket:
                call.seconds = seconds * call.n * call.q / rows
                self.shares[call.order] += call.seconds
            self.stats.forwards += 1
            self.stats.calls_per_forward.append(len(bucket))
            self.stats.rows_per_forward.append(sum(c.n for c in bucket))
            self.stats.model_s += seconds


class CallRecorder:
    """Stands in for a runner on this thread: records the model calls a strategy makes (and runs each alone),
    so that benchmarks can stack recorded calls of many requests (`spiffy.lab.benchmarks.batched_cost_curve`)."""

    def __init__(self, model: DiffusionLM):
        self.model, self.calls = model, []

    def __enter__(self) -> CallRecorder:
        _local.runner = self
        return self

    def __exit__(self, *exc) -> None:
        _local.runner = None

    def submit(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> tuple[Any, float]:
        call = ModelCall(len(self.calls), input_ids, kwargs)
        with torch.no_grad():
            call.out = self.model(input_ids, **kwargs)
        self.calls.append(call)
        return call.out, 0.0
