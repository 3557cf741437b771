"""One engine loop per process (docs/serving.md "The engine loop"): a worker thread owns the `Engine`s and steps
them while work exists, fed by a thread-safe command queue; committed blocks go back to whoever submitted the
request through its `deliver` callback (the HTTP app wraps `loop.call_soon_threadsafe`, `spiffy chat` a queue).

Requests are `Job`s. Each runs in the `Engine` of its decoder (one per distinct sampling/drafting setting,
`spiffy.serve.service.Settings`), joins at the next step, and leaves when its decode is done, when it has the
blocks its `max_tokens` asked for (it is aborted there: its tokens are the first blocks of the offline
`generate`), when it is cancelled (a client disconnect, a stop string), or when it fails (that request only: the
engine fails a request whose step or forward raised, docs/algorithm.md §13). Every job's tokens are its offline
`generate(prompt, request_id=0, seed=seed)`'s, whatever else runs: the engine's guarantee.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from spiffy.decoding.engine import Engine
from spiffy.decoding.types import DecodeStats


class QueueFull(RuntimeError):
    """`serve.max_queue` requests are in the server already (HTTP 429)."""


class Closed(RuntimeError):
    """The server is draining (SIGTERM) and admits nothing new (HTTP 503)."""


@dataclass
class Job:
    """One request in the loop. `deliver(kind, payload)` is called on the loop's thread: ("block", token ids),
    then ("done", `DecodeStats`) or ("error", exception); a cancelled job gets nothing more."""

    prompt_ids: list[int]
    decoder: object
    seed: int
    max_blocks: int
    deliver: Callable[[str, object], None]
    request_id: int = (
        0  # keyed noise: NoiseKey(seed, request_id), so the seed alone decides the text
    )
    blocks: list[list[int]] = field(default_factory=list)
    nfe: int = 0
    handle: object = None
    finished: bool = False
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)


class EngineLoop:
    """The worker thread and its engines. `submit(job)` (QueueFull / Closed), `cancel(job)`, `close()` (stop
    admitting), `wait_idle(timeout)`, `stop()`; `metrics` (a `spiffy.serve.metrics.Metrics`) gets every event."""

    def __init__(self, *, max_batch: int, max_queue: int, metrics=None, max_tokens="auto"):
        self.max_batch, self.max_queue, self.max_tokens = max_batch, max_queue, max_tokens
        self.metrics = metrics
        self.accepting = True
        self._commands: queue.Queue = queue.Queue()
        self._engines: dict[int, Engine] = {}
        self._jobs: dict[int, Job] = {}  # id(engine Request) -> job
        self._pending = 0
        self.cancels = (
            0  # cancel() calls that reached an unfinished job (client disconnects, stop strings)
        )
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="spiffy-engine-loop", daemon=True)
        self._thread.start()

    # ---- any thread ----------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests in the server: decoding or waiting."""
        return self._pending

    def live(self) -> int:
        """Requests decoding now (admitted by their engine), the rest of `pending` waits."""
        return sum(1 for job in list(self._jobs.values()) if job.handle.state.begun)

    def submit(self, job: Job) -> None:
        with self._lock:
            if not self.accepting:
                raise Closed("the server is shutting down and admits no new requests")
            if self._pending >= self.max_queue:
                raise QueueFull(f"serve.max_queue={self.max_queue} requests are in the server")
            self._pending += 1
        self._commands.put(("add", job))

    def cancel(self, job: Job, *, done: bool = False) -> None:
        """Abort a job (between two steps); nothing more is delivered to it. `done`: its text is complete (EOS
        or a stop string): it counts as finished and leaves the queue now; else the client went away (aborted)."""
        if job.finished:
            return
        job.cancelled = True
        if done:
            handle = job.handle
            self._finish(job, "ok", handle.state.recorder.stats if handle is not None else None)
        else:
            self.cancels += 1
        self._commands.put(("abort", (job, done)))

    def close(self) -> None:
        with self._lock:
            self.accepting = False

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is in the server; False if `timeout` passed first."""
        with self._lock:
            return self._lock.wait_for(lambda: self._pending == 0, timeout)

    def stop(self) -> None:
        self._commands.put(("stop", None))
        self._thread.join()

    # ---- the worker thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            busy = any(e.has_unfinished() for e in self._engines.values())
            try:
                commands = [self._commands.get(block=not busy)]
            except queue.Empty:
                commands = []
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for kind, arg in commands:
                if kind == "stop":
                    return
                if kind == "add":
                    self._add(arg)
                elif kind == "abort":
                    self._abort(*arg)
            for engine in list(self._engines.values()):
                if engine.has_unfinished():
                    self._step(engine)

    def _engine(self, decoder) -> Engine:
        key = id(decoder)
        if key not in self._engines:
            self._engines[key] = Engine(
                decoder, max_batch=self.max_batch, max_tokens=self.max_tokens
            )
        return self._engines[key]

    def _add(self, job: Job) -> None:
        if job.cancelled:
            self._finish(job, "aborted")
            return
        engine = self._engine(job.decoder)
        try:
            job.handle = engine.add_request(
                job.prompt_ids, request_id=job.request_id, seed=job.seed
            )
        except ValueError as error:
            self._end(job, "error", error)
            return
        self._jobs[id(job.handle)] = job

    def _abort(self, job: Job, done: bool) -> None:
        if job.handle is not None:
            if not job.handle.finished:
                job.handle.engine.abort(job.handle)
            self._jobs.pop(id(job.handle), None)
        self._finish(job, "aborted")

    def _step(self, engine: Engine) -> None:
        forwards = engine.stats.forwards
        t0 = time.perf_counter()
        try:
            events = engine.step()
        except (
            Exception
        ) as error:  # the engine itself failed: every request in it fails with the reason
            for key, job in list(self._jobs.items()):
                if job.handle.engine is engine:
                    del self._jobs[key]
                    self._end(job, "error", error)
            self._engines.pop(id(engine.decoder), None)
            return
        if self.metrics is not None:
            self.metrics.step(engine.stats.forwards - forwards, time.perf_counter() - t0)
        for request, event in events:
            job = self._jobs.get(id(request))
            if job is None or job.finished:
                continue
            tokens = event.tokens.tolist()
            job.blocks.append(tokens)
            job.nfe += event.nfe
            if self.metrics is not None:
                self.metrics.block(len(tokens), job.submitted if len(job.blocks) == 1 else None)
            job.deliver("block", tokens)
            if (
                len(job.blocks) >= job.max_blocks and not request.finished
            ):  # its max_tokens are there
                engine.abort(request)
                self._jobs.pop(id(request), None)
                self._end(job, "done", request.state.recorder.stats)
        for request in engine.take_finished():
            job = self._jobs.pop(id(request), None)
            if job is None or job.finished:
                continue
            if request.error is not None:
                self._end(job, "error", request.error)
            else:
                self._end(job, "done", request.result.stats)

    def _end(self, job: Job, kind: str, payload: DecodeStats | BaseException) -> None:
        """The job is over: its slot is freed, then its submitter told (so it may submit again at once)."""
        if job.cancelled:  # its client went away first
            self._finish(job, "aborted")
        elif self._finish(
            job, "ok" if kind == "done" else "error", payload if kind == "done" else None
        ):
            job.deliver(kind, payload)

    def _finish(self, job: Job, outcome: str, stats: DecodeStats | None = None) -> bool:
        """Mark the job finished once (any thread) and free its slot; False if it already was."""
        with self._lock:
            if job.finished:
                return False
            job.finished = True
            self._pending -= 1
            self._lock.notify_all()
        if self.metrics is not None:
            self.metrics.finished(outcome, stats)
        return True
