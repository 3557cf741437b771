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


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(temperature=True), "temperature=True: must be a finite number >= 0"),
        (dict(temperature=float("inf")), "temperature=inf: must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature=nan"),
        (dict(temperature=0.5, top_p=True), "top_p=True: must be None or in"),
        (dict(rule="threshold", tau=True), "tau=True: must be a number in"),
        (dict(rule="factor", factor=float("inf")), "factor=inf"),
        (dict(stop_ids=[False]), r"stop_ids=\[False\]: must be None or a list of token ids"),
        (dict(stop_ids=[0.0]), r"stop_ids=\[0.0\]"),
        (dict(stop_ids=[-1]), r"stop_ids=\[-1\]"),
        (dict(logits_eos_inf=1), "logits_eos_inf=1: must be True or False"),
    ],
)
def test_bools_and_non_finite_numbers_are_not_settings(kwargs, match):
    """A bool is an int in Python: `temperature=True` would otherwise run at temperature 1."""
    with pytest.raises(ValueError, match=match):
        spiffy.GenerationConfig(**{"gen_length": 32, "block_length": 8, "steps": 32, **kwargs})


@pytest.mark.parametrize("prune", [True, 0, -1, 1.5, "2"])
def test_speculation_prune_must_be_a_positive_integer(prune):
    with pytest.raises(ValueError, match=f"prune={prune!r} must be None or a positive integer"):
        spiffy.Speculation("chain:3", prune=prune)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(seed=None), "seed=None must be an integer >= 0"),
        (dict(seed="abc"), "seed='abc' must be an integer >= 0"),
        (dict(seed=1.5), "seed=1.5"),
        (dict(seed=-1), "seed=-1"),
        (dict(seed=True), "seed=True"),
        (dict(request_id=None), "request_id=None must be an integer >= 0 or a non-empty string"),
        (dict(request_id=1.5), "request_id=1.5"),
        (dict(request_id=-1), "request_id=-1"),
        (dict(request_id=""), "request_id=''"),
    ],
)
def test_seed_and_request_id_are_checked(kwargs, match):
    decoder = spiffy.build_decoder(tiny_random_model(), gen_length=8, block_length=8, steps=8)
    with pytest.raises(ValueError, match=match):
        decoder.generate([1, 2, 3], **kwargs)
    batch_kwargs = {"seed": kwargs.get("seed", 0), "request_ids": [0, kwargs.get("request_id", 1)]}
    with pytest.raises(ValueError, match=match):  # before any forward of the batch
        decoder.generate_batch([[1, 2, 3], [1, 2]], **batch_kwargs)


def test_string_request_ids_stay_keys():
    decoder = spiffy.build_decoder(tiny_random_model(), gen_length=8, block_length=8, steps=8)
    assert decoder.generate([1, 2, 3], request_id="warmup", seed=3).tokens.numel() == 8
