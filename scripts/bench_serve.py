"""Serving benchmark (docs/serving.md "Benchmark"): drives `spiffy serve` with the `openai` client, streamed, at
several concurrencies and request rates, for a base decoder and its Spiffy version side by side, like
`vllm bench serve`: TTFT (arrival to the first committed block), time per output block after the first, p50/p99
request latency, output tokens/s. It also runs the concurrency-16 workload on the engine loop in this process
(no HTTP), interleaved with the HTTP runs (the `openai` client streamed, and a plain `httpx` client not
streamed, whose parsing costs the shared CPU less), to measure what the HTTP layer costs.

    python scripts/bench_serve.py                      # starts one server per decoder on a free port
    python scripts/bench_serve.py --url http://h:8000 --only spiffy   # a running server (no in-process run)

Writes results/bench/serve_cpu.{md,json,png} (--out). Every request's tokens are checked against the offline
`generate` of its decoder (the lossless property, over HTTP). The machine's load average goes in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

COMMON = ["model=embedded", "eval.threads=1", "serve.max_batch=32", "serve.max_queue=256"]
DECODERS = {  # the base and its Spiffy version (graph.budget=auto: calibrated once, D* chosen for this device)
    "dual": ["decoder=kv_cache"],
    "dual+spiffy": ["decoder=spiffy_kv_cache", "graph.budget=auto"],
}


def prompts(n: int) -> list[str]:
    from spiffy.tasks.arith import format_prompt, generate_split

    return [format_prompt(q["question"]) for q in generate_split("test", n)]


def start(overrides: list[str]):
    cmd = [sys.executable, "-c", "import sys; from spiffy.lab.cli import main; sys.exit(main())"]
    proc = subprocess.Popen(
        [*cmd, "serve", *overrides, "port=0"], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    for line in proc.stdout:
        print(line.rstrip(), flush=True)
        if m := re.search(r"ready on (http://\S+)", line):
            return proc, m[1]
    raise SystemExit(f"the server did not start: {' '.join(overrides)}")


def one_http(client, model: str, prompt: str, t_arrival: float) -> dict:
    """One streamed request: arrival, each chunk's time, tokens, the spiffy object."""
    times, text, last = [], "", None
    for chunk in client.completions.create(model=model, prompt=prompt, stream=True):
        times.append(time.perf_counter())
        text += chunk.choices[0].text
        last = chunk
    spiffy = last.model_extra["spiffy"]
    return record(
        t_arrival, times[: spiffy["blocks"]], times[-1], spiffy, last.usage.completion_tokens
    )


def record(t0: float, block_times: list[float], t_end: float, spiffy: dict, tokens: int) -> dict:
    return {
        "ttft_s": block_times[0] - t0,
        "tpob_s": (block_times[-1] - block_times[0]) / (len(block_times) - 1)
        if len(block_times) > 1
        else None,
        "latency_s": t_end - t0,
        "tokens": tokens,
        "nfe": spiffy["nfe"],
        "ids": spiffy["completion_token_ids"],
    }


class InProcess:
    """The same workload on the engine loop in this process, what the server runs minus HTTP: a closed loop on
    the loop's own thread (each finished request submits the next), so no client threads share the GIL."""

    def __init__(self, overrides: list[str]):
        from spiffy.serve.config import split_args
        from spiffy.serve.loop import EngineLoop
        from spiffy.serve.service import Service, compose_job

        serve, job = split_args(overrides)
        self.service = Service(compose_job(job), serve).load()
        self.loop = EngineLoop(max_batch=serve.max_batch, max_queue=serve.max_queue)

    def run(self, texts: list[str], concurrency: int) -> tuple[list[dict], float]:
        from spiffy.serve.generation import Text, plan, spiffy_object
        from spiffy.serve.loop import Job

        plans = [plan(self.service, self.service.encode(t)) for t in texts]
        rows: list = [None] * len(texts)
        todo = iter(range(len(texts)))
        done = threading.Event()
        lock = threading.Lock()

        def submit_next():
            with lock:
                i = next(todo, None)
            if i is None:
                return
            p, text, times, t0 = (
                plans[i],
                Text(self.service, plans[i].stops),
                [],
                time.perf_counter(),
            )

            def deliver(kind, payload):
                if kind == "block":
                    times.append(time.perf_counter())
                    if not text.add(payload)[1]:
                        return
                    self.loop.cancel(job, done=True)
                    stats = job.handle.state.recorder.stats
                elif kind == "done":
                    stats = payload
                else:
                    raise payload
                spiffy = spiffy_object(self.service, p, stats, job.nfe, len(job.blocks), text.kept)
                rows[i] = record(t0, times, times[-1], spiffy, len(text.kept))
                if all(r is not None for r in rows):
                    done.set()
                submit_next()

            job = Job(p.prompt_ids, p.decoder, p.seed, p.blocks, deliver)
            self.loop.submit(job)

        t0 = time.perf_counter()
        for _ in range(concurrency):
            submit_next()
        done.wait()
        wall = time.perf_counter() - t0
        self.loop.wait_idle()
        return rows, wall

    def close(self):
        self.loop.stop()


def run_load(fn, texts: list[str], *, concurrency: int | None = None, rate: float | None = None):
    """All `texts` through `fn(prompt, t_arrival)`: `concurrency` at a time, or Poisson arrivals at `rate`/s."""
    t0 = time.perf_counter()
    if concurrency is not None:
        with ThreadPoolExecutor(concurrency) as pool:
            rows = list(pool.map(lambda t: fn(t, time.perf_counter()), texts))
    else:
        gaps = np.random.default_rng(0).exponential(1.0 / rate, len(texts))
        arrivals = t0 + np.cumsum(gaps) - gaps[0]
        with ThreadPoolExecutor(len(texts)) as pool:

            def at(i):
                time.sleep(max(0.0, arrivals[i] - time.perf_counter()))
                return fn(texts[i], float(arrivals[i]))

            rows = list(pool.map(at, range(len(texts))))
    return rows, time.perf_counter() - t0


def summarize(rows: list[dict], wall: float) -> dict:
    def pct(key, q):
        values = [r[key] for r in rows if r[key] is not None]
        return float(np.percentile(values, q)) if values else float("nan")

    return {
        "requests": len(rows),
        "wall_s": wall,
        "ttft_p50_ms": 1e3 * pct("ttft_s", 50),
        "ttft_p99_ms": 1e3 * pct("ttft_s", 99),
        "tpob_p50_ms": 1e3 * pct("tpob_s", 50),
        "latency_p50_ms": 1e3 * pct("latency_s", 50),
        "latency_p99_ms": 1e3 * pct("latency_s", 99),
        "output_tokens_per_s": sum(r["tokens"] for r in rows) / wall,
        "requests_per_s": len(rows) / wall,
        "nfe_mean": statistics.fmean(r["nfe"] for r in rows),
    }


def check(rows: list[dict], texts: list[str], expected: dict[str, list[int]], name: str) -> None:
    bad = [t for r, t in zip(rows, texts) if r["ids"] != expected[t]]
    if bad:
        raise SystemExit(
            f"{name}: {len(bad)} requests differ from the offline generate (first: {bad[0]!r})"
        )


def offline_tokens(overrides: list[str], texts: list[str]) -> dict[str, list[int]]:
    """Each prompt's expected tokens: its decoder's offline `generate` (request id 0, seed 0), cut at EOS."""
    import torch

    from spiffy.serve.config import split_args
    from spiffy.serve.service import Service, compose_job

    serve, job = split_args(overrides)
    service = Service(compose_job(job), serve).load()
    out = {}
    for t in set(texts):
        tokens = service.default.generate(torch.tensor(service.encode(t)), request_id=0, seed=0)
        out[t] = service.cut(tokens.tokens.tolist())[0]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--url", help="a running server (then only its decoder, no in-process comparison)"
    )
    ap.add_argument("--only", choices=list(DECODERS), help="one decoder")
    ap.add_argument("--concurrency", default="1,4,16,32")
    ap.add_argument(
        "--rates", default="4,16,64", help="request rates (requests/s), Poisson arrivals"
    )
    ap.add_argument(
        "--requests", type=int, default=64, help="requests per cell (at least 2x concurrency)"
    )
    ap.add_argument(
        "--rounds", type=int, default=3, help="HTTP / in-process pairs at concurrency 16"
    )
    ap.add_argument("--out", default="results/bench/serve_cpu")
    args = ap.parse_args(argv)
    import openai

    names = [args.only] if args.only else list(DECODERS)
    if args.url and len(names) != 1:
        raise SystemExit("--url serves one decoder: add --only")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    rates = [float(r) for r in args.rates.split(",") if r]
    load_before = os.getloadavg()
    results, overhead = [], []
    for name in names:
        overrides = [*COMMON, *DECODERS[name]]
        proc, url = (None, args.url) if args.url else start(overrides)
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)
            model = client.models.list().data[0].id
            texts = prompts(args.requests)
            expected = None if args.url else offline_tokens(overrides, texts)
            http = lambda t, t0: one_http(client, model, t, t0)  # noqa: E731
            run_load(http, texts[:8], concurrency=4)  # warm-up
            for c in concurrencies:
                rows, wall = run_load(http, texts[: max(args.requests, 2 * c)], concurrency=c)
                if expected:
                    check(rows, texts, expected, f"{name} c={c}")
                results.append(
                    {"decoder": name, "load": f"concurrency {c}", **summarize(rows, wall)}
                )
                print(json.dumps(results[-1]), flush=True)
            for rate in rates:
                rows, wall = run_load(http, texts, rate=rate)
                if expected:
                    check(rows, texts, expected, f"{name} rate={rate}")
                results.append(
                    {"decoder": name, "load": f"{rate:g} req/s", **summarize(rows, wall)}
                )
                print(json.dumps(results[-1]), flush=True)
            if not args.url:  # HTTP vs in-process at concurrency 16, interleaved
                inproc = InProcess(overrides)
                inproc.run(texts[:8], 4)
                raw = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=32))
                plain = lambda t, t0: raw.post(f"{url}/v1/completions", json={"prompt": t}).json()  # noqa: E731
                pairs = []
                for _ in range(args.rounds):
                    _, wall_http = run_load(http, texts, concurrency=16)
                    _, wall_plain = run_load(plain, texts, concurrency=16)
                    rows, wall_in = inproc.run(texts, 16)
                    check(rows, texts, expected, f"{name} in-process")
                    pairs.append((wall_http, wall_in, wall_plain))
                inproc.close()
                http_s, in_s, plain_s = (statistics.median(p[i] for p in pairs) for i in range(3))
                overhead.append(
                    {
                        "decoder": name,
                        "http_wall_s": http_s,
                        "in_process_wall_s": in_s,
                        "http_overhead": http_s / in_s - 1,
                        "plain_http_wall_s": plain_s,
                        "plain_http_overhead": plain_s / in_s - 1,
                        "rounds": pairs,
                    }
                )
                print(json.dumps(overhead[-1]), flush=True)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(120)
    write(args, results, overhead, load_before, os.getloadavg())
    return 0


def write(args, results, overhead, load_before, load_after) -> None:
    import pandas as pd
    import torch

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = (
        f"{platform.machine()} CPU, torch {torch.__version__}, 1 torch thread per server, embedded model "
        f"(float32, gen 32, block 8), {args.requests} held-out `arith` prompts per cell, streamed, T=0; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after (2 cores, shared)"
    )
    (out.with_suffix(".json")).write_text(
        json.dumps({"env": env, "results": results, "http_overhead": overhead}, indent=1)
    )
    table = pd.DataFrame(results).drop(columns=["requests"]).round(2)
    lines = [f"# {out.name}", "", env + ".", "", "Command: `python scripts/bench_serve.py`", ""]
    lines += [table.to_markdown(index=False), ""]
    gains = []
    by = {(r["decoder"], r["load"]): r for r in results}
    for c in ("concurrency 1", "concurrency 16"):
        base, fast = by.get(("dual", c)), by.get(("dual+spiffy", c))
        if base and fast:
            gains.append(
                f"- {c}: Spiffy's TTFT p50 {base['ttft_p50_ms']:.1f} -> {fast['ttft_p50_ms']:.1f} ms "
                f"({base['ttft_p50_ms'] / fast['ttft_p50_ms']:.2f}x), output tokens/s "
                f"{base['output_tokens_per_s']:.0f} -> {fast['output_tokens_per_s']:.0f} "
                f"({fast['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}x)"
            )
    if gains:
        lines += ["Spiffy over its base (dual cache):", "", *gains, ""]
    if overhead:
        lines += [
            "HTTP overhead at concurrency 16 (wall-clock of the workload, medians of interleaved pairs):",
            "",
        ]
        lines += [
            f"- {o['decoder']}: in-process {o['in_process_wall_s']:.2f} s; HTTP with the `openai` client, "
            f"streamed {o['http_wall_s']:.2f} s ({100 * o['http_overhead']:+.1f} %); HTTP with a plain "
            f"`httpx` client, not streamed {o['plain_http_wall_s']:.2f} s "
            f"({100 * o['plain_http_overhead']:+.1f} %)"
            for o in overhead
        ]
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["decoder"] for r in results):
        rows = [r for r in results if r["decoder"] == name and r["load"].startswith("concurrency")]
        xs = [int(r["load"].split()[1]) for r in rows]
        axes[0].plot(xs, [r["output_tokens_per_s"] for r in rows], marker="o", label=name)
        axes[1].plot(xs, [r["ttft_p50_ms"] for r in rows], marker="o", label=name)
    for ax, label in zip(axes, ("output tokens/s", "TTFT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("spiffy serve on CPU (embedded model)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(f"wrote {out}.md/.json/.png")


if __name__ == "__main__":
    sys.exit(main())
