"""`graph.budget=auto`: the replay with costs, the choice on scripted cost models, and the cost-model cache."""

from __future__ import annotations

import json

import pytest
import torch

import spiffy
from spiffy.calibration import cost
from spiffy.calibration.autotune import Candidate, choose, drafts_counter, predict
from spiffy.calibration.calibrate import evaluate
from spiffy.calibration.cost import CostModel, load_or_measure, lossless_layouts, state_grid
from spiffy.calibration.trajectories import record_trajectories
from spiffy.decoding.config import GenerationConfig
from spiffy.graph.builtin import chain
from spiffy.graph.draft_graph import DraftGraph
from tests.helpers.scripted_model import ScriptedModel

CFG = GenerationConfig(gen_length=32, block_length=16, steps=32)
PROMPTS = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]


@pytest.fixture(scope="module")
def trajectories():
    # the stable scripted model: relative to X_t's anchor, X_{t+l} adds exactly (1,1), ..., (l,1)
    return record_trajectories(ScriptedModel(), CFG, PROMPTS, horizon=6, progress=False)


def chains(depth: int) -> dict[int, DraftGraph | None]:
    return {0: None, **{d: chain(d) for d in range(1, depth + 1)}}


def scripted_costs(forward, *, overhead: float = 0.0, step: float = 0.0, max_states: int = 8):
    """A cost model whose in-block forward with n states costs forward(n) ms, block starts 10 ms."""
    states = state_grid(max_states)
    return CostModel(
        states,
        [0, 1],
        {"exact": [[forward(n) for n in states] for _ in range(2)]},
        [forward(1)] * 2,
        10.0,
        step,
        {"exact": {1: overhead, max_states - 1: overhead}},
    )


def test_a_flat_cost_curve_chooses_the_largest_budget(trajectories):
    candidates = predict(trajectories, chains(4), scripted_costs(lambda n: 10.0), CFG)
    nfe = [c.speedup_nfe for c in sorted(candidates, key=lambda c: c.budget)]
    assert nfe == sorted(nfe) and len(set(nfe)) == len(nfe)  # every node saves forwards here
    best, why = choose(candidates)
    assert best.budget == 4 and best.layout == "exact"
    assert why.startswith("auto: D*=4, layout exact") and best.speedup_wall > 2


def test_a_steep_cost_curve_chooses_the_base(trajectories):
    candidates = predict(trajectories, chains(5), scripted_costs(lambda n: 10.0 * n**2), CFG)
    best, why = choose(candidates)
    assert best.budget == 0 and why.startswith("auto: D*=0 (the base decoder)")
    assert (best.speedup_wall, best.speedup_nfe, best.nodes) == (1.0, 1.0, 0)
    assert all(c.speedup_wall < 1 for c in candidates if c.budget)


def test_overhead_and_the_margin_keep_the_base_when_the_gain_is_marginal(trajectories):
    # forwards cost 1.4x per extra state: D=1 is predicted a little faster, unless Spiffy's own time is charged
    curve = lambda n: 10.0 * (1 + 0.4 * (n - 1))  # noqa: E731
    free = {c.budget: c for c in predict(trajectories, chains(2), scripted_costs(curve), CFG)}
    costly = predict(trajectories, chains(2), scripted_costs(curve, overhead=3.0, step=1.0), CFG)
    assert free[1].speedup_wall > {c.budget: c for c in costly}[1].speedup_wall
    assert choose(list(free.values()), margin=0.0)[0].budget >= 1
    gain = max(c.speedup_wall for c in free.values())
    assert choose(list(free.values()), margin=gain - 1 + 0.01)[0].budget == 0


@pytest.mark.parametrize(
    "cfg", [CFG, GenerationConfig(gen_length=32, block_length=16, rule="fixed_k", k=2)]
)
def test_the_replay_counts_the_forwards_and_drafts_the_decoder_runs(cfg):
    """Predicted NFE equals `evaluate` and the real decoder; predicted states per forward equal the real ones
    (two tokens per step: the masked counts come from the recorded trajectories, not from the rule)."""
    model = ScriptedModel()
    trajectories = record_trajectories(model, cfg, PROMPTS, horizon=6, progress=False)
    if cfg.rule == "fixed_k":
        assert trajectories.blocks[0].masked[:2] == [14, 12]
    c3 = chain(3)
    phased = DraftGraph(c3.nodes, c3.parents, 3, phases=((1, (0,)), (8, (0, 1, 2))))
    two = DraftGraph.from_formulas([[(1, 1)], [(2, 1)], [(1, 1), (2, 1)]])
    for graph in (c3, two, phased):
        (candidate,) = [
            c for c in predict(trajectories, {3: graph}, scripted_costs(lambda n: 1.0), cfg)
        ]
        nfe = drafts = 0
        for i, prompt in enumerate(PROMPTS):
            decoder = spiffy.build_decoder(model, cfg, speculate=spiffy.Speculation(graph))
            stats = decoder.generate(prompt, request_id=i, seed=0).stats
            nfe, drafts = nfe + stats.nfe, drafts + stats.drafts_verified
        assert evaluate(graph, trajectories).nfe == nfe
        assert candidate.speedup_nfe == pytest.approx(evaluate(graph, trajectories).speedup_nfe)
        in_block = nfe - cfg.num_blocks * len(PROMPTS)
        assert candidate.states_per_forward == pytest.approx((in_block + drafts) / in_block)


def test_drafts_counter_drops_nodes_beyond_the_masked_positions_and_complete_drafts():
    graph = DraftGraph.from_formulas(
        [[(1, 1)], [(1, 1), (2, 1)], [(3, 1)], [(1, 1), (2, 1), (3, 1)]]
    )
    count = drafts_counter(graph, keyed=False)
    # m = 3: all but the node filling every masked position; m = 2: only ranks <= 2 that leave a mask
    assert [count(m) for m in (1, 2, 3, 4)] == [0, 1, 3, 4]
    # a phased graph drafts the nodes of the phase of m: {(1,1)} from m = 1, the chain of 2 from m = 3
    nodes = (((1, 1),), ((1, 1), (2, 1)))
    phased = DraftGraph(nodes, ((-1,), (0,)), 2, phases=((1, (0,)), (3, (0, 1))))
    assert [drafts_counter(phased, keyed=False)(m) for m in (1, 2, 3, 4)] == [0, 1, 2, 2]


def test_choose_needs_candidates():
    with pytest.raises(ValueError, match="candidates"):
        choose([])
    base = Candidate("exact", 0, 0, 1.0, 1.0, 1.0, 1.0, 0.0)
    assert choose([base])[0] is base


def test_lossless_layouts_come_from_the_mode_registry():
    assert lossless_layouts("none") == ["exact"] and lossless_layouts("prefix") == ["exact"]
    assert lossless_layouts("dual") == ["exact"]  # dual runs every layout as exact block queries


def test_state_grid_covers_one_to_the_maximum():
    assert state_grid(1) == [1] and state_grid(4) == [1, 2, 3, 4]
    grid = state_grid(17)
    assert grid[0] == 1 and grid[-1] == 17 and grid == sorted(set(grid))


def measure(root, graphs, **kw):
    return load_or_measure(
        ScriptedModel(), CFG, PROMPTS, graphs, model_name="scripted", root=root, **kw
    )


def test_cost_model_is_measured_once_then_read_from_its_cache(tmp_path, monkeypatch):
    costs, path = measure(tmp_path, [chain(1), chain(3)])
    assert path.parent == tmp_path / "scripted" / "costs" and path.exists()
    assert costs.states == [1, 2, 3, 4] and set(costs.forward_ms) == {"exact"}
    assert set(costs.overhead_ms["exact"]) == {1, 3} and costs.block_start_ms > 0
    assert len(costs.base_forward_ms) == len(costs.blocks) == 2  # blocks 0 and 1 of 2
    assert costs.meta["threads"] == torch.get_num_threads() and costs.meta["dtype"] == "float64"

    def no_timing(*args, **kwargs):
        raise AssertionError("a cached cost model was measured again")

    monkeypatch.setattr(cost, "time_forwards", no_timing)
    again, same = measure(tmp_path, [chain(1), chain(3)])
    assert same == path and again == costs
    with pytest.raises(AssertionError, match="measured again"):  # other graphs: another key, a miss
        measure(tmp_path, [chain(2)])
    with pytest.raises(AssertionError, match="measured again"):
        measure(tmp_path, [chain(1), chain(3)], force=True)


def test_batched_costs_are_per_request_of_a_stacked_forward(tmp_path, fixture_model):
    """eval.batch_size > 1: the forwards are timed per request of a stacked batch, under their own cache key."""
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, cache="dual")
    kw = dict(model_name="fixture", root=tmp_path)
    one, one_path = load_or_measure(fixture_model, cfg, PROMPTS, [chain(2)], **kw)
    four, four_path = load_or_measure(fixture_model, cfg, PROMPTS, [chain(2)], batch=4, **kw)
    assert one_path != four_path and four.meta["batch"] == 4 and "batch" not in one.meta
    assert set(four.forward_ms) == set(one.forward_ms) == {"exact"}  # dual: the exact layout only
    assert four.states == one.states and four.blocks == [1]  # dual: one block suffices
    assert all(ms > 0 for row in four.forward_ms["exact"] for ms in row) and four.block_start_ms > 0
    again, same = load_or_measure(fixture_model, cfg, PROMPTS, [chain(2)], batch=4, **kw)
    assert same == four_path and again == four


def test_a_malformed_cost_model_file_raises_naming_its_path(tmp_path):
    _, path = measure(tmp_path, [chain(2)])
    data = json.loads(path.read_text())
    for broken in ("{not json", json.dumps({**data, "step_ms": "fast"}), json.dumps({"format": 1})):
        path.write_text(broken)
        with pytest.raises(ValueError, match=f"cost model file '{path}' is malformed"):
            measure(tmp_path, [chain(2)])
    for key, match in (
        ("forward_ms", "blocks x states"),
        ("base_forward_ms", "does not match blocks"),
    ):
        broken = json.loads(json.dumps(data))
        table = broken[key]["exact"] if key == "forward_ms" else broken[key]
        del table[0]
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=match):
            measure(tmp_path, [chain(2)])


def test_cost_measurement_needs_graphs_and_prompts(tmp_path):
    with pytest.raises(ValueError, match="graphs"):
        measure(tmp_path, [])
    with pytest.raises(ValueError, match="prompts"):
        load_or_measure(ScriptedModel(), CFG, [], [chain(1)], model_name="s", root=tmp_path)


def test_autotune_entry_point_chooses_a_graph_whose_output_is_the_base_decoders(tmp_path):
    model = ScriptedModel()
    kw = dict(model_name="scripted", task="scripted", n_samples=2, max_budget=3, root=tmp_path)
    choice = spiffy.autotune(model, CFG, PROMPTS, progress=False, **kw)
    assert sorted(c.budget for c in choice.candidates) == [0, 1, 2, 3]
    assert choice.reason.startswith(f"auto: D*={choice.budget}")
    assert (choice.graph is None) == (choice.budget == 0) == (choice.speculation() is None)
    assert choice.to_dict()["costs_path"] == choice.costs_path
    decoder = spiffy.build_decoder(model, CFG, speculate=choice.speculation())
    base = spiffy.build_decoder(model, CFG)
    for i, prompt in enumerate(PROMPTS):
        a, b = base.generate(prompt, request_id=i), decoder.generate(prompt, request_id=i)
        assert torch.equal(a.tokens, b.tokens) and b.stats.nfe <= a.stats.nfe
    with pytest.raises(ValueError, match="max_budget=0"):
        spiffy.autotune(model, CFG, PROMPTS, **{**kw, "max_budget": 0})
    with pytest.raises(ValueError, match="margin=1.5"):
        spiffy.autotune(model, CFG, PROMPTS, margin=1.5, **kw)


def test_the_store_keeps_a_phased_graphs_phases(tmp_path, monkeypatch):
    """`best` may choose a phased graph whose phases together hold more nodes than the budget (each phase
    <= D): the store used to rebuild it without its phases, which raised for every such budget."""
    from spiffy.calibration import store

    phased = DraftGraph(((((1, 1),), ((2, 1),))), ((-1,), (-1,)), 1, phases=((1, (0,)), (3, (1,))))
    monkeypatch.setattr(store, "select_graph", lambda *args, **kwargs: phased)
    graph = store.load_or_calibrate(
        ScriptedModel(),
        CFG,
        lambda: PROMPTS,
        model_name="s",
        task="t",
        n_samples=2,
        budget=1,
        root=tmp_path,
        progress=False,
    )
    assert graph.phases == phased.phases and len(graph.nodes) == 2 and graph.budget == 1


def test_autotune_models_the_block_causal_cache(tmp_path):
    """LLaDA2 (block-causal): the replay's NFE includes the prefill and stores (`predict` checks it against
    `evaluate`), the prefill is timed, and the chosen graph decodes exactly the base's tokens."""
    from tests.conftest import tiny_random_llada2

    model = tiny_random_llada2()
    cfg = GenerationConfig(
        gen_length=8, block_length=4, rule="llada2_threshold", steps_per_block=4, tau=0.9
    )
    prompts = [torch.tensor([1, 2, 3, 4, 5]), torch.tensor([6, 7, 8, 9, 10, 11])]
    kw = dict(
        model_name="tiny-llada2", task="t", n_samples=2, max_budget=2, root=tmp_path, progress=False
    )
    choice = spiffy.autotune(model, cfg, prompts, **kw)
    assert sorted(c.budget for c in choice.candidates) == [0, 1, 2]
    costs = CostModel.from_json(open(choice.costs_path).read(), choice.costs_path)
    assert costs.meta["prefill_ms"] > 0
    base = spiffy.build_decoder(model, cfg)
    for budget in (1, 2):
        graph = next(c for c in choice.candidates if c.budget == budget)
        assert graph.speedup_nfe >= 1.0
    decoder = spiffy.build_decoder(model, cfg, speculate=choice.speculation())
    for i, prompt in enumerate(prompts):
        a, b = base.generate(prompt, request_id=i), decoder.generate(prompt, request_id=i)
        assert torch.equal(a.canvas, b.canvas) and b.stats.nfe <= a.stats.nfe
    fused = GenerationConfig(**{**cfg.to_dict(), "fuse_next": True})
    with pytest.raises(ValueError, match="fuse_next=True"):
        spiffy.autotune(model, fused, prompts, **kw)


def test_dynamic_candidates_replay_the_forwards_and_drafts_the_decoder_runs(fixture_model):
    """Dynamic graphs (docs/algorithm.md §5.10): the predicted NFE and states per forward are the real
    decoder's (each forward's drafts replayed from the recorded anchor features)."""
    from spiffy.calibration.autotune import predict_dynamic
    from spiffy.calibration.dynamic import calibrate_dynamic
    from tests.calibration.test_calibrate import prompts

    cfg = GenerationConfig(gen_length=32, block_length=8, steps=32)
    test = prompts(3, seed=4)
    trajectories = record_trajectories(fixture_model, cfg, test, progress=False, features=3)
    graphs = {d: calibrate_dynamic(trajectories, d) for d in (2, 5)}
    candidates = predict_dynamic(
        trajectories, graphs, scripted_costs(lambda n: 1.0, max_states=6), cfg
    )
    assert [(c.kind, c.budget, c.nodes) for c in candidates] == [
        ("dynamic", 2, 2),
        ("dynamic", 5, 5),
    ]
    for candidate in candidates:
        nfe = drafts = 0
        decoder = spiffy.build_decoder(
            fixture_model, cfg, speculate=spiffy.Speculation(graphs[candidate.budget])
        )
        for i, prompt in enumerate(test):
            stats = decoder.generate(prompt, request_id=i).stats
            nfe, drafts = nfe + stats.nfe, drafts + stats.drafts_verified
        in_block = nfe - cfg.num_blocks * len(test)
        assert candidate.speedup_nfe == pytest.approx(32 * len(test) / nfe)
        assert candidate.states_per_forward == pytest.approx((in_block + drafts) / in_block)


def test_autotune_with_dynamic_graphs_measures_them_and_can_choose_one(tmp_path, monkeypatch):
    """`dynamic=True`: static and dynamic graphs of every budget compete on the same cost model, the dynamic
    graphs' own overhead measured; a chosen dynamic graph decodes exactly the base decoder's tokens."""
    from spiffy.calibration import autotune as module
    from spiffy.graph.dynamic import DynamicGraph

    model = ScriptedModel()
    kw = dict(model_name="scripted", task="scripted", n_samples=2, max_budget=3, root=tmp_path)
    choice = spiffy.autotune(model, CFG, PROMPTS, progress=False, dynamic=True, **kw)
    kinds = sorted((c.kind, c.budget) for c in choice.candidates)
    assert kinds == [("dynamic", 1), ("dynamic", 2), ("dynamic", 3)] + [
        ("static", d) for d in range(4)
    ]
    costs = CostModel.from_json(open(choice.costs_path).read(), choice.costs_path)
    assert set(costs.overhead_ms) == {"exact", "dynamic:exact"} and set(
        costs.overhead_ms["dynamic:exact"]
    ) == {3}

    def pick_dynamic(candidates, margin):
        best = next(c for c in candidates if c.kind == "dynamic" and c.budget == 2)
        return best, "forced"

    monkeypatch.setattr(module, "choose", pick_dynamic)
    choice = spiffy.autotune(model, CFG, PROMPTS, progress=False, dynamic=True, **kw)
    assert isinstance(choice.graph, DynamicGraph) and choice.graph.budget == 2
    assert choice.to_dict()["kind"] == "dynamic"
    decoder = spiffy.build_decoder(model, CFG, speculate=choice.speculation())
    base = spiffy.build_decoder(model, CFG)
    for i, prompt in enumerate(PROMPTS):
        a, b = base.generate(prompt, request_id=i), decoder.generate(prompt, request_id=i)
        assert torch.equal(a.tokens, b.tokens) and b.stats.nfe < a.stats.nfe
    with pytest.raises(ValueError, match="batch_size=2"):
        spiffy.autotune(model, CFG, PROMPTS, progress=False, dynamic=True, batch_size=2, **kw)
