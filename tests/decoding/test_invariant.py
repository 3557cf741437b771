"""Invariant numerics (docs/numerics.md): in `DecoderOptions(invariant=True)` Spiffy returns its base decoder's
tokens and a batch returns each request's tokens alone, bitwise in float32 and bfloat16, and every verified row's
logits are bitwise those the base (or the request alone) computed for the same state.

This file imports only the core (torch, transformers, hypothesis): `scripts/gpu_check.sh` runs its `cuda`
parameters on a GPU image without Hydra, lm-eval or W&B. CUDA parameters carry the `cuda` marker and are
deselected by default (`pytest -m cuda` runs them).
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import spiffy
from spiffy.decoding.block_causal import BlockCausalCache
from spiffy.decoding.block_decoder import DecoderOptions
from spiffy.decoding.forward import Pending
from spiffy.decoding.strategies import STRATEGIES
from tests.conftest import load_llada2_fixture, tiny_random_model, tiny_random_sdar
from tests.helpers.lossless import (
    BATCH_CASES,
    RULES,
    SDAR_RULES,
    assert_batch_equals_alone,
    batch_case,
)

INVARIANT = DecoderOptions(invariant=True)
DTYPES = [torch.float32, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
PROMPTS = [[71, 124, 84, 108, 88], [5, 9], [33, 44, 55, 66, 77, 88, 99, 110, 12], [7]]


@contextlib.contextmanager
def recording_verified_rows(monkeypatch):
    """Record the block logits of every state verified by any strategy, keyed by the canvas with that state in
    its block (the whole input of the row's computation); a key seen twice must give the same logits."""
    seen: dict[tuple, torch.Tensor] = {}
    with monkeypatch.context() as patch:
        for cls in {*STRATEGIES.values(), BlockCausalCache}:

            def verify_call(self, canvas, block, states, *args, _original=cls.verify_call, **kw):
                pending = _original(self, canvas, block, states, *args, **kw)
                canvas, states, name = canvas.clone(), states.clone(), self.name

                def finish(out, _finish=pending.finish):
                    result = _finish(out)
                    for r in range(states.shape[0]):
                        row = canvas.clone()
                        row[block] = states[r]
                        key = (name, block.start, tuple(row.tolist()))
                        if key in seen:
                            assert torch.equal(seen[key], result.logits[r]), (
                                "a state's logits moved"
                            )
                        seen[key] = result.logits[r].clone()
                    return result

                return Pending(pending.call, finish)

            patch.setattr(cls, "verify_call", verify_call)
        yield seen


def assert_same_rows(base: dict, other: dict) -> int:
    """Every state the base verified was verified by `other` with bitwise equal logits; returns how many."""
    missing = [k for k in base if k not in other]
    assert not missing, f"{len(missing)} base states never verified"
    for key, logits in base.items():
        assert torch.equal(logits, other[key]), f"logits differ at block {key[1]}"
    return len(base)


def model_of(family: str, dtype: torch.dtype, device: str, fixtures: dict):
    if family == "embedded":
        return spiffy.load_model("embedded", dtype=dtype).to(device)
    if family == "sdar-random":
        return tiny_random_sdar(block_size=4).to(dtype=dtype, device=device)
    if family == "llada-random":
        return tiny_random_model().to(dtype=dtype, device=device)
    if (
        family == "llada2"
    ):  # the fixture's mask and EOS ids are generate arguments, set on the config
        return load_llada2_fixture().to(dtype=dtype, device=device)
    return spiffy.load_model(fixtures[family], dtype=dtype).to(device)


@pytest.fixture
def fixtures(llada_fixture_dir, dream_fixture_dir, sdar_fixture_dir, llada2_fixture_dir):
    return {
        "llada": llada_fixture_dir,
        "dream": dream_fixture_dir,
        "sdar": sdar_fixture_dir,
        "llada2": llada2_fixture_dir,
    }


def run_lossless(monkeypatch, model, prompt, graph="chain:4", seed=3, **kwargs):
    """Base and Spiffy in invariant mode: tokens equal, every base state's logits among Spiffy's rows."""
    with recording_verified_rows(monkeypatch) as seen_base:
        base = spiffy.build_decoder(model, options=INVARIANT, **kwargs).generate(
            prompt, request_id=7, seed=seed
        )
    with recording_verified_rows(monkeypatch) as seen_fast:
        fast = spiffy.build_decoder(
            model, options=INVARIANT, speculate=spiffy.Speculation(graph), **kwargs
        ).generate(prompt, request_id=7, seed=seed)
    assert torch.equal(fast.canvas, base.canvas), kwargs
    assert fast.stats.nfe <= base.stats.nfe
    return base, fast, assert_same_rows(seen_base, seen_fast)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["llada", "dream", "sdar", "llada2"])
def test_a_row_is_bitwise_the_same_among_any_number_of_states(fixtures, family, dtype, device):
    """The mechanism: one verification forward of N states gives each state's logits alone, bit for bit, in
    every cache layout of the family (SDAR: its block-causal cache after a prefill)."""
    model = model_of(family, dtype, device, fixtures)
    spec = spiffy.model_spec(model)
    g = torch.Generator().manual_seed(0)
    lb = (spec.attention_block_size or 8) if spec.block_causal else 8  # LLaDA2: any block length
    canvas = torch.randint(0, spec.mask_id, (5 * lb,), generator=g).to(device)
    block = slice(3 * lb, 4 * lb)
    states = torch.randint(0, spec.mask_id, (9, lb), generator=g).to(device)
    states[:, lb // 2 :] = spec.mask_id
    canvas[block] = states[0]
    caches = ["block_causal"] if spec.block_causal else ["none", "prefix", "dual"]
    for cache in caches:
        if cache == "block_causal":
            strategy = BlockCausalCache(model, invariant=True)
            strategy.block_length = lb  # LLaDA2's block mask reads it (the decoder sets it)
            strategy.prefill(canvas, block.start)
        else:
            strategy = STRATEGIES[cache](model, invariant=True)
        strategy.begin_block(canvas, block)
        together = strategy.verify(canvas, block, states).logits
        for r in range(states.shape[0]):
            alone = strategy.verify(canvas, block, states[r : r + 1]).logits[0]
            assert torch.equal(together[r], alone), (cache, r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "temperature"), list(itertools.product(DTYPES, [0.0, 0.9])))
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_spiffy_equals_its_base_bitwise_on_the_embedded_model(
    monkeypatch, cache, dtype, temperature, device
):
    from spiffy.tasks.arith import format_prompt, generate_split

    model = model_of("embedded", dtype, device, {})
    tok = spiffy.load_tokenizer("embedded")
    saved = rows = 0
    for i, problem in enumerate(generate_split("test", 1 if cache == "none" else 2)):
        prompt = tok(format_prompt(problem["question"]), return_tensors="pt").input_ids[0]
        base, fast, n = run_lossless(
            monkeypatch,
            model,
            prompt,
            graph="chain:6",
            seed=i,
            gen_length=32,
            block_length=8,
            steps=32,
            cache=cache,
            temperature=temperature,
        )
        saved, rows = saved + base.stats.nfe - fast.stats.nfe, rows + n
    assert saved > 0 and rows > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_a_batch_equals_each_request_alone_bitwise(monkeypatch, fixtures, cache, dtype, device):
    """Requests of different prompt lengths stacked into shared forwards (padded rows, queries and caches):
    each request's tokens and the logits of every state it verified equal its decode alone, bitwise."""
    model = model_of("llada", dtype, device, fixtures)
    decoder = spiffy.build_decoder(
        model,
        gen_length=16,
        block_length=8,
        cache=cache,
        temperature=0.7,
        options=INVARIANT,
        speculate=spiffy.Speculation("fig2"),
    )
    with recording_verified_rows(monkeypatch) as seen_alone:
        alone = [decoder.generate(p, request_id=r, seed=5) for r, p in enumerate(PROMPTS)]
    with recording_verified_rows(monkeypatch) as seen_batch:
        batch = decoder.generate_batch(PROMPTS, seed=5, batch_size=4)
    assert max(batch.batch.calls_per_forward) > 1  # calls were really stacked
    for a, b in zip(alone, batch, strict=True):
        assert torch.equal(a.canvas, b.canvas) and a.stats.nfe == b.stats.nfe
    assert_same_rows(seen_alone, seen_batch)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "rule", "cache", "temperature"),
    list(itertools.product(DTYPES, RULES, ["none", "prefix", "dual"], [0.0, 0.7])),
)
def test_losslessness_grid_in_invariant_mode(
    monkeypatch, fixtures, dtype, rule, cache, temperature, device
):
    """The losslessness grid (tests/decoding/test_losslessness.py) in float32 and bfloat16: LLaDA and Dream."""
    for family in ("llada", "dream"):
        model = model_of(family, dtype, device, fixtures)
        for graph in ("chain:4", "fig2", "topk:3"):
            run_lossless(
                monkeypatch,
                model,
                torch.tensor([71, 124, 84, 108, 88]),
                graph=graph,
                gen_length=32,
                block_length=8,
                rule=rule,
                cache=cache,
                temperature=temperature,
                **RULES[rule],
            )


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "rule", "temperature"), list(itertools.product(DTYPES, SDAR_RULES, [0.0, 0.7]))
)
def test_sdar_grid_in_invariant_mode(monkeypatch, fixtures, dtype, rule, temperature, device):
    model = model_of("sdar", dtype, device, fixtures)
    lb = spiffy.model_spec(model).attention_block_size
    for graph in ("chain:4", "fig2"):
        run_lossless(
            monkeypatch,
            model,
            torch.tensor([71, 12, 84, 10, 88]),
            graph=graph,
            gen_length=2 * lb,
            block_length=lb,
            rule=rule,
            temperature=temperature,
            **{**SDAR_RULES[rule], "steps_per_block": min(4, lb)},
        )


@pytest.mark.slow
@settings(max_examples=30, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate])
@given(**BATCH_CASES, dtype=st.sampled_from(DTYPES))
def test_property_batch_equals_alone_in_lower_precision(prompts, seed, batch_size, dtype, **case):
    """The batching property test (tests/decoding/test_batching.py) in float32 and bfloat16, invariant mode."""
    decoder = batch_case(**case, dtype=dtype, options=INVARIANT)
    ids = [seed + i for i in range(len(prompts))]
    assert_batch_equals_alone(
        decoder, prompts, ids, seed=seed, reverse=False, batch_size=batch_size
    )
