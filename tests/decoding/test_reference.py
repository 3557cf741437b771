"""Our decoders reproduce LLaDA's `generate` and Fast-dLLM's three generators token for token (docs/algorithm.md §8)."""

from __future__ import annotations

import torch

import spiffy

FUNCTION_CACHE = {
    "generate": "none",
    "generate_with_prefix_cache": "prefix",
    "generate_with_dual_cache": "dual",
}


def fastdllm_kwargs(case: dict) -> dict:
    kwargs = dict(
        gen_length=case["gen_length"],
        block_length=case["block_length"],
        cache=FUNCTION_CACHE[case["function"]],
        temperature=case["temperature"],
    )
    if case["threshold"] is not None:
        kwargs.update(rule="threshold", tau=case["threshold"])
    elif case["factor"] is not None:
        kwargs.update(rule="factor", factor=case["factor"])
    else:
        kwargs.update(rule="schedule", steps=case["steps"])
    return kwargs


def test_vanilla_matches_llada_generate(fixture_model, llada_expected):
    cases = llada_expected["llada_generate"]
    assert cases
    for case in cases:
        decoder = spiffy.build_decoder(
            fixture_model,
            gen_length=case["gen_length"],
            block_length=case["block_length"],
            steps=case["steps"],
            temperature=case["temperature"],
            remasking=case["remasking"],
        )
        result = decoder.generate(torch.tensor(case["prompt"]))
        assert result.tokens.tolist() == case["output"], case
        assert result.stats.nfe == case["steps"]


def test_rules_and_caches_match_fastdllm_tokens_and_nfe(fixture_model, llada_expected):
    cases = llada_expected["fastdllm"]
    assert {c["function"] for c in cases} == set(FUNCTION_CACHE)
    for case in cases:
        result = spiffy.build_decoder(fixture_model, **fastdllm_kwargs(case)).generate(
            torch.tensor(case["prompt"])
        )
        assert result.tokens.tolist() == case["output"], case
        assert result.stats.nfe == case["nfe"], case
