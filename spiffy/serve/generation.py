"""A request from arrival to text, whatever carries it (HTTP, `spiffy chat`, the in-process benchmark): `plan`
validates it against the served job and the limits (a `RequestError` naming the field), `Text` turns committed
blocks into text (cut at EOS, the canvas filler and stop strings), `spiffy_object` reports what decoding did.
docs/serving.md "Requests"."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from spiffy.serve.service import RequestError, Service, Settings


@dataclass
class Plan:
    prompt_ids: list[int]
    decoder: object
    settings: Settings
    seed: int
    max_tokens: int  # what the request asked (or the server's limit)
    blocks: int  # whole blocks decoded: ceil(max_tokens / block_length)
    stops: list[str]
    temperature: float

    @property
    def rounded_tokens(self) -> int:
        return self.blocks * self.decoder.cfg.block_length


def plan(
    service: Service,
    prompt_ids: list[int],
    *,
    prompt_param: str = "prompt",
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    graph: str | None = None,
    budget: int | None = None,
) -> Plan:
    limit = service.max_tokens
    if max_tokens is not None and max_tokens > limit:
        raise RequestError(
            f"max_tokens={max_tokens} exceeds this server's limit of {limit} "
            f"(serve.max_tokens, at most the decoder's gen_length={service.gen_length})",
            param="max_tokens",
        )
    if len(prompt_ids) > service.serve.max_prompt_tokens:
        raise RequestError(
            f"{prompt_param} is {len(prompt_ids)} tokens, over the limit "
            f"serve.max_prompt_tokens={service.serve.max_prompt_tokens}",
            param=prompt_param,
        )
    settings = Settings(temperature=temperature, top_p=top_p, graph=graph, budget=budget)
    if settings == Settings(temperature=service.default.cfg.temperature) or settings == Settings(
        temperature=service.default.cfg.temperature, top_p=service.default.cfg.top_p
    ):
        settings = Settings()  # the served decoder's own sampling, said explicitly
    decoder = service.decoder(settings)
    try:
        decoder.prepare_prompt(prompt_ids)
    except ValueError as err:
        raise RequestError(f"{prompt_param}: {err}", param=prompt_param) from None
    t = decoder.cfg.temperature
    if (
        seed is None
    ):  # greedy decoding draws nothing; sampling without a seed gets a fresh one (reported)
        seed = 0 if t == 0 else secrets.randbelow(2**32)
    tokens = limit if max_tokens is None else max_tokens
    blocks = math.ceil(tokens / decoder.cfg.block_length)
    return Plan(list(prompt_ids), decoder, settings, seed, tokens, blocks, list(stop or []), t)


class Text:
    """The text of a request's committed blocks: `add(block)` returns the new text that is final (held back:
    what could still be the start of a stop string) and whether the request is over (EOS, filler or a stop
    string); `finish()` returns the rest."""

    def __init__(self, service: Service, stops: list[str]):
        self.service, self.stops = service, stops
        self.tokens: list[int] = []
        self.kept: list[int] = []
        self.sent = ""
        self.text = ""
        self.stopped = False  # EOS or a stop string ended it
        self.hold = max((len(s) for s in stops), default=1) - 1

    def add(self, block: list[int]) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.tokens += block
        self.kept, ended = self.service.cut(self.tokens)
        self.text = self.service.text(self.kept)
        found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.text, ended = self.text[: min(found)], True
        self.stopped = ended
        safe = self.text if ended else self.text[: max(len(self.sent), len(self.text) - self.hold)]
        if not safe.startswith(
            self.sent
        ):  # a tokenizer re-spelled earlier text: send nothing more yet
            return "", ended
        delta, self.sent = safe[len(self.sent) :], safe
        return delta, ended

    def finish(self) -> str:
        rest = self.text[len(self.sent) :] if self.text.startswith(self.sent) else ""
        self.sent = self.text
        return rest

    @property
    def finish_reason(self) -> str:
        return "stop" if self.stopped else "length"


def spiffy_object(service: Service, p: Plan, stats, nfe: int, blocks: int, kept: int) -> dict:
    """The response's `spiffy` object: what decoding did for this request."""
    base = stats.nfe_base if stats is not None else None
    out = {
        "nfe": nfe,
        "base_nfe": base,
        "speedup_nfe": base / nfe if base and nfe else None,
        "forwards": sum(stats.accepted_per_forward.values()) if stats is not None else None,
        "accepted_per_forward": (
            stats.mean_accepted_per_forward
            if stats is not None and stats.accepted_per_forward
            else None
        ),
        "blocks": blocks,
        "block_length": p.decoder.cfg.block_length,
        "max_tokens": p.rounded_tokens,
        "seed": p.seed,
        "temperature": p.temperature,
        "graph": service.graph_name(p.settings),
        "completion_token_ids": kept,
    }
    if p.rounded_tokens != p.max_tokens:
        out["warning"] = (
            f"max_tokens={p.max_tokens} rounded up to {p.rounded_tokens}: decoding commits whole blocks of "
            f"{p.decoder.cfg.block_length} tokens"
        )
    return out
