"""The losslessness and batching harness the decoder tests share (docs/algorithm.md §5.4, §13).

`assert_lossless`: Spiffy over a base decoder returns exactly the base decoder's canvas and tokens, with no more
forwards. `assert_batch_equals_alone`: a batch returns what each request returns alone (and in reverse order).
`fixture_savings` runs one base decoder of `FIXTURE_GRID` on a fixture model; `draft_graphs` draws random valid graphs; `llada_cases` / `check_llada_case` are the property test of every
LLaDA-style base decoder over a graph (the graph strategy is the caller's: static, phased, dynamic);
`BATCH_CASES` / `batch_case` the batching property test's cases (LLaDA rules or SDAR).
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import spiffy
from spiffy.graph import DraftGraph
from tests.conftest import tiny_random_model, tiny_random_sdar

# each LLaDA-style rule with parameters that make it decode several tokens per step where it can
RULES = {
    "schedule": {},
    "fixed_k": {"k": 2},
    "threshold": {"tau": 0.6},
    "factor": {"factor": 1.0},
}
# the block-causal (SDAR) rules, docs/algorithm.md §12
SDAR_RULES = {
    "sdar_static": {"steps_per_block": 4},
    "sdar_dynamic": {"steps_per_block": 4, "tau": 0.5},
    "sdar_sequential": {"steps_per_block": 4},
}
CACHES = ["none", "prefix", "dual"]


def assert_lossless(
    model,
    prompt,
    graph,
    request_id=0,
    seed=0,
    verify="exact",
    cross_block=False,
    fuse_store=False,
    **kwargs,
):
    """Decode `prompt` with the base decoder of `kwargs` and with Spiffy over it (`graph` and the options);
    assert the same canvas and tokens with no more forwards, and the statistics' base-call count; returns
    both results."""
    base = spiffy.build_decoder(model, **kwargs).generate(prompt, request_id=request_id, seed=seed)
    speculation = spiffy.Speculation(
        graph, verify=verify, cross_block=cross_block, fuse_store=fuse_store
    )
    spec = spiffy.build_decoder(model, speculate=speculation, **kwargs).generate(
        prompt, request_id=request_id, seed=seed
    )
    # the prompt region too (SDAR may rewrite it)
    assert torch.equal(spec.canvas, base.canvas), kwargs
    assert torch.equal(spec.tokens, base.tokens), kwargs
    assert spec.stats.nfe <= base.stats.nfe
    # nfe_base is known without running the base: its transitions (+ SDAR's prefill and store calls)
    assert spec.stats.nfe_base == base.stats.nfe_base
    if not kwargs.get("fuse_next"):
        assert base.stats.nfe == base.stats.nfe_base
    return base, spec


def assert_batch_equals_alone(decoder, prompts, request_ids, seed=0, reverse=True, **batch_kw):
    """Decode alone, then in a batch (and, with `reverse`, in reverse order); every request must come out the
    same: tokens, canvas, forwards and accepted drafts. Returns the results alone and in the batch."""
    alone = [decoder.generate(p, request_id=r, seed=seed) for p, r in zip(prompts, request_ids)]
    batch = decoder.generate_batch(prompts, request_ids, seed, **batch_kw)
    batches = [list(batch)]
    if reverse:
        backwards = decoder.generate_batch(prompts[::-1], request_ids[::-1], seed, **batch_kw)
        batches.append(list(backwards)[::-1])
    for others in batches:
        for a, other in zip(alone, others, strict=True):
            assert torch.equal(a.tokens, other.tokens)
            assert torch.equal(a.canvas, other.canvas)
            assert a.stats.nfe == other.stats.nfe
            assert a.stats.accepted_per_forward == other.stats.accepted_per_forward
    return alone, batch


# every LLaDA-style base decoder (rule x cache x temperature) on a fixture model: `fixture_savings`
FIXTURE_GRID = [(r, c, t) for r in RULES for c in CACHES for t in (0.0, 0.7)]


def fixture_savings(model, graphs, rule, cache, temperature) -> int:
    """`assert_lossless` for each of `graphs` over one `FIXTURE_GRID` base decoder on a fixed prompt (32
    tokens in blocks of 8); returns the forwards Spiffy saved in all."""
    saved = 0
    for graph in graphs:
        base, spec = assert_lossless(
            model,
            torch.tensor([71, 124, 84, 108, 88]),
            graph,
            request_id=7,
            seed=3,
            gen_length=32,
            block_length=8,
            rule=rule,
            cache=cache,
            temperature=temperature,
            **RULES[rule],
        )
        saved += base.stats.nfe - spec.stats.nfe
    return saved


@st.composite
def draft_graphs(draw, max_nodes: int = 8):
    """Random valid graphs: grow nodes by adding one (i, j) pair to an existing node or the root."""
    nodes: list[tuple] = []
    for _ in range(draw(st.integers(1, max_nodes))):
        parent = draw(st.sampled_from([()] + nodes))
        used = {i for i, _ in parent}
        i = draw(st.integers(1, 5).filter(lambda v: v not in used))
        node = tuple(sorted(parent + ((i, draw(st.integers(1, 3))),)))
        if node not in nodes:
            nodes.append(node)
    return DraftGraph.from_formulas(nodes)


def llada_cases(graphs) -> dict:
    """A LLaDA-style base decoder on a random tiny model with a graph drawn from `graphs`:
    `@given(**llada_cases(...))`, then `check_llada_case` (the keys in the order hypothesis draws them)."""
    return dict(
        model_seed=st.integers(0, 3),
        prompt=st.lists(st.integers(0, 19), min_size=1, max_size=6),
        blocks=st.sampled_from([(8, 4), (12, 4), (16, 8), (12, 12)]),
        rule=st.sampled_from(list(RULES)),
        cache=st.sampled_from(CACHES),
        temperature=st.sampled_from([0.0, 0.5, 1.5]),
        graph=graphs,
        seed=st.integers(0, 1000),
        cross_block=st.booleans(),
    )


def check_llada_case(
    graph, model_seed, prompt, blocks, rule, cache, temperature, seed, cross_block
) -> None:
    """`assert_lossless` on one drawn `llada_cases` case (the cross-block walk where it applies: no cache)."""
    gen_length, block_length = blocks
    assert_lossless(
        tiny_random_model(seed=model_seed),
        torch.tensor(prompt),
        graph,
        request_id=seed % 7,
        seed=seed,
        gen_length=gen_length,
        block_length=block_length,
        rule=rule,
        cache=cache,
        temperature=temperature,
        cross_block=cross_block and cache == "none",
        **RULES[rule],
    )


# the batching property test's cases: `@given(**BATCH_CASES)`, then `batch_case`
BATCH_CASES = dict(
    model_seed=st.integers(0, 3),
    prompts=st.lists(st.lists(st.integers(0, 19), min_size=1, max_size=9), min_size=2, max_size=4),
    blocks=st.sampled_from([(8, 4), (12, 4), (16, 8)]),
    rule=st.sampled_from(list(RULES)),
    cache=st.sampled_from(CACHES),
    temperature=st.sampled_from([0.0, 0.5, 1.5]),
    graph=st.one_of(st.none(), draft_graphs()),
    seed=st.integers(0, 1000),
    batch_size=st.integers(1, 4),
    sdar=st.booleans(),
)


def batch_case(model_seed, blocks, rule, cache, temperature, graph, sdar, dtype=None, **build):
    """The decoder of one drawn `BATCH_CASES` case: a random LLaDA model with `rule`, or (`sdar`) a random SDAR
    model with its static rule and exact cache, in `dtype` if given; `build` goes to `build_decoder`."""
    gen_length, block_length = blocks
    if sdar:
        model = tiny_random_sdar(seed=model_seed, block_size=block_length)
        rule, kw = "sdar_static", {"steps_per_block": block_length}
        cache = "none"  # implies SDAR's exact block-causal cache
    else:
        model, kw = tiny_random_model(seed=model_seed), RULES[rule]
    if dtype is not None:
        model = model.to(dtype)
    return spiffy.build_decoder(
        model,
        gen_length=gen_length,
        block_length=block_length,
        rule=rule,
        cache=cache,
        temperature=temperature,
        speculate=spiffy.Speculation(graph) if graph is not None else None,
        **kw,
        **build,
    )
