"""The OpenAI-compatible API against a live server (the `openai` client on 127.0.0.1): completions and chat,
streamed and not, token-identical to the offline `generate` with the same seed at any concurrency; the response's
usage and `spiffy` object; `/v1/models`, `/health`, `/health/ready`, `/metrics`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serve.conftest import QUESTIONS, client, offline, prompt


def complete(url, i, *, stream=False, **kw):
    c = client(url)
    if not stream:
        r = c.completions.create(model="tiny-llada-arith", prompt=prompt(i), **kw)
        return r.choices[0].text, r.model_extra["spiffy"], r.choices[0].finish_reason, r.usage
    text, last = "", None
    for chunk in c.completions.create(
        model="tiny-llada-arith", prompt=prompt(i), stream=True, **kw
    ):
        text += chunk.choices[0].text
        last = chunk
    return text, last.model_extra["spiffy"], last.choices[0].finish_reason, last.usage


@pytest.mark.parametrize("concurrency", [1, 8])
@pytest.mark.parametrize("stream", [False, True])
def test_completions_equal_offline_generate(served, concurrency, stream):
    url, service, _, _ = served
    n = max(concurrency, 4)
    with ThreadPoolExecutor(concurrency) as pool:
        got = list(pool.map(lambda i: complete(url, i, stream=stream, max_tokens=16), range(n)))
    for i, (text, spiffy, finish, usage) in enumerate(got):
        want = offline(service, prompt(i), blocks=2)
        assert spiffy["completion_token_ids"] == want
        assert text == service.text(want)
        assert finish == ("stop" if len(want) < 16 else "length")
        assert usage.completion_tokens == len(want)
        assert spiffy["nfe"] <= spiffy["base_nfe"]  # Spiffy: the base's tokens in no more forwards


def test_sampling_with_a_seed_is_the_same_at_any_concurrency(served):
    url, service, _, _ = served
    kw = dict(max_tokens=32, temperature=0.9, seed=7)
    alone = complete(url, 0, **kw)
    with ThreadPoolExecutor(8) as pool:
        crowd = list(
            pool.map(lambda i: complete(url, i % 2 * 4, stream=i % 3 == 0, **kw), range(8))
        )
    want = offline(service, prompt(0), temperature=0.9, seed=7)
    assert alone[1]["completion_token_ids"] == want
    assert all(r[1]["completion_token_ids"] == want and r[0] == alone[0] for r in crowd)
    assert alone[1]["seed"] == 7 and alone[1]["temperature"] == 0.9


def test_max_tokens_rounds_up_to_whole_blocks_and_says_so(served):
    url, service, _, _ = served
    text, spiffy, _, _ = complete(url, 1, max_tokens=3)
    assert spiffy["max_tokens"] == service.block_length and spiffy["blocks"] == 1
    assert "rounded up" in spiffy["warning"]
    assert spiffy["completion_token_ids"] == offline(service, prompt(1), blocks=1)


def test_stop_strings_cut_the_text(served):
    url, service, _, _ = served
    full = service.text(offline(service, prompt(0)))
    stop = full[3:5]
    assert stop and full.find(stop) == 3
    for stream in (False, True):
        text, _, finish, _ = complete(url, 0, stop=[stop], stream=stream)
        assert (text, finish) == (full[:3], "stop")


def test_chat_uses_the_models_prompt_format(served):
    """The embedded model has no chat template: its own `Question: ...\\nAnswer:` format (the QA layout)."""
    url, service, _, _ = served
    c = client(url)
    messages = [{"role": "user", "content": QUESTIONS[2]}]
    r = c.chat.completions.create(model="tiny-llada-arith", messages=messages)
    want = offline(service, prompt(2))
    assert r.model_extra["spiffy"]["completion_token_ids"] == want
    assert r.choices[0].message.content == service.text(want)
    streamed = "".join(
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(
            model="tiny-llada-arith", messages=messages, stream=True
        )
    )
    assert streamed == service.text(want)


def test_spiffy_graph_none_is_the_base_decoder(served):
    url, service, _, _ = served
    c = client(url)
    fast = c.completions.create(model="tiny-llada-arith", prompt=prompt(3)).model_extra["spiffy"]
    base = c.completions.create(
        model="tiny-llada-arith", prompt=prompt(3), extra_body={"spiffy": {"graph": "none"}}
    ).model_extra["spiffy"]
    assert fast["completion_token_ids"] == base["completion_token_ids"]
    assert base["graph"] == "none" and fast["graph"] == "chain:3"
    assert base["nfe"] == base["base_nfe"] and fast["nfe"] < base["nfe"]


def test_models_health_ready_metrics(served):
    url, service, _, _ = served
    models = client(url).models.list().data
    assert [m.id for m in models] == ["tiny-llada-arith"]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/health/ready").json()["ready"] is True
    complete(url, 0, max_tokens=8)
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "requests_total",
        "queue_depth",
        "tokens_per_second",
        "nfe_per_token",
        "accepted_drafts_per_forward",
        "speedup_nfe",
    ):
        assert f"\nspiffy_{name}" in text
    ok = [
        line for line in text.splitlines() if line.startswith('spiffy_requests_total{outcome="ok"}')
    ]
    assert int(ok[0].split()[-1]) >= 1


def test_chat_template_models_and_models_without_one(served):
    """A tokenizer with a chat template renders the conversation with it (generation prompt added); a model
    with neither a template nor the embedded format is a 400 naming `messages`."""
    import copy

    from spiffy.serve.service import RequestError

    _, service, _, _ = served
    templated = copy.copy(service)
    templated.tokenizer = copy.copy(service.tokenizer)
    templated.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    assert templated.chat_format == "template"
    assert templated.chat_prompt(messages) == "<system>Be brief.\n<user>1+1?\n<assistant>"
    assert service.chat_format == "qa"
    assert (
        service.chat_prompt(
            [
                {"role": "user", "content": "a?"},
                {"role": "assistant", "content": "1"},
                {"role": "user", "content": "b?"},
            ]
        )
        == "Question: a?\nAnswer: 1\n\nQuestion: b?\nAnswer:"
    )
    plain = copy.copy(service)
    plain.cfg = copy.deepcopy(service.cfg)
    plain.cfg.model.path = "some/checkpoint"
    with pytest.raises(RequestError, match="has no chat template") as err:
        plain.chat_prompt(messages)
    assert err.value.param == "messages"
