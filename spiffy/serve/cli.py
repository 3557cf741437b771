"""The `spiffy serve` and `spiffy chat` subcommands (registered in `spiffy.lab.cli`'s registry): the same Hydra
overrides as `spiffy run` for model, decoder and graph, plus the server's `serve.*` settings (docs/serving.md)."""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading

from spiffy.lab.cli import command

SERVE_HELP = """usage: spiffy serve [key=value ...]   (the job's Hydra overrides, as `spiffy run`, and serve.* keys)

  e.g. spiffy serve model=embedded decoder=spiffy_kv_cache graph.budget=auto host=127.0.0.1 port=8000

  server keys (serve.<key>=v; host=, port=, api_key= also without the prefix; --host/--port/--api-key v):
{keys}
  API: POST /v1/completions, POST /v1/chat/completions (stream: true = SSE), GET /v1/models, /health,
  /health/ready, /metrics. docs/serving.md has every field and limit."""

CHAT_HELP = """usage: spiffy chat [key=value ...]   (the job's Hydra overrides, as `spiffy run`, and serve.* keys)

  A terminal chat over the served job in this process: type a message, the answer streams block by block, then
  a line with the request's NFE against its base decoder's ("NFE 12 vs 32 (2.7x)"). /reset forgets the
  conversation, /quit (or end of input) leaves. serve.max_tokens=N caps each answer."""


def _keys_help() -> str:
    import dataclasses

    from spiffy.serve.config import ServeConfig

    return "\n".join(f"    {f.name}={f.default!r}" for f in dataclasses.fields(ServeConfig))


def _setup(argv: list[str], name: str):
    """Settings and job from argv, checked before anything loads; (None, None, status) on a user error."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from spiffy.serve.config import split_args
    from spiffy.serve.service import Service, compose_job

    try:
        serve_cfg, overrides = split_args(argv)
        cfg = compose_job(overrides)
    except ValueError as err:
        print(f"spiffy {name}: {err}", file=sys.stderr)
        return None, 2
    return Service(cfg, serve_cfg), 0


@command("serve", "an OpenAI-compatible server over the job's decoder (spiffy serve --help)")
def serve_main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(SERVE_HELP.format(keys=_keys_help()))
        return 0
    service, status = _setup(argv, "serve")
    if service is None:
        return status
    try:
        import uvicorn

        from spiffy.serve.app import create_app
    except ImportError as err:
        print(
            f"spiffy serve needs the [serve] extra (pip install 'spiffy[serve]'): {err}",
            file=sys.stderr,
        )
        return 2
    from spiffy.serve.loop import EngineLoop
    from spiffy.serve.metrics import Metrics

    cfg = service.serve
    metrics = Metrics()
    loop = EngineLoop(max_batch=cfg.max_batch, max_queue=cfg.max_queue, metrics=metrics)
    app = create_app(service, loop, metrics)
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            log_level="warning",
            timeout_graceful_shutdown=max(1, int(cfg.drain_timeout_s)),
        ),
        loop,
        cfg.drain_timeout_s,
    )
    outcome = {}

    def load():
        try:
            service.load()
        except Exception as err:  # a model or graph that fails to load: say why, stop the server
            outcome["error"] = err
            print(
                f"spiffy serve: loading failed: {type(err).__name__}: {err}",
                file=sys.stderr,
                flush=True,
            )
            server.should_exit = True
            return
        while not server.started and not server.should_exit:
            threading.Event().wait(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            d = service.describe()
            print(
                f"spiffy serve: ready on http://{cfg.host}:{port} (model {d['model']}, decoder "
                f"{d['decoder']}, graph {d['graph']}, gen_length {d['gen_length']}, block {d['block_length']}; "
                f"load {service.load_s:.1f} s, graph {service.graph_s:.1f} s)",
                flush=True,
            )

    threading.Thread(target=load, name="spiffy-load", daemon=True).start()
    server.run()
    loop.stop()
    return 1 if "error" in outcome else 0


class _Draining:
    """Mixed into uvicorn's Server: the first SIGTERM stops admitting (503 on new requests), waits for the live
    requests to finish (up to `drain_timeout_s`), then lets uvicorn shut down; exit status 0."""

    def __init__(self, config, loop, drain_timeout_s: float):
        super().__init__(config)
        self.loop, self.drain_timeout_s, self.draining = loop, drain_timeout_s, False

    def handle_exit(self, sig, frame) -> None:
        if sig == signal.SIGTERM and not self.draining:
            self.draining = True
            self.loop.close()
            print(
                "spiffy serve: SIGTERM: draining the requests in flight",
                file=sys.stderr,
                flush=True,
            )

            def drain():
                done = self.loop.wait_idle(self.drain_timeout_s)
                if not done:
                    print(
                        f"spiffy serve: drain timeout ({self.drain_timeout_s} s)",
                        file=sys.stderr,
                        flush=True,
                    )
                self.should_exit = True

            threading.Thread(target=drain, name="spiffy-drain", daemon=True).start()
            return
        super().handle_exit(sig, frame)


def DrainingServer(config, loop, drain_timeout_s):  # noqa: N802 (a class made on demand: uvicorn is optional)
    import uvicorn

    cls = type("DrainingServer", (_Draining, uvicorn.Server), {})
    return cls(config, loop, drain_timeout_s)


@command(
    "chat",
    "a terminal chat over the job's decoder, block by block, with its NFE (spiffy chat --help)",
)
def chat_main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(CHAT_HELP)
        return 0
    service, status = _setup(argv, "chat")
    if service is None:
        return status
    from spiffy.serve.generation import Text, plan
    from spiffy.serve.loop import EngineLoop, Job
    from spiffy.serve.service import RequestError

    tty = sys.stdin.isatty()
    print("spiffy chat: loading ...", file=sys.stderr, flush=True)
    service.load()
    d = service.describe()
    print(
        f"spiffy chat: {d['model']} with {d['decoder']} (graph {d['graph']}); /reset, /quit",
        file=sys.stderr,
        flush=True,
    )
    loop = EngineLoop(max_batch=1, max_queue=1)
    history: list[dict] = []
    try:
        while True:
            if tty:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            message = line.strip()
            if not message:
                continue
            if message == "/quit":
                break
            if message == "/reset":
                history.clear()
                print("(conversation reset)", flush=True)
                continue
            history.append({"role": "user", "content": message})
            try:
                ids = service.encode(service.chat_prompt(history))
                p = plan(service, ids, prompt_param="message")
            except RequestError as err:
                history.pop()
                print(f"error: {err}", flush=True)
                continue
            inbox: queue.Queue = queue.Queue()
            job = Job(p.prompt_ids, p.decoder, p.seed, p.blocks, lambda k, v: inbox.put((k, v)))
            loop.submit(job)
            text = Text(service, p.stops)
            stats = None
            while True:
                kind, payload = inbox.get()
                if kind == "block":
                    delta, over = text.add(payload)
                    print(delta, end="", flush=True)
                    if over:
                        loop.cancel(job, done=True)
                        stats = job.handle.state.recorder.stats
                        break
                elif kind == "done":
                    stats = payload
                    break
                else:
                    print(f"\nerror: {type(payload).__name__}: {payload}", flush=True)
                    break
            print(text.finish(), flush=True)
            loop.wait_idle()  # a cancelled request leaves the engine between two steps
            if stats is not None:
                speed = stats.nfe_base / job.nfe if job.nfe else float("nan")
                print(f"[NFE {job.nfe} vs {stats.nfe_base} ({speed:.1f}×)]", flush=True)
                history.append({"role": "assistant", "content": text.text.strip()})
            else:
                history.pop()
    finally:
        loop.stop()
    return 0
