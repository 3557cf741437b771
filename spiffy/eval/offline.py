"""Decode-and-score loops that need no lm-eval: used by the embedded model's evaluation, benchmarks, tests.

`decode_prompts` runs any decoder over tokenised prompts with stable request ids; `score_arith` decodes test
problems of the `arith` task and scores them with the GSM8K extraction (docs/algorithm.md §7 metrics per request).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from spiffy.decoding.batching import parse_batch_size
from spiffy.decoding.block_decoder import BlockDecoder
from spiffy.decoding.types import DecodeResult
from spiffy.tasks.arith import format_prompt
from spiffy.tasks.scoring import extract_strict, is_correct

MAX_BATCH_SIZE = (
    64  # batch_size="auto" decodes every request of a call, up to this many per forward
)


def resolve_batch_size(batch_size: int | str, n_requests: int, cap: int = MAX_BATCH_SIZE) -> int:
    """The requests decoded per forward: `batch_size`, or for "auto" all `n_requests`, at most `cap`."""
    size = parse_batch_size(batch_size)
    return max(1, min(n_requests, cap)) if size == "auto" else size


def encode(tokenizer, text: str) -> torch.Tensor:
    """Prompt ids without special tokens (P,)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def load_for_study(path: str = "embedded", threads: int = 1, dtype=torch.float32):
    """Model and tokenizer for the offline study scripts, with the torch thread count they report."""
    from spiffy.models.loading import load_model, load_tokenizer

    torch.set_num_threads(threads)
    return load_model(path, dtype=dtype), load_tokenizer(path)


def arith_test_prompts(tokenizer, n: int) -> list[torch.Tensor]:
    """The first `n` held-out `arith` test problems, formatted and encoded."""
    from spiffy.tasks.arith import generate_split

    return [encode(tokenizer, format_prompt(q["question"])) for q in generate_split("test", n)]


def completion_text(tokenizer, tokens: torch.Tensor, eos_id: int | None) -> str:
    """Generated text up to the first EOS."""
    ids = tokens.tolist()
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class ScoredSample:
    """One decoded test problem."""

    request_id: int
    prompt: str
    completion: str
    target: str
    correct: bool
    result: DecodeResult


def score_arith(
    decoder: BlockDecoder,
    tokenizer,
    problems: list[dict],
    *,
    seed: int = 0,
    progress: bool = True,
    desc: str = "decode",
) -> list[ScoredSample]:
    """Decode each problem's GSM8K-format prompt and score the strict `#### n` answer."""
    samples = []
    for i, problem in enumerate(tqdm(problems, desc=desc, disable=not progress)):
        prompt = format_prompt(problem["question"])
        result = decoder.generate(encode(tokenizer, prompt), request_id=i, seed=seed)
        text = completion_text(tokenizer, result.tokens, decoder.spec.eos_id)
        samples.append(
            ScoredSample(
                i, prompt, text, problem["target"], is_correct(text, problem["target"]), result
            )
        )
    return samples


def accuracy(samples: list[ScoredSample]) -> float:
    return sum(s.correct for s in samples) / max(1, len(samples))


def formatted_share(samples: list[ScoredSample]) -> float:
    """Share of completions that end in a `#### n` line (format learned, right or wrong)."""
    return sum(extract_strict(s.completion) is not None for s in samples) / max(1, len(samples))
