"""Refusals and failures: each bad field a 400 naming it, the API key (401), body size (413), the queue limit
(429 with Retry-After), a client that disconnects (its request aborted, the others' outputs unchanged) and a
decoder error inside one request (500 with the reason for it alone)."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import pytest

from tests.serve.conftest import Gate, build_service, client, offline, prompt, running

KEY = "sekret"


@pytest.fixture(scope="module")
def limited():
    service = build_service(api_key=KEY, max_queue=2, max_body_bytes=4000, max_prompt_tokens=300)
    with running(service) as (url, loop, metrics):
        yield url, service, loop, metrics


def post(url, body, *, path="/v1/completions", key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=60, **kw)


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"prompt": "x", "n": 2}, "n", "n=2"),
        ({"prompt": "x", "max_tokens": 33}, "max_tokens", "limit of 32"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"prompt": "x", "temperature": -1}, "temperature", "greater than or equal to 0"),
        ({"prompt": "x", "top_p": 1.5}, "top_p", "less than or equal to 1"),
        ({"prompt": "x", "top_p": 0.5, "temperature": 0}, "top_p", "temperature > 0"),
        ({"prompt": "x", "spiffy": {"graph": "bogus"}}, "spiffy.graph", "bogus"),
        (
            {"prompt": "x", "spiffy": {"graph": "none", "budget": 2}},
            "spiffy.budget",
            "drafts nothing",
        ),
        ({"prompt": "x", "spiffy": {"budgte": 2}}, "spiffy.budgte", "Extra inputs"),
        ({"prompt": "x", "best_of": 2}, "best_of", "Extra inputs"),
        ({"prompt": "x" * 301}, "prompt", "serve.max_prompt_tokens=300"),
        ({"prompt": [10**6]}, "prompt", "outside the vocabulary"),
        ({}, "prompt", "Field required"),
    ],
)
def test_bad_fields_are_400_naming_the_field(limited, body, param, words):
    r = post(limited[0], body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_chat_without_messages_or_format(limited):
    r = post(limited[0], {"messages": []}, path="/v1/chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post(
        limited[0], {"messages": [{"role": "robot", "content": "hi"}]}, path="/v1/chat/completions"
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.role"


def test_api_key_body_size_and_model(limited):
    url = limited[0]
    assert post(url, {"prompt": "x"}, key=None).status_code == 401
    assert post(url, {"prompt": "x"}, key="wrong").status_code == 401
    r = post(url, {"prompt": "x" * 5000})
    assert r.status_code == 413 and "serve.max_body_bytes=4000" in r.json()["error"]["message"]
    r = post(url, {"prompt": "x", "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert httpx.get(f"{url}/health").status_code == 200  # probes need no key


def test_queue_limit_is_429_with_retry_after(limited):
    url, service, loop, _ = limited
    gate = Gate(service, service.encode(prompt(0)))
    try:
        held = [threading.Thread(target=post, args=(url, {"prompt": prompt(0)})) for _ in range(2)]
        for t in held:
            t.start()
        assert gate.reached.wait(30)
        while loop.pending < 2:
            time.sleep(0.01)
        r = post(url, {"prompt": prompt(1)})
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert "serve.max_queue=2" in r.json()["error"]["message"]
    finally:
        gate.close()
    for t in held:
        t.join(30)
    assert post(url, {"prompt": prompt(1)}).status_code == 200  # room again


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_only_that_request(limited, stream):
    url, service, loop, metrics = limited
    gate = Gate(service, service.encode(prompt(0)))
    other: dict = {}
    body = {"prompt": prompt(0), "stream": stream}
    headers = {"Authorization": f"Bearer {KEY}"}

    def leave():  # stream: the first block arrives, then the client goes; else it gives up waiting
        timeout = httpx.Timeout(60, read=60 if stream else 2)
        with contextlib.suppress(httpx.ReadTimeout):
            with httpx.stream(
                "POST", f"{url}/v1/completions", headers=headers, json=body, timeout=timeout
            ) as r:
                lines = r.iter_lines()  # kept: a dropped iterator would close the connection now
                first = next(line for line in lines if line.startswith("data:"))
                other["first"] = json.loads(first[5:])["choices"][0]["text"]
                gate.reached.wait(30)  # leave while the request is mid-decode (the engine held)

    try:
        aborted, cancels = metrics.requests["aborted"], loop.cancels
        client_thread = threading.Thread(target=leave)
        client_thread.start()
        assert gate.reached.wait(30)
        waiter = threading.Thread(target=lambda: other.update(r=post(url, {"prompt": prompt(2)})))
        waiter.start()
        while loop.pending < 2:
            time.sleep(0.01)
        client_thread.join(30)
        assert ("first" in other) == stream
        deadline = time.monotonic() + 30
        while loop.cancels == cancels:  # the server saw the disconnect (the engine is still held)
            assert time.monotonic() < deadline, "the disconnect did not cancel the request"
            time.sleep(0.01)
        gate.release.set()
        waiter.join(60)
        assert loop.wait_idle(30)
        assert metrics.requests["aborted"] == aborted + 1
    finally:
        gate.close()
    spiffy = other["r"].json()["spiffy"]
    assert spiffy["completion_token_ids"] == offline(service, prompt(2))


def test_a_failing_request_is_500_and_the_others_finish(limited):
    url, service, _, _ = limited
    gate = Gate(service, service.encode(prompt(3)), fail="injected fault")
    try:
        results = {}
        threads = [
            threading.Thread(
                target=lambda i=i: results.update({i: post(url, {"prompt": prompt(i)})})
            )
            for i in (2, 3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results[3].status_code == 500
        assert "RuntimeError: injected fault" in results[3].json()["error"]["message"]
        assert results[2].status_code == 200
        assert results[2].json()["spiffy"]["completion_token_ids"] == offline(service, prompt(2))
        stream = client(url, KEY).completions.create(
            prompt=prompt(3), model="tiny-llada-arith", stream=True
        )
        with pytest.raises(Exception, match="injected fault"):
            list(stream)
    finally:
        gate.close()
