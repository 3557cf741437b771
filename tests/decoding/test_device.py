"""Device-parametrised checks of the GPU tier (`scripts/gpu_check.sh`): host synchronisations per forward, and the
`DecoderOptions(compile=True)` path. CPU parameters run in the default tier; `cuda` ones only with `-m cuda`.
Core imports only (the GPU image has no Hydra, lm-eval or W&B)."""

from __future__ import annotations

import warnings

import pytest
import torch

import spiffy
from spiffy.decoding.block_decoder import DecoderOptions
from tests.conftest import tiny_random_model

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("invariant", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_host_synchronisations_per_forward(device, invariant):
    """At most one host read per forward (docs/algorithm.md §5.4 "one forward, one host read"), counted by
    `torch.cuda.set_sync_debug_mode` on a GPU; on the CPU the same decode runs (nothing to count)."""
    model = tiny_random_model().to(device=device, dtype=torch.float32)
    decoder = spiffy.build_decoder(
        model,
        gen_length=16,
        block_length=8,
        cache="dual",
        speculate=spiffy.Speculation("chain:3"),
        options=DecoderOptions(invariant=invariant),
    )
    prompt = torch.tensor([1, 2, 3, 4])
    decoder.generate(prompt)  # warm-up: lazy initialisation may synchronise
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            result = decoder.generate(prompt)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert result.stats.nfe > 0
    assert len(syncs) <= 2 * result.stats.nfe, (
        f"{len(syncs)} synchronisations in {result.stats.nfe} forwards"
    )


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_decoder_matches_eager(device):
    """`DecoderOptions(compile=True)`: the same tokens and NFE as eager, float64 (argmax-stable)."""
    model = tiny_random_model().to(device)
    kw = dict(gen_length=16, block_length=8, cache="dual", speculate=spiffy.Speculation("chain:3"))
    prompt = torch.tensor([1, 2, 3, 4])
    eager = spiffy.build_decoder(model, **kw).generate(prompt)
    compiled = spiffy.build_decoder(model, **kw, options=DecoderOptions(compile=True)).generate(
        prompt
    )
    assert torch.equal(compiled.tokens, eager.tokens) and compiled.stats.nfe == eager.stats.nfe
