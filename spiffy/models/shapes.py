"""Random-weight models with the published configurations, to measure cost at real scale without weights.

`random_model("llada-8b", layers=2)` builds LLaDA-8B's architecture (docs/algorithm.md §9: width, heads, MLP, vocabulary,
RoPE) with `layers` of its 32 blocks and random weights; `hidden=` narrows the width (heads and MLP scaled with
it, head_dim kept) for machines that cannot hold even one full block. Timings then scale with the number of
layers (plus the embedding and LM head, which keep the real vocabulary). A family's config defaults are its
flagship's published shapes, and its `shape_keys` name the fields that `layers` and `hidden` change.
"""

from __future__ import annotations

import torch

from spiffy.models.loading import MODEL_CLASSES

# name -> (model_type, fields that differ from the family config's defaults, which are its flagship's shapes)
SHAPES: dict[str, tuple[str, dict]] = {
    "llada-8b": ("llada", dict(eot_token_id=126348)),  # GSAI-ML/LLaDA-8B-Instruct
    "dream-7b": ("Dream", {}),  # Dream-org/Dream-v0-Instruct-7B
    "sdar-8b": ("sdar", dict(block_size=32)),  # JetLM/SDAR-8B-Chat-b32 (Qwen3-8B, block-causal)
    # inclusionAI/LLaDA2.1-mini (LLaDA2.0-mini: the same architecture), 16B-A1.4B MoE
    "llada2-mini": ("llada2_moe", dict(pad_token_id=156892)),
}


def shape_config(name: str, *, layers: int | None = None, hidden: int | None = None):
    """The published config of `name` with `layers` blocks and an optional narrower `hidden` width."""
    if name not in SHAPES:
        raise ValueError(f"shape={name!r} is not known; known: {sorted(SHAPES)}")
    model_type, fields = SHAPES[name]
    if model_type not in MODEL_CLASSES:
        raise ValueError(
            f"shape={name!r}: the {model_type!r} model class is not available in this checkout yet "
            f"(known model types: {sorted(MODEL_CLASSES)})"
        )
    config_class = MODEL_CLASSES[model_type].config_class
    cfg = config_class(**fields)
    n_layers, width, heads, kv_heads, mlp = config_class.shape_keys
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers={layers!r} must be >= 1")
        fields = fields | {n_layers: layers}
    if hidden is not None:
        head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, width) // getattr(cfg, heads)
        group = getattr(cfg, heads) // getattr(cfg, kv_heads)
        if hidden < head_dim or hidden % (head_dim * group):
            raise ValueError(
                f"hidden={hidden!r} must be a positive multiple of head_dim * query groups = "
                f"{head_dim} * {group}"
            )
        fields = fields | {
            mlp: getattr(cfg, mlp) * hidden // getattr(cfg, width),
            width: hidden,
            heads: hidden // head_dim,
            kv_heads: hidden // head_dim // group,
        }
    return config_class(**fields)


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
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    cls = MODEL_CLASSES[cfg.model_type]
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(
        dtype
    )  # build in the target dtype: no float32 copy of 8B-shaped tensors
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()
