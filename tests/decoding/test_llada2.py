"""LLaDA2's samplers (docs/llada2.md) against the reference `generate` (the llada2_reference fixture): output and call
counts of every 2.0 and `log_fixed` 2.1 case, the rules' pieces, and the argument checks."""

from __future__ import annotations

import json

import pytest
import torch

import spiffy
from spiffy.decoding.llada2_generate import llada2_settings
from spiffy.decoding.llada2_rules import (
    edit_complete_rows,
    edited_positions,
    eos_stop_rows,
    float32_threshold,
    threshold_quota,
    unmask_positions,
)

ARGS = (
    "version",
    "gen_length",
    "block_length",
    "steps",
    "threshold",
    "eos_early_stop",
    "minimal_topk",
    "temperature",
    "top_k",
    "top_p",
)
ARGS_21 = ("editing_threshold", "max_post_steps", "num_to_transfer")


@pytest.fixture(scope="module")
def expected(llada2_fixture_dir):
    return json.loads((llada2_fixture_dir / "expected.json").read_text())


def reference_kwargs(case: dict) -> dict:
    """The `model.generate` arguments of one reference call."""
    names = ARGS + (ARGS_21 if case["version"] == "2.1" else ())
    return {name: case[name] for name in names}


def test_every_20_and_log_fixed_21_case_equals_the_reference(llada2, expected):
    """Output (what `generate` returns) and call count of each case; our NFE adds the cache's calls."""
    cases = [c for c in expected["generate"] if c.get("mask_variant", "log_fixed") == "log_fixed"]
    assert len(cases) == 32 and sum(c["version"] == "2.0" for c in cases) == 20
    vias = {c["returned_via"] for c in cases}
    assert vias == {"final_return (prompt excluded)", "eos_early_stop_branch (prompt included)"}
    for i, case in enumerate(cases):
        out, result = llada2.generate(
            torch.tensor([case["prompt"]]),
            eos_id=expected["eos_id"],
            mask_id=expected["mask_id"],
            return_result=True,
            **reference_kwargs(case),
        )
        assert out.shape[0] == 1 and out[0].tolist() == case["output"], i
        assert result.stats.transitions == case["nfe"], i  # the reference's model calls
        # plus the exact cache's prefill (whole prompt blocks) and one store per decoded block
        assert result.stats.nfe == case["nfe"] + result.stats.base_extra_calls, i
        assert result.stats.eos_early_stop == case["returned_via"].startswith("eos_early_stop"), i


def test_as_copied_21_cases_are_not_claimed(expected):
    """The 2.1 copy's unmasked (+1 bonus) attention is not reproduced (docs/llada2.md): labelled, six cases."""
    variants = [c["mask_variant"] for c in expected["generate"] if c["version"] == "2.1"]
    assert variants.count("as_copied") == 6 and variants.count("log_fixed") == 12


def test_build_decoder_equals_model_generate(llada2, expected):
    """`rule="llada2_threshold"/"llada2_edit"` through build_decoder is the same decode as model.generate."""
    for case in expected["generate"][::5]:
        if case.get("mask_variant") == "as_copied":
            continue
        settings = llada2_settings(**reference_kwargs(case), eos_id=expected["eos_id"])
        result = spiffy.build_decoder(llada2, **settings).generate(torch.tensor(case["prompt"]))
        _, via_generate = llada2.generate(
            torch.tensor([case["prompt"]]),
            eos_id=126,
            mask_id=127,
            return_result=True,
            **reference_kwargs(case),
        )
        assert torch.equal(result.canvas, via_generate.canvas)


def test_threshold_quota_and_selection():
    assert [threshold_quota(4, 3, s, 4) for s in range(3)] == [2, 1, 1]
    with pytest.raises(RuntimeError, match="steps_per_block=3"):
        threshold_quota(4, 3, 3, 1)
    neg = float("-inf")
    conf = torch.tensor([0.2, neg, 0.96, 0.97], dtype=torch.float64)
    masked = conf > neg
    assert unmask_positions(conf, masked, 1, 0.95).tolist() == [
        2,
        3,
    ]  # all above tau (more than quota)
    assert unmask_positions(conf, masked, 3, 0.95).tolist() == [3, 2, 0]  # too few: the top 3
    assert unmask_positions(conf, masked, 2, 1.0).tolist() == [3, 2]  # tau 1.0: never reached
    assert unmask_positions(conf, masked, 9, 1.0).tolist() == [
        3,
        2,
        0,
    ]  # never more than the masked
    # the reference compares float32 p with float32(threshold), strictly
    tau32 = float32_threshold(0.7)
    assert tau32 != 0.7
    at = torch.tensor([tau32], dtype=torch.float64)
    assert unmask_positions(at, torch.tensor([True]), 0, 0.7).tolist() == []


def test_edits_skip_the_prompt_masks_and_unchanged_tokens():
    state = torch.tensor([5, 6, 9, 7])  # 9 = mask
    masked = state == 9
    x0 = torch.tensor([1, 2, 3, 7])
    p = torch.tensor([0.99, 0.99, 0.99, 0.99], dtype=torch.float64)
    assert edited_positions(p, x0, state, masked, 1, 0.5).tolist() == [False, True, False, False]
    assert not edited_positions(p, x0, state, masked, 0, 1.0).any()  # threshold 1.0: never edit


def test_edit_block_end_counts_post_calls():
    s = torch.tensor([[1, 2], [1, 9]])  # row 1 still masked (mask id 9)
    same = s.clone()
    # a mask-free state that nothing edited ends the block; a masked one does not
    assert edit_complete_rows(s, same, 9, 1, 16).tolist() == [True, False]
    filled = torch.tensor([[1, 3], [1, 4]])
    # edited / filled: the next call would be post call 1 (or 2): allowed up to max_post_steps
    assert edit_complete_rows(s, filled, 9, 0, 1).tolist() == [False, False]
    assert edit_complete_rows(s, filled, 9, 1, 1).tolist() == [True, True]
    assert edit_complete_rows(s, filled, 9, 0, 0).tolist() == [True, True]  # no post call at all


def test_eos_early_stop_needs_a_fresh_eos_and_no_mask_before_it():
    eos, mask = 8, 9
    old = torch.tensor([[3, 9, 9, 9], [3, 9, 9, 9], [3, 4, 9, 9]])
    new = torch.tensor([[3, 8, 9, 9], [3, 9, 8, 9], [3, 4, 5, 9]])
    assert eos_stop_rows(old, new, eos, mask, 0).tolist() == [True, False, False]
    # the prompt part of the block is outside the search
    assert eos_stop_rows(old[:1], torch.tensor([[8, 8, 9, 9]]), eos, mask, 1).tolist() == [True]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rule="llada2_threshold", steps_per_block=4), "tau=None"),
        (dict(rule="llada2_threshold", steps_per_block=4, tau=1.5), "tau=1.5"),
        (dict(rule="llada2_threshold", steps_per_block=5, tau=0.9), "steps_per_block=5"),
        (
            dict(rule="llada2_edit", tau=0.9, max_post_steps=1, num_to_transfer=1),
            "editing_threshold=None",
        ),
        (
            dict(
                rule="llada2_edit",
                tau=0.9,
                editing_threshold=2.0,
                max_post_steps=1,
                num_to_transfer=1,
            ),
            "editing_threshold=2.0",
        ),
        (
            dict(
                rule="llada2_edit",
                tau=0.9,
                editing_threshold=0.5,
                max_post_steps=-1,
                num_to_transfer=1,
            ),
            "max_post_steps=-1",
        ),
        (
            dict(
                rule="llada2_edit",
                tau=0.9,
                editing_threshold=0.5,
                max_post_steps=1,
                num_to_transfer=0,
            ),
            "num_to_transfer=0",
        ),
        (
            dict(
                rule="llada2_edit",
                tau=0.9,
                editing_threshold=0.5,
                max_post_steps=1,
                num_to_transfer=1,
                eos_early_stop=True,
            ),
            "eos_early_stop=True",
        ),
        (dict(rule="threshold", tau=0.9, editing_threshold=0.5), "editing_threshold=0.5"),
        (dict(rule="fixed_k", k=1, eos_early_stop=True), "eos_early_stop=True"),
        (dict(rule="threshold", tau=0.0), "tau=0.0"),
    ],
)
def test_bad_llada2_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spiffy.GenerationConfig(gen_length=8, block_length=4, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(version="2.2"), "version='2.2'"),
        (dict(minimal_topk=0), "minimal_topk=0"),
        (dict(gen_length=3, minimal_topk=4), "steps=4"),
        (dict(mask_id=128), "mask_id=128"),
        (dict(eos_id=-1), "eos_id=-1"),
    ],
)
def test_bad_generate_arguments(llada2, kwargs, match):
    args = dict(gen_length=8, block_length=4, steps=4, mask_id=127, eos_id=126) | kwargs
    with pytest.raises(ValueError, match=match):
        llada2.generate(torch.tensor([[3, 4, 5]]), **args)


def test_llada2_model_takes_block_causal_rules_at_any_block_length(llada2):
    with pytest.raises(ValueError, match="block-causal"):
        spiffy.build_decoder(llada2, gen_length=8, block_length=4, rule="threshold", tau=0.9)
    for block in (2, 4, 8):
        out = spiffy.build_decoder(
            llada2,
            gen_length=8,
            block_length=block,
            rule="llada2_threshold",
            steps_per_block=2,
            tau=0.9,
        ).generate(torch.tensor([3, 4, 5]))
        assert out.tokens.numel() == 8 and not (out.tokens == 127).any()
