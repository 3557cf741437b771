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
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from spiffy.models.base import select_rows
from spiffy.models.dream import qwen_rope, rotate_half
from spiffy.models.generate import SDARGenerate
from spiffy.models.kv import KVCache, append_kv, bidirectional_attention
from spiffy.models.llada import DiffusionLMOutput, RMSNorm


class SDARConfig(PretrainedConfig):
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
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        self.block_size = block_size
        self.mask_token_id = mask_token_id
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
        tied = kwargs.pop("tie_word_embeddings", False)
        if tied:
            raise ValueError("SDARConfig.tie_word_embeddings=True: SDAR's lm_head is untied")
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=False,
            **kwargs,
        )
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "block_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SDARConfig.{key}={value!r} must be a positive integer")
        if num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"SDARConfig.num_attention_heads={num_attention_heads} is not divisible by "
                f"num_key_value_heads={num_key_value_heads}"
            )

    # the names spiffy's ModelSpec reads
    @property
    def max_sequence_length(self) -> int:
        return self.max_position_embeddings

    @property
    def embedding_size(self) -> int:
        return self.vocab_size

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


class SDARAttention(nn.Module):
    """Qwen3 attention: q/k RMSNorm over head_dim before RoPE, GQA, explicit boolean mask."""

    def __init__(self, config: SDARConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            hd,
        )
        bias = config.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=bias)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x, cos_sin, attention_mask, cache: KVCache | None, layer: int):
        B, Q, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, Q, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, Q, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, Q, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos_sin
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        out = bidirectional_attention(q, k, v, attention_mask, cache, layer)
        return self.o_proj(out), (k, v)


class SDARMLP(nn.Module):
    def __init__(self, config: SDARConfig):
        super().__init__()
        d, h = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, h, bias=False)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SDARLayer(nn.Module):
    def __init__(self, config: SDARConfig):
        super().__init__()
        self.self_attn = SDARAttention(config)
        self.mlp = SDARMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos_sin, attention_mask, cache, layer):
        att, fresh = self.self_attn(self.input_layernorm(x), cos_sin, attention_mask, cache, layer)
        x = x + att
        return x + self.mlp(self.post_attention_layernorm(x)), fresh


class SDARBackbone(nn.Module):
    def __init__(self, config: SDARConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(SDARLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class SDARForCausalLM(SDARGenerate, PreTrainedModel):
    """SDAR block-diffusion LM: block-causal attention, absolute positions, logits at every query row."""

    config_class = SDARConfig
    base_model_prefix = "model"
    _no_split_modules = ["SDARLayer"]

    def __init__(self, config: SDARConfig):
        super().__init__(config)
        self.model = SDARBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=getattr(self.config, "initializer_range", 0.02))
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

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
        cos_sin = qwen_rope(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        present = []
        for i, layer in enumerate(self.model.layers):
            x, fresh = layer(x, cos_sin, attention_mask, kv_cache, i)
            if return_kv or store_kv:
                present.append(fresh)
        if logits_at is not None:
            x = select_rows(x, logits_at)
        logits = self.lm_head(self.model.norm(x))
        stored = append_kv(kv_cache, present) if store_kv else None
        return SDAROutput(
            logits=logits, present=tuple(present) if return_kv else None, kv_cache=stored
        )

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
