"""Native PyTorch implementation of the LLaDA architecture (docs/algorithm.md §8, §9), weight-compatible with GSAI-ML/LLaDA-*.

It reads LLaDA's own `config.json` (`model_type: llada`) and weight names
(`model.transformer.blocks.N.q_proj.weight`, ...), and is registered with transformers' Auto classes so that
`from_pretrained(local_dir)` works offline without `trust_remote_code`. Beyond the reference it supports the
features the decoders need: explicit boolean attention masks (B, Q, K), explicit position ids, and K/V caches that
a query block is spliced into (`spiffy.models.kv`). It deliberately has no causal mode, dropout or generation API.

Precision follows the reference (docs/algorithm.md §8): RMSNorm in float32 then cast back before the weight multiply, RoPE on
float32 q/k with float32 inverse frequencies and positions (rotate-half), bidirectional SDPA scaled by 1/sqrt(hd).
The call follows the decoders' contract (`spiffy.models.base.DiffusionLM`): the LM head runs on `logits_at` only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from spiffy.models.base import (
    DiffusionLMOutput,
    LogitsRows,
    Positions,
    RopeTables,
    position_tensor,
    select_rows,
)
from spiffy.models.generate import LLaDAGenerate
from spiffy.models.kv import (
    AttentionPlan,
    KVCache,
    bidirectional_attention,
    bidirectional_mask,
    plan_attention,
)

__all__ = ["DiffusionLMOutput", "LLaDAConfig", "LLaDAModelLM"]


class LLaDAConfig(PretrainedConfig):
    """LLaDA's config format; unknown reference fields (dropouts, init, flash flags) are kept verbatim."""

    model_type = "llada"

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        n_layers: int = 32,
        mlp_hidden_size: int = 12288,
        vocab_size: int = 126464,
        embedding_size: int | None = None,
        max_sequence_length: int = 4096,
        rope_theta: float = 500000.0,
        rms_norm_eps: float = 1e-5,
        mask_token_id: int = 126336,
        eos_token_id: int = 126081,
        pad_token_id: int = 126081,
        eot_token_id: int | None = None,
        activation_type: str = "silu",
        **kwargs,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads if n_kv_heads is not None else n_heads
        self.n_layers = n_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size if embedding_size is not None else vocab_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.mask_token_id = mask_token_id
        self.eot_token_id = eot_token_id
        self.activation_type = activation_type
        kwargs.pop("tie_word_embeddings", None)
        super().__init__(
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=False,
            **kwargs,
        )
        for key, value in (("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads)):
            if value <= 0:
                raise ValueError(f"LLaDAConfig.{key} must be positive, got {value}")
        if d_model % n_heads:
            raise ValueError(f"LLaDAConfig.d_model={d_model} is not divisible by n_heads={n_heads}")
        if n_heads % self.n_kv_heads:
            raise ValueError(
                f"LLaDAConfig.n_heads={n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            )
        if activation_type not in ("silu", "swiglu"):
            raise ValueError(f"LLaDAConfig.activation_type={activation_type!r} is not supported")


class RMSNorm(nn.Module):
    """LLaDA's RMSLayerNorm: normalise in float32, cast back, then scale (docs/algorithm.md §8)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension."""
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_sin_cos(
    position_ids: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 sin/cos tables `(B or 1, 1, Q, head_dim)` at explicit absolute positions (rotate-half)."""
    device = position_ids.device
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # (B, Q, hd/2)
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, Q, hd)
    return angles.sin(), angles.cos()


def apply_rope(t: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate `t` (B, H, Q, hd) in float32 and cast back to its dtype."""
    t32 = t.to(torch.float32)
    x1, x2 = t32.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (t32 * cos + rotated * sin).to(t.dtype)


class LLaDABlock(nn.Module):
    """One pre-norm transformer block with LLaDA's parameter names (llama block type)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, hd = config.d_model, config.d_model // config.n_heads
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, hd
        self.rope_theta = config.rope_theta
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        sin_cos: tuple[torch.Tensor, torch.Tensor],
        plan: AttentionPlan,
        cache: KVCache | None,
        layer: int,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Return the block output and this block's fresh (post-RoPE) K/V."""
        B, Q, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, Q, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, Q, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, Q, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *sin_cos), apply_rope(k, *sin_cos)
        x = x + self.attn_out(bidirectional_attention(q, k, v, plan, cache, layer))
        h = self.ff_norm(x)
        x = x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))
        return x, (k, v)


class LLaDATransformer(nn.Module):
    """Holds `transformer.{wte, blocks, ln_f, ff_out}` so that weight names match the checkpoints."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.embedding_size, config.d_model),
                blocks=nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
                ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
                ff_out=nn.Linear(config.d_model, config.embedding_size, bias=False),
            )
        )


class LLaDAModelLM(LLaDAGenerate, PreTrainedModel):
    """LLaDA masked-diffusion LM: bidirectional, no timestep input, logits at every query position."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDATransformer(config)
        hd = config.d_model // config.n_heads
        self._rope = RopeTables(lambda pos: rope_sin_cos(pos, hd, config.rope_theta))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "init_std", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.transformer["wte"]

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Positions | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_kv: bool = False,
        logits_at: LogitsRows | None = None,
        **_: object,
    ) -> DiffusionLMOutput:
        """Logits (B, P, V) at the query rows `logits_at` of `input_ids` (B, Q); see `DiffusionLM`.

        Args:
            input_ids: query tokens (B, Q).
            position_ids: absolute positions, a `range` or a tensor (Q,) / (B, Q); default: continuing at the
                cache's `insert_at` (0 without a cache). Drafts pass the block's positions explicitly.
            attention_mask: bool (B, Q, K) with True = attend, keys `[cache, own fresh]`; None = all.
            kv_cache: frozen K/V (batch 1) that every row attends to; never modified.
            return_kv: also return this call's fresh post-RoPE K/V per layer.
            logits_at: query rows to project (slice, LongTensor (P,) or per row (B, P)); None = all rows.
        """
        B, Q = input_ids.shape
        start = kv_cache.insert_at if kv_cache is not None else 0
        limit = ("max_sequence_length", self.config.max_sequence_length)
        positions, span = position_tensor(position_ids, Q, start, limit, input_ids.device)
        tr = self.model.transformer
        x = tr["wte"](input_ids)
        sin_cos = self._rope(positions, span, input_ids.device)
        plan = plan_attention(kv_cache, B, Q, attention_mask, input_ids.device)
        present = []
        for i, block in enumerate(tr["blocks"]):
            x, fresh = block(x, sin_cos, plan, kv_cache, i)
            if return_kv:
                present.append(fresh)
        logits = tr["ff_out"](tr["ln_f"](select_rows(x, logits_at)))
        return DiffusionLMOutput(logits=logits, present=tuple(present) if return_kv else None)

    def default_attention_mask(
        self, positions: torch.Tensor, kv_cache: KVCache | None
    ) -> torch.Tensor:
        """Bidirectional attention as an explicit mask (B, Q, L_c + Q) (`spiffy.models.base`)."""
        return bidirectional_mask(positions, kv_cache)
