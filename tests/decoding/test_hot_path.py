"""The decode step's hot path (#16): one host read per forward, logits only where read, batched rules equal to the
reference rules, sync-free drafting equal to the reference drafting."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spiffy
from spiffy.decoding import block_decoder
from spiffy.decoding.drafting import GraphTensors, prune_rows, top_ranked
from spiffy.decoding.rules import BATCHED, TransitionRule
from spiffy.graph.draft_graph import DraftGraph
from spiffy.lab.profiling import reads_between_forwards
from spiffy.models.base import DiffusionLM
from tests.conftest import tiny_random_model
from tests.helpers.lossless import draft_graphs
from tests.helpers.scripted_model import ScriptedModel

DECODERS = {
    "vanilla": {},
    "spiffy": dict(speculate=spiffy.Speculation("fig2")),
    "dual+spiffy": dict(cache="dual", speculate=spiffy.Speculation("chain:4")),
    "prefix+spiffy": dict(cache="prefix", speculate=spiffy.Speculation("chain:4")),
    "threshold+spiffy": dict(rule="threshold", tau=0.6, speculate=spiffy.Speculation("fig2")),
    "T0.7+spiffy": dict(temperature=0.7, speculate=spiffy.Speculation("chain:4")),
    "cross+spiffy": dict(speculate=spiffy.Speculation("chain:4", cross_block=True)),
    "pruned+spiffy": dict(speculate=spiffy.Speculation("chain:6", prune=3)),
}


@pytest.mark.parametrize("name", list(DECODERS))
def test_at_most_one_host_read_per_forward(fixture_model, name):
    """Between two model calls the host reads the device at most once (the walk's one transfer), and never
    inside a model call. Before #16 the same decoders read 4.1 times per transition (base) and 8.0-8.9 times
    per transition (Spiffy), up to 45 times between two forwards, plus two `cuda.synchronize` per forward."""
    decoder = spiffy.build_decoder(fixture_model, gen_length=32, block_length=8, **DECODERS[name])
    out = {}
    between, inside, _ = reads_between_forwards(
        fixture_model,
        lambda: out.setdefault("r", decoder.generate(torch.tensor([71, 124, 84, 108, 88]), seed=2)),
    )
    assert inside == 0
    assert out["r"].stats.nfe == len(between)
    assert (
        between[-1] <= 3
    )  # the last walk's read, then the EOS search of the result (once per request)
    if (
        name == "cross+spiffy"
    ):  # a block started from carried logits walks once more without a forward
        assert max(between[:-1]) <= 2 and sum(between[:-1]) <= len(between) - 1 + 32 // 8 - 1
    else:
        assert max(between[:-1]) <= 1, between


def test_the_counter_sees_every_kind_of_read():
    from spiffy.lab.profiling import SyncCounter

    x = torch.arange(6.0)
    with SyncCounter() as c:
        x.sum().item(), bool(x.any()), int(x[0]), x.tolist(), x.nonzero(), torch.equal(x, x)
        x[x > 2], x.unique()
    assert c.count == 8


@pytest.mark.parametrize("rule", sorted(BATCHED))
def test_batched_counts_equal_the_reference_rule(rule):
    g = torch.Generator().manual_seed(0)
    params = {
        "schedule": dict(steps_per_block=4),
        "fixed_k": dict(k=3),
        "threshold": dict(tau=0.6),
        "factor": dict(factor=1.0),
        "dream_steps": dict(steps_per_block=5),
        "dream_threshold": dict(steps_per_block=4, tau=0.7),
    }[rule]
    spb = params.pop("steps_per_block", None)
    r = TransitionRule(rule, spb, **params)
    lb, start = 8, 8
    for _ in range(60):
        n = torch.randint(0, lb + 1, (6,), generator=g)
        conf = torch.rand(6, lb, generator=g, dtype=torch.float64)
        conf[torch.arange(lb) >= n[:, None]] = float("-inf")
        conf = conf.sort(dim=1, descending=True).values
        conf[0, :2] = 0.65  # ties at a threshold
        steps = torch.randint(0, 6, (6,), generator=g).tolist()
        if rule == "schedule":
            steps = [min(s, spb - 1) for s in steps]
        if (
            rule == "dream_threshold"
        ):  # reachable states: never more committed than the quota so far
            n = torch.maximum(n, torch.tensor([max(0, start - (s * start // spb)) for s in steps]))
            conf = (
                torch.rand(6, lb, generator=g, dtype=torch.float64).sort(1, descending=True).values
            )
            conf[torch.arange(lb) >= n[:, None]] = float("-inf")
        got = r.counts(conf, n, steps, start).tolist()
        want = [r.count(conf[i, : n[i]], steps[i], start) for i in range(6)]
        assert got == want, (rule, n.tolist(), steps)


def test_top_ranked_equals_a_stable_sort_with_ties_and_infinities():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (50, 30), generator=g).to(torch.float64)  # many ties
    scores[scores == 0] = float("-inf")
    scores[3] = float("-inf")  # a row with no finite score
    for k in (1, 2, 3, 5):
        want = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(top_ranked(scores, k), want)


def _reference_prune(tensors, pair_probs, graph: DraftGraph, keep: int) -> list[int]:
    """The pre-#16 implementation (Python, O(n^2)), kept as the oracle."""
    n = len(graph.nodes)
    node = tensors.node.tolist()
    first = {}
    for r, q in enumerate(node):
        first.setdefault(q, r)
    valid = tensors.valid[[first[q] for q in range(n)]]
    probs = pair_probs[[first[q] for q in range(n)]]
    logp = torch.where(valid, probs.clamp_min(1e-300).log(), torch.zeros_like(probs))
    local = (logp.sum(1) / valid.sum(1)).tolist()
    children = graph.children()
    score = [0.0] * n
    for q in sorted(range(n), key=lambda q: -len(graph.nodes[q])):
        kids = children[q]
        child = sum(score[c] for c in kids) / len(kids) if kids else local[q]
        score[q] = 0.5 * (local[q] + child)
    kept: list[int] = []
    while len(kept) < keep:
        admissible = [
            q
            for q in range(n)
            if q not in kept and any(p == -1 or p in kept for p in graph.parents[q])
        ]
        if not admissible:
            break
        kept.append(max(admissible, key=lambda q: (score[q], -q)))
    return [r for r, q in enumerate(node) if q in kept]


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    graph=draft_graphs(max_nodes=10),
    keep=st.integers(1, 8),
    keyed=st.booleans(),
    seed=st.integers(0, 99),
)
def test_vectorised_pruning_equals_the_reference(graph, keep, keyed, seed):
    tensors = GraphTensors.from_graph(graph, keyed=keyed)
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(tensors.pos_rank.shape, generator=g, dtype=torch.float64)
    probs[probs < 0.2] = 0.5  # ties between nodes
    rows = prune_rows(tensors, probs, keep).nonzero().squeeze(1).tolist()
    assert rows == _reference_prune(tensors, probs, graph, keep)


def test_models_satisfy_the_contract(fixture_model):
    for model in (fixture_model, tiny_random_model(), ScriptedModel()):
        assert isinstance(model, DiffusionLM)


def test_rows_reached_at_another_step_finish_one_transition_at_a_time(fixture_model, monkeypatch):
    """A transition that commits nothing (Dream's step schedule often rounds to 0), or a multi-token one at
    T > 0 landing on a deeper draft than its level assumed: the walk then finishes transition by transition
    (docs/algorithm.md §5.4 verbatim), still lossless."""
    calls = []
    original = block_decoder.BlockDecoder._walk_slowly

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(block_decoder.BlockDecoder, "_walk_slowly", counted)
    rules = [dict(rule="threshold", tau=0.3, temperature=0.8), dict(rule="dream_steps", steps=32)]
    for prompt, graph, rule in itertools.product(
        [[71, 124, 84, 108, 88], [5, 9, 14, 3]], ["fig2", "topk:3"], rules
    ):
        kw = dict(gen_length=32, block_length=8, **rule)
        base = spiffy.build_decoder(fixture_model, **kw).generate(torch.tensor(prompt), seed=4)
        fast = spiffy.build_decoder(
            fixture_model, **kw, speculate=spiffy.Speculation(graph)
        ).generate(torch.tensor(prompt), seed=4)
        assert torch.equal(fast.tokens, base.tokens) and fast.stats.nfe <= base.stats.nfe
    assert calls


@pytest.mark.slow
def test_compiled_block_forward_is_lossless():
    """`DecoderOptions(compile=True)` (Hydra `decoder.compile=true`): the model forward under `torch.compile`,
    draft rows padded to a fixed count; same tokens and NFE as the eager decoder."""
    from spiffy.decoding.block_decoder import DecoderOptions

    model = tiny_random_model()
    prompt = torch.tensor([1, 2, 3, 4])
    kw = dict(gen_length=16, block_length=8, cache="dual", speculate=spiffy.Speculation("chain:3"))
    eager = spiffy.build_decoder(model, **kw).generate(prompt)
    compiled = spiffy.build_decoder(model, **kw, options=DecoderOptions(compile=True)).generate(
        prompt
    )
    assert torch.equal(compiled.tokens, eager.tokens) and compiled.stats.nfe == eager.stats.nfe
