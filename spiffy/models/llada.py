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
from torch import nn
from transformers import PreTrainedModel

from spiffy.models.base import DiffusionLMOutput, RopeTables, select_rows
from spiffy.models.generate import LLaDAGenerate
from spiffy.models.kv import AttentionPlan, KVCache, bidirectional_attention
from spiffy.models.transformer import (
    BidirectionalLM,
    CosSin,
    FamilyConfig,
    RMSNorm,
    apply_rope,
    init_weights,
    project_heads,
    rope_tables,
    run_blocks,
    swiglu,
)

__all__ = ["DiffusionLMOutput", "LLaDAConfig", "LLaDAModelLM"]


class LLaDAConfig(FamilyConfig):
    """LLaDA's config format; unknown reference fields (dropouts, init, flash flags) are kept verbatim."""

    model_type = "llada"
    shape_keys = ("n_layers", "d_model", "n_heads", "n_kv_heads", "mlp_hidden_size")

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
        self.init_fields(
            locals(),
            n_kv_heads=n_kv_heads if n_kv_heads is not None else n_heads,
            embedding_size=embedding_size if embedding_size is not None else vocab_size,
        )
        self.check_positive("d_model", "n_layers", "n_heads")
        self.check_divisible(("d_model", "n_heads"), ("n_heads", "n_kv_heads"))
        if activation_type not in ("silu", "swiglu"):
            raise ValueError(f"LLaDAConfig.activation_type={activation_type!r} is not supported")


def rope_float32(t: torch.Tensor, cos_sin: CosSin) -> torch.Tensor:
    """RoPE as LLaDA's reference applies it: on float32 q/k, cast back to their dtype."""
    return apply_rope(t.to(torch.float32), *cos_sin).to(t.dtype)


class LLaDABlock(nn.Module):
    """One pre-norm transformer block with LLaDA's parameter names (llama block type)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, hd = config.d_model, config.d_model // config.n_heads
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, hd
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
        cos_sin: CosSin,
        plan: AttentionPlan,
        cache: KVCache | None,
        layer: int,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Return the block output and this block's fresh (post-RoPE) K/V."""
        h = self.attn_norm(x)
        q = project_heads(h, self.q_proj, self.n_heads, self.head_dim)
        k = project_heads(h, self.k_proj, self.n_kv_heads, self.head_dim)
        v = project_heads(h, self.v_proj, self.n_kv_heads, self.head_dim)
        q, k = rope_float32(q, cos_sin), rope_float32(k, cos_sin)
        x = x + self.attn_out(bidirectional_attention(q, k, v, plan, cache, layer))
        x = x + swiglu(self.ff_norm(x), self.ff_proj, self.up_proj, self.ff_out)
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


class LLaDAModelLM(LLaDAGenerate, BidirectionalLM, PreTrainedModel):
    """LLaDA masked-diffusion LM: bidirectional, no timestep input, logits at every query position."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDATransformer(config)
        hd = config.d_model // config.n_heads
        self._rope = RopeTables(lambda pos: rope_tables(pos, hd, config.rope_theta))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        init_weights(module, getattr(self.config, "init_std", 0.02))

    def get_input_embeddings(self) -> nn.Module:
        return self.model.transformer["wte"]

    def hidden(self, input_ids, positions, span, plan, kv_cache, return_kv):
        """The blocks' output (B, Q, d) before `ln_f`, and the fresh K/V if asked (`BidirectionalLM`)."""
        tr = self.model.transformer
        cos_sin = self._rope(positions, span, input_ids.device)
        return run_blocks(tr["blocks"], tr["wte"](input_ids), cos_sin, plan, kv_cache, return_kv)

    def head(self, h, logits_at, *_) -> torch.Tensor:
        """Logits at the rows `logits_at`: `ln_f` and the LM head on those rows only."""
        tr = self.model.transformer
        return tr["ff_out"](tr["ln_f"](select_rows(h, logits_at)))
