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
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from spiffy.models.base import (
    DiffusionLMOutput,
    LogitsRows,
    Positions,
    position_tensor,
    select_rows,
)
from spiffy.models.kv import (
    AttentionPlan,
    KVCache,
    append_kv,
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
    # `spiffy.models.shapes` scales, and may set `published`, the keys it shares with other families (the
    # Qwen fields) with its flagship values, which its `__init__` then need not name (class attributes, not
    # annotations: transformers makes annotated class attributes of a config into required fields)
    published = MappingProxyType({})

    def init_fields(self, values: dict[str, Any], **derived: Any) -> None:
        """Set every named argument of the family's `__init__` (`values = locals()`; `derived` overrides
        defaults that depend on other fields) and each key of `published` (given in `**kwargs`, else its
        published value), and pass token ids and the other keys (`**kwargs`: unknown reference keys are kept
        verbatim) to `PretrainedConfig`. A tied LM head is refused: no family ties it."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        fields = {k: values[k] for k in names}
        kwargs = fields.pop("kwargs")
        fields = {k: kwargs.pop(k, v) for k, v in self.published.items()} | fields | derived
        token_ids = {k: fields.pop(k) for k in _TOKEN_IDS if k in fields}
        for key, value in fields.items():
            setattr(self, key, value)
        if kwargs.pop("tie_word_embeddings", False):
            raise ValueError(
                f"{type(self).__name__}.tie_word_embeddings=True: this family's LM head is untied"
            )
        PretrainedConfig.__init__(self, tie_word_embeddings=False, **token_ids, **kwargs)

    def refuse_unsupported(self, kwargs: dict[str, Any], **supported: Any) -> None:
        """Pop each reference key of `supported` from `kwargs`; raise `ValueError` naming it when its value is
        not the one supported value (`rope_scaling=None`: the families implement plain RoPE only)."""
        for key, value in supported.items():
            given = kwargs.pop(key, value)
            if given != value:
                raise ValueError(
                    f"{type(self).__name__}.{key}={given!r} is not supported (use {value!r})"
                )

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


def qwen_fields(
    vocab_size: int,
    shape: tuple[int, int, int, int, int],
    *,
    positions: int,
    theta: float,
    head_dim: int | None = None,
    rms_norm_eps: float = 1e-6,
) -> MappingProxyType:
    """A Qwen-style family's `published` table from its flagship values: `vocab_size`, `shape` (the values of
    `QwenConfig.shape_keys`: layers, width, query heads, kv heads, MLP width), `max_position_embeddings`,
    `rope_theta`, `head_dim` (only families whose config has the key) and `rms_norm_eps`."""
    table = dict(zip(QwenConfig.shape_keys, shape, strict=True))
    table.update(vocab_size=vocab_size, max_position_embeddings=positions, rope_theta=theta)
    table.update({"head_dim": head_dim} if head_dim is not None else {}, rms_norm_eps=rms_norm_eps)
    return MappingProxyType(table)


class QwenConfig(FamilyConfig):
    """A Qwen-style config (`hidden_size`, `num_attention_heads`, ...): the `ModelSpec` names and the `Block`."""

    shape_keys = (
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
    )

    def init_fields(self, values: dict[str, Any], **derived: Any) -> None:
        """`FamilyConfig.init_fields`, then a `head_dim` left None (or out of a published file that has the
        key) is `hidden_size // num_attention_heads`, as in the references."""
        super().init_fields(values, **derived)
        if "head_dim" in self.published and self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

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


def apply_partial_rope(t: torch.Tensor, cos_sin: CosSin, dims: int | None) -> torch.Tensor:
    """`apply_rope` on the first `dims` of each head (tables of `dims`), the rest unrotated; all of them when
    `dims` is None (partial RoPE: LLaDA2's `partial_rotary_factor`)."""
    if dims is None:
        return apply_rope(t, *cos_sin)
    return torch.cat([apply_rope(t[..., :dims], *cos_sin), t[..., dims:]], dim=-1)


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

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    @classmethod
    def of(cls, config: BlockConfig) -> GatedMLP:
        """The block's MLP: `hidden_size` -> `intermediate_size` -> `hidden_size`."""
        return cls(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Q, d) -> (B, Q, d)."""
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


class Attention(nn.Module):
    """Grouped-query attention over `[cache, fresh keys]` with Qwen's parameter names (`self_attn.*`)."""

    def __init__(self, config: BlockConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = config.n_heads, config.n_kv_heads, hd
        self.rotary_dims = config.rotary_dims
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
        q = apply_partial_rope(q, cos_sin, self.rotary_dims)
        k = apply_partial_rope(k, cos_sin, self.rotary_dims)
        return self.o_proj(bidirectional_attention(q, k, v, plan, cache, layer)), (k, v)


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
    qk_norm: bool = False  # Qwen3 (SDAR), LLaDA2: per-head RMSNorm on q and k before RoPE
    rotary_dims: int | None = None  # partial RoPE (LLaDA2): rotate only the first dims of each head
    # the components, built from this config: the MLP (a mixture-of-experts family passes its own) and the
    # attention (a family with fused projections passes its own), under the checkpoint's module name
    mlp: Callable[[BlockConfig], nn.Module] = GatedMLP.of
    attention: Callable[[BlockConfig], nn.Module] = Attention
    attention_name: str = "self_attn"


class Block(nn.Module):
    """One pre-norm transformer block: `x + attn(norm(x))`, then `x + mlp(norm(x))`; the attention module is
    named `config.attention_name` (`self_attn`, LLaDA2's `attention`) as the checkpoints name it."""

    def __init__(self, config: BlockConfig):
        super().__init__()
        self.attention_name = config.attention_name
        self.add_module(config.attention_name, config.attention(config))
        self.mlp = config.mlp(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, x, cos_sin: CosSin, plan, cache: KVCache | None, layer: int):
        """The block output and this layer's fresh K/V."""
        attention = self._modules[self.attention_name]
        att, fresh = attention(self.input_layernorm(x), cos_sin, plan, cache, layer)
        x = x + att
        return x + self.mlp(self.post_attention_layernorm(x)), fresh


class Backbone(nn.Module):
    """The embeddings (`embed_tokens`, or the checkpoint's `embedding` name), one `Block` per `BlockConfig`
    (`layers`) and the final `norm`, under Qwen's weight names."""

    def __init__(self, vocab_size: int, blocks: list[BlockConfig], embedding: str = "embed_tokens"):
        super().__init__()
        first = blocks[0]
        self.embedding_name = embedding
        self.add_module(embedding, nn.Embedding(vocab_size, first.hidden_size))
        self.layers = nn.ModuleList(Block(config) for config in blocks)
        self.norm = RMSNorm(first.hidden_size, first.norm_eps)

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


class FamilyLM:
    """The `DiffusionLM` call every family shares, a mixin before `PreTrainedModel`: the family's `positions`,
    its `forward_mask` and one attention plan per forward, then its `hidden` and `head` hooks; with
    `store_kv=True` (families that store K/V, `stores_kv`) also the cache grown by this call's K/V."""

    stores_kv = False  # the block-causal families (SDAR, LLaDA2): finished blocks' K/V are exact

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Positions | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_kv: bool = False,
        logits_at: LogitsRows | None = None,
        store_kv: bool = False,
        **_: object,
    ) -> DiffusionLMOutput:
        """Logits (B, P, V) at the query rows `logits_at` of `input_ids` (B, Q); see `DiffusionLM`.

        Args:
            input_ids: query tokens (B, Q).
            position_ids: absolute positions, a `range` or a tensor (Q,) / (B, Q); default: continuing after
                the cache (the family's `positions`). Drafts pass the block's positions explicitly.
            attention_mask: bool (B, Q, K) with True = attend, keys `[cache, own fresh]`; None = the family's
                default attention (`forward_mask`).
            kv_cache: frozen K/V that every row attends to (or a stacked one); never modified.
            return_kv: also return this call's fresh post-RoPE K/V per layer.
            logits_at: query rows to project (slice, LongTensor (P,) or per row (B, P)); None = all rows.
            store_kv: also return, in `kv_cache`, a new cache holding this chunk's K/V (batch 1, `stores_kv`).
        """
        B, Q = input_ids.shape
        if store_kv and not self.stores_kv:
            raise ValueError(
                f"store_kv=True: {type(self).__name__} attends bidirectionally, its K/V are not stored"
            )
        if store_kv and B != 1:
            raise ValueError(f"store_kv=True stores one chunk, got a batch of {B} rows")
        positions, span = self.positions(position_ids, kv_cache, B, Q, input_ids.device)
        mask = self.forward_mask(attention_mask, positions, kv_cache)
        plan = plan_attention(kv_cache, B, Q, mask, input_ids.device)
        h, present = self.hidden(input_ids, positions, span, plan, kv_cache, return_kv or store_kv)
        logits = self.head(h, logits_at, positions, span, attention_mask, kv_cache)
        stored = append_kv(kv_cache, present) if store_kv else None
        return DiffusionLMOutput(
            logits=logits, present=present if return_kv else None, kv_cache=stored
        )

    def forward_mask(self, attention_mask, positions, kv_cache: KVCache | None):
        """The mask the attention plan is made of: the one given (None = attend to every key)."""
        return attention_mask


class BidirectionalLM(FamilyLM):
    """The bidirectional families (LLaDA, Dream): positions continue at the cache's `insert_at` (host-known
    ranges stay ranges: `position_tensor`), every key visible by default."""

    position_limit = "max_sequence_length"  # the config key that bounds positions

    def positions(self, position_ids, kv_cache: KVCache | None, batch: int, q_len: int, device):
        """Positions (1 or B, Q) and their range when the host knows it (`position_tensor`)."""
        start = kv_cache.insert_at if kv_cache is not None else 0
        limit = (self.position_limit, getattr(self.config, self.position_limit))
        return position_tensor(position_ids, q_len, start, limit, device)

    def default_attention_mask(
        self, positions: torch.Tensor, kv_cache: KVCache | None
    ) -> torch.Tensor:
        """Bidirectional attention as an explicit mask (B, Q, L_c + Q) (`spiffy.models.base`)."""
        return bidirectional_mask(positions, kv_cache)


class BlockCausalLM(FamilyLM):
    """The families with a stored cache (SDAR, LLaDA2; docs/algorithm.md §12): positions (B, Q) continue at
    `cache.length`; the embeddings, RoPE over the family's `rope_dims`, the blocks (`model.layers`), then the
    final norm and the LM head on the rows `logits_at`. A family gives `forward_mask` (its default attention
    when none is given), `default_attention_mask` and `rope_dims` (the rotated dims of a head)."""

    stores_kv = True
    float32_logits = False  # LLaDA2's reference returns float32 logits whatever the model's dtype

    def positions(self, position_ids, cache: KVCache | None, batch: int, q_len: int, device):
        """Positions (B, Q): as given, or continuing at `cache.length`; raises beyond the model's limit."""
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = range(start, start + q_len)
        if isinstance(position_ids, range):
            position_ids = torch.arange(position_ids.start, position_ids.stop, device=device)
        if position_ids.dim() == 1:
            position_ids = position_ids.expand(batch, q_len)
        top, limit = int(position_ids.max()), self.config.max_position_embeddings
        if top >= limit:
            raise ValueError(f"position {top} exceeds max_position_embeddings={limit}")
        return position_ids, None

    def hidden(self, input_ids, positions, span, plan, kv_cache, return_kv):
        """The blocks' output (B, Q, d) before the final norm, and the fresh K/V if asked."""
        x = self.get_input_embeddings()(input_ids)
        cos_sin = rope_tables(positions, self.rope_dims, self.config.rope_theta, x.dtype)
        return run_blocks(self.model.layers, x, cos_sin, plan, kv_cache, return_kv)

    def head(self, h, logits_at, *_) -> torch.Tensor:
        """Logits at the rows `logits_at`: the final norm and the LM head on those rows only."""
        if logits_at is not None:
            h = select_rows(h, logits_at)
        logits = self.lm_head(self.model.norm(h))
        return logits.float() if self.float32_logits else logits


def init_weights(module: nn.Module, std: float) -> None:
    """The families' initialisation: normal linear and embedding weights, zero biases, unit norms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)


class DecoderLM(PreTrainedModel):
    """The Qwen-style model shell: `model` (a `Backbone`) and an untied `lm_head`; families add the call
    (`BidirectionalLM`, `BlockCausalLM`). `block` is every layer's `BlockConfig`, or a list of one per layer
    (LLaDA2: dense first layers, MoE after); `embedding` the checkpoint's name of the embeddings."""

    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(
        self,
        config: PretrainedConfig,
        block: BlockConfig | list[BlockConfig],
        embedding: str = "embed_tokens",
    ):
        super().__init__(config)
        blocks = [block] * config.num_hidden_layers if isinstance(block, BlockConfig) else block
        self.model = Backbone(config.vocab_size, blocks, embedding)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        init_weights(module, getattr(self.config, "initializer_range", 0.02))

    def get_input_embeddings(self) -> nn.Module:
        return getattr(self.model, self.model.embedding_name)
