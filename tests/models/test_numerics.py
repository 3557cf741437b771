"""Invariant numerics (`spiffy.models.numerics`, docs/numerics.md): each replaced operation gives a row (or an
element) the same bits whatever the number of rows around it, and only inside the mode. Core imports only."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from spiffy.decoding.block_decoder import DecoderOptions
from spiffy.models import numerics
from spiffy.models.kv import KVCache, bidirectional_attention
from tests.helpers.stacking import stacked_attention_case

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_linear_row_is_the_same_among_any_number_of_rows(dtype, device):
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(96, 200, bias=True).to(device=device, dtype=dtype)
    x = torch.randn(300, 96, generator=g).to(device=device, dtype=dtype)
    with numerics.invariant_numerics():
        every = layer(x)
        for start, rows in [(0, 1), (5, 3), (17, 40), (100, 1), (33, 200), (299, 1)]:
            assert torch.equal(layer(x[start : start + rows]), every[start : start + rows])
        assert torch.equal(layer(x.view(3, 100, 96)).view(300, -1), every)  # any leading shape
    # the same function, other roundings (bfloat16: the bias is added after rounding, one ulp of |y| <= 4)
    tol = {"atol": 1.6e-2, "rtol": 1.6e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(every, layer(x), **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
def test_activations_do_not_depend_on_an_elements_position(dtype, device):
    """ATen's fused silu rounds its scalar tail differently from its vector loop (strided = scalar path)."""
    x = (torch.randn(1 << 16, generator=torch.Generator().manual_seed(1)) * 4).to(
        device=device, dtype=dtype
    )
    with numerics.invariant_numerics():
        for fn in (F.silu, F.sigmoid, torch.sigmoid):
            assert torch.equal(fn(x)[::2], fn(x[::2])) and torch.equal(fn(x)[1:], fn(x[1:]))
            original = (
                numerics._ORIGINAL_TORCH_SIGMOID
                if fn is torch.sigmoid
                else numerics._ORIGINAL[fn.__name__]
            )
            torch.testing.assert_close(fn(x), original(x))


def test_only_threads_inside_the_mode_get_the_replacements():
    x = torch.randn(3, 8)
    layer = torch.nn.Linear(8, 4)
    seen = {}

    def outside():
        seen["outside"] = F.linear is numerics._DISPATCH["linear"], numerics.active()

    with numerics.invariant_numerics():
        assert numerics.active() and F.linear is numerics._DISPATCH["linear"]
        worker = threading.Thread(target=outside)
        worker.start()
        worker.join()
        with numerics.invariant_numerics():  # nested: still on
            assert numerics.active()
        assert numerics.active()
        layer(x)
    assert seen["outside"] == (
        True,
        False,
    )  # the dispatcher is installed but runs the original there
    assert not numerics.active() and F.linear is numerics._ORIGINAL["linear"]
    assert torch.sigmoid is numerics._ORIGINAL_TORCH_SIGMOID


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_invariant_attention_ignores_stacking_and_padding(dtype, device):
    """Rows of several requests with caches of different lengths (zero-padded, masked) in one call: each
    request's rows are bitwise its rows alone; in float64 the mode matches the default attention."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    group = 3
    caches, queries, fresh, stacked, q_all, k_all, mask = stacked_attention_case(
        rand, [(5, 2), (41, 1), (7, 3)], group=group, device=device
    )
    with numerics.invariant_numerics():
        together = bidirectional_attention(q_all, k_all, k_all, mask, stacked, 0)
        for c, (cache, qq, kk) in enumerate(zip(caches, queries, fresh)):
            alone = bidirectional_attention(qq, kk, kk, None, cache, 0)
            assert torch.equal(together[c * group : c * group + qq.shape[0]], alone)
    # the same function as the default path (float64: only rounding apart)
    q64, k64 = queries[0].double(), fresh[0].double()
    c64 = KVCache(tuple((k.double(), v.double()) for k, v in caches[0].layers), insert_at=5)
    with numerics.invariant_numerics():
        mode = bidirectional_attention(q64, k64, k64, None, c64, 0)
    torch.testing.assert_close(
        mode, bidirectional_attention(q64, k64, k64, None, c64, 0), rtol=0, atol=1e-12
    )


def test_decoder_options_refuse_non_booleans():
    for bad in ({"invariant": "yes"}, {"invariant": 1}, {"compile": None}, {"min_rows": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DecoderOptions(**bad)
