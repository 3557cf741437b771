"""Shared fixtures: the reference checkpoints in tests/fixtures/ (LLaDA, Dream, SDAR), a random tiny LLaDA."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

# provenance and checksums: tests/fixtures/README.md
FIXTURES = Path(__file__).resolve().parent / "fixtures"
LLADA_FIXTURE = FIXTURES / "llada_reference"
DREAM_FIXTURE = FIXTURES / "dream_reference"
SDAR_FIXTURE = FIXTURES / "sdar_reference"
LLADA2_FIXTURE = FIXTURES / "llada2_reference"


@pytest.fixture(scope="session")
def llada_fixture_dir() -> Path:
    return LLADA_FIXTURE


@pytest.fixture(scope="session")
def dream_fixture_dir() -> Path:
    return DREAM_FIXTURE


@pytest.fixture(scope="session")
def sdar_fixture_dir() -> Path:
    return SDAR_FIXTURE


@pytest.fixture(scope="session")
def llada2_fixture_dir() -> Path:
    return LLADA2_FIXTURE


@pytest.fixture(scope="session")
def llada_expected(llada_fixture_dir) -> dict:
    return json.loads((llada_fixture_dir / "expected.json").read_text())


@pytest.fixture(scope="session")
def fixture_model(llada_fixture_dir):
    import spiffy

    return spiffy.load_model(llada_fixture_dir, dtype=torch.float64)


def tiny_random_model(seed: int = 0, vocab: int = 24, layers: int = 2, kv_heads: int = 2):
    """A random LLaDA-architecture model in float64 (GQA, small vocab: drafts often match)."""
    from spiffy.models.llada import LLaDAConfig, LLaDAModelLM

    torch.manual_seed(seed)
    cfg = LLaDAConfig(
        d_model=32,
        n_heads=4,
        n_kv_heads=kv_heads,
        n_layers=layers,
        mlp_hidden_size=48,
        vocab_size=vocab,
        max_sequence_length=128,
        rope_theta=10000.0,
        mask_token_id=vocab - 1,
        eos_token_id=vocab - 2,
        pad_token_id=vocab - 2,
        eot_token_id=vocab - 3,
    )
    model = LLaDAModelLM(cfg).to(torch.float64).eval()
    with torch.no_grad():  # sharpen the distributions so that drafts are sometimes right
        model.model.transformer["ff_out"].weight.mul_(8.0)
    model.register_forward_hook(_never_predict_mask)
    return model


def tiny_random_sdar(seed: int = 0, vocab: int = 24, block_size: int = 4, kv_heads: int = 2):
    """A random SDAR-architecture model in float64 (block-causal, GQA, q/k norms; never predicts the mask)."""
    from spiffy.models.sdar import SDARConfig, SDARForCausalLM

    torch.manual_seed(seed)
    cfg = SDARConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=8,
        max_position_embeddings=128,
        rope_theta=10000.0,
        block_size=block_size,
        mask_token_id=vocab - 1,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 2,
    )
    model = SDARForCausalLM(cfg).to(torch.float64).eval()
    with torch.no_grad():  # sharpen the distributions so that drafts are sometimes right
        model.lm_head.weight.mul_(8.0)
    model.register_forward_hook(_never_predict_mask)
    return model


def _never_predict_mask(module, args, output):
    """A trained dLLM never predicts the mask token; a random one may, which stalls every decoder."""
    output.logits[..., module.config.mask_token_id] = float("-inf")
    return output


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_random_model()


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and CI's two cores are not oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


def load_llada2_fixture():
    """The LLaDA2 reference checkpoint in float64 with the fixture's mask and EOS ids on its config (the
    published config names neither: they are `generate` arguments)."""
    import spiffy

    expected = json.loads((LLADA2_FIXTURE / "expected.json").read_text())
    model = spiffy.load_model(LLADA2_FIXTURE, dtype=torch.float64)
    model.config.mask_token_id, model.config.eos_token_id = expected["mask_id"], expected["eos_id"]
    return model


@pytest.fixture(scope="module")
def llada2():
    """`load_llada2_fixture()`, one per test module (a module may register hooks on it)."""
    return load_llada2_fixture()


def tiny_random_llada2(seed: int = 0, vocab: int = 24, layers: int = 2):
    """A random LLaDA2 MoE model in float64 (layer 0 dense, MoE after; mask id vocab-1, EOS vocab-2)."""
    from spiffy.models.llada2 import LLaDA2MoeConfig, LLaDA2MoeModelLM

    torch.manual_seed(seed)
    cfg = LLaDA2MoeConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        n_group=2,
        topk_group=1,
        mask_token_id=vocab - 1,
        eos_token_id=vocab - 2,
        pad_token_id=vocab - 2,
    )
    model = LLaDA2MoeModelLM(cfg).to(torch.float64).eval()
    with torch.no_grad():
        for layer in model.model.layers[cfg.first_k_dense_replace :]:
            layer.mlp.gate.expert_bias.normal_(0, 0.3)
        model.lm_head.weight.mul_(
            8.0
        )  # sharpen the distributions so that drafts are sometimes right
    model.register_forward_hook(_never_predict_mask)
    return model
