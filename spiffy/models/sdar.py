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

from dataclasses import dataclass

import torch

from spiffy.models.base import DiffusionLMOutput, select_rows
from spiffy.models.generate import SDARGenerate
from spiffy.models.kv import KVCache, append_kv, plan_attention
from spiffy.models.transformer import DecoderLM, QwenConfig, rope_tables


class SDARConfig(QwenConfig):
    """SDAR's config format (Qwen3 fields plus `block_size` and `mask_token_id`)."""

    model_type = "sdar"

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        intermediate_size: int = 12288,
        num_hidden_layers: int = 36,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 8,
        head_dim: int | None = 128,
        max_position_embeddings: int = 32768,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1000000.0,
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
        rope_scaling = kwargs.pop("rope_scaling", None)
        if rope_scaling is not None:
            raise ValueError(
                f"SDARConfig.rope_scaling={rope_scaling!r} is not supported (use null)"
            )
        if kwargs.get("use_sliding_window"):
            raise ValueError("SDARConfig.use_sliding_window=True is not supported")
        self.init_fields(
            locals(),
            head_dim=head_dim if head_dim is not None else hidden_size // num_attention_heads,
        )
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


@dataclass
class SDAROutput(DiffusionLMOutput):
    """`DiffusionLMOutput` plus the grown cache when the call stored its K/V (`store_kv=True`)."""

    kv_cache: KVCache | None = None


class SDARForCausalLM(SDARGenerate, DecoderLM):
    """SDAR block-diffusion LM: block-causal attention, absolute positions, logits at every query row."""

    config_class = SDARConfig

    def __init__(self, config: SDARConfig):
        # Qwen3: per-head q/k RMSNorm, one bias flag for every projection
        bias = config.attention_bias
        super().__init__(config, config.block_config(qkv_bias=bias, out_bias=bias, qk_norm=True))

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_kv: bool = False,
        store_kv: bool = False,
        logits_at: slice | torch.Tensor | None = None,
        **_: object,
    ) -> SDAROutput:
        """Compute logits for the query chunk `input_ids` (B, Q) against the (optional) cache.

        Args:
            input_ids: query tokens (B, Q).
            position_ids: absolute positions (B, Q) or (Q,); default `cache.length + arange(Q)`.
            attention_mask: bool (B, Q, K), True = attend, K = cached keys + Q; None = the block-causal
                mask of the cached positions `0..cache.length-1` and the query positions.
            kv_cache: stored K/V of earlier positions; never modified.
            return_kv: also return this call's fresh post-RoPE K/V per layer (`present`).
            store_kv: return, in `kv_cache`, a new cache that also holds this chunk's K/V (batch 1 only).
            logits_at: query rows whose logits to compute (slice or LongTensor); None = all
                (`spiffy.models.base.DiffusionLM`).
        """
        B, Q = input_ids.shape
        if store_kv and B != 1:
            raise ValueError(f"store_kv=True stores one chunk, got a batch of {B} rows")
        start = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + Q, device=input_ids.device)
        if isinstance(position_ids, range):
            position_ids = torch.arange(
                position_ids.start, position_ids.stop, device=input_ids.device
            )
        if position_ids.dim() == 1:
            position_ids = position_ids.expand(B, Q)
        if int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"position {int(position_ids.max())} exceeds "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        if attention_mask is None:
            attention_mask = self._block_causal(position_ids, kv_cache)
        x = self.model.embed_tokens(input_ids)
        cos_sin = rope_tables(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        plan = plan_attention(kv_cache, B, Q, attention_mask, input_ids.device)
        x, present = self.model.run(x, cos_sin, plan, kv_cache, return_kv or store_kv)
        if logits_at is not None:
            x = select_rows(x, logits_at)
        logits = self.lm_head(self.model.norm(x))
        stored = append_kv(kv_cache, present) if store_kv else None
        return SDAROutput(logits=logits, present=present if return_kv else None, kv_cache=stored)

    def _block_causal(
        self, position_ids: torch.Tensor, cache: KVCache | None
    ) -> torch.Tensor | None:
        """The block-causal mask for these query positions over the spliced keys; None when all true."""
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
