"""Losslessness (docs/algorithm.md §6): Spiffy(B) produces exactly B's tokens with NFE <= NFE(B), for every base decoder
(rule × cache mode × temperature × remasking), every graph and seed, at T = 0 and T > 0, in float64."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import spiffy
from tests.conftest import _never_predict_mask, tiny_random_sdar
from tests.helpers.lossless import (
    FIXTURE_GRID,
    RULES,
    SDAR_RULES,
    assert_lossless,
    check_llada_case,
    draft_graphs,
    fixture_savings,
    llada_cases,
)

GRAPHS = ["chain:4", "fig2", "topk:3", "chain:10"]


@pytest.mark.parametrize(("rule", "cache", "temperature"), FIXTURE_GRID)
def test_every_base_decoder_on_the_fixture(fixture_model, rule, cache, temperature):
    saved = fixture_savings(fixture_model, GRAPHS, rule, cache, temperature)
    if rule == "schedule":
        assert saved > 0  # Spiffy must actually save forwards on the one-token-per-step base


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_remasking_and_eos_options(tiny_model, remasking, cache):
    for temperature, eos_opts in itertools.product([0.0, 1.0], [False, True]):
        assert_lossless(
            tiny_model,
            torch.tensor([1, 2, 3, 4]),
            "fig2",
            seed=11,
            gen_length=24,
            block_length=8,
            cache=cache,
            temperature=temperature,
            remasking=remasking,
            logits_eos_inf=eos_opts,
            confidence_eos_eot_inf=eos_opts,
        )


@settings(
    max_examples=60, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate]
)  # no shrinking: bounded CI time
@given(**llada_cases(draft_graphs()))
def test_property_spiffy_equals_base(graph, **case):
    check_llada_case(graph, **case)


@pytest.mark.parametrize(
    ("rule", "temperature", "remasking"),
    [
        *itertools.product(RULES, [0.0, 0.7], ["low_confidence"]),
        ("schedule", 1.0, "random"),
    ],
)
def test_cross_block_continuation_is_lossless_and_saves_block_start_forwards(
    fixture_model, rule, temperature, remasking
):
    """docs/algorithm.md §5.4 (optional): a verified complete draft's next-block logits replace that block's first
    forward; tokens stay the base's, and it never costs a forward over the plain walk."""
    saved = 0
    for graph, (request_id, prompt) in itertools.product(
        ["chain:4", "fig2", "chain:10"], enumerate([[71, 124, 84, 108, 88], [5, 9, 14, 3]])
    ):
        kw = dict(gen_length=32, block_length=8, rule=rule, temperature=temperature)
        kw.update(remasking=remasking, **RULES[rule])
        args = (fixture_model, torch.tensor(prompt), graph, request_id, 3)
        _, plain = assert_lossless(*args, **kw)
        _, cross = assert_lossless(*args, cross_block=True, **kw)
        assert torch.equal(cross.tokens, plain.tokens) and cross.stats.nfe <= plain.stats.nfe
        saved += plain.stats.nfe - cross.stats.nfe
        assert plain.stats.nfe - cross.stats.nfe <= kw["gen_length"] // kw["block_length"] - 1
    if rule == "schedule":
        assert saved > 0


def test_cross_block_needs_the_exact_no_cache_layout(fixture_model):
    with pytest.raises(
        ValueError, match="cross_block=True needs .* verify='exact', got .*verify='shared'"
    ):
        spiffy.build_decoder(
            fixture_model,
            gen_length=16,
            block_length=8,
            speculate=spiffy.Speculation("chain:3", verify="shared", cross_block=True),
        )
    for cache in ("prefix", "dual"):
        with pytest.raises(
            ValueError, match=f"cross_block=True needs cache in \\['none'\\].*'{cache}'"
        ):
            spiffy.build_decoder(
                fixture_model,
                gen_length=16,
                block_length=8,
                cache=cache,
                speculate=spiffy.Speculation("chain:3", cross_block=True),
            )


def test_shared_mode_reports_agreement(fixture_model):
    """`shared` is near-lossless: measured and reported, not asserted equal (docs/algorithm.md §5.3)."""
    prompts = [torch.tensor([71, 124, 84, 108, 88]), torch.tensor([5, 9, 14]), torch.tensor([3])]
    agree = 0
    for prompt, cache in itertools.product(prompts, ["none", "prefix"]):
        kw = dict(gen_length=32, block_length=8, cache=cache)
        base = spiffy.build_decoder(fixture_model, **kw).generate(prompt)
        shared = spiffy.build_decoder(
            fixture_model, speculate=spiffy.Speculation("chain:4", verify="shared"), **kw
        ).generate(prompt)
        agree += torch.equal(base.tokens, shared.tokens)
        assert shared.stats.nfe <= base.stats.nfe
    print(f"shared-mode agreement: {agree}/{len(prompts) * 2}")


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("temperature", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_keyed_draft_noise_is_lossless(fixture_model, remasking, temperature, cache):
    """docs/algorithm.md §5.7: drafts ranked under future steps' keyed noise; verification still decides."""
    prompt = torch.tensor([71, 124, 84, 108, 88])
    for graph in ("chain:6", "fig2"):
        assert_lossless_keyed = dict(
            gen_length=32, block_length=8, cache=cache, temperature=temperature, remasking=remasking
        )
        base = spiffy.build_decoder(fixture_model, **assert_lossless_keyed).generate(
            prompt, request_id=2, seed=9
        )
        for noise in ("none", "keyed"):
            spec = spiffy.build_decoder(
                fixture_model,
                **assert_lossless_keyed,
                speculate=spiffy.Speculation(graph, draft_noise=noise),
            ).generate(prompt, request_id=2, seed=9)
            assert torch.equal(spec.tokens, base.tokens)
            assert spec.stats.nfe <= base.stats.nfe


def test_keyed_drafts_recover_acceptance_at_high_temperature(fixture_model):
    """At T = 1 the keyed drafts follow the real noisy transitions; the stale argmax does not."""
    nfe = {}
    for noise in ("none", "keyed"):
        decoder = spiffy.build_decoder(
            fixture_model,
            gen_length=32,
            block_length=8,
            temperature=1.0,
            speculate=spiffy.Speculation("chain:6", draft_noise=noise),
        )
        nfe[noise] = sum(
            decoder.generate(torch.tensor([5, 9, 14, i]), request_id=i).stats.nfe for i in range(6)
        )
    assert nfe["keyed"] < nfe["none"]


# --- SDAR (block-causal, docs/algorithm.md §12): drafts are block rows against the exact cache; both fusions

SDAR_PROMPTS = [[14, 85, 49, 44, 72, 39, 24, 74], [6, 19, 64], [5, 9, 14, 3, 22, 70]]


@pytest.fixture(scope="module")
def sdar_model(sdar_fixture_dir):
    model = spiffy.load_model(sdar_fixture_dir, dtype=torch.float64)
    model.register_forward_hook(
        _never_predict_mask
    )  # at T > 0 the random model could sample the mask id
    return model


@pytest.fixture(scope="module")
def sdar_calibrated(sdar_model):
    """A graph calibrated on the SDAR base decoder (other prompts than the tests')."""
    from spiffy.calibration.calibrate import select_graph
    from spiffy.calibration.trajectories import record_trajectories
    from spiffy.decoding.config import GenerationConfig

    cfg = GenerationConfig(gen_length=16, block_length=4, rule="sdar_static", steps_per_block=4)
    calib = [torch.tensor([3 + i, 40 + i, 7 * i % 90]) for i in range(6)]
    return select_graph(record_trajectories(sdar_model, cfg, calib, progress=False), 6, "degree1")


@pytest.mark.parametrize(("rule", "temperature"), list(itertools.product(SDAR_RULES, [0.0, 0.7])))
def test_spiffy_on_sdar_is_lossless_with_and_without_fusions(
    sdar_model, sdar_calibrated, rule, temperature
):
    saved = {}
    for (request_id, prompt), graph, fuse_store, fuse_next in itertools.product(
        enumerate(SDAR_PROMPTS), ["chain:4", "fig2", sdar_calibrated], [False, True], [False, True]
    ):
        kw = dict(gen_length=14, block_length=4, rule=rule, temperature=temperature)
        base, spec = assert_lossless(
            sdar_model,
            torch.tensor(prompt),
            graph,
            request_id,
            3,
            fuse_store=fuse_store,
            fuse_next=fuse_next,
            **kw,
            **SDAR_RULES[rule],
        )
        key = (fuse_store, fuse_next)
        saved[key] = saved.get(key, 0) + spec.stats.nfe_base - spec.stats.nfe
    assert saved[(False, False)] > 0  # drafting alone saves forwards
    assert saved[(True, False)] > saved[(False, False)]  # storing from the verifying forward too
    assert saved[(True, True)] > saved[(False, True)] > saved[(False, False)]


@settings(max_examples=40, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate])
@given(
    model_seed=st.integers(0, 3),
    prompt=st.lists(st.integers(0, 21), min_size=1, max_size=9),
    gen_length=st.integers(1, 12),
    block_size=st.sampled_from([2, 4, 8]),
    rule=st.sampled_from(list(SDAR_RULES)),
    steps_fraction=st.sampled_from([1.0, 0.5, 0.34]),
    temperature=st.sampled_from([0.0, 0.5, 1.5]),
    graph=draft_graphs(),
    seed=st.integers(0, 1000),
    fuse_store=st.booleans(),
    fuse_next=st.booleans(),
    stop=st.booleans(),
)
def test_property_spiffy_equals_base_on_sdar(
    model_seed,
    prompt,
    gen_length,
    block_size,
    rule,
    steps_fraction,
    temperature,
    graph,
    seed,
    fuse_store,
    fuse_next,
    stop,
):
    model = tiny_random_sdar(seed=model_seed, block_size=block_size)
    params = dict(SDAR_RULES[rule], steps_per_block=max(1, round(block_size * steps_fraction)))
    assert_lossless(
        model,
        torch.tensor(prompt),
        graph,
        request_id=seed % 7,
        seed=seed,
        fuse_store=fuse_store,
        gen_length=gen_length,
        block_length=block_size,
        rule=rule,
        temperature=temperature,
        fuse_next=fuse_next,
        stop_ids=[seed % 22] if stop else None,
        **params,
    )
