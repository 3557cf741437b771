"""Keyed randomness and the EOS options of a transition (docs/algorithm.md §2.1, §2 step 6)."""

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


def _one_step(logits, **options):
    """The positions one schedule transition commits from hand-made block logits (Lb, V)."""
    from spiffy.decoding.config import GenerationConfig
    from spiffy.decoding.rules import TransitionRule
    from spiffy.decoding.sampling import TransitionContext, transition
    from spiffy.models.loading import ModelSpec

    lb, vocab = logits.shape
    spec = ModelSpec(mask_id=0, eos_id=1, eot_id=2, pad_id=1, vocab_size=vocab, max_length=64)
    cfg = GenerationConfig(gen_length=lb, block_length=lb, steps=lb, **options)
    ctx = TransitionContext(cfg, TransitionRule.from_config(cfg), spec, NoiseKey(), 0, lb)
    state = torch.zeros(lb, dtype=torch.long)  # all masked
    new, _ = transition(logits, state, 0, ctx)
    return (new != 0).nonzero().squeeze(-1).tolist(), new


def test_confidence_eos_eot_option_changes_which_position_is_committed():
    """Position 0 predicts EoT with p = 0.9, position 1 predicts token 3 with p = 0.6. Plain confidence commits
    position 0 first; with `confidence_eos_eot_inf` the EoT logit is removed before the confidence softmax, so
    position 0's predicted token has confidence 0 and position 1 is committed instead (docs/algorithm.md §2 step 6)."""
    probs = torch.tensor(
        [[0.01, 0.02, 0.90, 0.03, 0.04], [0.01, 0.02, 0.17, 0.60, 0.20]], dtype=torch.float64
    )
    logits = probs.log()
    plain, plain_state = _one_step(logits)
    removed, removed_state = _one_step(logits, confidence_eos_eot_inf=True)
    assert plain == [0] and plain_state[0] == 2  # EoT committed at position 0
    assert removed == [1] and removed_state[1] == 3  # the order changed, the token did not
