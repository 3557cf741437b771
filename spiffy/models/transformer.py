"""The transformer parts every family is built from: one pre-norm `Block` whose family differences are flags.

litgpt's model (one `Block`, family differences in `Config` flags) is the pattern: Dream (Qwen2) and SDAR (Qwen3)
are the same `Block` with different `BlockConfig` flags (q/k/v biases, q/k RMSNorm), and the MLP is a component
the config names (`BlockConfig.mlp`), so a mixture-of-experts family swaps it without touching the block.
LLaDA keeps its own parameter names (`attn_out`, `ff_proj`, ...; weight compatibility with its checkpoints), so it
builds its block from the same functions (`project_heads`, `apply_rope`, `swiglu`) rather than the module.
`FamilyConfig` is the config helper all families share, `DecoderLM` the model base of the Qwen-style ones.
How a new family plugs in: docs/extending.md ("A model family"). Precision follows the references
(docs/algorithm.md §8, §9): RMSNorm in float32, cast back, then the weight; RoPE tables in float32.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from spiffy.models.base import DiffusionLMOutput, LogitsRows, Positions, position_tensor
from spiffy.models.kv import (
    AttentionPlan,
    KVCache,
    bidirectional_attention,
    bidirectional_mask,
    plan_attention,
)

CosSin = tuple[torch.Tensor, torch.Tensor]
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


class FamilyConfig(PretrainedConfig):
    """A family's `PretrainedConfig`: its fields, an untied LM head, and shape checks naming key and value.
    Its defaults are the family's flagship published shapes (`spiffy.models.shapes`)."""

    # each family sets `shape_keys`, the keys of (layers, width, query heads, kv heads, MLP width): what
    # `spiffy.models.shapes` scales (a class attribute, not an annotation: transformers makes annotated class
    # attributes of a config into required fields)

    def init_fields(self, values: dict[str, Any], **derived: Any) -> None:
        """Set every named argument of the family's `__init__` (`values = locals()`; `derived` overrides
        defaults that depend on other fields) and pass token ids and the other keys (`**kwargs`: unknown
        reference keys are kept verbatim) to `PretrainedConfig`. A tied LM head is refused: no family ties it."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        fields = {k: values[k] for k in names} | derived
        kwargs = fields.pop("kwargs")
        token_ids = {k: fields.pop(k) for k in _TOKEN_IDS if k in fields}
        for key, value in fields.items():
            setattr(self, key, value)
        if kwargs.pop("tie_word_embeddings", False):
            raise ValueError(
                f"{type(self).__name__}.tie_word_embeddings=True: this family's LM head is untied"
            )
        PretrainedConfig.__init__(self, tie_word_embeddings=False, **token_ids, **kwargs)

    def check_positive(self, *keys: str) -> None:
        """Raise `ValueError` naming the first of `keys` that is not a positive integer."""
        for key in keys:
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"{type(self).__name__}.{key}={value!r} must be a positive integer"
                )

    def check_divisible(self, *pairs: tuple[str, str]) -> None:
        """Raise `ValueError` for the first `(a, b)` whose value of `a` is not a multiple of `b`'s."""
        for a, b in pairs:
            if getattr(self, a) % getattr(self, b):
                raise ValueError(
                    f"{type(self).__name__}.{a}={getattr(self, a)} is not divisible by "
                    f"{b}={getattr(self, b)}"
                )


class QwenConfig(FamilyConfig):
    """A Qwen-style config (`hidden_size`, `num_attention_heads`, ...): the `ModelSpec` names and the `Block`."""

    shape_keys = (
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
    )

    @property
    def max_sequence_length(self) -> int:
        """The name spiffy's `ModelSpec` reads."""
        return self.max_position_embeddings

    @property
    def embedding_size(self) -> int:
        """The name spiffy's `ModelSpec` reads."""
        return self.vocab_size

    def block_config(self, **flags: Any) -> BlockConfig:
        """The `BlockConfig` of these shapes with the family's `flags` (`qkv_bias`, `qk_norm`, `mlp`, ...)."""
        head_dim = getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads
        return BlockConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            n_heads=self.num_attention_heads,
            n_kv_heads=self.num_key_value_heads,
            head_dim=head_dim,
            norm_eps=self.rms_norm_eps,
            **flags,
        )


class RMSNorm(nn.Module):
    """RMSNorm as the references compute it: normalise in float32, cast back, then scale (docs/algorithm.md §8)."""

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


def rope_tables(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> CosSin:
    """RoPE cos/sin `(B or 1, 1, Q, head_dim)` (rotate-half layout), computed in float32 and cast to `dtype`."""
    device = position_ids.device
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # (B, Q, hd/2)
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, Q, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    """`(-t2, t1)` for the halves `t1, t2` of the last dimension (RoPE's rotate-half layout)."""
    t1, t2 = t.chunk(2, dim=-1)
    return torch.cat([-t2, t1], dim=-1)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `t` (B, H, Q, hd) by the tables in `t`'s dtype (rotate-half)."""
    return t * cos + rotate_half(t) * sin


def project_heads(
    x: torch.Tensor, proj: nn.Linear, n_heads: int, head_dim: int, norm: nn.Module | None = None
) -> torch.Tensor:
    """`proj(x)` split into heads (B, n_heads, Q, head_dim), per-head `norm` first when given (Qwen3's q/k norm)."""
    B, Q, _ = x.shape
    t = proj(x).view(B, Q, n_heads, head_dim)
    return (t if norm is None else norm(t)).transpose(1, 2)


def swiglu(x: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    """The gated SiLU MLP `down(silu(gate(x)) * up(x))`."""
    return down(F.silu(gate(x)) * up(x))


class GatedMLP(nn.Module):
    """The dense SwiGLU MLP with Qwen's parameter names (`mlp.{gate,up,down}_proj`)."""

    def __init__(self, config: BlockConfig):
        super().__init__()
        d, h = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, h, bias=False)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Q, d) -> (B, Q, d)."""
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


@dataclass(frozen=True)
class BlockConfig:
    """The shapes and flags of one `Block`; each family builds it from its own `PretrainedConfig`."""

    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float
    qkv_bias: bool = False  # Qwen2 (Dream): biases on the q/k/v projections
    out_bias: bool = False  # a bias on the output projection
    qk_norm: bool = False  # Qwen3 (SDAR): per-head RMSNorm on q and k before RoPE
    # the MLP component, built from this config (a mixture-of-experts family passes its own)
    mlp: Callable[[BlockConfig], nn.Module] = GatedMLP


class Attention(nn.Module):
    """Grouped-query attention over `[cache, fresh keys]` with Qwen's parameter names (`self_attn.*`)."""

    def __init__(self, config: BlockConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = config.n_heads, config.n_kv_heads, hd
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=config.out_bias)
        self.q_norm = RMSNorm(hd, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, config.norm_eps) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: CosSin,
        plan: AttentionPlan | torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The attention output (B, Q, d) and this layer's fresh post-RoPE K/V."""
        q = project_heads(x, self.q_proj, self.n_heads, self.head_dim, self.q_norm)
        k = project_heads(x, self.k_proj, self.n_kv, self.head_dim, self.k_norm)
        v = project_heads(x, self.v_proj, self.n_kv, self.head_dim)
        q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
        return self.o_proj(bidirectional_attention(q, k, v, plan, cache, layer)), (k, v)


class Block(nn.Module):
    """One pre-norm transformer block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, config: BlockConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = config.mlp(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, x, cos_sin: CosSin, plan, cache: KVCache | None, layer: int):
        """The block output and this layer's fresh K/V."""
        att, fresh = self.self_attn(self.input_layernorm(x), cos_sin, plan, cache, layer)
        x = x + att
        return x + self.mlp(self.post_attention_layernorm(x)), fresh


class Backbone(nn.Module):
    """`embed_tokens`, the blocks (`layers`) and the final `norm`, under Qwen's weight names."""

    def __init__(self, vocab_size: int, n_layers: int, config: BlockConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(n_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)

    def run(self, x, cos_sin: CosSin, plan, cache: KVCache | None, return_kv: bool):
        """Every block over the embedded queries `x` (`run_blocks`)."""
        return run_blocks(self.layers, x, cos_sin, plan, cache, return_kv)


def run_blocks(blocks, x, cos_sin: CosSin, plan, cache: KVCache | None, return_kv: bool):
    """`blocks` in turn over the embedded queries `x`: the last hidden states (before the final norm) and,
    if `return_kv`, each layer's fresh K/V."""
    present = []
    for i, block in enumerate(blocks):
        x, fresh = block(x, cos_sin, plan, cache, i)
        if return_kv:
            present.append(fresh)
    return x, tuple(present) if return_kv else None


class BidirectionalLM:
    """The `DiffusionLM` call of the bidirectional families (LLaDA, Dream), a mixin before `PreTrainedModel`:
    positions and the attention plan once per forward, then the family's `hidden` and `head` hooks."""

    position_limit = "max_sequence_length"  # the config key that bounds positions

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
            kv_cache: frozen K/V that every row attends to (or a stacked one); never modified.
            return_kv: also return this call's fresh post-RoPE K/V per layer.
            logits_at: query rows to project (slice, LongTensor (P,) or per row (B, P)); None = all rows.
        """
        B, Q = input_ids.shape
        start = kv_cache.insert_at if kv_cache is not None else 0
        limit = (self.position_limit, getattr(self.config, self.position_limit))
        positions, span = position_tensor(position_ids, Q, start, limit, input_ids.device)
        plan = plan_attention(kv_cache, B, Q, attention_mask, input_ids.device)
        h, present = self.hidden(input_ids, positions, span, plan, kv_cache, return_kv)
        logits = self.head(h, logits_at, positions, span, attention_mask, kv_cache)
        return DiffusionLMOutput(logits=logits, present=present)

    def default_attention_mask(
        self, positions: torch.Tensor, kv_cache: KVCache | None
    ) -> torch.Tensor:
        """Bidirectional attention as an explicit mask (B, Q, L_c + Q) (`spiffy.models.base`)."""
        return bidirectional_mask(positions, kv_cache)


def init_weights(module: nn.Module, std: float) -> None:
    """The families' initialisation: normal linear and embedding weights, zero biases, unit norms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)


class DecoderLM(PreTrainedModel):
    """The Qwen-style model shell: `model` (a `Backbone`) and an untied `lm_head`; families add `forward`."""

    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config: PretrainedConfig, block: BlockConfig):
        super().__init__(config)
        self.model = Backbone(config.vocab_size, config.num_hidden_layers, block)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        init_weights(module, getattr(self.config, "initializer_range", 0.02))

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens
