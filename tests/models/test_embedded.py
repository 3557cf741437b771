"""The shipped embedded model: loads offline through the public loader and still solves its task."""

from __future__ import annotations

import pytest
import torch

import spiffy
from spiffy.eval.offline import accuracy, score_arith
from spiffy.tasks.arith import generate_split
from spiffy.tasks.registry import TASKS

# Floors sit well below the model card's measured accuracy (see spiffy/checkpoints/*/README.md):
# they catch a broken checkpoint, tokenizer or decoder, not noise.
FAST_FLOOR, SLOW_FLOOR = 0.30, 0.40


@pytest.fixture(scope="module")
def embedded():
    return spiffy.load_model("embedded", dtype=torch.float32), spiffy.load_tokenizer("embedded")


def test_loads_offline_with_consistent_ids(embedded):
    model, tok = embedded
    spec = spiffy.model_spec(model)
    assert (spec.mask_id, spec.eos_id) == (tok.mask_token_id, tok.eos_token_id)
    assert type(model).__name__ == "LLaDAModelLM"
    assert tok.decode(tok("Question: 3+4=7")["input_ids"]) == "Question: 3+4=7"


def test_greedy_decode_solves_test_problems(embedded):
    model, tok = embedded
    decoder = spiffy.build_decoder(model, **TASKS["arith"].generation)
    samples = score_arith(decoder, tok, generate_split("test", 20), progress=False)
    assert accuracy(samples) >= FAST_FLOOR, [(s.completion, s.target) for s in samples[:5]]


@pytest.mark.slow
def test_accuracy_on_100_held_out_problems_with_spiffy(embedded):
    model, tok = embedded
    gen = TASKS["arith"].generation
    base = score_arith(
        spiffy.build_decoder(model, **gen), tok, generate_split("test", 100), progress=False
    )
    fast = score_arith(
        spiffy.build_decoder(model, **gen, speculate=spiffy.Speculation("chain:8")),
        tok,
        generate_split("test", 100),
        progress=False,
    )
    assert accuracy(base) >= SLOW_FLOOR
    assert [s.completion for s in fast] == [s.completion for s in base]
    assert sum(s.result.stats.nfe for s in fast) < sum(s.result.stats.nfe for s in base)
