"""Verification layouts: one forward gives every state's own distribution, with no leak between drafts."""

from __future__ import annotations

import pytest
import torch

from spiffy.decoding.strategies import STRATEGIES
from tests.conftest import tiny_random_model


def make_states(mask_id: int, lb: int = 8):
    g = torch.Generator().manual_seed(0)
    states = torch.randint(0, 20, (4, lb), generator=g)
    states[:, 3:] = mask_id
    states[1:, 3] = torch.tensor([1, 2, 3])
    return states


def prepared(cache: str):
    """A random model, a canvas whose block holds row 0 of `make_states`, and a started strategy."""
    model = tiny_random_model()
    mask_id = model.config.mask_token_id
    canvas = torch.cat([torch.randint(0, 20, (6,)), torch.full((24,), mask_id)])
    block = slice(14, 22)
    states = make_states(mask_id)
    canvas[block] = states[0]
    strategy = STRATEGIES[cache](model)
    strategy.begin_block(canvas, block)
    return canvas, block, states, strategy


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_each_row_equals_a_separate_forward_and_drafts_do_not_leak(cache):
    canvas, block, states, strategy = prepared(cache)
    together = strategy.block_logits(canvas, block, states, "exact")
    for r in range(states.shape[0]):
        alone = strategy.block_logits(canvas, block, states[r : r + 1], "exact")[0]
        torch.testing.assert_close(together[r], alone, rtol=0, atol=1e-12)
    perturbed = states.clone()
    perturbed[2, 4] = 7  # change one draft: the other rows must not move
    again = strategy.block_logits(canvas, block, perturbed, "exact")
    for r in (0, 1, 3):
        torch.testing.assert_close(again[r], together[r], rtol=0, atol=1e-12)
    assert not torch.allclose(again[2], together[2])


@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_shared_layout_real_row_is_exact_and_drafts_are_isolated(cache):
    canvas, block, states, strategy = prepared(cache)
    exact = strategy.block_logits(canvas, block, states[:1], "exact")[0]
    shared = strategy.block_logits(canvas, block, states, "shared")
    torch.testing.assert_close(shared[0], exact, rtol=0, atol=1e-12)  # the canvas never sees drafts
    perturbed = states.clone()
    perturbed[2, 4] = 7
    again = strategy.block_logits(canvas, block, perturbed, "shared")
    for r in (0, 1, 3):
        torch.testing.assert_close(again[r], shared[r], rtol=0, atol=1e-12)


@pytest.mark.parametrize("invariant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_rows_in_lower_precision_by_mode(llada_fixture_dir, cache, dtype, invariant):
    """A state's logits among 9 states vs alone in float32 and bfloat16. Invariant mode: bit for bit, by
    construction (`spiffy.models.numerics`). Default mode: BLAS chooses kernels by the product's shape and the
    CPU, so only rounding-level closeness holds (torch's default tolerances for the dtype: float32 1.3e-6
    relative, bfloat16 1.6e-2); tests/decoding/test_invariant.py states the exact claims."""
    import spiffy

    model = spiffy.load_model(llada_fixture_dir, dtype=dtype)
    mask_id = model.config.mask_token_id
    g = torch.Generator().manual_seed(0)
    canvas = torch.randint(0, mask_id, (40,), generator=g)
    block = slice(24, 32)
    states = torch.randint(0, mask_id, (9, 8), generator=g)
    states[:, 5:] = mask_id
    canvas[block] = states[0]
    strategy = STRATEGIES[cache](model, invariant=invariant)
    strategy.begin_block(canvas, block)
    together = strategy.verify(canvas, block, states).logits
    for r in range(states.shape[0]):
        alone = strategy.verify(canvas, block, states[r : r + 1]).logits[0]
        if invariant:
            assert torch.equal(together[r], alone)
        else:
            torch.testing.assert_close(together[r], alone)


def test_lookahead_rows_equal_the_next_blocks_first_forward():
    canvas, block, states, strategy = prepared("none")
    out = strategy.verify(canvas, block, states, "exact", lookahead=8)
    for r in range(states.shape[0]):
        row = canvas.clone()
        row[block] = states[r]
        nxt = slice(block.stop, block.stop + 8)
        full = strategy.model(row[None]).logits[0]
        torch.testing.assert_close(out.lookahead[r], full[nxt], rtol=0, atol=1e-12)
        torch.testing.assert_close(out.logits[r], full[block], rtol=0, atol=1e-12)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_caches_keep_only_the_boundary_logits(cache):
    canvas, block, states, strategy = prepared(cache)
    vocab = strategy.model.config.vocab_size
    assert strategy.cache.boundary_logits.shape == (vocab,)  # not (1, L, V)
