"""The server's own settings (`serve.*`: address, limits, API key) and the split of `spiffy serve`'s arguments
into them and the Hydra overrides that compose the job (model, decoder, graph) exactly as `spiffy run` does
(docs/serving.md "Settings"). Every value is checked before any model loads; a bad one is a one-line error naming
the key and the value."""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
from dataclasses import dataclass


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: a free port (printed when the server is up)
    api_key: str | None = (
        None  # clients must send `Authorization: Bearer <api_key>` (401 otherwise)
    )
    max_tokens: int | None = (
        None  # the largest `max_tokens` a request may ask (None: the decoder's gen_length)
    )
    max_prompt_tokens: int = 2048  # longer prompts: 400 (the model's max_length also bounds them)
    max_body_bytes: int = 1 << 20  # larger request bodies: 413
    max_queue: int = (
        64  # requests in the server at once (decoding + waiting); one more: 429 with Retry-After
    )
    max_batch: int = (
        32  # requests decoded per forward (the engine's max_batch); the rest wait their turn
    )
    retry_after_s: int = 1  # the Retry-After of a 429
    drain_timeout_s: float = (
        60.0  # SIGTERM: how long live requests may take to finish before the exit
    )
    max_settings: int = (
        8  # distinct (temperature, top_p, spiffy.graph, spiffy.budget) decoders kept at once
    )

    def __post_init__(self) -> None:
        def bad(key: str, value, why: str) -> ValueError:
            return ValueError(f"serve.{key}={value!r} {why}")

        if not isinstance(self.host, str) or not self.host:
            raise bad("host", self.host, "must be a host name or an IP address")
        if self.host != "localhost" and any(c.isdigit() for c in self.host[:1]):
            try:
                ipaddress.ip_address(self.host)
            except ValueError:
                raise bad("host", self.host, "is not an IP address") from None
        if not _int(self.port) or not 0 <= self.port <= 65535:
            raise bad("port", self.port, "must be an integer in [0, 65535] (0: a free port)")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise bad("api_key", self.api_key, "must be a non-empty string or null")
        for key in (
            "max_prompt_tokens",
            "max_body_bytes",
            "max_queue",
            "max_batch",
            "max_settings",
        ):
            if not _int(getattr(self, key)) or getattr(self, key) < 1:
                raise bad(key, getattr(self, key), "must be a positive integer")
        if self.max_tokens is not None and (not _int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", self.max_tokens, "must be a positive integer or null")
        if not _int(self.retry_after_s) or self.retry_after_s < 0:
            raise bad("retry_after_s", self.retry_after_s, "must be an integer >= 0 (seconds)")
        if not isinstance(self.drain_timeout_s, (int, float)) or not self.drain_timeout_s >= 0:
            raise bad("drain_timeout_s", self.drain_timeout_s, "must be a number >= 0 (seconds)")


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


FIELDS = {f.name: f for f in dataclasses.fields(ServeConfig)}
# `spiffy serve host=... port=...`: the address keys may be given without the `serve.` prefix
SHORT_KEYS = ("host", "port", "api_key")
FLAGS = {"--host": "host", "--port": "port", "--api-key": "api_key"}


def parse_value(key: str, text: str):
    """A `serve.<key>=<text>` value as its field's type (YAML-like: null, integers, numbers, strings)."""
    if text in ("null", "None", "~"):
        return None
    kind = FIELDS[key].type
    if "int" in kind:
        try:
            return int(text)
        except ValueError:
            return text  # reported by __post_init__, naming the key
    if "float" in kind:
        try:
            return float(text)
        except ValueError:
            return text
    return text


def split_args(argv: list[str]) -> tuple[ServeConfig, list[str]]:
    """`spiffy serve`'s arguments: the server's settings (`serve.<key>=v`, `host=`, `port=`, `api_key=`,
    `--host/--port/--api-key v`) and the rest, the Hydra overrides of the job. ValueError names a bad key or value."""
    values: dict = {}
    overrides: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        flag = arg.split("=", 1)[0]
        if flag in FLAGS:
            if "=" in arg:
                text = arg.split("=", 1)[1]
            elif args:
                text = args.pop(0)
            else:
                raise ValueError(f"{flag} needs a value")
            values[FLAGS[flag]] = parse_value(FLAGS[flag], text)
            continue
        if arg.startswith("-"):
            raise ValueError(f"unknown option {arg!r} (spiffy serve --help)")
        key, sep, text = arg.partition("=")
        if sep and (key.startswith("serve.") or key in SHORT_KEYS):
            name = key.removeprefix("serve.")
            if name not in FIELDS:
                close = difflib.get_close_matches(name, list(FIELDS), n=1)
                hint = f" (did you mean serve.{close[0]}?)" if close else ""
                raise ValueError(f"unknown config key serve.{name}{hint}")
            values[name] = parse_value(name, text)
        else:
            overrides.append(arg)
    return ServeConfig(**values), overrides
