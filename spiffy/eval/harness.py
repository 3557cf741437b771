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


@dataclass
class RequestRecord:
    """What one request produced: ids, text, stats, and the base decoder's view when compared."""

    request_id: str
    completion: str
    stats: DecodeStats
    base_stats: DecodeStats | None = None
    agrees: bool | None = None
    tokens_sha256: str | None = None  # of the generated token ids: compares runs (e.g. 1 vs N processes) exactly


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

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """Build from lm-eval's `--model_args` string, parsed by lm-eval's own parser."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """Build from lm-eval's parsed `--model_args`, e.g.
        `pretrained=embedded,gen_length=48,block_length=16,graph=chain:5,compare_base=true`.
        Keys: `pretrained`, `dtype`, `device`, `seed`, `compare_base`, `chat_template`, `graph` (Spiffy's draft
        graph; absent = the base decoder), every other `spiffy.Speculation` option (`verify`, `prune`,
        `draft_noise`, `cross_block`, ...) and every `spiffy.GenerationConfig` field. Unknown keys raise."""
        import dataclasses

        from spiffy.decoding.build import build_decoder
        from spiffy.decoding.speculative import Speculation
        from spiffy.models.loading import load_model, load_tokenizer

        args = dict(arg_dict)
        path = str(args.pop("pretrained", "embedded"))
        timeout_s = float(args.pop("dist_timeout_s", distributed.DEFAULT_TIMEOUT_S))
        ranks = distributed.join(str(args.pop("device", "cpu")), timeout_s=timeout_s)
        model = load_model(path, dtype=args.pop("dtype", "float32"), device=ranks.device)
        tokenizer = load_tokenizer(path)
        seed = int(args.pop("seed", 0))
        compare = bool(args.pop("compare_base", False))
        chat = bool(args.pop("chat_template", False))
        graph = args.pop("graph", None)
        options = [f.name for f in dataclasses.fields(Speculation) if f.name != "graph"]
        speculation = {k: args.pop(k) for k in options if k in args}
        if graph is None and speculation:
            raise ValueError(f"model_args {sorted(speculation)} need graph=<spec or path>")
        base = build_decoder(model, **args)
        decoder = (
            base
            if graph is None
            else build_decoder(model, base.cfg, speculate=Speculation(graph, **speculation))
        )
        extra = additional_config or {}
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
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(gen_kwargs.get("max_gen_toks", self.decoder.cfg.gen_length))
            request_id = f"{instance.task_name}:{instance.doc_id}:{instance.idx}"
            items.append((request_id, encode(self.tokenizer, context), until, max_tokens))
        size = resolve_batch_size(self.batch_size, len(items), self.max_batch_size)
        chunk = 1 if size == 1 else 4 * size
        outputs = []
        bar = tqdm(
            total=len(items), desc="generate_until", disable=disable_tqdm or not self.progress
        )
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            prompts, ids = [p for _, p, _, _ in part], [r for r, _, _, _ in part]
            base = self._decode(self.base, prompts, ids, size) if self.base is not None else None
            results = self._decode(self.decoder, prompts, ids, size, lambda *_: bar.update())
            for i, (request_id, _, until, max_tokens) in enumerate(part):
                result = results[i]
                text = completion_text(
                    self.tokenizer, result.tokens[:max_tokens], self.decoder.spec.eos_id
                )
                text = cut_at_stop(text, until)
                base_stats = base[i].stats if base is not None else None
                agrees = torch.equal(result.tokens, base[i].tokens) if base is not None else None
                self.records.append(
                    RequestRecord(
                        request_id, text, result.stats, base_stats, agrees, token_digest(result.tokens)
                    )
                )
                outputs.append(text)
        bar.close()
        return outputs

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
