"""`SpiffyLM`: the lm-eval `LM` whose `generate_until` runs a spiffy decoder (lm-eval 0.4 model contract).

Each request is decoded with a stable request id (`<task>:<doc_id>`) so keyed noise is reproducible; the output is
cut at the first EOS, at `max_gen_toks` tokens and at the first `until` string (lm-eval leaves that to the model).
With `base` given, the base decoder decodes the same request too, interleaved, for `agreement` and the wall-clock
speedup measured in the same process. One `RequestRecord` per request is kept in `records`.

`batch_size` (lm-eval's `--batch_size`, `eval.batch_size`) decodes that many requests per forward
(`BlockDecoder.generate_batch`, docs/algorithm.md §13; outputs are the batch-of-one outputs). The base and the
decoder then alternate per chunk of `4 * batch_size` requests; `"auto"` keeps every request of the call in flight,
up to `max_batch_size` (64).
Launched as several processes (`torchrun`, `accelerate launch`: docs/distributed.md), it follows lm-eval's
multi-process contract: `rank`, `world_size`, `device` (`cuda:<LOCAL_RANK>`), `all_gather`, `gather_object`,
`barrier`, so lm-eval shards the documents and reports once; lm-eval's padding requests (the last request repeated
so every rank decodes as many) are answered without decoding or recording them, and a failure on one rank fails
every rank with its error (`spiffy.eval.distributed`).
`loglikelihood*` are out of scope for generation-only evaluation and raise `NotImplementedError`.

lm-eval's flags (docs/conventions.md "lm-eval"): `--device` loads the model there (a device this machine lacks is
an error); `--gen_kwargs` `until`, `max_gen_toks` (the generated length: a decoder of that `gen_length`),
`temperature`, `do_sample`, `top_p`, `top_k` are honoured per request and any other key is refused by name;
`spiffy_metrics` adds Spiffy's per-task numbers (nfe, base_nfe, speedup_nfe, agreement, tokens/s) to lm-eval's
results and each request's NFE to its `--log_samples` record.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from spiffy.decoding.batching import parse_batch_size
from spiffy.decoding.block_decoder import BlockDecoder
from spiffy.decoding.types import DecodeStats
from spiffy.eval import distributed
from spiffy.eval.offline import MAX_BATCH_SIZE, completion_text, encode, resolve_batch_size

# lm-eval `gen_kwargs` keys a request may carry, and how they map onto `GenerationConfig`
GEN_KWARGS = ("until", "max_gen_toks", "temperature", "do_sample", "top_p", "top_k")
# the graph a `--model_args graph=` value names besides a spec or a file: calibrated here, or chosen by autotune
GRAPH_MODES = ("calibrated", "auto")
# `--model_args` keys read by graph=calibrated|auto (and their defaults, as the runner's graph group)
CALIBRATION_ARGS = {
    "budget": 6,
    "max_budget": 10,
    "rule": "best",
    "calibration_task": None,
    "n_samples": 20,
    "num_fewshot": 0,
    "horizon": 16,
    "graph_root": "runs/graphs",
}


@dataclass
class RequestRecord:
    """What one request produced: ids, text, stats, and the base decoder's view when compared. `task`, `doc_id`
    and `idx` are lm-eval's (they key the request's `--log_samples` record)."""

    request_id: str
    completion: str
    stats: DecodeStats
    base_stats: DecodeStats | None = None
    agrees: bool | None = None
    tokens_sha256: str | None = (
        None  # of the generated token ids: compares runs (e.g. 1 vs N processes) exactly
    )
    task: str | None = None
    doc_id: int | None = None
    idx: int | None = None

    def to_dict(self) -> dict:
        """The request's Spiffy numbers for its `--log_samples` record."""
        out = {
            "request_id": self.request_id,
            "nfe": self.stats.nfe,
            "nfe_base": self.stats.nfe_base,
            "generated_tokens": self.stats.generated_tokens,
            "wall_s": self.stats.wall_s,
        }
        if self.base_stats is not None:
            out.update(base_nfe_measured=self.base_stats.nfe, agrees=self.agrees)
        return out


def summarize_records(records: list[RequestRecord]) -> dict[str, float]:
    """Spiffy's per-task numbers in lm-eval's results: mean NFE, the base decoder's mean NFE, the NFE speedup,
    agreement with the base decoder (when it ran), generated tokens per second."""
    if not records:
        return {}
    stats = [r.stats for r in records]
    nfe, base = sum(s.nfe for s in stats), sum(s.nfe_base for s in stats)
    wall = sum(s.wall_s for s in stats)
    out = {
        "nfe": nfe / len(stats),
        "base_nfe": base / len(stats),
        "speedup_nfe": base / nfe if nfe else float("nan"),
        "tokens_per_s": sum(s.generated_tokens for s in stats) / wall if wall else float("nan"),
    }
    compared = [r for r in records if r.base_stats is not None]
    if compared:
        out["agreement"] = sum(bool(r.agrees) for r in compared) / len(compared)
    return out


def generation_overrides(gen_kwargs: dict, cfg) -> tuple[list[str], dict]:
    """A request's stop strings and the `GenerationConfig` fields its lm-eval `gen_kwargs` change from `cfg`.

    `max_gen_toks` becomes `gen_length` (with `steps` scaled to keep the steps per token of `cfg`; values that do
    not divide are refused, not rounded); `do_sample=False` means temperature 0; `top_k=0` and `top_p=1.0` mean no
    filter (as in `transformers`). Any other key raises `ValueError` naming it."""
    unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
    if unknown:
        raise ValueError(
            f"gen_kwargs {unknown} are not supported by the spiffy model (supported: {list(GEN_KWARGS)})"
        )
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    settings: dict = {}
    if "max_gen_toks" in gen_kwargs:
        length = gen_kwargs["max_gen_toks"]
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise ValueError(f"gen_kwargs max_gen_toks={length!r} must be a positive integer")
        if length != cfg.gen_length:
            settings["gen_length"] = length
            if cfg.steps is not None:
                steps = cfg.steps * length / cfg.gen_length
                if steps != int(steps):
                    raise ValueError(
                        f"gen_kwargs max_gen_toks={length}: steps={cfg.steps} for gen_length={cfg.gen_length} "
                        f"gives {steps:g} steps for {length} tokens (choose a length that keeps it whole)"
                    )
                settings["steps"] = int(steps)
    sample = gen_kwargs.get("do_sample")
    if "temperature" in gen_kwargs:
        temperature = gen_kwargs["temperature"]
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
            raise ValueError(f"gen_kwargs temperature={temperature!r} must be a number")
        settings["temperature"] = float(temperature)
    if sample is not None:
        if sample not in (True, False):
            raise ValueError(f"gen_kwargs do_sample={sample!r} must be true or false")
        temperature = settings.get("temperature", cfg.temperature)
        if not sample:
            if "temperature" in gen_kwargs and temperature != 0:
                raise ValueError(
                    f"gen_kwargs do_sample=False with temperature={temperature}: greedy decoding has temperature 0"
                )
            settings["temperature"] = 0.0
        elif temperature == 0:
            raise ValueError("gen_kwargs do_sample=True needs temperature > 0")
    if "top_k" in gen_kwargs:
        settings["top_k"] = None if gen_kwargs["top_k"] == 0 else gen_kwargs["top_k"]
    if "top_p" in gen_kwargs:
        settings["top_p"] = None if gen_kwargs["top_p"] == 1.0 else gen_kwargs["top_p"]
    return until, {k: v for k, v in settings.items() if getattr(cfg, k) != v}


def token_digest(tokens: torch.Tensor) -> str:
    """SHA-256 of a token-id sequence (int64, as decoded), so two runs' tokens compare without storing them."""
    import hashlib

    return hashlib.sha256(tokens.detach().to("cpu", torch.int64).numpy().tobytes()).hexdigest()


def cut_at_stop(text: str, until: list[str]) -> str:
    """Text before the earliest stop string."""
    cut = len(text)
    for stop in until:
        if stop and stop in text:
            cut = min(cut, text.index(stop))
    return text[:cut]


@register_model("spiffy")
class SpiffyLM(LM):
    """Generation-only LM over a spiffy decoder (and optionally its base, for comparison)."""

    latest: SpiffyLM | None = (
        None  # the last one built (lm-eval's CLI builds it inside simple_evaluate)
    )

    def __init__(
        self,
        decoder: BlockDecoder,
        tokenizer,
        *,
        base: BlockDecoder | None = None,
        seed: int = 0,
        chat_template: bool = False,
        progress: bool = True,
        batch_size: int | str = 1,
        max_batch_size: int = MAX_BATCH_SIZE,
        ranks: distributed.Ranks | None = None,
    ):
        super().__init__()
        self.ranks = ranks or distributed.Ranks(device=str(getattr(decoder, "device", "cpu")))
        self._rank, self._world_size = self.ranks.rank, self.ranks.world_size
        self._device = torch.device(self.ranks.device)
        self.decoder, self.base, self.tokenizer = decoder, base, tokenizer
        self.seed, self.use_chat_template, self.progress = seed, chat_template, progress
        self.batch_size = parse_batch_size(batch_size)
        self.max_batch_size = parse_batch_size(max_batch_size)
        self.records: list[RequestRecord] = []
        self.batches: list = []  # the decoder's `BatchStats`, one per batched chunk
        self._variants: dict[tuple, tuple] = {}  # gen_kwargs settings -> (decoder, base)
        SpiffyLM.latest = self

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """Build from lm-eval's `--model_args` string, parsed by lm-eval's own parser."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """Build from lm-eval's parsed `--model_args`, e.g.
        `pretrained=embedded,gen_length=48,block_length=16,graph=chain:5,compare_base=true`.

        Keys: `pretrained`, `dtype`, `device` (else lm-eval's `--device`, else cpu), `seed`, `compare_base`,
        `chat_template`, `graph` (Spiffy's draft graph: a spec such as `chain:5`, a graph file, `calibrated`
        (calibrated here, cached; `budget`, `rule`, `calibration_task`, `n_samples`, `num_fewshot`, `horizon`,
        `graph_root`) or `auto` (the D* and layout predicted fastest on this device; `max_budget` instead of
        `budget`); absent = the base decoder), every other `spiffy.Speculation` option (`verify`, `prune`,
        `draft_noise`, `cross_block`, ...) and every `spiffy.GenerationConfig` field. Unknown keys raise."""
        import dataclasses

        from spiffy.decoding.build import build_decoder
        from spiffy.decoding.speculative import Speculation
        from spiffy.models.loading import load_model, load_tokenizer

        args = dict(arg_dict)
        extra = additional_config or {}
        path = str(args.pop("pretrained", "embedded"))
        dtype = args.pop("dtype", "float32")
        timeout_s = float(args.pop("dist_timeout_s", distributed.DEFAULT_TIMEOUT_S))
        device = args.pop("device", None) or extra.get("device") or "cpu"
        seed = int(args.pop("seed", 0))
        compare = bool(args.pop("compare_base", False))
        chat = bool(args.pop("chat_template", False))
        graph = args.pop("graph", None)
        calibration = {k: args.pop(k) for k in list(CALIBRATION_ARGS) if k in args}
        if calibration and graph not in GRAPH_MODES:
            raise ValueError(
                f"model_args {sorted(calibration)} need graph=calibrated or graph=auto"
            )
        options = [f.name for f in dataclasses.fields(Speculation) if f.name != "graph"]
        speculation = {k: args.pop(k) for k in options if k in args}
        if graph is None and speculation:
            raise ValueError(f"model_args {sorted(speculation)} need graph=<spec or path>")
        from spiffy.decoding.build import generation_config

        generation_config(**args)  # unknown or bad decoder settings fail before the model loads
        if graph in GRAPH_MODES:
            calibration = cls._calibration_args(graph, calibration)
        ranks = distributed.join(str(device), timeout_s=timeout_s)
        model = load_model(path, dtype=dtype, device=ranks.device)
        tokenizer = load_tokenizer(path)
        base = build_decoder(model, **args)
        if graph in GRAPH_MODES:
            graph, layout = cls._calibrated_graph(
                graph, model, tokenizer, base.cfg, path, seed, speculation, calibration
            )
            if layout is not None:
                speculation["verify"] = layout
        decoder = (
            base
            if graph is None
            else build_decoder(model, base.cfg, speculate=Speculation(graph, **speculation))
        )
        batch = {k: extra[k] for k in ("batch_size", "max_batch_size") if extra.get(k) is not None}
        return cls(
            decoder,
            tokenizer,
            base=base if compare and graph else None,
            seed=seed,
            chat_template=chat,
            ranks=ranks,
            **batch,
        )

    @staticmethod
    def _calibration_args(mode: str, given: dict) -> dict:
        """`graph=calibrated|auto`'s settings, typed, with the runner's defaults; a missing calibration task or
        an argument the mode does not read raises."""
        from spiffy.tasks.registry import TASKS

        unread = "max_budget" if mode == "calibrated" else "budget"
        if unread in given:
            raise ValueError(f"model_args {unread}= is not read by graph={mode}")
        out = {**CALIBRATION_ARGS, **given}
        task = out["calibration_task"]
        if task not in TASKS or TASKS[task].calibration is None:
            known = sorted(k for k, t in TASKS.items() if t.calibration is not None)
            raise ValueError(
                f"graph={mode} needs calibration_task=<one of {known}> (the prompts it calibrates on), "
                f"got {task!r}"
            )
        for key in ("budget", "max_budget", "n_samples", "num_fewshot", "horizon"):
            try:
                out[key] = int(out[key])
            except (TypeError, ValueError):
                raise ValueError(f"model_args {key}={out[key]!r} must be an integer") from None
        return out

    @staticmethod
    def _calibrated_graph(mode, model, tokenizer, cfg, path, seed, speculation, calib):
        """The graph (and, for `auto`, the verification layout) calibrated on `calibration_task`'s prompts, cached
        under `graph_root` exactly as the runner caches them."""
        from pathlib import Path

        from spiffy.calibration.autotune import autotune
        from spiffy.calibration.store import load_or_calibrate
        from spiffy.eval.offline import encode
        from spiffy.tasks.registry import TASKS

        task, shots = calib["calibration_task"], calib["num_fewshot"]

        def prompts():
            texts = TASKS[task].calibration(calib["n_samples"], seed, num_fewshot=shots)
            return [encode(tokenizer, t) for t in texts]

        common = dict(
            model_name=Path(path).name if Path(path).is_dir() else path.replace("/", "__"),
            task=task + (f"-{shots}shot" if shots else ""),
            n_samples=calib["n_samples"],
            rule=calib["rule"],
            seed=seed,
            horizon=calib["horizon"],
            draft_noise=speculation.get("draft_noise", "none"),
            root=calib["graph_root"],
        )
        if mode == "calibrated":
            graph = load_or_calibrate(
                model,
                cfg,
                prompts,
                budget=calib["budget"],
                cross_block=bool(speculation.get("cross_block", False)),
                **common,
            )
            return graph, None
        choice = autotune(model, cfg, prompts, max_budget=calib["max_budget"], **common)
        print(choice.reason)
        return choice.graph, (choice.layout if choice.graph is not None else None)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "spiffy").replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True):
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if self.use_chat_template else None

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` concatenated along dim 0 (0-d tensors as one element each), in rank order."""
        parts = distributed.all_gather(self.ranks, tensor.detach().cpu())
        return torch.cat([p.reshape(-1, *p.shape[1:]) for p in parts]).to(tensor.device)

    def gather_object(self, obj, dst: int = 0):
        if dst != 0:
            raise ValueError(f"gather_object(dst={dst}): SpiffyLM gathers on rank 0")
        return distributed.gather(self.ranks, obj)

    def barrier(self) -> None:
        distributed.all_gather(self.ranks, None)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode every request; with several processes, a failure on any rank fails all of them."""
        return distributed.checked(
            self.ranks, "generate_until", lambda: self._generate_until(requests, disable_tqdm)
        )

    def _generate_until(self, requests, disable_tqdm: bool) -> list[str]:
        # lm-eval repeats a request `repeats` times; more copies are its padding of this rank's share (identical
        # answers, not new requests): decoded and recorded once
        seen: dict[int, int] = {}
        first: dict[int, int] = {}  # request -> index in `kept` of its first copy
        kept, source = [], []  # source[i]: index in `kept` whose answer is output i
        for instance in requests:
            seen[id(instance)] = seen.get(id(instance), 0) + 1
            if seen[id(instance)] > max(1, getattr(instance, "repeats", 1)):
                source.append(first[id(instance)])
                continue
            first.setdefault(id(instance), len(kept))
            source.append(len(kept))
            kept.append(instance)
        outputs = self._decode_requests(kept, disable_tqdm or not self.ranks.is_main)
        return [outputs[i] for i in source]

    def _decode_requests(self, requests, disable_tqdm: bool) -> list[str]:
        items = []
        for instance in requests:
            context, gen_kwargs = instance.args
            until, settings = generation_overrides(dict(gen_kwargs or {}), self.decoder.cfg)
            key = tuple(sorted(settings.items()))
            ids = (instance.task_name, instance.doc_id, instance.idx)
            items.append((ids, encode(self.tokenizer, context), until, key))
        size = resolve_batch_size(self.batch_size, len(items), self.max_batch_size)
        chunk = 1 if size == 1 else 4 * size
        outputs: list[str | None] = [None] * len(items)
        bar = tqdm(
            total=len(items), desc="generate_until", disable=disable_tqdm or not self.progress
        )
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):  # requests with the same settings decode together
            groups.setdefault(item[3], []).append(i)
        for key, members in groups.items():
            decoder, base_decoder = self._variant(key)
            for start in range(0, len(members), chunk):
                part = members[start : start + chunk]
                prompts = [items[i][1] for i in part]
                ids = [":".join(map(str, items[i][0])) for i in part]
                base = (
                    self._decode(base_decoder, prompts, ids, size)
                    if base_decoder is not None
                    else None
                )
                results = self._decode(decoder, prompts, ids, size, lambda *_: bar.update())
                for j, i in enumerate(part):
                    (task, doc_id, idx), _, until, _ = items[i]
                    result = results[j]
                    text = completion_text(self.tokenizer, result.tokens, decoder.spec.eos_id)
                    text = cut_at_stop(text, until)
                    base_stats = base[j].stats if base is not None else None
                    agrees = (
                        torch.equal(result.tokens, base[j].tokens) if base is not None else None
                    )
                    self.records.append(
                        RequestRecord(
                            ids[j],
                            text,
                            result.stats,
                            base_stats,
                            agrees,
                            token_digest(result.tokens),
                            task,
                            doc_id,
                            idx,
                        )
                    )
                    outputs[i] = text
        bar.close()
        return outputs

    def _variant(self, key: tuple) -> tuple:
        """The decoder (and base) for a request's `gen_kwargs` settings: the configured ones, or the same decoder
        rebuilt with those `GenerationConfig` fields (built once per distinct settings)."""
        if not key:
            return self.decoder, self.base
        if key not in self._variants:
            from spiffy.decoding.build import build_decoder

            settings = dict(key)
            speculation = getattr(self.decoder, "speculation", None)
            decoder = build_decoder(
                self.decoder.model,
                self.decoder.cfg,
                speculate=speculation,
                options=self.decoder.options,
                **settings,
            )
            base = None
            if self.base is not None:
                base = build_decoder(
                    self.base.model, self.base.cfg, options=self.base.options, **settings
                )
            self._variants[key] = (decoder, base)
        return self._variants[key]

    def spiffy_results(self) -> dict[str, dict[str, float]]:
        """Spiffy's numbers per lm-eval task (`summarize_records` over that task's requests)."""
        tasks: dict[str, list[RequestRecord]] = {}
        for record in self.records:
            tasks.setdefault(record.task or "", []).append(record)
        return {task: summarize_records(records) for task, records in tasks.items()}

    def get_model_info(self) -> dict:
        """lm-eval copies this into its results' `config` (the per-task numbers also go into `results` through
        `spiffy_metrics`)."""
        return {"spiffy": self.spiffy_results()}

    def _decode(self, decoder: BlockDecoder, prompts, ids, size: int, done=None):
        """Decode with `batch_size` requests per forward (one at a time: the plain `generate`)."""
        if size == 1:
            results = []
            for prompt, request_id in zip(prompts, ids, strict=True):
                results.append(decoder.generate(prompt, request_id=request_id, seed=self.seed))
                if done is not None:
                    done()
            return results
        out = decoder.generate_batch(prompts, ids, self.seed, batch_size=size, on_result=done)
        if decoder is self.decoder:
            self.batches.append(out.batch)
        return list(out)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "SpiffyLM evaluates generation (generate_until) only; likelihood tasks need a Monte-Carlo "
            "ELBO estimator that spiffy does not provide"
        )

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self.loglikelihood(requests, disable_tqdm)


def spiffy_metrics(results: dict | None, lm: SpiffyLM) -> dict | None:
    """lm-eval's `simple_evaluate` results with Spiffy's numbers added: per task `nfe,none`, `base_nfe,none`,
    `speedup_nfe,none`, `agreement,none`, `tokens_per_s,none` in `results[task]`, and each `--log_samples`
    record's `spiffy` entry (its requests' NFE, base NFE, agreement). Returns `results` (None on other ranks)."""
    if results is None:
        return None
    by_request = {(r.task, r.doc_id, r.idx): r for r in lm.records}
    for task, numbers in lm.spiffy_results().items():
        if task in results.get("results", {}):
            results["results"][task].update({f"{k},none": v for k, v in numbers.items()})
        for sample in results.get("samples", {}).get(task, []):
            requests = [
                by_request.get((task, sample["doc_id"], idx))
                for idx in range(len(sample.get("arguments", [])))
            ]
            sample["spiffy"] = [r.to_dict() for r in requests if r is not None]
    return results
