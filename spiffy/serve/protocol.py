"""The OpenAI-compatible request and response shapes (docs/serving.md "API"): `/v1/completions` and
`/v1/chat/completions` requests (pydantic, unknown fields refused), their responses, streaming chunks, `usage`,
and the `spiffy` extension object (request: `graph`, `budget`; response: nfe, base_nfe, forwards, accepted per
forward, the block-rounded max_tokens). A bad field is a 400 naming it."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SpiffyOptions(BaseModel):
    """`spiffy` in a request: `graph` ("none": the base decoder, no drafts; "chain:D", D in 1..64; default: the
    served graph) and `budget` (draft at most this many of the graph's nodes per forward: `graph.prune`)."""

    model_config = ConfigDict(extra="forbid")
    graph: str | None = None
    budget: int | None = Field(default=None, ge=1)

    @field_validator("graph")
    @classmethod
    def _graph(cls, value):
        if value is None or value == "none":
            return value
        kind, _, depth = value.partition(":")
        if kind == "chain" and depth.isdigit() and 1 <= int(depth) <= 64:
            return f"chain:{int(depth)}"
        raise ValueError(
            f"spiffy.graph={value!r} is not a graph this server builds per request: "
            "'none' (the base decoder), 'chain:D' (D in 1..64), or leave it out (the served graph)"
        )


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=100.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    spiffy: SpiffyOptions | None = None

    @field_validator("n")
    @classmethod
    def _n(cls, value):
        if value != 1:
            raise ValueError(f"n={value}: this server returns one choice per request (n must be 1)")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, value, info):
        if value != 0:
            raise ValueError(f"{info.field_name}={value}: not supported (only 0)")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops or None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str]
    echo: bool = False
    logprobs: None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError(
                    f"a list of {len(value)} prompts: this server takes one prompt per request"
                )
            value = value[0]
        if isinstance(value, list) and not value or value == "":
            raise ValueError("prompt is empty")
        return value

    @field_validator("echo")
    @classmethod
    def _echo(cls, value):
        if value:
            raise ValueError("echo=true is not supported")
        return value


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, value):
        if isinstance(value, list):  # OpenAI content parts: text only
            if any(part.get("type") != "text" or "text" not in part for part in value):
                raise ValueError(
                    "only text content parts ({'type': 'text', 'text': ...}) are supported"
                )
            return "".join(part["text"] for part in value)
        return value


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value):
        if value:
            raise ValueError("logprobs=true is not supported")
        return value


# ---- responses -------------------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(rid, model, text, finish_reason, usage_, spiffy, *, chat: bool) -> dict:
    choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage_,
        "spiffy": spiffy,
    }


def chunk(
    rid, model, text, finish_reason, *, chat: bool, first=False, usage_=None, spiffy=None
) -> dict:
    """One streamed event: a block's new text (or the final chunk, with its finish_reason)."""
    choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if chat:
        choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
    else:
        choice["text"] = text
    out = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if usage_ is not None:
        out["usage"] = usage_
    if spiffy is not None:
        out["spiffy"] = spiffy
    return out


def error(
    message: str,
    *,
    param: str | None = None,
    kind: str = "invalid_request_error",
    code: str | None = None,
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
