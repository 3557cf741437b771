"""The OpenAI-compatible HTTP API over one engine loop (docs/serving.md): `create_app(service, loop, metrics)`.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as server-sent events, one
per committed block, then a final chunk with `finish_reason`, then `data: [DONE]`), `GET /v1/models`,
`GET /health` (liveness: the process answers), `GET /health/ready` (readiness: model loaded, graph ready, not
draining), `GET /metrics` (Prometheus). Every refusal is an OpenAI-shaped error naming the field or the limit:
400 bad field, 401 API key, 404 unknown model, 413 body size, 429 queue full (with Retry-After), 503 loading or
draining, 500 the decoder failed on this request (others are unaffected). A client that disconnects has its
request aborted in the engine.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from spiffy.serve import protocol
from spiffy.serve.generation import Text, plan, spiffy_object
from spiffy.serve.loop import Closed, EngineLoop, Job, QueueFull
from spiffy.serve.metrics import Metrics
from spiffy.serve.service import RequestError, Service

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


class Refusal(Exception):
    def __init__(
        self, status: int, message: str, *, param=None, kind="invalid_request_error", headers=None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}


def create_app(service: Service, loop: EngineLoop, metrics: Metrics | None = None) -> FastAPI:
    metrics = metrics or loop.metrics or Metrics()
    serve = service.serve
    app = FastAPI(title="spiffy", version="1", docs_url=None, redoc_url=None)
    app.state.service, app.state.loop, app.state.metrics = service, loop, metrics

    @app.exception_handler(Refusal)
    async def _refused(request: Request, exc: Refusal):
        if exc.status != 401:
            metrics.rejected()
        return JSONResponse(
            protocol.error(exc.message, param=exc.param, kind=exc.kind),
            status_code=exc.status,
            headers=exc.headers,
        )

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready():
        ok = service.ready and loop.accepting
        state = "ready" if ok else "draining" if service.ready else "loading"
        return JSONResponse({"ready": ok, "state": state}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        running = loop.live()
        text = metrics.render(
            running=running, waiting=max(0, loop.pending - running), ready=service.ready
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        described = service.describe() if service.ready else {}
        return {
            "object": "list",
            "data": [
                {
                    "id": service.name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "spiffy",
                    "max_model_len": service.max_tokens if service.ready else None,
                    "spiffy": described,
                }
            ],
        }

    def check_auth(request: Request) -> None:
        if serve.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {serve.api_key}":
            raise Refusal(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>' (serve.api_key)",
                kind="authentication_error",
            )

    async def read_body(request: Request, schema):
        check_auth(request)
        if not service.ready:
            raise Refusal(503, "the model is loading (GET /health/ready)", kind="server_error")
        if not loop.accepting:
            raise Refusal(503, "the server is shutting down", kind="server_error")
        limit = serve.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise Refusal(
                413, f"request body of {length} bytes exceeds serve.max_body_bytes={limit}"
            )
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > limit:
                raise Refusal(413, f"request body exceeds serve.max_body_bytes={limit}")
        try:
            body = schema.model_validate_json(raw)
        except ValidationError as err:
            first = err.errors()[0]
            loc = [str(x) for x in first["loc"] if not isinstance(x, int)]
            if first["type"] == "json_invalid":
                raise Refusal(400, f"the body is not valid JSON: {first['msg']}") from None
            param = ".".join(loc) or None
            message = first["msg"].removeprefix("Value error, ")
            if param and not message.startswith(param.split(".")[-1]):
                message = f"{param}: {message}"
            raise Refusal(400, message, param=param) from None
        if body.model is not None and body.model != service.name:
            raise Refusal(
                404,
                f"model={body.model!r} is not served here; this server serves {service.name!r}",
                param="model",
                kind="not_found_error",
            )
        return body

    def make_plan(body, prompt_ids, prompt_param):
        options = body.spiffy
        try:
            return plan(
                service,
                prompt_ids,
                prompt_param=prompt_param,
                max_tokens=body.max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                seed=body.seed,
                stop=body.stop,
                graph=options.graph if options else None,
                budget=options.budget if options else None,
            )
        except RequestError as err:
            raise Refusal(err.status, str(err), param=err.param) from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, protocol.CompletionRequest)
        try:
            ids = body.prompt if isinstance(body.prompt, list) else service.encode(body.prompt)
        except Exception as err:
            raise Refusal(400, f"prompt: {err}", param="prompt") from None
        return await respond(request, body, make_plan(body, ids, "prompt"), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, protocol.ChatRequest)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            ids = service.encode(service.chat_prompt(messages))
        except RequestError as err:
            raise Refusal(err.status, str(err), param=err.param) from None
        return await respond(request, body, make_plan(body, ids, "messages"), chat=True)

    async def respond(request: Request, body, p, *, chat: bool):
        aloop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def deliver(kind, payload):
            try:
                aloop.call_soon_threadsafe(inbox.put_nowait, (kind, payload))
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

        job = Job(p.prompt_ids, p.decoder, p.seed, p.blocks, deliver)
        try:
            loop.submit(job)
        except QueueFull as err:
            raise Refusal(
                429,
                f"{err}: retry after {serve.retry_after_s} s",
                kind="rate_limit_error",
                headers={"Retry-After": str(serve.retry_after_s)},
            ) from None
        except Closed as err:
            raise Refusal(503, str(err), kind="server_error") from None
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        text = Text(service, p.stops)
        if body.stream:
            return StreamingResponse(
                stream(job, inbox, text, p, rid, chat),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        checked = time.monotonic()
        while True:
            try:
                kind, payload = await asyncio.wait_for(inbox.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                kind = payload = None
            if time.monotonic() - checked >= DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():  # nobody waits for the answer: stop decoding it
                    loop.cancel(job)
                    return JSONResponse({}, status_code=499)
            if kind is None:
                continue
            if kind == "block":
                _, over = text.add(payload)
                if over:  # EOS or a stop string: nothing after it is wanted
                    loop.cancel(job, done=True)
                    return final(job, text, p, rid, chat, stats=partial_stats(job))
            elif kind == "done":
                return final(job, text, p, rid, chat, stats=payload)
            else:
                return failed(payload)

    def partial_stats(job: Job):
        handle = job.handle
        return handle.state.recorder.stats if handle is not None else None

    def summary(job, text, p, stats):
        spiffy = spiffy_object(service, p, stats, job.nfe, len(job.blocks), text.kept)
        return protocol.usage(len(p.prompt_ids), len(text.kept)), spiffy

    def final(job, text, p, rid, chat, stats):
        text.finish()
        usage, spiffy = summary(job, text, p, stats)
        return JSONResponse(
            protocol.completion(
                rid, service.name, text.text, text.finish_reason, usage, spiffy, chat=chat
            )
        )

    def failed(error: BaseException) -> JSONResponse:
        return JSONResponse(
            protocol.error(
                f"decoding failed for this request: {type(error).__name__}: {error}",
                kind="server_error",
            ),
            status_code=500,
        )

    async def stream(job: Job, inbox, text: Text, p, rid, chat):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        first = True
        try:
            while True:
                kind, payload = await inbox.get()
                if kind == "block":
                    delta, over = text.add(payload)
                    if delta or first:
                        yield sse(
                            protocol.chunk(rid, service.name, delta, None, chat=chat, first=first)
                        )
                        first = False
                    if not over:
                        continue
                    loop.cancel(job, done=True)
                    stats = partial_stats(job)
                elif kind == "done":
                    stats = payload
                else:
                    body = protocol.error(
                        f"decoding failed for this request: {type(payload).__name__}: {payload}",
                        kind="server_error",
                    )
                    yield sse(body)
                    break
                rest = text.finish()
                usage, spiffy = summary(job, text, p, stats)
                yield sse(
                    protocol.chunk(
                        rid,
                        service.name,
                        rest,
                        text.finish_reason,
                        chat=chat,
                        usage_=usage,
                        spiffy=spiffy,
                    )
                )
                break
            yield "data: [DONE]\n\n"
        finally:
            if (
                not job.finished
            ):  # the client went away (or the server stops): abort it in the engine
                loop.cancel(job)

    return app
