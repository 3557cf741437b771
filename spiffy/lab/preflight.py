"""Check a job against its model's files, its device, its task and its graph file before any model loads.

`spiffy.lab.schema` checks what the config alone decides. This module reads what loading would meet first, so a
bad value fails in seconds, naming the key and the value (or the file), not after minutes of loading an 8B model:
the checkpoint's `config.json` (vocabulary size, maximum length, widths; readable without the weights), the
headers of its safetensors files, whether the device exists, the task's shortest prompt against the model's
maximum length, a `graph.source=file` graph (size-capped, checked against the block and the vocabulary), and an
estimate of one verification forward's memory against `eval.max_verify_gib` (docs/algorithm.md §5.3). It loads
no weights and runs no model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from spiffy.graph.draft_graph import DraftGraph, check_graph_fits
from spiffy.graph.files import read_json
from spiffy.lab.schema import RunConfig, decoder_settings
from spiffy.models.loading import resolve_model_path

DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
MAX_HEADER_BYTES = 100 << 20  # safetensors caps its JSON header at 100 MB


@dataclass(frozen=True)
class ModelFacts:
    """What `config.json` says about a checkpoint (None: the config does not say)."""

    path: Path
    vocab_size: int | None
    max_length: int | None
    mask_id: int | None
    hidden: int | None
    intermediate: int | None
    heads: int | None


def _first(config: dict, *names: str) -> int | None:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def model_facts(path_or_id: str) -> ModelFacts | None:
    """The checkpoint's `config.json`, from its folder or the hub cache (None: a hub id not cached here)."""
    name = resolve_model_path(path_or_id)  # FileNotFoundError naming a missing folder
    folder = Path(name)
    if folder.is_dir():
        file = folder / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if not isinstance(cached, str):
            return None
        file = Path(cached)
    config = read_json(file, "model config")  # ValueError naming the file when it is not JSON
    if not isinstance(config, dict):
        raise ValueError(f"model config file {str(file)!r} is not a JSON object")
    if folder.is_dir():
        for weights in sorted(folder.glob("*.safetensors")):
            check_safetensors(weights)
    return ModelFacts(
        path=file,
        vocab_size=_first(config, "embedding_size", "vocab_size"),
        max_length=_first(config, "max_sequence_length", "max_position_embeddings"),
        mask_id=_first(config, "mask_token_id"),
        hidden=_first(config, "d_model", "hidden_size"),
        intermediate=_first(config, "mlp_hidden_size", "intermediate_size"),
        heads=_first(config, "n_heads", "num_attention_heads"),
    )


def check_safetensors(path: Path) -> None:
    """The file's header parses and its tensors lie inside the file (ValueError naming the file)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= length <= min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(
                f"model weights {str(path)!r}: not a safetensors file ({size} bytes, header length {length})"
            )
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(
                f"model weights {str(path)!r}: not a safetensors file ({err})"
            ) from None
    if not isinstance(header, dict):
        raise ValueError(
            f"model weights {str(path)!r}: not a safetensors file (header is not an object)"
        )
    ends = [
        t["data_offsets"][1]
        for name, t in header.items()
        if name != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets", ())) == 2
    ]
    if 8 + length + max(ends, default=0) > size:
        raise ValueError(
            f"model weights {str(path)!r}: truncated ({size} bytes; its header describes "
            f"{8 + length + max(ends)})"
        )


def check_device(device: str) -> None:
    """The device exists here (ValueError naming `model.device`)."""
    d = torch.device(device)
    if d.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (d.index is not None and d.index >= count):
            raise ValueError(f"model.device={device!r}: this machine has {count} CUDA device(s)")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"model.device={device!r}: MPS is not available on this machine")
    elif d.type != "cpu":
        raise ValueError(f"model.device={device!r}: spiffy runs on cpu, cuda or mps")


def shortest_prompt(cfg: RunConfig, n: int = 100) -> int:
    """The task's shortest prompt in tokens, estimated as its shortest of `n` calibration prompts, which are
    written in the evaluation's few-shot layout (`task.num_fewshot` exemplars; docs/conventions.md
    "Few-shot"). 0 when the task has no prompt source here."""
    from spiffy.eval.offline import encode
    from spiffy.models.loading import load_tokenizer
    from spiffy.tasks.registry import TASKS

    preset = TASKS[cfg.task.name]
    if preset.calibration is None or (cfg.task.num_fewshot and not preset.fewshot):
        return 0
    tokenizer = load_tokenizer(cfg.model.path)
    texts = preset.calibration(n, cfg.seed, num_fewshot=cfg.task.num_fewshot)
    return min(len(encode(tokenizer, text)) for text in texts)


def verify_bytes(cfg: RunConfig, facts: ModelFacts, prompt: int, rows: int) -> int:
    """Estimated memory of one verification forward of `rows` canvases (the real state and its drafts).

    Each row runs its query positions (the whole canvas without a cache, the generated region with the prefix
    cache, a block with the dual or block-causal cache) through layers of width `hidden`/`intermediate` with
    attention over the canvas, and the block's logits are turned into float64 probabilities. An estimate of
    the largest live tensors, not a measurement: the prompt counted is the task's shortest.
    """
    total = prompt + cfg.task.gen_length
    query = {"none": total, "prefix": cfg.task.gen_length}.get(
        cfg.decoder.cache, cfg.task.block_length
    )
    width = (facts.intermediate or 4 * facts.hidden) + 3 * facts.hidden
    per_row = query * width * DTYPE_BYTES.get(cfg.model.dtype, 4)
    per_row += (facts.heads or 1) * query * total * 4  # attention scores
    per_row += cfg.task.block_length * facts.vocab_size * 8  # float64 probabilities of the block
    return rows * per_row


def check_graph_file(cfg: RunConfig, facts: ModelFacts | None) -> None:
    """`graph.source=file`: the file loads (size-capped), holds graph.budget and fits the block and the vocabulary."""
    g = cfg.graph
    graph = DraftGraph.load(g.path)  # FileNotFoundError / ValueError naming the path
    if graph.budget != g.budget:  # the row is named after graph.budget
        raise ValueError(
            f"graph.budget={g.budget} but graph.path={g.path!r} holds a graph of budget {graph.budget}"
        )
    check_graph_fits(
        graph,
        block_length=cfg.task.block_length,
        vocab_size=facts.vocab_size if facts else None,
        source=repr(g.path),
    )


def preflight(cfg: RunConfig) -> None:
    """Every check of this module, in the order loading would meet them; raises ValueError/FileNotFoundError."""
    check_device(cfg.model.device)
    facts = model_facts(cfg.model.path)
    speculates = cfg.decoder.speculate and cfg.graph.budget != 0
    if speculates and cfg.graph.source == "file":
        check_graph_file(cfg, facts)
    if facts is None:
        return  # a hub id not downloaded yet: loading will fetch it and `build_decoder` checks the rest
    gen = decoder_settings(cfg.decoder, cfg.task)
    if facts.vocab_size is not None:
        bad = [i for i in gen["stop_ids"] or () if i >= facts.vocab_size or i == facts.mask_id]
        if bad:
            raise ValueError(
                f"decoder.stop_ids={list(gen['stop_ids'])}: {bad} outside the vocabulary of {cfg.model.path!r} "
                f"(vocab_size={facts.vocab_size} in {facts.path}) or the mask id {facts.mask_id}"
            )
    prompt = 0
    if facts.max_length is not None:
        prompt = shortest_prompt(cfg)
        if prompt + cfg.task.gen_length > facts.max_length:
            raise ValueError(
                f"model {cfg.model.path!r} has max_length={facts.max_length} ({facts.path}), which cannot hold "
                f"task {cfg.task.name!r}: task.gen_length={cfg.task.gen_length} plus its shortest prompt "
                f"(about {prompt} tokens with task.num_fewshot={cfg.task.num_fewshot}) needs "
                f"{prompt + cfg.task.gen_length}"
            )
    if speculates and isinstance(cfg.graph.budget, int) and facts.hidden and facts.vocab_size:
        check_verify_memory(cfg, facts, prompt)


def check_verify_memory(cfg: RunConfig, facts: ModelFacts, prompt: int) -> None:
    limit = cfg.eval.max_verify_gib * 2**30
    need = verify_bytes(cfg, facts, prompt, cfg.graph.budget + 1)
    if need > limit:
        per_row = verify_bytes(cfg, facts, prompt, 1)
        most = int(limit // per_row) - 1
        raise ValueError(
            f"graph.budget={cfg.graph.budget}: one verification forward of {cfg.graph.budget + 1} rows needs an "
            f"estimated {need / 2**30:.1f} GiB, over eval.max_verify_gib={cfg.eval.max_verify_gib}: the maximum "
            f"is graph.budget={max(most, 0)} (or raise eval.max_verify_gib)"
        )
