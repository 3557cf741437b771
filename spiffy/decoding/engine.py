"""The engine loop (docs/algorithm.md §13): many requests' state machines, one stacked forward per round, no threads.

`Engine(decoder)` owns the requests. `add_request(prompt, request_id=, seed=)` validates the prompt at once and
returns a `Request` handle; `step()` runs one round: it admits waiting requests (up to `max_batch` live), collects
every live request's next `ModelCall`, stacks the calls into as few forwards as `CallStacker` can (bucketed by
query length, at most `max_tokens` query tokens per forward), runs them, and hands each request its own output
back through the decoder's step function (`BlockDecoder.step`), which returns the request's next call or `Done`.
Requests may be added and aborted between any two steps; an aborted request is simply dropped (its caches are its
own), and nobody else's calls, noise or tokens depend on it. Each committed block is a `BlockEvent` on its
request (`Request.poll`, or iterate the request, which steps the engine as needed) and in `step()`'s return.

Every request's tokens, canvas and NFE equal its `generate` result (the oracle; `tests/decoding/test_engine.py`,
`tests/decoding/test_batching.py`): a request's calls are its own, stacked only with inert padding (see
`spiffy.decoding.batching`). Everything runs on the caller's thread, so its grad mode and CUDA stream apply.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from spiffy.decoding.batching import BatchStats, CallStacker, ModelCall, default_max_tokens
from spiffy.decoding.types import BlockEvent, DecodeResult, Done
from spiffy.models import numerics

if TYPE_CHECKING:
    from spiffy.decoding.block_decoder import BlockDecoder, RequestState


class Request:
    """A request in an `Engine`. `poll()` returns its blocks committed since the last poll; iterating it yields
    them all, stepping the engine while it waits; `result` (a `DecodeResult`) is set when it finished, `error`
    when it failed, `aborted` when it was aborted. `share` is its share of the engine's wall-clock (its own
    stepping time plus its share of the forwards it was in, by query rows)."""

    def __init__(self, engine: Engine, state: RequestState, order: int):
        self.engine, self.state, self.order = engine, state, order
        self.request_id = state.request_id
        self.result: DecodeResult | None = None
        self.error: BaseException | None = None
        self.aborted = False
        self.share = 0.0
        self.call: ModelCall | None = None
        self._events: deque[BlockEvent] = deque()

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None or self.aborted

    def poll(self) -> list[BlockEvent]:
        """The blocks committed since the last poll (each once)."""
        events = list(self._events)
        self._events.clear()
        return events

    def __iter__(self) -> Iterator[BlockEvent]:
        while True:
            yield from self.poll()
            if self.error is not None:
                raise self.error
            if self.finished:
                return
            self.engine.step()

    def __repr__(self) -> str:
        status = (
            "done"
            if self.result is not None
            else "failed"
            if self.error
            else "aborted"
            if self.aborted
            else "live"
        )
        return f"Request({self.request_id!r}, {status})"


class Engine:
    """Runs many requests of one decoder, stacking their model calls (module docstring).

    `max_batch`: at most that many requests live (the rest wait, in arrival order; None = no limit);
    `max_tokens`: at most that many query tokens per forward (None = no limit, "auto" =
    `batching.default_max_tokens` of the model's device); `tolerance`: the padding a forward's bucket allows, as
    a fraction of its longest query."""

    def __init__(
        self,
        decoder: BlockDecoder,
        *,
        max_batch: int | None = None,
        max_tokens: int | None | str = "auto",
        tolerance: float = 0.25,
    ):
        if max_batch is not None and (
            not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1
        ):
            raise ValueError(f"batch_size={max_batch!r} must be a positive integer")
        if isinstance(max_tokens, str) and max_tokens != "auto":
            raise ValueError(
                f"max_tokens={max_tokens!r} must be None, 'auto' or a positive integer"
            )
        self.decoder, self.max_batch = decoder, max_batch
        if max_tokens == "auto":
            max_tokens = default_max_tokens(decoder.device)
        self.stacker = CallStacker(
            numerics.wrap(decoder.model, decoder.options.invariant),
            block_causal=decoder.spec.block_causal,
            tolerance=tolerance,
            max_tokens=max_tokens,
        )
        self.stats = BatchStats()
        self._waiting: deque[Request] = deque()
        self._live: list[Request] = []
        self._finished: list[Request] = []
        self._order = 0

    # ---- requests ---------------------------------------------------------------------------------------

    def add_request(
        self, prompt_ids: torch.Tensor | list[int], *, request_id: int | str = 0, seed: int = 0
    ) -> Request:
        """Queue a request (it joins at the next step with room); bad prompts raise `ValueError` here."""
        state = self.decoder.start(prompt_ids, request_id=request_id, seed=seed)
        request = Request(self, state, self._order)
        self._order += 1
        self._waiting.append(request)
        return request

    def abort(self, request: Request | int | str) -> int:
        """Drop a request (a handle, or every unfinished request with this id), live or waiting; safe between
        any two steps. Returns how many were aborted."""
        targets = [
            r
            for r in [*self._waiting, *self._live]
            if r is request or (not isinstance(request, Request) and r.request_id == request)
        ]
        for r in targets:
            r.aborted, r.call = True, None
            if r in self._live:
                self._live.remove(r)
            else:
                self._waiting.remove(r)
        return len(targets)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._live)

    def take_finished(self) -> list[Request]:
        """Requests that finished (done or failed) since the last call, in the order they finished."""
        done, self._finished = self._finished, []
        return done

    # ---- the loop ---------------------------------------------------------------------------------------

    def step(self) -> list[tuple[Request, BlockEvent]]:
        """One round: admit, collect every live request's next call, run the stacked forwards, advance every
        request with its output. Returns the blocks committed in this round, with their requests."""
        t0 = time.perf_counter()
        events: list[tuple[Request, BlockEvent]] = []
        try:
            while self._waiting and (self.max_batch is None or len(self._live) < self.max_batch):
                request = self._waiting.popleft()
                request.state.started = time.perf_counter()
                self._live.append(request)
                self._advance(request, None, 0.0, events)  # steps to its first call
            calls = [r.call for r in self._live if r.call is not None]
            by_order = {r.order: r for r in self._live}
            for bucket in self.stacker.buckets(calls):
                t = time.perf_counter()
                try:
                    with torch.no_grad():
                        self.stacker.run(bucket)
                    if bucket[0].input_ids.is_cuda:  # the forward's time, not its launch
                        torch.cuda.synchronize(bucket[0].input_ids.device)
                except Exception as error:  # every request of the forward fails with it
                    for call in bucket:
                        self._fail(by_order[call.order], error)
                    continue
                seconds = time.perf_counter() - t
                rows = sum(c.n * c.q for c in bucket)
                for call in bucket:
                    call.seconds = seconds * call.n * call.q / rows
                    by_order[call.order].share += call.seconds
                self.stats.forwards += 1
                self.stats.calls_per_forward.append(len(bucket))
                self.stats.rows_per_forward.append(sum(c.n for c in bucket))
                self.stats.model_s += seconds
            for request in list(self._live):
                call = request.call
                if call is not None and call.out is not None:
                    out, call.out = call.out, None
                    self._advance(request, out, call.seconds, events)
        finally:
            self.stats.wall_s += time.perf_counter() - t0
        return events

    def _advance(self, request: Request, out, seconds: float, events: list) -> None:
        """Give the request its call's output (None: its first step); keep its next call, or finish it."""
        t = time.perf_counter()
        try:
            nxt = self.decoder.step(request.state, out, seconds=seconds)
        except Exception as error:
            self._fail(request, error)
            return
        finally:
            request.share += time.perf_counter() - t
        for event in request.state.take_events():
            request._events.append(event)
            events.append((request, event))
        if isinstance(nxt, Done):
            request.result, request.call = nxt.result, None
            self._live.remove(request)
            self._finished.append(request)
        else:
            nxt.order = request.order
            request.call = nxt

    def _fail(self, request: Request, error: BaseException) -> None:
        if request.finished:
            return
        request.error, request.call = error, None
        self._live.remove(request)
        self._finished.append(request)
