"""Random-weight models with the published configurations, to measure cost at real scale without weights.

`random_model("llada-8b", layers=2)` builds LLaDA-8B's architecture (docs/algorithm.md §9: width, heads, MLP, vocabulary,
RoPE) with `layers` of its 32 blocks and random weights; `hidden=` narrows the width (heads and MLP scaled with
it, head_dim kept) for machines that cannot hold even one full block. Timings then scale with the number of
layers (plus the embedding and LM head, which keep the real vocabulary). `sdar-8b` needs the SDAR model class
(`model_type="sdar"` in `spiffy.models.loading.MODEL_CLASSES`) and raises a clear error until it is there.
"""

from __future__ import annotations

import torch

from spiffy.models.loading import MODEL_CLASSES

SHAPES: dict[str, dict] = {
    "llada-8b": dict(
        model_type="llada",
        d_model=4096,
        n_heads=32,
        n_kv_heads=32,
        n_layers=32,
        mlp_hidden_size=12288,
        vocab_size=126464,
        embedding_size=126464,
        max_sequence_length=4096,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        mask_token_id=126336,
        eos_token_id=126081,
        pad_token_id=126081,
        eot_token_id=126348,
    ),
    "dream-7b": dict(
        model_type="Dream",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=131072,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        mask_token_id=151666,
        eos_token_id=151643,
        pad_token_id=151643,
    ),
    "sdar-8b": dict(  # JetLM/SDAR-8B-Chat-b32 (Qwen3-8B with block-causal attention)
        model_type="sdar",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        block_size=32,
        mask_token_id=151669,
        eos_token_id=151643,
    ),
    "llada2-mini": dict(  # inclusionAI/LLaDA2.1-mini (LLaDA2.0-mini: the same architecture), 16B-A1.4B MoE
        model_type="llada2_moe",
        vocab_size=157184,
        hidden_size=2048,
        intermediate_size=5120,
        num_hidden_layers=20,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=32768,
        rope_theta=600000.0,
        partial_rotary_factor=0.5,
        rms_norm_eps=1e-6,
        first_k_dense_replace=1,
        num_experts=256,
        num_experts_per_tok=8,
        num_shared_experts=1,
        moe_intermediate_size=512,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        mask_token_id=156895,
        eos_token_id=156892,
        pad_token_id=156892,
    ),
}

# per family: (layers key, width key, heads key, kv-heads key, mlp key)
_KEYS = {
    "llada": ("n_layers", "d_model", "n_heads", "n_kv_heads", "mlp_hidden_size"),
    "Dream": (
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
    ),
    "llada2_moe": (
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
    ),
    "sdar": (
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
    ),
}


def shape_config(name: str, *, layers: int | None = None, hidden: int | None = None) -> dict:
    """The published config of `name` with `layers` blocks and an optional narrower `hidden` width."""
    if name not in SHAPES:
        raise ValueError(f"shape={name!r} is not known; known: {sorted(SHAPES)}")
    cfg = dict(SHAPES[name])
    n_layers, width, heads, kv_heads, mlp = _KEYS[cfg["model_type"]]
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers={layers!r} must be >= 1")
        cfg[n_layers] = layers
    if hidden is not None:
        head_dim = cfg.get("head_dim") or cfg[width] // cfg[heads]
        group = cfg[heads] // cfg[kv_heads]
        if hidden < head_dim or hidden % (head_dim * group):
            raise ValueError(
                f"hidden={hidden!r} must be a positive multiple of head_dim * query groups = "
                f"{head_dim} * {group}"
            )
        cfg[mlp] = cfg[mlp] * hidden // cfg[width]
        cfg[width], cfg[heads], cfg[kv_heads] = (
            hidden,
            hidden // head_dim,
            hidden // head_dim // group,
        )
    return cfg


def random_model(
    name: str,
    *,
    layers: int | None = None,
    hidden: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
):
    """A randomly initialised model of the published shape `name` (see `shape_config`), in eval mode."""
    cfg = shape_config(name, layers=layers, hidden=hidden)
    model_type = cfg.pop("model_type")
    if model_type not in MODEL_CLASSES:
        raise ValueError(
            f"shape={name!r}: the {model_type!r} model class is not available in this checkout yet "
            f"(known model types: {sorted(MODEL_CLASSES)})"
        )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    cls = MODEL_CLASSES[model_type]
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(
        dtype
    )  # build in the target dtype: no float32 copy of 8B-shaped tensors
    try:
        with torch.device(device):
            model = cls(cls.config_class(**cfg))
    finally:
        torch.set_default_dtype(default)
    return model.eval()
