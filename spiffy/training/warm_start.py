"""Initialise an SDAR-format model from a trained LLaDA-format one (same tokenizer, same shapes), and write an SDAR
model's `config.json` with the published checkpoints' keys.

The two architectures are the same pre-norm SwiGLU transformer with rotate-half RoPE; only the names differ, and SDAR
(Qwen3) adds a per-head RMSNorm on q and k, which starts at ones. LLaDA's `ff_proj` is the gated (SiLU) branch, so
it maps to `gate_proj`. The result is then fine-tuned with the block-diffusion objective.
"""

from __future__ import annotations

import json
from pathlib import Path

from spiffy.models.llada import LLaDAModelLM
from spiffy.models.sdar import SDARConfig, SDARForCausalLM

LAYER_NAMES = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ff_norm": "post_attention_layernorm",
}

TOP_NAMES = {"wte": "model.embed_tokens", "ln_f": "model.norm", "ff_out": "lm_head"}


def sdar_config_from_llada(llada: LLaDAModelLM, block_size: int) -> SDARConfig:
    """The SDAR config with the LLaDA model's shapes, token ids and RoPE/norm constants."""
    c = llada.config
    return SDARConfig(
        vocab_size=c.embedding_size,
        hidden_size=c.d_model,
        intermediate_size=c.mlp_hidden_size,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.d_model // c.n_heads,
        max_position_embeddings=c.max_sequence_length,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        block_size=block_size,
        mask_token_id=c.mask_token_id,
        bos_token_id=c.eos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )


def llada_state_to_sdar(state: dict) -> dict:
    """Rename a LLaDA state dict to SDAR's weight names (q/k norms are not in it)."""
    out = {}
    for name, tensor in state.items():
        # model.transformer.<wte|ln_f|ff_out>.weight or model.transformer.blocks.N.<name>.weight
        parts = name.split(".")
        if parts[2] == "blocks":
            out[f"model.layers.{parts[3]}.{LAYER_NAMES[parts[4]]}.weight"] = tensor
        else:
            out[f"{TOP_NAMES[parts[2]]}.weight"] = tensor
    return out


def sdar_from_llada(llada: LLaDAModelLM, block_size: int) -> SDARForCausalLM:
    """A new SDAR model carrying the LLaDA model's weights (q/k norms at ones)."""
    model = SDARForCausalLM(sdar_config_from_llada(llada, block_size))
    missing, unexpected = model.load_state_dict(
        llada_state_to_sdar(llada.state_dict()), strict=False
    )
    if unexpected or any(m.split(".")[-2] not in ("q_norm", "k_norm") for m in missing):
        raise ValueError(f"LLaDA->SDAR mapping left missing={missing} unexpected={unexpected}")
    return model


# JetLM/SDAR-*-Chat/config.json's keys in their order (the sdar_reference fixture's config has the same), without
# `auto_map`: it names remote-code files that are not shipped (spiffy's native class needs none)
PUBLISHED_KEYS = (
    "architectures", "attention_bias", "attention_dropout", "attn_implementation", "bos_token_id", "debug",
    "eos_token_id", "block_size", "mask_token_id", "ep_size", "fuse_cross_entropy", "head_dim", "hidden_act",
    "hidden_size", "initializer_range", "intermediate_size", "max_position_embeddings", "max_window_layers",
    "micro_forward", "model_type", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
    "rms_norm_eps", "rope_scaling", "rope_theta", "skip_checkpoint", "sliding_window", "tie_word_embeddings",
    "torch_dtype", "transformers_version", "use_cache", "use_deepep", "use_sliding_window", "vocab_size",
)  # fmt: skip
# the published values of the keys that only training code reads (no effect at inference)
TRAINING_ONLY = dict(
    attention_dropout=0.0, attn_implementation="flex_attention", debug=False, ep_size=1,
    fuse_cross_entropy=True, hidden_act="silu", initializer_range=0.02, micro_forward=False,
    rope_scaling=None, skip_checkpoint=False, sliding_window=None, use_cache=False, use_deepep=False,
    use_sliding_window=False,
)  # fmt: skip


def write_published_config(config: SDARConfig, out: str | Path) -> dict:
    """Write `out/config.json` with the published SDAR keys (plus `pad_token_id` when set); returns it."""
    ours = config.to_dict()
    values = {
        **TRAINING_ONLY,
        **{k: ours[k] for k in PUBLISHED_KEYS if k in ours},
        "architectures": ["SDARForCausalLM"],
        "model_type": "sdar",
        "max_window_layers": config.num_hidden_layers,
        "torch_dtype": str(ours.get("dtype") or "float32").removeprefix("torch."),
        "tie_word_embeddings": False,
    }
    data = {k: values[k] for k in PUBLISHED_KEYS}
    if config.pad_token_id is not None:
        data["pad_token_id"] = config.pad_token_id
    Path(out, "config.json").write_text(json.dumps(data, indent=2) + "\n")
    return data
