"""The native LLaDA2 MoE model against the reference fixture (logits, routing), its masks, cache API and loading."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import spiffy
from spiffy.models.llada2 import LLaDA2MoeConfig, LLaDA2MoeModelLM, block_causal_additive_mask
from tests.conftest import tiny_random_llada2


@pytest.fixture(scope="module")
def expected(llada2_fixture_dir):
    return json.loads((llada2_fixture_dir / "expected.json").read_text())


def _mask(kind: str | None, length: int, block: int) -> torch.Tensor | None:
    """The fixture's `attention_mask` kinds as the reference passes them (1, 1, L, L)."""
    if kind is None:
        return None
    if kind == "block_log":
        return block_causal_additive_mask(length, block, torch.float64)
    assert kind == "block_raw_1_0"  # 2.1 as copied: the 0/1 matrix added to the scores
    blocks = torch.arange(length) // block
    return (blocks[None, :] <= blocks[:, None]).to(torch.float64)[None, None]


@torch.no_grad()
def test_logits_match_reference_within_1e12(llada2, expected):
    """Every logits case (block-causal, no mask, and 2.1's raw 1/0 mask): float32 logits as the reference."""
    cases = expected["logits"]
    kinds = {c["attention_mask"] for c in cases}
    assert kinds == {"block_log", None, "block_raw_1_0"} and len(cases) == 10
    assert any(len(c["input_ids"]) % expected["block_length_used"] for c in cases)  # partial blocks
    for case in cases:
        ids = torch.tensor([case["input_ids"]])
        mask = _mask(case["attention_mask"], ids.shape[1], expected["block_length_used"])
        out = llada2(
            ids, position_ids=torch.tensor([case["position_ids"]]), attention_mask=mask
        ).logits
        assert out.dtype == torch.float32  # the reference's `logits.float()`
        ref = torch.tensor(case["logits"], dtype=torch.float64)
        assert (out[0].double() - ref).abs().max().item() <= 1e-12, case["note"]


@torch.no_grad()
def test_router_chooses_the_reference_experts_and_weights(llada2, expected):
    """Routing probe of logits case 0: float32 router logits, chosen experts in order, scaled weights."""
    probe = expected["routing_probe"]
    case = expected["logits"][probe["logits_case"]]
    ids = torch.tensor([case["input_ids"]])
    seen = {}

    def keep(layer):
        def hook(module, args, output):
            seen[layer] = (args[0], output)

        return hook

    handles = [
        llada2.model.layers[int(entry["layer"])].mlp.gate.register_forward_hook(
            keep(int(entry["layer"]))
        )
        for entry in probe["layers"]
    ]
    try:
        llada2(ids, attention_mask=_mask(case["attention_mask"], ids.shape[1], 4))
    finally:
        for h in handles:
            h.remove()
    for entry in probe["layers"]:
        x, (experts, weights) = seen[int(entry["layer"])]
        gate = llada2.model.layers[int(entry["layer"])].mlp.gate
        logits = torch.nn.functional.linear(x.float(), gate.weight.float())
        assert logits.tolist() == entry["router_logits_float32"]
        assert experts.tolist() == entry["topk_idx"]
        assert weights.dtype == torch.float32 and weights.tolist() == entry["topk_weight_float32"]


def test_first_layers_dense_then_moe_with_published_names(llada2, expected):
    names = set(llada2.state_dict())
    assert names == set(expected["parameter_names"])
    cfg = llada2.config
    kinds = [type(layer.mlp).__name__ for layer in llada2.model.layers]
    assert kinds == ["LLaDA2MLP"] * cfg.first_k_dense_replace + ["LLaDA2MoE"] * (
        cfg.num_hidden_layers - cfg.first_k_dense_replace
    )
    assert cfg.rotary_dims == 8 and cfg.partial_rotary_factor == 0.5


def test_rope_inverse_frequencies_are_float32_over_the_rotary_dims(llada2, expected):
    r, theta = llada2.config.rotary_dims, llada2.config.rope_theta
    inv = 1.0 / (theta ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r))
    assert inv.tolist() == expected["rope_inv_freq_float32"]


@torch.no_grad()
def test_bool_mask_equals_the_additive_block_mask_and_none_is_full(llada2):
    ids = torch.randint(0, 126, (1, 11))
    additive = block_causal_additive_mask(11, 4, torch.float64)
    as_bool = additive[:, 0] == 0  # (1, L, L) True = attend
    a = llada2(ids, attention_mask=additive).logits
    b = llada2(ids, attention_mask=as_bool).logits
    assert torch.equal(a, b)
    full = llada2(ids).logits
    later = ids.clone()
    later[0, 9] = (later[0, 9] + 1) % 126
    assert not torch.equal(llada2(later).logits[0, 0], full[0, 0])  # no mask: position 0 sees 9
    assert torch.equal(
        llada2(later, attention_mask=additive).logits[0, :8], a[0, :8]
    )  # block-causal
    with pytest.raises(ValueError, match="max_position_embeddings"):
        llada2(ids, position_ids=torch.arange(510, 521))
    with pytest.raises(ValueError, match=r"\(B, 1, Q, K\)"):
        llada2(ids, attention_mask=additive[0])


@torch.no_grad()
def test_block_by_block_cache_equals_the_masked_full_forward(llada2):
    """Storing blocks one at a time (positions follow the cache) is the block-causal full forward."""
    ids = torch.randint(0, 126, (1, 14))
    full = llada2(ids, attention_mask=block_causal_additive_mask(14, 4, torch.float64)).logits[0]
    cache, rows = None, []
    for s in range(0, 14, 4):
        out = llada2(ids[:, s : s + 4], kv_cache=cache, store_kv=True)
        cache = out.kv_cache
        rows.append(out.logits[0])
    assert cache.length == 14
    # other GEMM shapes than the full forward: float64 rounding before the float32 cast, not bitwise
    torch.testing.assert_close(torch.cat(rows), full, rtol=0, atol=1e-6)
    states = torch.randint(0, 126, (3, 4))
    batch = llada2(
        states, position_ids=torch.arange(8, 12), kv_cache=cache.slice_positions(8)
    ).logits
    for r in range(3):
        alone = llada2(states[r : r + 1], kv_cache=cache.slice_positions(8)).logits[0]
        torch.testing.assert_close(batch[r], alone, rtol=0, atol=1e-6)


@torch.no_grad()
def test_experts_are_grouped_matrix_products_equal_to_a_per_token_loop(llada2):
    """The grouped MoE equals the README's per-token definition (route, each chosen expert, float32 sum)."""
    moe = llada2.model.layers[1].mlp
    x = torch.randn(2, 7, llada2.config.hidden_size, dtype=torch.float64)
    out = moe(x)
    flat = x.reshape(-1, x.shape[-1])
    experts, weights = moe.gate(flat)
    for t in range(flat.shape[0]):
        routed = torch.zeros(flat.shape[1], dtype=torch.float32)
        for e, w in zip(experts[t].tolist(), weights[t]):
            routed = routed + moe.experts[e](flat[t]).float() * w
        want = routed.double() + moe.shared_experts(flat[t])
        torch.testing.assert_close(out.reshape(-1, x.shape[-1])[t], want, rtol=0, atol=1e-6)


def test_auto_classes_and_spec_without_remote_code(llada2_fixture_dir, llada2):
    cfg = AutoConfig.from_pretrained(llada2_fixture_dir)
    assert isinstance(cfg, LLaDA2MoeConfig) and cfg.model_type == "llada2_moe"
    assert cfg.mask_token_id is None  # the tiny vocabulary has no published mask id
    for auto in (AutoModel, AutoModelForCausalLM):
        assert isinstance(auto.from_pretrained(llada2_fixture_dir), LLaDA2MoeModelLM)
    spec = spiffy.model_spec(llada2)
    assert (spec.mask_id, spec.eos_id, spec.block_causal, spec.attention_block_size) == (
        127,
        126,
        True,
        0,
    )
    with pytest.raises(ValueError, match="mask_token_id is None"):
        spiffy.model_spec(spiffy.load_model(llada2_fixture_dir))
    published = LLaDA2MoeConfig()
    assert (published.mask_token_id, published.eos_token_id) == (156895, 156892)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(score_function="softmax"), "score_function"),
        (dict(rope_scaling={"type": "linear"}), "rope_scaling"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings"),
        (dict(num_experts=6, n_group=4), "num_experts=6"),
        (dict(topk_group=9), "topk_group=9"),
        (dict(partial_rotary_factor=0.0), "rotary_dims"),
        (dict(num_attention_heads=6), "num_attention_heads=6"),
    ],
)
def test_bad_config_values_raise_naming_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLaDA2MoeConfig(**kwargs)


@torch.no_grad()
def test_lower_precision_runs_and_stays_close(llada2_fixture_dir, llada2):
    ids = torch.randint(0, 126, (1, 8))
    ref = llada2(ids).logits
    low = spiffy.load_model(llada2_fixture_dir, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(low, ref, rtol=0, atol=1e-3)


def test_tiny_random_model_routes_and_decodes():
    model = tiny_random_llada2()
    out = model(torch.randint(0, 22, (2, 6))).logits
    assert out.shape == (2, 6, 24) and torch.isfinite(out[..., :23]).all()
