"""Dream (shifted logits) against its reference fixture, and Spiffy over every base decoder on it."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from transformers import AutoModel

import spiffy
from tests.conftest import DREAM_FIXTURE as DREAM

ALGS = {"maskgit_plus": "low_confidence", "topk_margin": "topk_margin", "entropy": "entropy"}
PROMPT = torch.tensor([9, 90, 9, 8, 52, 44, 57, 84, 49, 119, 76, 87])


@pytest.fixture(scope="module")
def dream():
    return spiffy.load_model(DREAM, dtype=torch.float64)


@pytest.fixture(scope="module")
def expected():
    return json.loads((DREAM / "expected.json").read_text())


def test_raw_logits_match_and_the_shift_lives_in_the_model(dream, expected):
    for case in expected["logits"]:
        ids = torch.tensor([case["input_ids"]])
        ref = torch.tensor(case["logits"], dtype=torch.float64)
        raw, _ = dream.raw_logits(ids, torch.arange(ids.shape[1])[None])
        assert (raw[0] - ref).abs().max() < 1e-9
        aligned = dream(ids).logits[0]  # position i is predicted by hidden state i - 1
        torch.testing.assert_close(aligned[1:], ref[:-1], rtol=0, atol=1e-9)
        torch.testing.assert_close(aligned[0], ref[0], rtol=0, atol=1e-9)


def test_auto_class_and_spec(dream, expected):
    assert type(AutoModel.from_pretrained(DREAM, dtype=torch.float64)).__name__ == "DreamModel"
    spec = spiffy.model_spec(dream)
    assert (spec.mask_id, spec.eos_id) == (expected["mask_id"], expected["eos_id"])


def test_diffusion_generate_cases_token_for_token(dream, expected):
    cases = expected["diffusion_generate"]
    assert {c["alg"] for c in cases} >= {
        "maskgit_plus",
        "entropy",
        "topk_margin",
        "confidence_threshold",
    }
    for case in cases:
        n = case["max_new_tokens"]  # Dream's sampler = the block loop with one block
        if case["alg"] == "confidence_threshold":
            kw = dict(rule="dream_threshold", tau=case["threshold"], steps=case["steps"])
        else:
            kw = dict(rule="dream_steps", steps=case["steps"], remasking=ALGS[case["alg"]])
        out = spiffy.build_decoder(dream, gen_length=n, block_length=n, **kw).generate(
            torch.tensor(case["prompt"])
        )
        assert out.tokens.tolist() == case["output"], case


RULES = {
    "schedule": {"steps": 32},
    "threshold": {"tau": 0.6},
    "fixed_k": {"k": 2},
    "dream_steps": {"steps": 16},
    "dream_threshold": {"tau": 0.9, "steps": 8},
}


@pytest.mark.parametrize(
    ("rule", "cache", "temperature"),
    list(itertools.product(RULES, ["none", "prefix", "dual"], [0.0, 0.8])),
)
def test_spiffy_is_lossless_on_dream(dream, rule, cache, temperature):
    kw = dict(
        gen_length=32,
        block_length=8,
        cache=cache,
        rule=rule,
        temperature=temperature,
        **RULES[rule],
    )
    base = spiffy.build_decoder(dream, **kw).generate(PROMPT, request_id=3, seed=1)
    # cross-block continuation (no cache only) reads the next block's shifted logits from a draft row
    for graph, cross in itertools.product(("chain:4", "fig2"), (False, cache == "none")):
        speculation = spiffy.Speculation(graph, cross_block=cross)
        spec = spiffy.build_decoder(dream, speculate=speculation, **kw).generate(
            PROMPT, request_id=3, seed=1
        )
        assert torch.equal(spec.tokens, base.tokens)
        assert spec.stats.nfe <= base.stats.nfe and spec.stats.transitions == base.stats.nfe


def test_dream_threshold_needs_divisible_steps(dream):
    decoder = spiffy.build_decoder(
        dream, gen_length=24, block_length=24, rule="dream_threshold", tau=0.9, steps=5
    )
    with pytest.raises(ValueError, match="divisible"):
        decoder.generate(PROMPT)


def test_logits_at_and_the_cache_boundary_match_the_full_forward(dream):
    from spiffy.models.kv import KVCache

    ids = PROMPT[None].repeat(2, 1)
    full = dream(ids).logits
    # Fewer LM-head rows is another GEMM shape (kernel chosen by shape and CPU): equal to float64 rounding only.
    torch.testing.assert_close(
        dream(ids, logits_at=slice(4, 9)).logits, full[:, 4:9], rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        dream(ids, logits_at=slice(0, 3)).logits, full[:, :3], rtol=0, atol=1e-12
    )
    out = dream(ids[:1], return_kv=True, logits_at=slice(4, 8))
    cache = KVCache(out.present, insert_at=4, replace=4, boundary_logits=out.logits[0, 0])
    block = dream(
        ids[:, 4:8], position_ids=range(4, 8), kv_cache=cache
    ).logits  # 2 states, one cache
    torch.testing.assert_close(block, full[:, 4:8], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="boundary_logits"):
        dream(ids[:, 4:8], position_ids=range(4, 8), kv_cache=KVCache(out.present, 4, 4))
