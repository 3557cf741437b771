"""SDAR's block decoder (docs/algorithm.md §12) against `block_diffusion_generate` (the sdar_reference fixture): canvas and
call counts of every case, the over-selection tie order, and the settings around it (stop ids, top-k/top-p)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import spiffy
from spiffy.decoding.sampling import top_k_filter, top_p_filter
from spiffy.decoding.sdar_rules import libstdcxx_topk_indices, step_quota
from tests.conftest import tiny_random_model, tiny_random_sdar

RULES = {
    "low_confidence_static": "sdar_static",
    "low_confidence_dynamic": "sdar_dynamic",
    "sequential": "sdar_sequential",
}


@pytest.fixture(scope="module")
def sdar(sdar_fixture_dir):
    return spiffy.load_model(sdar_fixture_dir, dtype=torch.float64)


@pytest.fixture(scope="module")
def cases(sdar_fixture_dir):
    return json.loads((sdar_fixture_dir / "expected.json").read_text())["generate"]


def reference_kwargs(case: dict) -> dict:
    """The build_decoder arguments of one reference `block_diffusion_generate` call."""
    assert (case["temperature"], case["top_k"], case["top_p"]) == (0.0, 0, 1.0)
    kw = dict(
        gen_length=case["gen_length"],
        block_length=case["block_length"],
        rule=RULES[case["remasking_strategy"]],
        steps_per_block=case["denoising_steps"],
        stop_ids=case["stopping_criteria_idx"],
    )
    if kw["rule"] == "sdar_dynamic":
        kw["tau"] = case["confidence_threshold"]
    return kw


def test_every_generate_case_equals_the_reference_canvas_and_call_counts(sdar, cases):
    assert len(cases) == 24
    covered = {
        "prompt_region_changed": any(c["prompt_region_changed"] for c in cases),
        "stop": any(
            c["decoded_blocks"] < c["num_blocks_total"] - c["prefill_blocks"] for c in cases
        ),
        "remainder": any(c["block_length"] % c["denoising_steps"] for c in cases),
        "partial": any(len(c["prompt"]) % c["block_length"] for c in cases),
        "rounded": any(c["gen_length"] % c["block_length"] for c in cases),
    }
    assert all(covered.values()), covered
    for i, case in enumerate(cases):
        result = spiffy.build_decoder(sdar, **reference_kwargs(case)).generate(
            torch.tensor(case["prompt"])
        )
        calls, p = case["call_counts"], len(case["prompt"])
        assert result.canvas.tolist() == case["output"], i
        assert result.stats.transitions == calls["denoise"], i
        assert result.stats.base_extra_calls == calls["prefill"] + calls["store_kv"], i
        assert result.stats.nfe == result.stats.nfe_base == sum(calls.values()), i
        assert torch.equal(result.tokens, result.canvas[p : p + case["gen_length"]])


def test_fused_base_keeps_the_tokens_and_saves_one_call_per_block_boundary(sdar, cases):
    """docs/algorithm.md §12's second fusion on the base: the store forward also starts the next block."""
    for case in cases:
        kw = reference_kwargs(case)
        plain = spiffy.build_decoder(sdar, **kw).generate(torch.tensor(case["prompt"]))
        fused = spiffy.build_decoder(sdar, fuse_next=True, **kw).generate(
            torch.tensor(case["prompt"])
        )
        assert torch.equal(fused.canvas, plain.canvas)
        assert fused.stats.nfe == plain.stats.nfe - (case["decoded_blocks"] - 1)
        assert fused.stats.nfe_base == plain.stats.nfe  # speedups stay quoted against the reference


def test_over_selection_follows_torch_cpu_topk(sdar_fixture_dir):
    """The emulated libstdc++ order equals torch's CPU top-k on every mask pattern of blocks of 4 and 8,
    random ones up to 64 (ties among finite values included) and the partial-sort path for long rows."""
    expected = json.loads((sdar_fixture_dir / "expected.json").read_text())["topk_tie_check"]
    for p, indices in expected["one_mask_left_k2_table"].items():
        row = [0.5 if i == int(p) else float("-inf") for i in range(4)]
        assert libstdcxx_topk_indices(row, 2) == sorted(indices)
    g = torch.Generator().manual_seed(0)
    neg = torch.tensor(float("-inf"), dtype=torch.float64)
    for b in (4, 8):
        for pattern in itertools.product([False, True], repeat=b):
            row = torch.where(
                torch.tensor(pattern), torch.rand(b, generator=g, dtype=torch.float64), neg
            )
            for k in range(1, b + 1):
                assert libstdcxx_topk_indices(row.tolist(), k) == sorted(
                    row.topk(k).indices.tolist()
                )
    for b, _ in itertools.product((16, 32, 64, 200), range(60)):
        values = torch.rand(b, generator=g, dtype=torch.float64)
        values = torch.where(torch.rand(b, generator=g) < 0.3, (values * 3).round() / 3, values)
        row = torch.where(torch.rand(b, generator=g) < 0.5, values, neg)
        k = int(torch.randint(1, 4 if b == 200 else b + 1, (1,), generator=g))
        assert libstdcxx_topk_indices(row.tolist(), k) == sorted(row.topk(k).indices.tolist())


def test_quota_depends_on_the_step_index_only():
    assert [step_quota(4, 3, s, 4) for s in range(3)] == [2, 1, 1]
    assert [step_quota(8, 8, s, 8) for s in range(8)] == [1] * 8
    with pytest.raises(RuntimeError, match="after steps_per_block=3"):
        step_quota(4, 3, 3, 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rule="schedule", steps_per_block=None), "block-causal"),
        (dict(cache="prefix"), "cache='prefix'"),
        (dict(cache="dual"), "cache='dual'"),
        (dict(steps=16), "steps=16"),
        (dict(block_length=8), "block_size is 4"),
        (dict(steps_per_block=None), "steps_per_block=None"),
        (dict(steps_per_block=5), "steps_per_block=5"),
        (dict(rule="sdar_dynamic"), "tau=None"),
        (dict(stop_ids=[1.5]), "stop_ids"),
        (dict(tau=0.9), "tau=0.9"),
        (dict(top_k=3), "top_k=3"),
        (dict(top_p=0.5, temperature=0.5, top_k=0), "top_k=0"),
        (dict(stop_ids=[96]), "stop_ids=\\[96\\]"),
        (dict(stop_ids=[3, 95]), "the mask id 95"),
        (dict(remasking="random"), "remasking='random'"),
        (dict(speculate=spiffy.Speculation("chain:3", cross_block=True)), "cross_block=True"),
    ],
)
def test_bad_sdar_arguments(sdar, kwargs, match):
    kw = {**dict(gen_length=16, block_length=4, rule="sdar_static", steps_per_block=4), **kwargs}
    with pytest.raises(ValueError, match=match):
        spiffy.build_decoder(sdar, **kw)


def test_sdar_rules_and_fusions_need_a_block_causal_model():
    llada = tiny_random_model()
    with pytest.raises(ValueError, match="bidirectional"):
        spiffy.build_decoder(
            llada, gen_length=16, block_length=4, rule="sdar_static", steps_per_block=4
        )
    with pytest.raises(ValueError, match="fuse_next"):
        spiffy.build_decoder(llada, gen_length=16, block_length=4, fuse_next=True)
    with pytest.raises(ValueError, match="fuse_store=True"):
        spiffy.build_decoder(
            llada,
            gen_length=16,
            block_length=4,
            speculate=spiffy.Speculation("chain:3", fuse_store=True),
        )


def test_stop_ids_end_any_family_after_the_block_that_produced_one():
    model = tiny_random_model()
    kw = dict(gen_length=32, block_length=8)
    prompt = torch.tensor([1, 2, 3, 4])
    full = spiffy.build_decoder(model, **kw).generate(prompt)
    assert torch.equal(full.canvas, torch.cat([prompt, full.tokens]))
    first = int(full.tokens[8])  # a token of the second block
    stopped = spiffy.build_decoder(model, stop_ids=[first], **kw).generate(prompt)
    end = next(b for b in range(4) if first in full.tokens[: 8 * (b + 1)].tolist())
    assert torch.equal(stopped.tokens[: 8 * (end + 1)], full.tokens[: 8 * (end + 1)])
    assert (stopped.tokens[8 * (end + 1) :] == spiffy.model_spec(model).mask_id).all()
    assert stopped.stats.nfe == 8 * (end + 1)
    assert spiffy.build_decoder(model, stop_ids=[], **kw).generate(prompt).stats.nfe == 32


def test_filters_follow_the_reference_samplers():
    scaled = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64))
    kept = lambda t: (t > float("-inf"))[0].tolist()  # noqa: E731
    assert kept(top_p_filter(scaled, 0.7)) == [True, True, True, False]  # the crossing token stays
    assert kept(top_p_filter(scaled, 0.3)) == [True, False, False, False]
    assert kept(top_k_filter(scaled, 3)) == [True, True, True, False]
    # the order matters: top-p after top-k renormalises over the k kept tokens (SDAR), not before (Dream)
    assert kept(top_p_filter(top_k_filter(scaled, 3), 0.7)) == [True, True, False, False]
    assert kept(top_k_filter(top_p_filter(scaled, 0.7), 3)) == [True, True, True, False]
    tied = torch.tensor([[2.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    assert kept(top_k_filter(tied, 2)) == [True, True, True, False]  # ties at the cut are kept


@pytest.mark.parametrize("rule", ["sdar_static", "sdar_sequential"])
def test_sampling_uses_keyed_noise_and_the_filtered_distribution(rule):
    model = tiny_random_sdar()
    kw = dict(gen_length=12, block_length=4, rule=rule, steps_per_block=2)
    prompt = torch.tensor([3, 5, 7, 1, 2])
    sample = lambda seed, **extra: spiffy.build_decoder(model, **kw, **extra).generate(  # noqa: E731
        prompt, request_id=1, seed=seed
    )
    a, b = sample(0, temperature=0.8), sample(0, temperature=0.8)
    assert torch.equal(a.canvas, b.canvas)  # keyed: reproducible
    assert any(not torch.equal(sample(s, temperature=0.8).canvas, a.canvas) for s in range(1, 6))
    greedy = sample(0)
    one = sample(3, temperature=0.8, top_k=1)  # a single candidate token: greedy tokens
    nucleus = sample(4, temperature=0.8, top_p=1e-9)
    assert torch.equal(one.canvas, nucleus.canvas)
    if rule == "sdar_sequential":  # positions do not depend on the confidence
        assert torch.equal(one.canvas, greedy.canvas)


def test_dream_top_p_keeps_only_the_nucleus():
    dream = spiffy.load_model("tiny-dream-random", dtype=torch.float64)
    kw = dict(gen_length=16, block_length=8, rule="dream_steps", steps=16)
    prompt = torch.tensor([5, 6, 7])
    greedy = spiffy.build_decoder(dream, **kw).generate(prompt)
    nucleus = spiffy.build_decoder(dream, temperature=0.9, top_p=1e-9, **kw).generate(
        prompt, seed=3
    )
    assert torch.equal(nucleus.tokens, greedy.tokens)  # a nucleus of one token is the argmax
    free = [
        spiffy.build_decoder(dream, temperature=0.9, **kw).generate(prompt, seed=s).tokens
        for s in range(4)
    ]
    assert any(not torch.equal(t, greedy.tokens) for t in free)


@pytest.mark.parametrize("rule", ["sdar_static", "schedule"])
def test_keyed_samples_follow_the_filtered_tempered_distribution(rule):
    """Gumbel-max under keyed noise draws from softmax(filter(logits / T)) (SDAR: top-k then top-p)."""
    from spiffy.decoding.config import GenerationConfig
    from spiffy.decoding.randomness import NoiseKey
    from spiffy.decoding.rules import TransitionRule
    from spiffy.decoding.sampling import TransitionContext, predict_tokens

    extra = dict(steps_per_block=4) if rule == "sdar_static" else dict(steps=16)
    cfg = GenerationConfig(
        gen_length=16, block_length=4, rule=rule, temperature=0.7, top_k=4, top_p=0.8, **extra
    )
    spec = spiffy.model_spec(tiny_random_sdar())
    ctx = TransitionContext(cfg, TransitionRule.from_config(cfg), spec, NoiseKey(5, 0), 0, 4)
    logits = torch.tensor([2.0, 1.6, 1.5, 1.0, 0.9, -1.0], dtype=torch.float64)
    draws = predict_tokens(logits.expand(20000, -1), ctx, step=0)
    freq = torch.bincount(draws, minlength=6).double() / draws.numel()
    scaled = logits[None] / 0.7
    if rule == "sdar_static":  # top-k (4 kept) then top-p over the renormalised 4
        kept = top_p_filter(top_k_filter(scaled, 4), 0.8)
    else:  # Dream's order: top-p over all 6, then top-k
        kept = top_k_filter(top_p_filter(scaled, 0.8), 4)
    expected = torch.softmax(kept, dim=-1)[0]
    assert (expected[3:] == 0).all() and (freq[expected == 0] == 0).all()
    assert (freq - expected).abs().max() < 0.015
