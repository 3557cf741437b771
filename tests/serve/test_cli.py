"""`spiffy serve` and `spiffy chat` as commands: bad settings are one line before any model loads; the chat over
piped stdin streams each answer and its NFE line; the server started as a subprocess answers, and on SIGTERM
refuses new requests (503), finishes the ones in flight and exits 0; the invariant mode and 32 concurrent
requests stay token-identical to the offline `generate`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from spiffy.lab.cli import main
from tests.serve.conftest import JOB, QUESTIONS, build_service, client, offline, prompt, running

SPIFFY = [sys.executable, "-c", "import sys; from spiffy.lab.cli import main; sys.exit(main())"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize(
    "argv, words",
    [
        (["port=http"], "serve.port='http' must be an integer"),
        (["serve.max_queue=0"], "serve.max_queue=0 must be a positive integer"),
        (["serve.max_qeue=3"], "did you mean serve.max_queue?"),
        (["graph.budget=ten"], "graph.budget='ten'"),
        (["--api-key"], "--api-key needs a value"),
    ],
)
@pytest.mark.parametrize("name", ["serve", "chat"])
def test_bad_settings_are_one_line_before_loading(capsys, name, argv, words):
    assert main([name, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"spiffy {name}: ") and words in err and "\n" not in err


def test_chat_over_piped_stdin():
    questions = f"{QUESTIONS[0]}\n/reset\n{QUESTIONS[1]}\n"
    out = subprocess.run(
        [*SPIFFY, "chat", *JOB],
        input=questions,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    service = build_service()
    answers = [service.text(offline(service, prompt(i))) for i in (0, 1)]
    lines = out.stdout.splitlines()
    nfe = [re.fullmatch(r"\[NFE (\d+) vs (\d+) \((\d+\.\d)×\)\]", line) for line in lines]
    assert sum(m is not None for m in nfe) == 2
    for answer in answers:
        assert answer.strip() and answer in out.stdout
    for m in filter(None, nfe):
        assert int(m[1]) < int(m[2])  # Spiffy over its base: fewer model calls


def start_server(*args):
    proc = subprocess.Popen(
        [*SPIFFY, "serve", *JOB, "port=0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    for line in proc.stdout:
        if m := re.search(r"ready on (http://\S+)", line):
            return proc, m[1]
    raise AssertionError(f"no ready line: {proc.stderr.read()}")


@pytest.mark.slow
def test_sigterm_refuses_new_requests_drains_and_exits_0():
    proc, url = start_server("serve.max_batch=1")
    try:
        assert httpx.get(f"{url}/health/ready").status_code == 200
        results = []
        threads = [
            threading.Thread(
                target=lambda i=i: results.append(
                    (
                        i,
                        httpx.post(
                            f"{url}/v1/completions", json={"prompt": prompt(i)}, timeout=120
                        ),
                    )
                )
            )
            for i in range(6)
        ]
        for t in threads:
            t.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health/ready").status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        late = httpx.post(f"{url}/v1/completions", json={"prompt": prompt(0)}, timeout=60)
        for t in threads:
            t.join(120)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert late.status_code == 503
    assert len(results) == 6 and all(r.status_code == 200 for _, r in results)
    service = build_service()
    for i, r in results:
        assert r.json()["spiffy"]["completion_token_ids"] == offline(service, prompt(i))


@pytest.mark.slow
@pytest.mark.parametrize("invariant", [False, True])
def test_32_concurrent_requests_equal_offline_generate(invariant):
    service = build_service([f"decoder.invariant={str(invariant).lower()}"])
    with running(service) as (url, _, _):

        def one(i):
            c = client(url)
            kw = dict(model="tiny-llada-arith", seed=i, temperature=0.7 if i % 2 else 0.0)
            if i % 4 < 2:
                r = c.completions.create(prompt=prompt(i), stream=i % 3 == 0, **kw)
            else:
                r = c.chat.completions.create(
                    messages=[{"role": "user", "content": QUESTIONS[i % 4]}],
                    stream=i % 3 == 0,
                    **kw,
                )
            if i % 3 == 0:
                return [json.loads(ch.model_dump_json()) for ch in r][-1]["spiffy"]
            return r.model_extra["spiffy"]

        with ThreadPoolExecutor(32) as pool:
            got = list(pool.map(one, range(32)))
    for i, spiffy in enumerate(got):
        want = offline(service, prompt(i), seed=i, temperature=0.7 if i % 2 else 0.0)
        assert spiffy["completion_token_ids"] == want, i
