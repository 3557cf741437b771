"""Spiffy over LLaDA2 (docs/llada2.md): lossless for both rules (2.0 threshold, 2.1 editing), T = 0 and T > 0,
built-in and calibrated graphs, the fusions where they apply; and the combination refused with its reason."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import spiffy
from tests.conftest import _never_predict_mask, load_llada2_fixture, tiny_random_llada2
from tests.helpers.lossless import assert_lossless, draft_graphs

RULES = {
    "llada2_threshold": {"steps_per_block": 4, "tau": 0.5},
    "llada2_edit": {
        "tau": 0.7,
        "editing_threshold": 0.5,
        "max_post_steps": 2,
        "num_to_transfer": 1,
    },
}
PROMPTS = [[14, 85, 49, 44, 72, 39, 24, 74], [6, 19, 64], [5, 9, 14, 3, 22, 70]]


@pytest.fixture(scope="module")
def llada2():
    model = load_llada2_fixture()
    model.register_forward_hook(
        _never_predict_mask
    )  # at T > 0 the random model could sample the mask id
    return model


@pytest.fixture(scope="module")
def calibrated(llada2):
    """Graphs calibrated on each LLaDA2 base decoder (other prompts than the tests')."""
    from spiffy.calibration.calibrate import select_graph
    from spiffy.calibration.trajectories import record_trajectories

    calib = [torch.tensor([3 + i, 40 + i, 7 * i % 90]) for i in range(6)]
    graphs = {}
    for rule, params in RULES.items():
        cfg = spiffy.GenerationConfig(gen_length=16, block_length=4, rule=rule, **params)
        graphs[rule] = select_graph(
            record_trajectories(llada2, cfg, calib, progress=False), 6, "degree1"
        )
    return graphs


@pytest.mark.parametrize(("rule", "temperature"), list(itertools.product(RULES, [0.0, 0.7])))
def test_spiffy_on_llada2_is_lossless_and_saves_calls(llada2, calibrated, rule, temperature):
    saved = 0
    fusions = [(False, False), (False, True)] + (
        [(True, False), (True, True)] if rule != "llada2_edit" else []
    )
    for (request_id, prompt), graph, (fuse_store, fuse_next) in itertools.product(
        enumerate(PROMPTS), ["chain:4", "fig2", calibrated[rule]], fusions
    ):
        base, spec = assert_lossless(
            llada2,
            torch.tensor(prompt),
            graph,
            request_id,
            3,
            fuse_store=fuse_store,
            fuse_next=fuse_next,
            gen_length=14,
            block_length=4,
            rule=rule,
            temperature=temperature,
            **RULES[rule],
        )
        saved += spec.stats.nfe_base - spec.stats.nfe
    assert saved > 0  # drafting saves forwards


@pytest.mark.parametrize("early", [False, True])
def test_eos_early_stop_is_lossless(llada2, early):
    """2.0's stop inside a block at EOS, with the EOS id made likely (a stop id the model predicts)."""
    for request_id, prompt in enumerate(PROMPTS):
        assert_lossless(
            llada2,
            torch.tensor(prompt),
            "chain:4",
            request_id,
            0,
            gen_length=16,
            block_length=4,
            rule="llada2_threshold",
            eos_early_stop=early,
            stop_ids=[126],
            **RULES["llada2_threshold"],
        )


def test_fuse_store_with_editing_is_refused(llada2):
    with pytest.raises(ValueError, match="fuse_store=True with rule='llada2_edit'"):
        spiffy.build_decoder(
            llada2,
            gen_length=8,
            block_length=4,
            rule="llada2_edit",
            speculate=spiffy.Speculation("chain:3", fuse_store=True),
            **RULES["llada2_edit"],
        )


@settings(max_examples=40, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate])
@given(
    model_seed=st.integers(0, 3),
    prompt=st.lists(st.integers(0, 21), min_size=1, max_size=9),
    gen_length=st.integers(1, 12),
    block_length=st.sampled_from([2, 4, 8]),
    rule=st.sampled_from(list(RULES)),
    steps_fraction=st.sampled_from([1.0, 0.5, 0.34]),
    tau=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    editing=st.sampled_from([0.0, 0.4, 0.9]),
    max_post_steps=st.integers(0, 3),
    transfer=st.integers(1, 3),
    temperature=st.sampled_from([0.0, 0.5, 1.5]),
    graph=draft_graphs(),
    seed=st.integers(0, 1000),
    fuse=st.booleans(),
    early=st.booleans(),
)
def test_property_spiffy_equals_base_on_llada2(
    model_seed,
    prompt,
    gen_length,
    block_length,
    rule,
    steps_fraction,
    tau,
    editing,
    max_post_steps,
    transfer,
    temperature,
    graph,
    seed,
    fuse,
    early,
):
    model = tiny_random_llada2(seed=model_seed)
    if rule == "llada2_threshold":
        params = dict(
            steps_per_block=max(1, round(block_length * steps_fraction)), eos_early_stop=early
        )
        fuse_store = fuse
    else:
        params = dict(
            editing_threshold=editing, max_post_steps=max_post_steps, num_to_transfer=transfer
        )
        fuse_store = False
    assert_lossless(
        model,
        torch.tensor(prompt),
        graph,
        request_id=seed % 7,
        seed=seed,
        fuse_store=fuse_store,
        gen_length=gen_length,
        block_length=block_length,
        rule=rule,
        tau=tau,
        temperature=temperature,
        fuse_next=fuse,
        stop_ids=[22] if early else None,
        **params,
    )
