"""The engine and streaming (docs/algorithm.md §13): requests joining at any step, aborted requests and streamed
blocks never change anyone's tokens; every request equals its `generate` result (float64 fixtures)."""

from __future__ import annotations

import pytest
import torch

import spiffy
from spiffy.decoding.engine import Engine
from spiffy.decoding.types import BlockEvent
from tests.conftest import tiny_random_sdar
from tests.helpers.stacking import fail_request_1_in_block_2

PROMPTS = [[71, 124, 84, 108, 88], [5, 9], [33, 44, 55, 66, 77, 88, 99, 110, 12], [7]]


def decoders(fixture_model):
    """A base and a Spiffy decoder of each cache kind, at T > 0 (keyed noise), and SDAR with both fusions."""
    kw = dict(gen_length=24, block_length=8, temperature=0.7)
    sdar = tiny_random_sdar(seed=1, block_size=4)
    return {
        "none": spiffy.build_decoder(fixture_model, **kw),
        "dual+spiffy": spiffy.build_decoder(
            fixture_model, cache="dual", speculate=spiffy.Speculation("fig2"), **kw
        ),
        "none+cross": spiffy.build_decoder(
            fixture_model,
            rule="threshold",
            tau=0.5,
            speculate=spiffy.Speculation("chain:4", cross_block=True),
            **kw,
        ),
        "sdar+fuse": spiffy.build_decoder(
            sdar,
            gen_length=10,
            block_length=4,
            rule="sdar_dynamic",
            steps_per_block=4,
            tau=0.5,
            fuse_next=True,
            temperature=0.5,
            speculate=spiffy.Speculation("fig2", fuse_store=True),
        ),
    }


def prompts_for(decoder):
    vocab = decoder.spec.vocab_size
    return [[t % min(vocab, 20) if decoder.spec.block_causal else t for t in p] for p in PROMPTS]


def same_result(a, b) -> None:
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.canvas, b.canvas)
    assert a.stats.nfe == b.stats.nfe
    assert a.stats.accepted_per_forward == b.stats.accepted_per_forward
    assert a.stats.accepted_per_level == b.stats.accepted_per_level


def test_streamed_blocks_concatenate_to_generate(fixture_model):
    for name, decoder in decoders(fixture_model).items():
        for i, prompt in enumerate(prompts_for(decoder)):
            result = decoder.generate(prompt, request_id=i, seed=3)
            events = list(decoder.stream(prompt, request_id=i, seed=3))
            assert all(isinstance(e, BlockEvent) for e in events)
            assert [e.block_index for e in events] == list(range(len(events))), name
            tokens = torch.cat([e.tokens for e in events])
            assert torch.equal(tokens, result.tokens), name
            assert sum(e.nfe for e in events) == result.stats.nfe, name
            assert sum(e.accepted for e in events) == sum(result.stats.accepted_per_level.values())


def test_streaming_stops_at_a_stop_id(fixture_model):
    """After a stop id decoding ends: the streamed blocks are a prefix of the tokens, the rest keep the mask."""
    decoder = spiffy.build_decoder(fixture_model, gen_length=32, block_length=8)
    free = decoder.generate(PROMPTS[0])
    stop = int(free.tokens[3])  # a token of the first block: decoding ends after it
    stopped = spiffy.build_decoder(fixture_model, gen_length=32, block_length=8, stop_ids=[stop])
    result = stopped.generate(PROMPTS[0])
    events = list(stopped.stream(PROMPTS[0]))
    tokens = torch.cat([e.tokens for e in events])
    assert len(events) < 4 and torch.equal(tokens, result.tokens[: tokens.numel()])
    assert (result.tokens[tokens.numel() :] == stopped.spec.mask_id).all()


def test_requests_joining_mid_decode_equal_generate(fixture_model):
    """Requests added at different steps (one per step, then two at once) come out as alone; the engine's
    events per request are the stream's."""
    for name, decoder in decoders(fixture_model).items():
        prompts = prompts_for(decoder)
        alone = [decoder.generate(p, request_id=i, seed=7) for i, p in enumerate(prompts)]
        streams = [list(decoder.stream(p, request_id=i, seed=7)) for i, p in enumerate(prompts)]
        engine = Engine(decoder, max_tokens=None)
        events = {i: [] for i in range(len(prompts))}

        def step():
            for request, event in engine.step():
                events[request.request_id].append(event)

        requests = [engine.add_request(prompts[0], request_id=0, seed=7)]
        step()
        step()
        requests.append(engine.add_request(prompts[1], request_id=1, seed=7))
        step()
        requests += [
            engine.add_request(p, request_id=i + 2, seed=7) for i, p in enumerate(prompts[2:])
        ]
        while engine.has_unfinished():
            step()
        assert max(engine.stats.calls_per_forward) > 1, name  # really stacked
        for i, (request, result) in enumerate(zip(requests, alone, strict=True)):
            same_result(request.result, result)
            assert [e.block_index for e in events[i]] == [e.block_index for e in streams[i]]
            for got, want in zip(events[i], streams[i], strict=True):
                assert torch.equal(got.tokens, want.tokens) and got.nfe == want.nfe


def test_aborted_requests_do_not_change_the_others(fixture_model):
    for name, decoder in decoders(fixture_model).items():
        prompts = prompts_for(decoder)
        alone = [decoder.generate(p, request_id=i, seed=2) for i, p in enumerate(prompts)]
        engine = Engine(decoder, max_batch=3, max_tokens=None)
        requests = [engine.add_request(p, request_id=i, seed=2) for i, p in enumerate(prompts)]
        extra = engine.add_request(prompts[0], request_id="extra", seed=2)
        engine.step()
        engine.step()
        assert engine.abort(requests[1]) == 1  # live, mid-decode
        assert engine.abort("extra") == 1  # still waiting
        assert engine.abort("nobody") == 0
        while engine.has_unfinished():
            engine.step()
        assert requests[1].aborted and requests[1].result is None and requests[1].finished
        assert extra.aborted and extra.result is None
        for i in (0, 2, 3):
            same_result(requests[i].result, alone[i])


def test_request_iteration_steps_the_engine(fixture_model):
    decoder = decoders(fixture_model)["dual+spiffy"]
    engine = Engine(decoder)
    first = engine.add_request(PROMPTS[0], request_id=0)
    second = engine.add_request(PROMPTS[2], request_id=2)
    events = list(first)  # steps the engine until `first` is done; `second` advances alongside
    assert first.result is not None and torch.equal(
        torch.cat([e.tokens for e in events]), first.result.tokens
    )
    assert first.poll() == []
    rest = second.poll()
    assert rest and all(isinstance(e, BlockEvent) for e in rest)
    rest += list(second)
    same_result(second.result, decoder.generate(PROMPTS[2], request_id=2))
    assert torch.equal(torch.cat([e.tokens for e in rest]), second.result.tokens)


def test_engine_input_errors(fixture_model):
    decoder = spiffy.build_decoder(fixture_model, gen_length=8, block_length=8)
    with pytest.raises(ValueError, match="batch_size=0"):
        Engine(decoder, max_batch=0)
    with pytest.raises(ValueError, match="max_tokens='many'"):
        Engine(decoder, max_tokens="many")
    engine = Engine(decoder)
    with pytest.raises(ValueError, match="prompt_ids contain 99999"):
        engine.add_request([1, 99999])
    assert not engine.has_unfinished()
    state = decoder.start(PROMPTS[0])
    with pytest.raises(ValueError, match="no model call yet"):
        decoder.step(state, object())
    decoder.step(state)
    with pytest.raises(ValueError, match="waits on its model call"):
        decoder.step(state)


def test_a_failing_request_fails_alone_in_the_engine(fixture_model):
    """An error in one request's step marks that request failed; the others finish as alone."""
    decoder = spiffy.build_decoder(fixture_model, gen_length=16, block_length=8)
    alone = [decoder.generate(p, request_id=i) for i, p in enumerate(PROMPTS)]
    fail_request_1_in_block_2(decoder)
    engine = Engine(decoder)
    requests = [engine.add_request(p, request_id=i) for i, p in enumerate(PROMPTS)]
    while engine.has_unfinished():
        engine.step()
    with pytest.raises(RuntimeError, match="request 1 fails"):
        list(requests[1])
    for i in (0, 2, 3):
        same_result(requests[i].result, alone[i])
