"""Native PyTorch implementation of LLaDA2.x (`model_type: llada2_moe`), weight-compatible with inclusionAI/LLaDA2.*.

It reads the published `config.json` keys and weight names (`model.word_embeddings`, `model.layers.N.attention.
{query_key_value,dense,query_layernorm,key_layernorm}`, `mlp.gate.{weight,expert_bias}`, `mlp.experts.K.*`,
`mlp.shared_experts.*`, untied `lm_head`) and is registered with transformers' Auto classes without
`trust_remote_code` (docs/llada2.md). Numerics follow the reference (tests/fixtures/llada2_reference/README.md):
RMSNorms in float32 then the weight, RoPE on the first `head_dim * partial_rotary_factor` dims with float32 tables,
a float32 sigmoid router with expert bias, group-limited top-k, normalised and scaled weights, the routed sum in
float32, shared experts, the first `first_k_dense_replace` layers dense, and float32 logits.

Attention: `attention_mask=None` is full attention (the reference's); a 4-D additive mask (B or 1, 1, Q, K) is
added to the scores; a bool mask (B, Q, K) is spiffy's contract. The cache API is SDAR's (`kv_cache`,
`return_kv`, `store_kv`): LLaDA2 decodes block-causally, so finished blocks' K/V are exact, and decoders pass the
block-causal mask where a query spans more than one block (`spiffy.decoding.block_causal`). The experts run as
one matrix product per expert over the tokens routed to it (tokens sorted by expert), never per token.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from spiffy.models.generate import LLaDA2Generate
from spiffy.models.kv import KVCache, bidirectional_attention, bidirectional_mask
from spiffy.models.transformer import (
    BlockCausalLM,
    BlockConfig,
    DecoderLM,
    GatedMLP,
    QwenConfig,
    RMSNorm,
    apply_partial_rope,
    qwen_fields,
)

# the published generate defaults (LLaDA2.0-mini / 2.1-mini): the config itself has neither id
PUBLISHED_MASK_ID, PUBLISHED_EOS_ID = 156895, 156892


class LLaDA2MoeConfig(QwenConfig):
    """LLaDA2's config format (Bailing-MoE keys). `mask_token_id` / `eos_token_id` are not in the published
    file (they are `generate` arguments); they default to the published values when the vocabulary holds
    them (else None: set them on the config before building a decoder)."""

    model_type = "llada2_moe"
    # (layers, width, query heads, kv heads, MLP width) of LLaDA2.0-mini
    published = qwen_fields(
        157184, (20, 2048, 16, 4, 5120), head_dim=128, positions=32768, theta=6e5
    )

    def __init__(
        self,
        partial_rotary_factor: float = 0.5,
        first_k_dense_replace: int = 1,
        num_experts: int = 256,
        num_experts_per_tok: int = 8,
        num_shared_experts: int = 1,
        moe_intermediate_size: int = 512,
        n_group: int = 8,
        topk_group: int = 4,
        routed_scaling_factor: float = 2.5,
        use_qk_norm: bool = True,
        use_bias: bool = False,
        use_qkv_bias: bool = False,
        score_function: str = "sigmoid",
        mask_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        kwargs.pop("attn_implementation", None)  # one attention path here
        self.refuse_unsupported(kwargs, rope_scaling=None)
        self.init_fields(locals())
        # the published ids where the vocabulary has them (a tiny test checkpoint has not: None, set them)
        if self.vocab_size > PUBLISHED_MASK_ID:
            if self.mask_token_id is None:
                self.mask_token_id = PUBLISHED_MASK_ID
            if self.eos_token_id is None:
                self.eos_token_id = PUBLISHED_EOS_ID
        self._validate()

    def _validate(self) -> None:
        self.check_positive(
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_experts",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
            "head_dim",
        )
        self.check_divisible(
            ("num_attention_heads", "num_key_value_heads"), ("num_experts", "n_group")
        )
        checks = (
            ("topk_group", self.topk_group <= self.n_group, f"<= n_group={self.n_group}"),
            (
                "num_experts_per_tok",
                self.num_experts_per_tok <= self.topk_group * self.num_experts // self.n_group,
                "<= the experts of topk_group groups",
            ),
            (
                "score_function",
                self.score_function == "sigmoid",
                "'sigmoid' (the reference's routing)",
            ),
            ("use_qk_norm", self.use_qk_norm is True, "True (the published models norm q and k)"),
            ("use_bias", self.use_bias is False and self.use_qkv_bias is False, "False"),
            (
                "rotary_dims",
                self.rotary_dims % 2 == 0 and self.rotary_dims > 0,
                "even and positive (head_dim * partial_rotary_factor)",
            ),
        )
        for key, ok, need in checks:
            if not ok:
                value = getattr(self, key, self.rotary_dims if key == "rotary_dims" else None)
                raise ValueError(f"LLaDA2MoeConfig.{key}={value!r} must be {need}")

    @property
    def rotary_dims(self) -> int:
        """RoPE dims per head: the first `int(head_dim * partial_rotary_factor)` (the reference's rule)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_block_size(self) -> int:
        """Block-causal at the decoder's block length (0): LLaDA2 builds its mask from `block_length`."""
        return 0


def block_causal_additive_mask(length: int, block_length: int, dtype: torch.dtype) -> torch.Tensor:
    """The reference `generate`'s mask (1, 1, L, L): 0 where block(key) <= block(query), else -inf."""
    blocks = torch.arange(length) // block_length
    keep = blocks[None, :] <= blocks[:, None]
    return torch.zeros(length, length, dtype=dtype).masked_fill(~keep, float("-inf"))[None, None]


class LLaDA2Attention(nn.Module):
    """Fused QKV, per-head q/k RMSNorm, RoPE on the first `rotary_dims` dims, GQA, `dense` output: the
    attention component of LLaDA2's `Block` (module `attention`), built from its `BlockConfig`."""

    def __init__(self, config: BlockConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.rot = config.rotary_dims
        width = (self.n_heads + 2 * self.n_kv) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, width, bias=False)
        self.dense = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.query_layernorm = RMSNorm(self.head_dim, config.norm_eps)
        self.key_layernorm = RMSNorm(self.head_dim, config.norm_eps)

    def forward(self, x, cos_sin, plan, cache: KVCache | None, layer: int):
        """The attention output (B, Q, d) and this layer's fresh post-RoPE K/V."""
        B, Q, _ = x.shape
        qkv = self.query_key_value(x).view(B, Q, self.n_heads + 2 * self.n_kv, self.head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=2)
        q = self.query_layernorm(q).transpose(1, 2)  # (B, H, Q, hd)
        k = self.key_layernorm(k).transpose(1, 2)  # (B, H_kv, Q, hd)
        v = v.transpose(1, 2)
        q, k = apply_partial_rope(q, cos_sin, self.rot), apply_partial_rope(k, cos_sin, self.rot)
        out = bidirectional_attention(q, k, v, plan, cache, layer)
        return self.dense(out), (k, v)


class LLaDA2MLP(GatedMLP):
    """The dense SwiGLU `down(silu(gate(x)) * up(x))` of the dense layers, each expert and the shared experts."""


class LLaDA2Gate(nn.Module):
    """The router: float32 logits, sigmoid scores, expert bias for the choice only, group-limited top-k."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = (
            config.num_experts_per_tok,
            config.n_group,
            config.topk_group,
        )
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen experts (T, k) in descending routing score and their float32 weights (T, k), for tokens (T, H)."""
        logits = F.linear(x.to(torch.float32), self.weight.to(torch.float32))  # (T, E) float32
        scores = torch.sigmoid(logits)
        choice = scores + self.expert_bias[None]  # the bias's dtype (float64 in float64 models)
        t, e = choice.shape
        grouped = choice.view(t, self.n_group, e // self.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (T, n_group)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(t, e)
        experts = choice.topk(self.top_k, dim=-1, sorted=True).indices  # (T, k)
        weights = scores.gather(1, experts)
        if self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return experts, weights * self.scaling


class LLaDA2MoE(nn.Module):
    """Routed experts as grouped matrix products (one per expert over its tokens) plus the shared experts."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.gate = LLaDA2Gate(config)
        self.experts = nn.ModuleList(
            LLaDA2MLP(config.hidden_size, config.moe_intermediate_size)
            for _ in range(config.num_experts)
        )
        self.shared_experts = LLaDA2MLP(
            config.hidden_size, config.moe_intermediate_size * config.num_shared_experts
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (T, H)
        experts, weights = self.gate(flat)  # (T, k)
        k = experts.shape[1]
        # sort the (token, slot) pairs by expert: each expert multiplies one contiguous slice of tokens
        order = experts.view(-1).argsort(stable=True)
        counts = torch.bincount(experts.view(-1), minlength=len(self.experts)).tolist()
        tokens = flat[order // k]  # (T*k, H)
        outs, at = [], 0
        for expert, n in enumerate(counts):
            if n:
                outs.append(self.experts[expert](tokens[at : at + n]))
                at += n
        sorted_out = torch.cat(outs)
        routed = torch.empty_like(sorted_out)
        routed[order] = sorted_out  # back to (token, slot) order
        # each expert output in float32 times its weight, summed over the slots in float32 (the reference)
        mixed = routed.view(-1, k, shape[-1]).to(weights.dtype).mul_(weights[..., None]).sum(dim=1)
        return (mixed.to(x.dtype) + self.shared_experts(flat)).view(shape)


class LLaDA2MoeModelLM(LLaDA2Generate, BlockCausalLM, DecoderLM):
    """LLaDA2 MoE block-diffusion LM: logits (float32, as the reference) at every requested query row. Its layers
    are the shared `Block` with LLaDA2's flags and components: the fused `attention`, q/k norm, partial RoPE,
    and the MLP dense in the first `first_k_dense_replace` layers, mixture-of-experts after."""

    config_class = LLaDA2MoeConfig
    float32_logits = True

    def __init__(self, config: LLaDA2MoeConfig):
        dense = config.block_config(
            qk_norm=True,
            rotary_dims=config.rotary_dims,
            attention=LLaDA2Attention,
            attention_name="attention",
            mlp=lambda c: LLaDA2MLP(c.hidden_size, c.intermediate_size),
        )
        moe = dataclasses.replace(dense, mlp=lambda c: LLaDA2MoE(config))
        first = config.first_k_dense_replace
        blocks = [dense if i < first else moe for i in range(config.num_hidden_layers)]
        super().__init__(config, blocks, embedding="word_embeddings")

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LLaDA2Gate):
            nn.init.normal_(module.weight, std=getattr(self.config, "initializer_range", 0.02))
            nn.init.zeros_(module.expert_bias)

    @property
    def rope_dims(self) -> int:
        """RoPE rotates the first `rotary_dims` of a head (`BlockCausalLM`)."""
        return self.config.rotary_dims

    def forward_mask(self, attention_mask, position_ids, cache: KVCache | None):
        """The mask in `plan_attention`'s form (`BlockCausalLM`): None = every key (the reference's default);
        bool (B, Q, K); or the reference's additive float (B, 1, Q, K): one of only 0 / -inf is the bool mask
        `== 0`, other additive values (as float (B, Q, K)) need no cache."""
        if attention_mask is None or attention_mask.dtype == torch.bool:
            if attention_mask is not None and attention_mask.dim() != 3:
                raise ValueError(
                    f"a bool attention_mask must be (B, Q, K), got {tuple(attention_mask.shape)}"
                )
            return attention_mask
        if attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
            raise ValueError(
                f"an additive attention_mask must be (B, 1, Q, K), got {tuple(attention_mask.shape)}"
            )
        blocked = attention_mask == float("-inf")
        if bool((blocked | (attention_mask == 0)).all()):
            return ~blocked[:, 0]
        if cache is not None:
            raise ValueError("an additive attention_mask other than 0/-inf needs kv_cache=None")
        dtype = self.get_input_embeddings().weight.dtype
        return attention_mask[:, 0].to(dtype)  # SDPA adds a float mask (no cache: `plan_attention`)

    def default_attention_mask(
        self, position_ids: torch.Tensor, cache: KVCache | None
    ) -> torch.Tensor:
        """The forward's default as an explicit mask (B, Q, L_c + Q): every key (`spiffy.models.base`)."""
        return bidirectional_mask(position_ids, cache)
