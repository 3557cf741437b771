"""Servers for the serving tests: the app under uvicorn in a thread on 127.0.0.1 and a free port, over a job
composed from `spiffy serve`'s overrides (the embedded model in float64, a chain graph: no calibration)."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

JOB = ["model.dtype=float64", "graph.source=chain", "graph.budget=3", "eval.threads=1"]
QUESTIONS = [
    "Ann has 2 coins. She finds 6 more. How many coins does Ann have now?",
    "Bo has 5 pens. He buys 3 more. How many pens does Bo have now?",
    "Cy has 9 apples. He eats 4. How many apples does Cy have now?",
    "Di has 7 cups. She breaks 2. How many cups does Di have now?",
]


def prompt(i: int) -> str:
    from spiffy.tasks.arith import format_prompt

    return format_prompt(QUESTIONS[i % len(QUESTIONS)])


def build_service(overrides=(), **serve):
    from spiffy.serve.config import ServeConfig
    from spiffy.serve.service import Service, compose_job

    return Service(compose_job([*JOB, *overrides]), ServeConfig(port=0, **serve)).load()


@contextlib.contextmanager
def running(service):
    """The app on a free port: yields (base_url, loop, metrics); stops the server and the loop after."""
    import uvicorn

    from spiffy.serve.app import create_app
    from spiffy.serve.loop import EngineLoop
    from spiffy.serve.metrics import Metrics

    metrics = Metrics()
    loop = EngineLoop(
        max_batch=service.serve.max_batch, max_queue=service.serve.max_queue, metrics=metrics
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(service, loop, metrics), host="127.0.0.1", port=0, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", loop, metrics
    finally:
        server.should_exit = True
        thread.join(10)
        loop.stop()


def client(base_url: str, api_key: str = "unused"):
    import openai

    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=60)


def offline(service, text_or_ids, *, blocks=None, seed=0, temperature=None, graph=None):
    """What the request must return: the base decoder's `generate` (a decoder built here, not the server's),
    its first `blocks` blocks, cut at EOS / filler. Spiffy is lossless, so this is also Spiffy's output."""
    import spiffy

    gen = dict(service.gen)
    if temperature is not None:
        gen["temperature"] = temperature
    options = spiffy.DecoderOptions(
        invariant=service.cfg.decoder.invariant
    )  # the numerics it serves with
    decoder = spiffy.build_decoder(service.model, **gen, options=options)
    ids = service.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
    tokens = decoder.generate(torch.tensor(ids), request_id=0, seed=seed).tokens.tolist()
    if blocks is not None:
        tokens = tokens[: blocks * decoder.cfg.block_length]
    kept, _ = service.cut(tokens)
    return kept


class Gate:
    """A fault or a pause injected into the served decoders' step function for the requests whose prompt is
    `ids`, once they reach block `at_block` (the decoder's own `step` is wrapped: nothing else changes)."""

    def __init__(self, service, ids, *, at_block=1, fail: str | None = None):
        self.ids, self.at_block, self.fail = torch.tensor(ids), at_block, fail
        self.release = threading.Event()
        self.reached = threading.Event()
        self.decoders = [service.default, service.base]
        self.originals = [d.step for d in self.decoders]
        for d, original in zip(self.decoders, self.originals):
            d.step = self._wrap(original)

    def _wrap(self, original):
        def step(state, out=None, *, seconds=0.0):
            p = state.prompt_len
            if (
                out is not None
                and state.index >= self.at_block
                and p == len(self.ids)
                and torch.equal(state.canvas[:p].cpu(), self.ids)
            ):
                self.reached.set()
                if self.fail:
                    raise RuntimeError(self.fail)
                self.release.wait(30)
            return original(state, out, seconds=seconds)

        return step

    def close(self):
        self.release.set()
        for d in self.decoders:
            vars(d).pop("step", None)


@pytest.fixture(scope="module")
def served():
    """One server for a test module: (base_url, service, loop, metrics)."""
    service = build_service()
    with running(service) as (url, loop, metrics):
        yield url, service, loop, metrics
