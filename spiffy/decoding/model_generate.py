"""The decoder behind `model.generate` (`spiffy.models.generate`): build the decoder the family's arguments name,
decode, and stream committed blocks to a `transformers` streamer (docs/conventions.md "model.generate").

`spiffy.decoding.build` registers `generate_for_model` with `spiffy.models.generate.register_backend` when it is
imported: the models layer, below this one, reaches the decoders only through that registration.
"""

from __future__ import annotations

import torch

from spiffy.decoding.types import DecodeResult


def as_speculation(speculate):
    """`speculate=` as a `Speculation`: one as given, a graph spec (`"chain:5"`) or a `DraftGraph` wrapped with
    the default options, or None (the base decoder)."""
    from spiffy.decoding.speculative import Speculation

    if speculate is None or isinstance(speculate, Speculation):
        return speculate
    return Speculation(speculate)


def generate_for_model(
    model, prompts, settings: dict, *, speculate=None, seed=0, request_ids=None, streamer=None
) -> list[DecodeResult]:
    """Decode each prompt with `build_decoder(model, speculate=..., **settings)`, exactly as alone."""
    from spiffy.decoding.build import build_decoder

    decoder = build_decoder(model, speculate=as_speculation(speculate), **settings)
    ids = list(request_ids) if request_ids is not None else list(range(len(prompts)))
    if len(prompts) == 1:
        result = decoder.generate(prompts[0], request_id=ids[0], seed=seed)
        if streamer is not None:
            stream_blocks(streamer, decoder, prompts[0], result)
        return [result]
    return list(decoder.generate_batch(list(prompts), ids, seed))


def stream_blocks(streamer, decoder, prompt: torch.Tensor, result: DecodeResult) -> None:
    """The streamer's `put` gets the prompt (1, P), then each committed block's generated tokens (1, n) up to the
    block holding the first EOS or stop id; then `end()`. The blocks are replayed from the finished result."""
    prompt = torch.as_tensor(prompt).long().cpu()
    p = prompt.numel()
    canvas = (
        result.canvas if result.canvas is not None else torch.cat([prompt, result.tokens.cpu()])
    )
    canvas = canvas.cpu()
    stops = set(decoder.cfg.stop_ids or ())
    if decoder.spec.eos_id is not None:
        stops.add(decoder.spec.eos_id)
    streamer.put(prompt[None])
    for block in decoder.layout(p)[1]:
        tokens = canvas[max(block.start, p) : block.stop]
        if not tokens.numel():
            continue
        streamer.put(tokens[None])
        if stops & set(tokens.tolist()):
            break
    streamer.end()
