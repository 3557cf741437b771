"""`LLaDA2MoeModelLM.generate`: LLaDA2's published `generate` arguments mapped onto the block loop (docs/llada2.md).

The reference recomputes the whole prefix at every call; here the block loop runs the rules `llada2_threshold`
(2.0) / `llada2_edit` (2.1) with the exact block-causal cache, so the tokens are the reference's and `stats.nfe`
counts every model call (prefill and block stores included, as for SDAR; `stats.transitions` is the reference's
call count). The return value is the reference's: the generated tokens cut after the first EOS, except 2.0's
`eos_early_stop` return, which includes the prompt. Registered on import as the backend of
`LLaDA2MoeModelLM.generate` (`spiffy.models.generate.LLaDA2Generate`).
"""

from __future__ import annotations

import torch

from spiffy.decoding.block_decoder import BlockDecoder
from spiffy.decoding.build import generation_config
from spiffy.decoding.types import DecodeResult
from spiffy.models.generate import register_backend
from spiffy.models.llada2 import PUBLISHED_EOS_ID, PUBLISHED_MASK_ID, LLaDA2MoeModelLM
from spiffy.models.loading import ModelSpec

VERSIONS = ("2.0", "2.1")


def llada2_settings(
    *,
    version: str = "2.1",
    temperature: float = 0.0,
    block_length: int = 32,
    steps: int = 32,
    gen_length: int = 2048,
    top_p: float | None = None,
    top_k: int | None = None,
    eos_early_stop: bool = False,
    minimal_topk: int = 1,
    threshold: float = 0.95,
    editing_threshold: float = 0.9,
    max_post_steps: int = 16,
    num_to_transfer: int = 1,
    eos_id: int = PUBLISHED_EOS_ID,
) -> dict:
    """`build_decoder` settings equivalent to the reference `generate(...)` call with these arguments.

    2.0 clamps `steps` to `gen_length // minimal_topk` (the reference's rule) and then to `block_length`: the
    quotas of steps beyond the block length are 0 and never reached (each earlier step writes at least one
    token), so the schedule is the same. 2.0 always stops after the block holding an EOS; 2.1 only with
    `eos_early_stop` (then also inside no block).
    """
    if version not in VERSIONS:
        raise ValueError(f"version={version!r} must be one of {list(VERSIONS)}")
    if not isinstance(minimal_topk, int) or minimal_topk < 1:
        raise ValueError(f"minimal_topk={minimal_topk!r} must be a positive integer")
    clamped = min(steps, gen_length // minimal_topk)
    if clamped < 1:
        raise ValueError(
            f"steps={steps!r}: min(steps, gen_length // minimal_topk = {gen_length // minimal_topk}) "
            "must be at least 1"
        )
    common = dict(gen_length=gen_length, block_length=block_length, tau=threshold)
    # sampling as the reference: float32 probabilities (its logits are float32)
    common.update(temperature=temperature, top_k=top_k, top_p=top_p, softmax_dtype="model")
    if version == "2.0":
        return dict(
            common,
            rule="llada2_threshold",
            steps_per_block=min(clamped, block_length),
            eos_early_stop=eos_early_stop,
            stop_ids=[eos_id],
        )
    return dict(
        common,
        rule="llada2_edit",
        editing_threshold=editing_threshold,
        max_post_steps=max_post_steps,
        num_to_transfer=num_to_transfer,
        stop_ids=[eos_id] if eos_early_stop else None,
    )


def reference_output(
    result: DecodeResult, prompt: torch.Tensor, gen_length: int, eos_id: int
) -> torch.Tensor:
    """What the reference `generate` returns (1, n): the generated tokens cut after the first EOS; after
    2.0's early stop, the prompt and the canvas up to that EOS."""
    p = prompt.numel()
    if result.stats.eos_early_stop:
        eos = (result.canvas[p:] == eos_id).nonzero()
        return result.canvas[: p + int(eos[0]) + 1][None]
    tokens = result.canvas[p : p + gen_length]
    eos = (tokens == eos_id).nonzero()
    return (tokens[: int(eos[0]) + 1] if len(eos) else tokens)[None]


def llada2_generate(
    model: LLaDA2MoeModelLM,
    inputs: torch.Tensor | list[int],
    *,
    eos_id: int = PUBLISHED_EOS_ID,
    mask_id: int = PUBLISHED_MASK_ID,
    seed: int = 0,
    return_result: bool = False,
    **arguments,
) -> torch.Tensor | tuple[torch.Tensor, DecodeResult]:
    """The reference `generate` (batch 1) through the block loop; `seed` keys sampling at temperature > 0
    (docs/algorithm.md §2.1). `return_result=True` also returns the `DecodeResult` (statistics)."""
    cfg = generation_config(**llada2_settings(eos_id=eos_id, **arguments))
    config = model.config
    for name, value in (("mask_id", mask_id), ("eos_id", eos_id)):
        if not isinstance(value, int) or not 0 <= value < config.vocab_size:
            raise ValueError(f"{name}={value!r} is outside the vocabulary [0, {config.vocab_size})")
    spec = ModelSpec(  # the call's ids (the published config names neither)
        mask_id=mask_id,
        eos_id=eos_id,
        eot_id=None,
        pad_id=config.pad_token_id,
        vocab_size=config.vocab_size,
        max_length=config.max_position_embeddings,
        attention_block_size=config.attention_block_size,
    )
    prompt = torch.as_tensor(inputs)
    result = BlockDecoder(model, cfg, spec=spec).generate(prompt, seed=seed)
    flat = prompt.reshape(-1).to(result.canvas.device)
    out = reference_output(result, flat, cfg.gen_length, eos_id)
    return (out, result) if return_result else out


register_backend(llada2_generate, "llada2")
