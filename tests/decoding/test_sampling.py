"""Keyed randomness and the EOS options of a transition (SPEC §2.1, §2 step 6)."""

from __future__ import annotations

import torch

import spiffy
from spiffy.decoding.randomness import NoiseKey, stable_key


def test_keys_are_stable_and_distinct():
    assert stable_key(0, 1, 2, 3, "gumbel") == stable_key(0, 1, 2, 3, "gumbel")
    keys = {stable_key(0, 1, 2, s, p) for s in range(50) for p in ("gumbel", "remask")}
    assert len(keys) == 100
    a = NoiseKey(0, "doc-7").uniforms(1, 2, "gumbel", (4, 5), torch.device("cpu"))
    b = NoiseKey(0, "doc-7").uniforms(1, 2, "gumbel", (4, 5), torch.device("cpu"))
    assert a.dtype == torch.float64 and torch.equal(a, b)


def test_sampling_depends_on_seed_and_request_only(tiny_model):
    kw = dict(gen_length=16, block_length=8, temperature=1.0)
    prompt = torch.tensor([1, 2, 3])
    dec = spiffy.build_decoder(tiny_model, **kw)
    r1 = dec.generate(prompt, request_id=5, seed=1).tokens
    assert torch.equal(r1, dec.generate(prompt, request_id=5, seed=1).tokens)
    others = [dec.generate(prompt, request_id=5, seed=s).tokens for s in range(2, 6)]
    assert any(not torch.equal(r1, o) for o in others)


def test_logits_eos_inf_never_emits_eos(tiny_model):
    eos = spiffy.model_spec(tiny_model).eos_id
    for seed in range(3):
        out = spiffy.build_decoder(
            tiny_model, gen_length=16, block_length=8, temperature=1.0, logits_eos_inf=True
        ).generate(torch.tensor([1, 2]), seed=seed)
        assert (out.tokens != eos).all()


def test_confidence_eos_eot_option_changes_the_order_not_the_validity(tiny_model):
    spec = spiffy.model_spec(tiny_model)
    out = spiffy.build_decoder(
        tiny_model, gen_length=16, block_length=8, confidence_eos_eot_inf=True
    ).generate(torch.tensor([1, 2]))
    assert (out.tokens != spec.mask_id).all()
