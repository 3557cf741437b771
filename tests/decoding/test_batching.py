"""Batched decoding (docs/algorithm.md §13): every request's tokens, canvas and NFE in a batch equal its batch-of-one
result, whatever its batch-mates, their prompt lengths, the batch size and the order (float64)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import Phase, given, settings

import spiffy
from spiffy.decoding.batching import CallStacker, ModelCall
from spiffy.models.kv import KVCache, bidirectional_attention
from tests.conftest import tiny_random_sdar
from tests.helpers.lossless import (
    BATCH_CASES,
    RULES,
    SDAR_RULES,
    assert_batch_equals_alone,
    batch_case,
)
from tests.helpers.stacking import fail_request_1_in_block_2, stacked_attention_case

PROMPTS = [[71, 124, 84, 108, 88], [5, 9], [33, 44, 55, 66, 77, 88, 99, 110, 12], [7]]


@pytest.mark.parametrize(
    ("rule", "cache", "temperature", "graph"),
    list(itertools.product(RULES, ["none", "prefix", "dual"], [0.0, 0.7], [None, "fig2"])),
)
def test_every_llada_decoder_batched(fixture_model, rule, cache, temperature, graph):
    speculate = spiffy.Speculation(graph) if graph else None
    decoder = spiffy.build_decoder(
        fixture_model,
        gen_length=16,
        block_length=8,
        rule=rule,
        cache=cache,
        temperature=temperature,
        speculate=speculate,
        **RULES[rule],
    )
    alone, batch = assert_batch_equals_alone(decoder, PROMPTS, [3, "b", 3, 9], seed=5)
    # fewer forwards than requests' calls: calls were really stacked
    assert batch.batch.forwards < sum(r.stats.nfe for r in alone)
    assert max(batch.batch.calls_per_forward) > 1


@pytest.mark.parametrize(
    ("cache", "graph", "verify"),
    [
        ("none", None, "exact"),
        ("dual", None, "exact"),
        ("none", "chain:4", "shared"),
        ("prefix", "fig2", "shared"),
        ("dual", "fig2", "exact"),
    ],
)
def test_dream_batched(dream_fixture_dir, cache, graph, verify):
    model = spiffy.load_model(dream_fixture_dir, dtype=torch.float64)
    speculate = spiffy.Speculation(graph, verify=verify) if graph else None
    decoder = spiffy.build_decoder(
        model, gen_length=16, block_length=8, cache=cache, speculate=speculate, temperature=0.5
    )
    vocab = model.config.vocab_size
    prompts = [[t % vocab for t in p] for p in PROMPTS]
    assert_batch_equals_alone(decoder, prompts, [0, 1, 2, 3], seed=2)


@pytest.mark.parametrize(
    ("rule", "fuse_store", "fuse_next"),
    [(r, s, n) for r in SDAR_RULES for s, n in [(False, False), (True, True), (False, True)]],
)
def test_sdar_batched(rule, fuse_store, fuse_next):
    model = tiny_random_sdar(seed=1, block_size=4)
    for spec in (None, spiffy.Speculation("fig2", fuse_store=fuse_store)):
        decoder = spiffy.build_decoder(
            model,
            gen_length=10,
            block_length=4,
            rule=rule,
            fuse_next=fuse_next,
            temperature=0.5,
            speculate=spec,
            **SDAR_RULES[rule],
        )
        prompts = [[t % 20 for t in p] for p in PROMPTS]
        assert_batch_equals_alone(decoder, prompts, [0, 1, 2, 3], seed=4)


def test_continuous_batching_and_stats(fixture_model):
    """batch_size < requests: a finished request leaves, the next joins; results come back in prompt order."""
    decoder = spiffy.build_decoder(
        fixture_model,
        gen_length=16,
        block_length=8,
        cache="dual",
        rule="threshold",
        tau=0.6,
        speculate=spiffy.Speculation("chain:4"),
    )
    prompts = PROMPTS * 2
    done = []
    alone, batch = assert_batch_equals_alone(
        decoder, prompts, list(range(8)), batch_size=3, on_result=lambda i, r: done.append(i)
    )
    assert sorted(done) == sorted(list(range(8)) * 2)  # the batch, then the reversed batch
    assert max(batch.batch.calls_per_forward) <= 3
    assert len(batch.batch.rows_per_forward) == batch.batch.forwards
    nfe = [r.stats.nfe for r in alone]
    assert len(set(nfe)) > 1  # requests finish independently, with their own NFE


def test_batch_input_errors(fixture_model):
    decoder = spiffy.build_decoder(fixture_model, gen_length=8, block_length=8)
    with pytest.raises(ValueError, match="batch_size=0"):
        decoder.generate_batch(PROMPTS, batch_size=0)
    with pytest.raises(ValueError, match="4 prompts but 2 request_ids"):
        decoder.generate_batch(PROMPTS, [0, 1])
    with pytest.raises(ValueError, match=r"prompts\[1\]: prompt_ids contain 99999"):
        decoder.generate_batch([[1, 2], [99999]])


def test_a_failing_request_stops_the_batch(fixture_model):
    """An error in one request's decode reaches the caller; the others are stopped, not left waiting."""
    decoder = spiffy.build_decoder(fixture_model, gen_length=16, block_length=8)
    fail_request_1_in_block_2(decoder)
    with pytest.raises(RuntimeError, match="request 1 fails"):
        decoder.generate_batch(PROMPTS, batch_size=4)


def test_stacked_cache_attention_equals_each_cache_alone():
    """Rows of several requests, each with its own cache (different lengths), in one attention call."""
    torch.manual_seed(0)
    group = 3
    caches, queries, fresh, stacked, q_all, k_all, mask = stacked_attention_case(
        lambda *shape: torch.randn(*shape, dtype=torch.float64),
        [(5, 2), (9, 1), (7, 3)],
        group=group,
    )
    together = bidirectional_attention(q_all, k_all, k_all, mask, stacked, 0)
    for c, (cache, qq, kk) in enumerate(zip(caches, queries, fresh)):
        alone = bidirectional_attention(qq, kk, kk, None, cache, 0)
        rows = together[c * group : c * group + qq.shape[0]]
        torch.testing.assert_close(rows, alone, rtol=0, atol=1e-12)


def test_buckets_keep_calls_apart_by_kind_and_length():
    stacker = CallStacker(torch.nn.Identity(), block_causal=False, tolerance=0.25)
    cache = KVCache(((torch.zeros(1, 1, 4, 2),) * 2,), insert_at=4)

    def call(order, q, **kw):
        return ModelCall(order, torch.zeros(1, q, dtype=torch.long), kw)

    calls = [
        call(0, 100),
        call(1, 90),
        call(2, 60),
        call(3, 8, kv_cache=cache),
        call(4, 8, kv_cache=cache),
        call(5, 8, store_kv=True),
    ]
    groups = [[c.order for c in g] for g in stacker.buckets(calls)]
    assert sorted(groups) == [[0, 1], [2], [3, 4], [5]]
    with pytest.raises(ValueError, match="tolerance=1"):
        CallStacker(torch.nn.Identity(), block_causal=False, tolerance=1)
    # at most max_tokens query tokens per forward: rows x the bucket's longest query, a call never split
    capped = CallStacker(torch.nn.Identity(), block_causal=False, max_tokens=200)
    groups = [[c.order for c in g] for g in capped.buckets(calls[:3] + [call(6, 95), call(7, 99)])]
    assert sorted(groups) == [[0, 1], [2], [6, 7]]
    with pytest.raises(ValueError, match="max_tokens=0"):
        CallStacker(torch.nn.Identity(), block_causal=False, max_tokens=0)


def test_a_token_cap_changes_the_forwards_not_the_outputs(fixture_model):
    decoder = spiffy.build_decoder(fixture_model, gen_length=16, block_length=8)
    capped = decoder.generate_batch(PROMPTS, seed=1, max_tokens=40)
    free = decoder.generate_batch(PROMPTS, seed=1, max_tokens=None)
    assert capped.batch.forwards > free.batch.forwards
    for a, b in zip(capped, free, strict=True):
        assert torch.equal(a.tokens, b.tokens) and a.stats.nfe == b.stats.nfe


@settings(max_examples=40, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate])
@given(**BATCH_CASES)
def test_property_batch_equals_batch_of_one(prompts, seed, batch_size, **case):
    decoder = batch_case(**case)
    ids = [seed + i for i in range(len(prompts))]
    assert_batch_equals_alone(decoder, prompts, ids, seed=seed, batch_size=batch_size)


def test_throughput_table_and_batched_cost_curve(fixture_model):
    """The bench's batch axis: every cell checks its outputs against batch 1; the curve has one row per cell."""
    from spiffy.lab.benchmarks import batch_throughput, batched_cost_curve

    kw = dict(gen_length=8, block_length=8, cache="dual")
    decoders = {
        "dual": spiffy.build_decoder(fixture_model, **kw),
        "dual+spiffy": spiffy.build_decoder(
            fixture_model, speculate=spiffy.Speculation("chain:3"), **kw
        ),
    }
    prompts = [torch.tensor(p) for p in PROMPTS[:3]]
    rows = batch_throughput(decoders, prompts, [1, 3])
    assert [(r["decoder"], r["batch_size"]) for r in rows] == [
        ("dual", 1),
        ("dual", 3),
        ("dual+spiffy", 1),
        ("dual+spiffy", 3),
    ]
    assert all(r["identical_to_batch_1"] and r["wall_s"] > 0 for r in rows)
    assert all(r["tokens_per_cpu_s"] >= 0 and r["overhead_vs_model"] >= 0 for r in rows)
    assert rows[1]["forwards"] < rows[0]["forwards"] and rows[1]["calls_per_forward"] > 1
    curve = batched_cost_curve(
        fixture_model, 24, 8, [0, 2], [1, 2], repeats=1, layouts=("exact", "dual")
    )
    assert len(curve) == 2 * 2 * 2
    assert all(r["cost_vs_no_drafts"] == 1.0 for r in curve if r["drafts"] == 0)
    assert all(r["forward_ms"] > 0 and r["block_start_ms_per_request"] > 0 for r in curve)
