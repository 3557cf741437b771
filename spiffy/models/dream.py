"""Native PyTorch implementation of Dream-v0 (Qwen2.5 made bidirectional), weight-compatible with Dream-org/*.

It reads Dream's `config.json` (`model_type: Dream`) and Qwen2-style weight names (q/k/v biases, grouped-query
attention). Dream's raw logits are **shifted**: the hidden state at position i predicts position i+1. The shift
lives here, not in the decoders: `forward` returns logits aligned to the query positions (SPEC §9). For a query
row at position p the aligned logits are the raw logits of the row at position p-1 that it attends to (so
appended drafts use their own previous row, or the canvas row before the block), `raw[0]` at position 0, and,
when position p-1 lives only in a K/V cache, the aligned logits that the cache's block-start forward computed for p
(Fast-dLLM's "keep its last logits"). Precision follows Qwen2: RMSNorm in float32, float32 RoPE tables cast to
the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from spiffy.models.kv import KVCache, bidirectional_attention
from spiffy.models.llada import DiffusionLMOutput, RMSNorm


class DreamConfig(PretrainedConfig):
    """Dream's config format (Qwen2 fields plus `mask_token_id`)."""

    model_type = "Dream"

    def __init__(
        self,
        vocab_size: int = 152064,
        hidden_size: int = 3584,
        intermediate_size: int = 18944,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 28,
        num_key_value_heads: int = 4,
        max_position_embeddings: int = 131072,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1000000.0,
        mask_token_id: int = 151666,
        eos_token_id: int = 151643,
        pad_token_id: int = 151643,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.mask_token_id = mask_token_id
        kwargs.pop("tie_word_embeddings", None)
        super().__init__(
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=False,
            **kwargs,
        )
        if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"DreamConfig: hidden_size={hidden_size}, num_attention_heads={num_attention_heads},"
                f" num_key_value_heads={num_key_value_heads} are not divisible"
            )

    # the names spiffy's ModelSpec reads
    @property
    def max_sequence_length(self) -> int:
        return self.max_position_embeddings

    @property
    def embedding_size(self) -> int:
        return self.vocab_size

    @property
    def logits_shift(self) -> int:
        return 1


def qwen_rope(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Float32 cos/sin (B, 1, Q, hd) cast to `dtype` (Qwen2's rotary embedding)."""
    inv_freq = 1.0 / (
        theta
        ** (
            torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
            / head_dim
        )
    )
    freqs = position_ids.float()[..., None] * inv_freq  # (B, Q, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class DreamAttention(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.n_heads
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos_sin, attention_mask, cache: KVCache | None, layer: int):
        B, Q, _ = x.shape
        q = self.q_proj(x).view(B, Q, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, Q, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, Q, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos_sin
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        out = bidirectional_attention(q, k, v, attention_mask, cache, layer)
        return self.o_proj(out), (k, v)


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        d, h = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, h, bias=False)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamLayer(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.self_attn = DreamAttention(config)
        self.mlp = DreamMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos_sin, attention_mask, cache, layer):
        att, fresh = self.self_attn(self.input_layernorm(x), cos_sin, attention_mask, cache, layer)
        x = x + att
        return x + self.mlp(self.post_attention_layernorm(x)), fresh


class DreamBackbone(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DreamLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DreamModel(PreTrainedModel):
    """Dream masked-diffusion LM returning position-aligned logits (the shift is applied here)."""

    config_class = DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamLayer"]

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBackbone(config)
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

    def raw_logits(
        self, input_ids, position_ids, attention_mask=None, kv_cache=None, return_kv=False
    ):
        """Unshifted logits (B, Q, V) and, if requested, the fresh K/V per layer."""
        x = self.model.embed_tokens(input_ids)
        hd = self.config.hidden_size // self.config.num_attention_heads
        cos_sin = qwen_rope(position_ids, hd, self.config.rope_theta, x.dtype)
        present = []
        for i, layer in enumerate(self.model.layers):
            x, fresh = layer(x, cos_sin, attention_mask, kv_cache, i)
            if return_kv:
                present.append(fresh)
        return self.lm_head(self.model.norm(x)), tuple(present) if return_kv else None

    def forward(
        self,
        input_ids,
        position_ids=None,
        attention_mask=None,
        kv_cache: KVCache | None = None,
        return_kv: bool = False,
        **_,
    ):
        """Aligned logits for `input_ids` (B, Q); same arguments as `LLaDAModelLM.forward`."""
        B, Q = input_ids.shape
        if position_ids is None:
            start = kv_cache.insert_at if kv_cache is not None else 0
            position_ids = torch.arange(start, start + Q, device=input_ids.device)
        if position_ids.dim() == 1:
            position_ids = position_ids.expand(B, Q)
        if int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"position {int(position_ids.max())} exceeds "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        raw, present = self.raw_logits(input_ids, position_ids, attention_mask, kv_cache, return_kv)
        aligned = self._align(raw, position_ids, attention_mask, kv_cache)
        return DiffusionLMOutput(logits=aligned, present=present)

    def _align(self, raw, position_ids, attention_mask, kv_cache):
        """aligned[r] = raw[r'] with r' the visible query row at position pos[r] - 1 (SPEC §9)."""
        B, Q, _ = raw.shape
        prev = position_ids[:, None, :] == (position_ids[:, :, None] - 1)  # (B, Q, Q) r -> r'
        if attention_mask is not None:  # the query rows' own keys start at the splice point
            lo = kv_cache.insert_at if kv_cache is not None else 0
            prev &= attention_mask[:, :, lo : lo + Q]
        has_prev = prev.any(-1)  # (B, Q)
        source = prev.to(torch.int8).argmax(-1)  # (B, Q)
        aligned = raw.gather(1, source[..., None].expand_as(raw))
        first = position_ids == 0
        aligned = torch.where(first[..., None], raw, aligned)
        missing = ~has_prev & ~first
        if missing.any():
            if kv_cache is None or kv_cache.logits is None:
                raise ValueError("Dream needs the logits of position p-1 for a query at position p")
            cached = kv_cache.logits.expand(B, -1, -1).gather(
                1, position_ids[..., None].expand(B, Q, raw.shape[-1])
            )
            aligned = torch.where(missing[..., None], cached.to(raw.dtype), aligned)
        return aligned
