"""The shipped block-causal model `tiny-sdar-arith`: loads offline by name, decodes with SDAR's base decoder, and
Spiffy over it gives the same tokens in fewer model calls."""

from __future__ import annotations

import json

import pytest
import torch

import spiffy
from spiffy.eval.offline import accuracy, score_arith
from spiffy.lab.benchmarks import generation_for
from spiffy.models.loading import CHECKPOINTS_DIR
from spiffy.tasks.arith import generate_split

NAME = "tiny-sdar-arith"
pytestmark = pytest.mark.skipif(
    not (CHECKPOINTS_DIR / NAME / "model.safetensors").exists(), reason="checkpoint missing"
)

# Floors sit well below the model card's measured accuracy (spiffy/checkpoints/tiny-sdar-arith/README.md):
# they catch a broken checkpoint, tokenizer or decoder, not noise.
FAST_FLOOR, SLOW_FLOOR = 0.30, 0.40


@pytest.fixture(scope="module")
def embedded_sdar():
    return spiffy.load_model(NAME), spiffy.load_tokenizer(NAME)


def sdar_generation(tok, **overrides) -> dict:
    """The arith task, SDAR's static rule at one token per step, stopping after the block holding EOS."""
    return generation_for("arith", "sdar", 0.0, stop_ids=[tok.eos_token_id], **overrides)


def test_loads_offline_by_name_in_sdar_format(embedded_sdar):
    model, tok = embedded_sdar
    spec = spiffy.model_spec(model)
    assert type(model).__name__ == "SDARForCausalLM" and model.config.model_type == "sdar"
    assert (spec.mask_id, spec.eos_id) == (tok.mask_token_id, tok.eos_token_id)
    assert spec.attention_block_size == 8 and spec.block_causal
    assert tok.decode(tok("Question: 3+4=7")["input_ids"]) == "Question: 3+4=7"


def test_config_has_the_published_keys_in_order(sdar_fixture_dir):
    """SDAR's published config.json keys (the reference fixture's), without the remote-code `auto_map`."""
    ours = json.loads((CHECKPOINTS_DIR / NAME / "config.json").read_text())
    published = json.loads((sdar_fixture_dir / "config.json").read_text())
    assert [k for k in ours if k != "pad_token_id"] == [k for k in published if k != "auto_map"]
    assert (ours["model_type"], ours["block_size"], ours["tie_word_embeddings"]) == (
        "sdar",
        8,
        False,
    )


def test_sdar_base_solves_test_problems_and_spiffy_agrees(embedded_sdar):
    model, tok = embedded_sdar
    problems = generate_split("test", 12)
    base = score_arith(
        spiffy.build_decoder(model, **sdar_generation(tok)), tok, problems, progress=False
    )
    assert accuracy(base) >= FAST_FLOOR, [(s.completion, s.target) for s in base[:5]]
    fast = score_arith(
        spiffy.build_decoder(
            model, **sdar_generation(tok), speculate=spiffy.Speculation("chain:3")
        ),
        tok,
        problems,
        progress=False,
    )
    for b, f in zip(base, fast, strict=True):
        assert torch.equal(b.result.canvas, f.result.canvas)
    assert sum(s.result.stats.nfe for s in fast) < sum(s.result.stats.nfe for s in base)


@pytest.mark.slow
def test_accuracy_on_100_held_out_problems_at_each_trained_block_size(embedded_sdar):
    model, tok = embedded_sdar
    problems = generate_split("test", 100)
    try:
        for block in (8, 4, 16):  # the block sizes it was trained at (recipe.json)
            model.config.block_size = block
            decoder = spiffy.build_decoder(model, **sdar_generation(tok, block_length=block))
            assert accuracy(score_arith(decoder, tok, problems, progress=False)) >= SLOW_FLOOR
    finally:
        model.config.block_size = 8
