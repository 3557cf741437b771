"""Invalid settings raise ValueError naming the argument and the value (docs/algorithm.md §2 step 1, §11)."""

from __future__ import annotations

import pytest
import torch

import spiffy
from tests.conftest import tiny_random_model


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(gen_length=30, block_length=8), "gen_length=30 must be a multiple of block_length=8"),
        (dict(gen_length=32, block_length=8, steps=2), "steps=2"),
        (dict(gen_length=32, block_length=8, steps=40), "steps=40"),
        (dict(gen_length=32, block_length=8, steps=10), "multiple of num_blocks=4"),
        (dict(rule="threshold"), "tau=None"),
        (dict(rule="threshold", tau=1.5), "tau=1.5"),
        (dict(rule="fixed_k", k=0), "k=0"),
        (dict(k=2), "k=2: only used by rule='fixed_k'"),
        (dict(rule="bogus"), "rule='bogus'"),
        (dict(cache="full"), "cache='full'"),
        (dict(remasking="margin"), "remasking='margin'"),
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(cfg_scale=1.0), "cfg_scale=1.0"),
        (dict(speculate="chain:3"), "speculate='chain:3'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spiffy.build_decoder(tiny_random_model(), **{"gen_length": 32, "block_length": 8, **kwargs})


def test_bad_speculation():
    with pytest.raises(ValueError, match="verify='fast'"):
        spiffy.Speculation("chain:3", verify="fast")
    with pytest.raises(ValueError, match="graph='chain:x'"):
        spiffy.Speculation("chain:x")


def test_bad_prompts():
    model = tiny_random_model()
    decoder = spiffy.build_decoder(model, gen_length=32, block_length=8)
    mask_id = spiffy.model_spec(model).mask_id
    with pytest.raises(ValueError, match="mask id"):
        decoder.generate(torch.tensor([1, mask_id, 2]))
    with pytest.raises(ValueError, match="exceeds the model's max_length=128"):
        decoder.generate(torch.ones(100, dtype=torch.long))
    with pytest.raises(ValueError, match="expected"):
        decoder.generate(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype torch.float32: expected integer token ids"):
        decoder.generate(torch.tensor([1.5, 2.0]))
    with pytest.raises(ValueError, match="dtype torch.bool"):
        decoder.generate(torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"contain 999, outside the vocabulary \[0, 24\)"):
        decoder.generate([1, 999])
    with pytest.raises(ValueError, match="contain -1"):
        decoder.generate([-1, 2])
