"""`decode_text`: a decode result as text, without the EOS filler a diffusion canvas ends with."""

from __future__ import annotations

import torch

from spiffy.decoding.types import DecodeResult


def decode_text(tokenizer, result, *, eos_id: int | None = None, skip_special_tokens: bool = True):
    """The generated text of `result`: a `DecodeResult` (or its generated token ids) gives a string; a batch
    (a list of them, `generate_batch`'s result, or `model.generate(..., return_dict_in_generate=True)`'s output)
    gives a list. The tokens are cut at the first `eos_id` (default: the tokenizer's EOS), which drops the filler
    after the answer, then decoded with `skip_special_tokens`."""
    if hasattr(result, "results"):  # BatchDecodeResult, GenerateOutput
        result = result.results
    if isinstance(result, (list, tuple)):
        return [
            decode_text(tokenizer, r, eos_id=eos_id, skip_special_tokens=skip_special_tokens)
            for r in result
        ]
    tokens = result.tokens if isinstance(result, DecodeResult) else torch.as_tensor(result)
    if tokens.dim() != 1:
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)}: decode_text takes one request's generated ids (n,)"
        )
    ids = tokens.tolist()
    eos = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
