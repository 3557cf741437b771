"""Native PyTorch implementation of Dream-v0 (Qwen2.5 made bidirectional), weight-compatible with Dream-org/*.

It reads Dream's `config.json` (`model_type: Dream`) and Qwen2-style weight names (q/k/v biases, grouped-query
attention). Dream's raw logits are **shifted**: the hidden state at position i predicts position i+1. The shift
lives here, not in the decoders: `forward` returns logits aligned to the query positions (docs/algorithm.md §9) at the rows
`logits_at` only (`spiffy.models.base.DiffusionLM`), and runs the LM head on the hidden rows those need. For a query
row at position p the aligned logits are the raw logits of the row at position p-1 that it attends to (so
appended drafts use their own previous row, or the canvas row before the block), `raw[0]` at position 0, and,
when position p-1 lives only in a K/V cache, the cache's `boundary_logits` (the aligned logits that its
block-start forward computed for p = `insert_at`: Fast-dLLM's "keep its last logits"). With a `range` of
positions and no mask the alignment is a fixed shift, computed without reading the device. Precision follows
Qwen2: RMSNorm in float32, float32 RoPE tables cast to the model dtype.
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
    row_slice,
)
from spiffy.models.generate import DreamGenerate
from spiffy.models.kv import KVCache, bidirectional_attention, bidirectional_mask, plan_attention
from spiffy.models.llada import RMSNorm


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

    def forward(self, x, cos_sin, plan, cache: KVCache | None, layer: int):
        B, Q, _ = x.shape
        q = self.q_proj(x).view(B, Q, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, Q, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, Q, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos_sin
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        out = bidirectional_attention(q, k, v, plan, cache, layer)
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

    def forward(self, x, cos_sin, plan, cache, layer):
        att, fresh = self.self_attn(self.input_layernorm(x), cos_sin, plan, cache, layer)
        x = x + att
        return x + self.mlp(self.post_attention_layernorm(x)), fresh


class DreamBackbone(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DreamLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DreamModel(DreamGenerate, PreTrainedModel):
    """Dream masked-diffusion LM returning position-aligned logits (the shift is applied here)."""

    config_class = DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamLayer"]

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        hd = config.hidden_size // config.num_attention_heads
        self._rope = RopeTables(
            lambda pos: qwen_rope(pos, hd, config.rope_theta, self.model.embed_tokens.weight.dtype)
        )
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

    def hidden_states(
        self, input_ids, positions, attention_mask=None, kv_cache=None, return_kv=False, span=None
    ):
        """Final-norm hidden states (B, Q, d) and, if requested, the fresh K/V per layer."""
        x = self.model.embed_tokens(input_ids)
        cos_sin = self._rope(positions, span, x.device, x.dtype)
        B, Q = input_ids.shape
        plan = plan_attention(kv_cache, B, Q, attention_mask, input_ids.device)
        present = []
        for i, layer in enumerate(self.model.layers):
            x, fresh = layer(x, cos_sin, plan, kv_cache, i)
            if return_kv:
                present.append(fresh)
        return self.model.norm(x), tuple(present) if return_kv else None

    def raw_logits(
        self, input_ids, position_ids, attention_mask=None, kv_cache=None, return_kv=False
    ):
        """Unshifted logits (B, Q, V) at every query row and, if requested, the fresh K/V per layer."""
        h, present = self.hidden_states(
            input_ids, position_ids, attention_mask, kv_cache, return_kv
        )
        return self.lm_head(h), present

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Positions | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_kv: bool = False,
        logits_at: LogitsRows | None = None,
        **_,
    ) -> DiffusionLMOutput:
        """Aligned logits (B, P, V) at the rows `logits_at`; same arguments as `LLaDAModelLM.forward`."""
        B, Q = input_ids.shape
        start = kv_cache.insert_at if kv_cache is not None else 0
        limit = ("max_position_embeddings", self.config.max_position_embeddings)
        positions, span = position_tensor(position_ids, Q, start, limit, input_ids.device)
        h, present = self.hidden_states(
            input_ids, positions, attention_mask, kv_cache, return_kv, span
        )
        rows = row_slice(logits_at, Q)
        if span is not None and attention_mask is None and rows is not None:
            logits = self._shifted(h, rows, span.start, kv_cache)
        else:
            if rows is not None:
                logits_at = torch.arange(rows.start, rows.stop, device=input_ids.device)
            if positions is None:
                positions = torch.arange(span.start, span.stop, device=input_ids.device)[None]
            logits = self._aligned(h, logits_at, positions.expand(B, Q), attention_mask, kv_cache)
        return DiffusionLMOutput(logits=logits, present=present)

    def default_attention_mask(
        self, positions: torch.Tensor, kv_cache: KVCache | None
    ) -> torch.Tensor:
        """Bidirectional attention as an explicit mask (B, Q, L_c + Q) (`spiffy.models.base`)."""
        return bidirectional_mask(positions, kv_cache)

    def _boundary(self, kv_cache: KVCache | None, position: int) -> torch.Tensor:
        if kv_cache is None or kv_cache.boundary_logits is None or kv_cache.insert_at != position:
            raise ValueError(
                f"Dream needs the logits of position {position - 1} for a query at position {position}: "
                "pass a KVCache whose boundary_logits are at that position"
            )
        return kv_cache.boundary_logits

    def _shifted(self, h, rows: slice, first_position: int, kv_cache) -> torch.Tensor:
        """Contiguous positions: aligned row r = raw row r - 1; row 0 = raw row 0 at position 0, else the cache's
        boundary logits. Only the needed hidden rows go through the LM head."""
        a, b = rows.start, rows.stop
        if a > 0:
            return self.lm_head(h[:, a - 1 : b - 1])
        raw = self.lm_head(h[:, : b - 1])
        if first_position == 0:
            first = self.lm_head(h[:, :1])
        else:
            boundary = self._boundary(kv_cache, first_position)
            first = boundary.to(raw.dtype).expand(h.shape[0], 1, -1)
        return torch.cat([first, raw], dim=1)

    def _aligned(self, h, rows: torch.Tensor, positions, attention_mask, kv_cache) -> torch.Tensor:
        """General layouts (masks, appended drafts, per-row `rows` (B, P)): aligned[r] = raw[r'] with r' the
        visible query row at position pos[r] - 1 (docs/algorithm.md §9); the LM head runs on the P selected source
        rows only. A row whose previous position is cached out takes its cache's boundary logits."""
        B, Q = positions.shape
        rows = rows.expand(B, -1) if rows.dim() == 1 else rows  # (B, P)
        pos = positions.gather(1, rows)
        prev = positions[:, None, :] == (pos[:, :, None] - 1)  # (B, P, Q): row r -> source r'
        if attention_mask is not None:  # the query rows' own keys follow the cached ones
            lo = kv_cache.length if kv_cache is not None else 0
            own = attention_mask[:, :, lo : lo + Q]
            prev &= own.gather(1, rows[..., None].expand(-1, -1, Q))
        has_prev = prev.any(-1)
        source = torch.where(has_prev, prev.to(torch.int8).argmax(-1), rows)
        hidden = h.gather(1, source[..., None].expand(B, -1, h.shape[-1]))
        logits = self.lm_head(hidden)
        missing = ~has_prev & (pos != 0)
        if bool(missing.any()):
            b, p = missing.nonzero(as_tuple=True)
            if kv_cache is None:
                self._boundary(None, int(pos[b[0], p[0]]))  # raises
            boundary = kv_cache.boundary(b, pos[b, p])
            logits = logits.index_put((b, p), boundary.to(logits.dtype))
        return logits
