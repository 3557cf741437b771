"""Native PyTorch implementation of SDAR (Qwen3 with block-causal attention), weight-compatible with JetLM/SDAR-*.

It reads SDAR's own `config.json` (`model_type: sdar`, `block_size`, `mask_token_id`) and the Qwen3 weight names
(`model.layers.N.self_attn.{q,k,v,o}_proj`, `self_attn.{q,k}_norm`, `mlp.{gate,up,down}_proj`, untied `lm_head`),
and is registered with transformers' Auto classes without `trust_remote_code`; no flash-attn, no Triton (docs/algorithm.md §9, §12).

Attention is **block-causal**: query position i sees key position j iff `j // block_size <= i // block_size`, so
it is causal across blocks and bidirectional inside one. Positions are absolute. Called with no mask and no
positions, `forward` applies that mask at positions `0..L-1` (continuing after a cache). Because finished blocks
never see later ones, their K/V are exact, and the cache API runs a query chunk against stored K/V **with**
(`store_kv=True`, returns the grown cache) or **without** storing it. Precision follows the reference (the
`sdar_reference` fixture README): the five RMSNorms in float32, cast back, then the weight; float32 RoPE tables cast
to the model dtype, rotate-half; SDPA scaled by 1/sqrt(head_dim); GQA with consecutive query heads sharing a KV head.
"""

from __future__ import annotations

import torch

from spiffy.models.base import DiffusionLMOutput
from spiffy.models.generate import SDARGenerate
from spiffy.models.kv import KVCache
from spiffy.models.transformer import BlockCausalLM, DecoderLM, QwenConfig, qwen_fields


class SDARConfig(QwenConfig):
    """SDAR's config format (Qwen3 fields plus `block_size` and `mask_token_id`)."""

    model_type = "sdar"
    # (layers, width, query heads, kv heads, MLP width) of SDAR-8B
    published = qwen_fields(
        151936, (36, 4096, 32, 8, 12288), head_dim=128, positions=32768, theta=1e6
    )

    def __init__(
        self,
        attention_bias: bool = False,
        block_size: int = 4,
        mask_token_id: int = 151669,
        bos_token_id: int = 151643,
        eos_token_id: int = 151643,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        # the reference's training kernel choice ("flex_attention"); transformers would treat it as a request
        # for its own attention backend, and our model has one attention path, so it is dropped
        kwargs.pop("attn_implementation", None)
        self.refuse_unsupported(kwargs, rope_scaling=None)
        if kwargs.get("use_sliding_window"):
            raise ValueError("SDARConfig.use_sliding_window=True is not supported")
        self.init_fields(locals())
        self.check_positive("hidden_size", "num_hidden_layers", "num_attention_heads", "block_size")
        self.check_divisible(("num_attention_heads", "num_key_value_heads"))

    @property
    def attention_block_size(self) -> int:
        """Block-causal attention granularity (the capability block decoders check)."""
        return self.block_size


def block_causal_mask(
    query_pos: torch.Tensor, key_pos: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Bool mask (B, Q, K): query at position i sees key at position j iff `j // bs <= i // bs`."""
    return (key_pos[:, None, :] // block_size) <= (query_pos[:, :, None] // block_size)


# the call's output (logits, `present`, the grown `kv_cache`): the one every family returns
SDAROutput = DiffusionLMOutput


class SDARForCausalLM(SDARGenerate, BlockCausalLM, DecoderLM):
    """SDAR block-diffusion LM: block-causal attention, absolute positions, logits at every query row."""

    config_class = SDARConfig

    def __init__(self, config: SDARConfig):
        # Qwen3: per-head q/k RMSNorm, one bias flag for every projection
        bias = config.attention_bias
        super().__init__(config, config.block_config(qkv_bias=bias, out_bias=bias, qk_norm=True))

    @property
    def rope_dims(self) -> int:
        """RoPE rotates every dim of a head (`BlockCausalLM`)."""
        return self.config.head_dim

    def forward_mask(self, attention_mask, position_ids, cache: KVCache | None):
        """The mask as given, else the block-causal mask of these query positions over the spliced keys
        (None when it hides nothing: `BlockCausalLM`)."""
        if attention_mask is not None:
            return attention_mask
        mask = self.default_attention_mask(position_ids, cache)
        return None if bool(mask.all()) else mask

    def default_attention_mask(
        self, position_ids: torch.Tensor, cache: KVCache | None
    ) -> torch.Tensor:
        """Block-causal attention as an explicit mask (B, Q, L_c + Q) (`spiffy.models.base`)."""
        keys = position_ids
        if cache is not None:  # cached key i sits at position i; the queries are spliced in
            cached = torch.arange(cache.length, device=position_ids.device).expand(
                position_ids.shape[0], -1
            )
            lo, hi = cache.insert_at, cache.insert_at + cache.replace
            keys = torch.cat([cached[:, :lo], position_ids, cached[:, hi:]], dim=1)
        return block_causal_mask(position_ids, keys, self.config.block_size)
