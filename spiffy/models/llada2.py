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

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from spiffy.models.base import select_rows
from spiffy.models.kv import KVCache, append_kv, bidirectional_attention, bidirectional_mask
from spiffy.models.sdar import SDAROutput
from spiffy.models.transformer import QwenConfig, RMSNorm, apply_rope, rope_tables, swiglu

# the published generate defaults (LLaDA2.0-mini / 2.1-mini): the config itself has neither id
PUBLISHED_MASK_ID, PUBLISHED_EOS_ID = 156895, 156892


class LLaDA2MoeConfig(QwenConfig):
    """LLaDA2's config format (Bailing-MoE keys). `mask_token_id` / `eos_token_id` are not in the published
    file (they are `generate` arguments); they default to the published values when the vocabulary holds
    them (else None: set them on the config before building a decoder)."""

    model_type = "llada2_moe"

    def __init__(
        self,
        vocab_size: int = 157184,
        hidden_size: int = 2048,
        intermediate_size: int = 5120,
        num_hidden_layers: int = 20,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 4,
        head_dim: int | None = 128,
        max_position_embeddings: int = 32768,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 600000.0,
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
        self.partial_rotary_factor = partial_rotary_factor
        self.first_k_dense_replace = first_k_dense_replace
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.num_shared_experts = num_shared_experts
        self.moe_intermediate_size = moe_intermediate_size
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.use_qk_norm = use_qk_norm
        self.use_bias = use_bias
        self.use_qkv_bias = use_qkv_bias
        self.score_function = score_function
        # the published ids where the vocabulary has them (a tiny test checkpoint has not: None, set them)
        fits = vocab_size > PUBLISHED_MASK_ID
        self.mask_token_id = mask_token_id if mask_token_id is not None else (PUBLISHED_MASK_ID if fits else None)
        if eos_token_id is None and fits:
            eos_token_id = PUBLISHED_EOS_ID
        kwargs.pop("attn_implementation", None)  # one attention path here
        for key, supported in (("rope_scaling", None), ("tie_word_embeddings", False)):
            value = kwargs.pop(key, supported)
            if value != supported:
                raise ValueError(f"LLaDA2MoeConfig.{key}={value!r} is not supported (use {supported!r})")
        super().__init__(
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, tie_word_embeddings=False, **kwargs
        )
        self._validate()

    def _validate(self) -> None:
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts",
                    "num_experts_per_tok", "n_group", "topk_group", "head_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LLaDA2MoeConfig.{key}={value!r} must be a positive integer")
        checks = (
            ("num_attention_heads", self.num_attention_heads % self.num_key_value_heads == 0,
             f"divisible by num_key_value_heads={self.num_key_value_heads}"),
            ("num_experts", self.num_experts % self.n_group == 0, f"divisible by n_group={self.n_group}"),
            ("topk_group", self.topk_group <= self.n_group, f"<= n_group={self.n_group}"),
            ("num_experts_per_tok",
             self.num_experts_per_tok <= self.topk_group * self.num_experts // self.n_group,
             "<= the experts of topk_group groups"),
            ("score_function", self.score_function == "sigmoid", "'sigmoid' (the reference's routing)"),
            ("use_qk_norm", self.use_qk_norm is True, "True (the published models norm q and k)"),
            ("use_bias", self.use_bias is False and self.use_qkv_bias is False, "False"),
            ("rotary_dims", self.rotary_dims % 2 == 0 and self.rotary_dims > 0,
             "even and positive (head_dim * partial_rotary_factor)"),
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
    """Fused QKV, per-head q/k RMSNorm, RoPE on the first `rotary_dims` dims, GQA, `dense` output."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim
        )
        self.rot = config.rotary_dims
        width = (self.n_heads + 2 * self.n_kv) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, width, bias=False)
        self.dense = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.query_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.key_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rot], x[..., self.rot :]
        return torch.cat([apply_rope(rot, cos, sin), rest], dim=-1)

    def forward(self, x, cos_sin, mask, cache: KVCache | None, layer: int):
        B, Q, _ = x.shape
        qkv = self.query_key_value(x).view(B, Q, self.n_heads + 2 * self.n_kv, self.head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=2)
        q = self.query_layernorm(q).transpose(1, 2)  # (B, H, Q, hd)
        k = self.key_layernorm(k).transpose(1, 2)  # (B, H_kv, Q, hd)
        v = v.transpose(1, 2)
        cos, sin = cos_sin
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        out = bidirectional_attention(q, k, v, mask, cache, layer)
        return self.dense(out), (k, v)


class LLaDA2MLP(nn.Module):
    """SwiGLU `down(silu(gate(x)) * up(x))`: the dense layers, each expert and the shared experts."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


class LLaDA2Gate(nn.Module):
    """The router: float32 logits, sigmoid scores, expert bias for the choice only, group-limited top-k."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = (
            config.num_experts_per_tok, config.n_group, config.topk_group
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


class LLaDA2Layer(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig, index: int):
        super().__init__()
        self.attention = LLaDA2Attention(config)
        dense = index < config.first_k_dense_replace
        self.mlp = LLaDA2MLP(config.hidden_size, config.intermediate_size) if dense else LLaDA2MoE(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos_sin, mask, cache, layer):
        att, fresh = self.attention(self.input_layernorm(x), cos_sin, mask, cache, layer)
        x = x + att
        return x + self.mlp(self.post_attention_layernorm(x)), fresh


class LLaDA2Backbone(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LLaDA2Layer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LLaDA2MoeModelLM(PreTrainedModel):
    """LLaDA2 MoE block-diffusion LM: logits (float32, as the reference) at every requested query row."""

    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDA2Layer"]

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.model = LLaDA2Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, LLaDA2Gate):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.expert_bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.word_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | range | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_kv: bool = False,
        store_kv: bool = False,
        logits_at: slice | torch.Tensor | None = None,
        **_: object,
    ) -> SDAROutput:
        """Float32 logits for the query chunk `input_ids` (B, Q) against the (optional) cache.

        Args:
            input_ids: query tokens (B, Q).
            position_ids: absolute positions (B, Q), (Q,) or a range; default `cache.length + arange(Q)`.
            attention_mask: None = every key (full attention); additive float (B or 1, 1, Q, K) as the
                reference's; or bool (B, Q, K), True = attend. K = cached keys + Q.
            kv_cache: stored K/V of earlier positions; never modified.
            return_kv: also return this call's fresh post-RoPE K/V per layer (`present`).
            store_kv: return, in `kv_cache`, a new cache that also holds this chunk's K/V (batch 1 only).
            logits_at: query rows whose logits to compute; None = all (`spiffy.models.base.DiffusionLM`).
        """
        B, Q = input_ids.shape
        if store_kv and B != 1:
            raise ValueError(f"store_kv=True stores one chunk, got a batch of {B} rows")
        positions = self._positions(position_ids, kv_cache, B, Q, input_ids.device)
        x = self.model.word_embeddings(input_ids)
        mask = self._mask(attention_mask, kv_cache, x.dtype)
        cos_sin = rope_tables(positions, self.config.rotary_dims, self.config.rope_theta, x.dtype)
        present = []
        for i, layer in enumerate(self.model.layers):
            x, fresh = layer(x, cos_sin, mask, kv_cache, i)
            if return_kv or store_kv:
                present.append(fresh)
        if logits_at is not None:
            x = select_rows(x, logits_at)
        logits = self.lm_head(self.model.norm(x)).float()
        stored = append_kv(kv_cache, present) if store_kv else None
        return SDAROutput(
            logits=logits, present=tuple(present) if return_kv else None, kv_cache=stored
        )

    def _positions(self, position_ids, cache, b: int, q: int, device) -> torch.Tensor:
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = range(start, start + q)
        if isinstance(position_ids, range):
            position_ids = torch.arange(position_ids.start, position_ids.stop, device=device)
        if position_ids.dim() == 1:
            position_ids = position_ids.expand(b, q)
        top = int(position_ids.max())
        if top >= self.config.max_position_embeddings:
            raise ValueError(
                f"position {top} exceeds max_position_embeddings={self.config.max_position_embeddings}"
            )
        return position_ids

    @staticmethod
    def _mask(attention_mask, cache: KVCache | None, dtype: torch.dtype):
        """The mask in `bidirectional_attention`'s form: bool (B, Q, K), or additive float (B, Q, K) without a
        cache. A 4-D mask of only 0 / -inf is the bool mask `== 0`; other additive values need no cache."""
        if attention_mask is None or attention_mask.dtype == torch.bool:
            if attention_mask is not None and attention_mask.dim() != 3:
                raise ValueError(f"a bool attention_mask must be (B, Q, K), got {tuple(attention_mask.shape)}")
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
        return attention_mask[:, 0].to(dtype)  # SDPA adds a float mask (no cache: `plan_attention`)

    def default_attention_mask(
        self, position_ids: torch.Tensor, cache: KVCache | None
    ) -> torch.Tensor:
        """The forward's default as an explicit mask (B, Q, L_c + Q): every key (`spiffy.models.base`)."""
        return bidirectional_mask(position_ids, cache)



def _generate(model: LLaDA2MoeModelLM, inputs, **kwargs):  # replaced by spiffy.decoding.llada2_generate
    raise RuntimeError("LLaDA2MoeModelLM.generate needs spiffy.decoding (import spiffy)")


LLaDA2MoeModelLM.generator = staticmethod(_generate)


def generate(self: LLaDA2MoeModelLM, inputs=None, **kwargs) -> torch.Tensor:
    """LLaDA2's own `generate` with the published argument names (`temperature`, `block_length`, `steps`,
    `gen_length`, `top_p`, `top_k`, `eos_early_stop`, `minimal_topk`, `threshold`, `eos_id`, `mask_id`; 2.1 adds
    `editing_threshold`, `max_post_steps`, `num_to_transfer`) and `version="2.1"` (default) or `"2.0"`; returns
    what the reference returns, a (1, n) tensor (docs/llada2.md). Decoding lives in `spiffy.decoding`
    (`spiffy.decoding.llada2_generate`), which installs itself here: models never import decoders."""
    return type(self).generator(self, inputs, **kwargs)


LLaDA2MoeModelLM.generate = generate
