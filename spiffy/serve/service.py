"""The served job: the composed config, the model, the draft graph and the decoders requests run on
(docs/serving.md). It is built exactly as `spiffy run` builds a job (`spiffy.lab.pipeline`: the same Hydra
overrides, checks, model cache and graph calibration or graph store), once, before the server is ready.

A request may change the sampling (`temperature`, `top_p`) or Spiffy's drafting (`spiffy.graph`,
`spiffy.budget`): each distinct setting is its own decoder over the same model (decoders are cheap: they hold no
weights), built on first use and kept while `serve.max_settings` allows.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from spiffy.serve.config import ServeConfig

EMBEDDED_QA = (
    "qa"  # the embedded checkpoints' prompt format: `Question: ...\nAnswer:` (spiffy.tasks.arith)
)


class RequestError(ValueError):
    """A bad request: `param` names the field, `status` the HTTP status (400 unless said)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@dataclass(frozen=True)
class Settings:
    """What selects a request's decoder: sampling and drafting (None: the served job's own)."""

    temperature: float | None = None
    top_p: float | None = None
    graph: str | None = None  # None: the served graph; "none": the base decoder; "chain:D"
    budget: int | None = None  # prune the graph to its best `budget` drafts per forward


def compose_job(overrides: list[str]):
    """The typed `RunConfig` of `spiffy run <overrides>`, checked as `spiffy run` checks it (schema, then
    `spiffy.lab.preflight`: model files, device, graph file), before any model loads. ValueError otherwise."""
    from hydra import compose, initialize_config_dir

    from spiffy.lab.pipeline import typed_job, user_message
    from spiffy.lab.preflight import preflight
    from spiffy.lab.schema import register_configs

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg, _ = typed_job(compose(config_name="config", overrides=overrides))
        preflight(cfg)
    except Exception as err:  # Hydra's composition errors and the schemas' ValueErrors
        raise ValueError(user_message(err)) from None
    return cfg


class Service:
    """One served job: `load()` loads the model and readies the graph (calibrating once if the job's graph is
    calibrated and not in the graph store); `decoder(settings)` is the decoder of a request."""

    def __init__(self, cfg, serve: ServeConfig):
        self.cfg, self.serve = cfg, serve
        self.model = self.tokenizer = self.graph = self.auto = None
        self.gen: dict = {}
        self.ready = False
        self.load_s = self.graph_s = 0.0
        self._decoders: dict[Settings, object] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.cfg.model.name

    def load(self) -> Service:
        from spiffy.lab import pipeline

        if self.cfg.eval.threads:
            torch.set_num_threads(self.cfg.eval.threads)
        t0 = time.perf_counter()
        self.model, self.tokenizer = pipeline.load(self.cfg)
        self.load_s = time.perf_counter() - t0
        self.gen = pipeline.generation_kwargs(self.cfg)
        t0 = time.perf_counter()
        self.graph, self.auto = pipeline.choose_graph(
            self.cfg, self.model, self.tokenizer, self.gen
        )
        self.graph_s = time.perf_counter() - t0
        self.default = self.decoder(Settings())
        self.base = self.decoder(Settings(graph="none"))
        if self.serve.max_tokens is not None and self.serve.max_tokens > self.gen_length:
            raise ValueError(
                f"serve.max_tokens={self.serve.max_tokens} exceeds the decoder's gen_length="
                f"{self.gen_length} (task.gen_length): a request cannot generate more"
            )
        self.ready = True
        return self

    # ---- the job's shape -----------------------------------------------------------------------------

    @property
    def gen_length(self) -> int:
        return self.default.cfg.gen_length

    @property
    def block_length(self) -> int:
        return self.default.cfg.block_length

    @property
    def max_tokens(self) -> int:
        return self.serve.max_tokens or self.gen_length

    @property
    def speculates(self) -> bool:
        return self.graph is not None

    def describe(self) -> dict:
        """The served job in a few fields (`/v1/models`, the `spiffy` object, `spiffy chat`'s banner)."""
        return {
            "model": self.cfg.model.name,
            "decoder": self.cfg.decoder.name,
            "graph": self.graph_name(Settings()),
            "gen_length": self.gen_length,
            "block_length": self.block_length,
            "dtype": self.cfg.model.dtype,
            "device": str(self.default.device),
            "invariant": bool(self.cfg.decoder.invariant),
        }

    def graph_name(self, settings: Settings) -> str:
        if settings.graph is not None:
            return settings.graph
        if self.graph is None:
            return "none"
        budget = getattr(self.graph, "budget", None)
        return f"{self.cfg.graph.source}:{budget}" if budget is not None else self.cfg.graph.source

    # ---- decoders ------------------------------------------------------------------------------------

    def decoder(self, settings: Settings):
        """The decoder of `settings` (built on first use; RequestError naming the field when they are bad)."""
        with self._lock:
            if settings in self._decoders:
                return self._decoders[settings]
            if len(self._decoders) >= self.serve.max_settings + 2:  # + the default and the base
                raise RequestError(
                    f"this server keeps at most serve.max_settings={self.serve.max_settings} distinct "
                    "sampling/drafting settings; use the server's defaults or one of those in use",
                    param="temperature",
                )
            decoder = self._build(settings)
            self._decoders[settings] = decoder
            return decoder

    def _build(self, settings: Settings):
        from spiffy.graph.builtin import chain
        from spiffy.lab.pipeline import job_decoder

        gen = dict(self.gen)
        if settings.temperature is not None:
            gen["temperature"] = settings.temperature
            if (
                settings.temperature == 0
            ):  # greedy: the job's filters would be refused, and do nothing
                gen["top_k"] = gen["top_p"] = None
        if settings.top_p is not None:
            gen["top_p"] = settings.top_p
        graph, auto = self.graph, self.auto
        if settings.graph == "none":
            graph = auto = None
        elif settings.graph is not None:
            graph, auto = chain(int(settings.graph.split(":")[1])), None
        if settings.budget is not None:
            if graph is None:
                raise RequestError(
                    f"spiffy.budget={settings.budget}: the request's decoder drafts nothing "
                    f"(spiffy.graph={self.graph_name(settings)!r})",
                    param="spiffy.budget",
                )
            if settings.budget > len(getattr(graph, "nodes", ())):
                raise RequestError(
                    f"spiffy.budget={settings.budget} exceeds the graph's "
                    f"{len(getattr(graph, 'nodes', ()))} drafts",
                    param="spiffy.budget",
                )
        try:
            return job_decoder(self.cfg, self.model, gen, graph, auto, prune=settings.budget)
        except ValueError as err:
            text = str(err)
            param = text.split("=", 1)[0] if "=" in text.split(" ", 1)[0] else None
            raise RequestError(text, param=param) from None

    # ---- text ----------------------------------------------------------------------------------------

    @property
    def chat_format(self) -> str | None:
        """ "template" (the tokenizer's chat template), `EMBEDDED_QA` (the embedded checkpoints, trained on
        `Question: ...\\nAnswer:`), or None: this model cannot chat."""
        if getattr(self.tokenizer, "chat_template", None):
            return "template"
        path = str(self.cfg.model.path)
        if path == "embedded" or path.endswith("-arith"):
            return EMBEDDED_QA
        return None

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt of a conversation, in the model's format; RequestError when it has none."""
        fmt = self.chat_format
        if fmt == "template":
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        if fmt == EMBEDDED_QA:  # the few-shot layout of its task: earlier turns as solved examples
            from spiffy.tasks.arith import format_prompt

            turns, question = [], None
            for m in messages:
                if m["role"] == "user":
                    question = m["content"]
                elif m["role"] == "assistant" and question is not None:
                    turns.append(f"{format_prompt(question)} {m['content'].strip()}")
                    question = None
            if question is None:
                raise RequestError("messages must end with a user message", param="messages")
            return "\n\n".join([*turns, format_prompt(question)])
        raise RequestError(
            f"model {self.cfg.model.name!r} has no chat template (its tokenizer defines none): use "
            "/v1/completions with a prompt in the model's own format",
            param="messages",
        )

    def encode(self, text: str) -> list[int]:
        """A completion prompt as the lm-eval path tokenizes it (`spiffy.eval.offline.encode`: no special
        tokens)."""
        from spiffy.eval.offline import encode

        return encode(self.tokenizer, text).tolist()

    def cut(self, tokens: list[int]) -> tuple[list[int], bool]:
        """Generated ids up to the first EOS, stop id or mask (the canvas's filler), and whether one ended them."""
        ends = {self.default.spec.mask_id, *(self.default.cfg.stop_ids or ())}
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None:
            ends.add(eos)
        for i, t in enumerate(tokens):
            if t in ends:
                return tokens[:i], True
        return tokens, False

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
