"""Task presets: generation settings and prompt sources per task (documented per task in the README).

This is the one place task lengths live: `spiffy/conf/task/*.yaml` leave them unset and `spiffy.lab.schema.TaskConfig` fills
them from here. `arith` is the embedded model's task (gen 32, block 8). `gsm8k` and `humaneval` follow the paper's
LLaDA settings (gen 256, block 32); the decoder's `steps_per_token` sets steps. Calibration prompts come from a split disjoint from test,
in the evaluation's few-shot layout (docs/conventions.md "Few-shot"): `fewshot_prompt` writes what lm-eval's `gsm8k`
task builds (exemplars `Question: q\nAnswer: a` joined by a blank line, then the question), so a graph calibrated
for a 4-shot evaluation has seen 4-shot prompts.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from spiffy.tasks.arith import ArithConfig, format_prompt, generate_split

# the shipped copy (MIT): train/test JSONL of the original release
GSM8K_DATA = Path(__file__).resolve().parent / "data" / "gsm8k"


# lm-eval's defaults for a `generate_until` task (`TaskConfig.fewshot_delimiter`, `target_delimiter`)
FEWSHOT_DELIMITER = "\n\n"
TARGET_DELIMITER = " "
# arith's few-shot pool: the first problems of its train split (the lm-eval task's `train`)
ARITH_TRAIN = 100


@dataclass(frozen=True)
class TaskPreset:
    """A task's standard generation settings, its calibration-prompt source `calibration(n, seed, num_fewshot)`,
    and whether it has a split to draw few-shot exemplars from."""

    name: str
    generation: dict = field(default_factory=dict)
    calibration: Callable[..., list[str]] | None = None
    fewshot: bool = False


def fewshot_prompt(question: str, exemplars: list[tuple[str, str]]) -> str:
    """lm-eval's context for one GSM8K-format request: each exemplar `Question: q\nAnswer: a`, then the question,
    joined by a blank line (no exemplars: the zero-shot prompt)."""
    shots = [format_prompt(q) + TARGET_DELIMITER + a for q, a in exemplars]
    return FEWSHOT_DELIMITER.join([*shots, format_prompt(question)])


def _with_exemplars(rows: list[dict], pool: list[dict], num_fewshot: int, seed: int) -> list[str]:
    """Each row's few-shot prompt with `num_fewshot` exemplars drawn from `pool` (never the row itself)."""
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot={num_fewshot} must be >= 0")
    prompts = []
    for i, row in enumerate(rows):
        rng = random.Random(f"calibration-fewshot:{seed}:{i}")
        others = [r for r in pool if r["question"] != row["question"]]
        if len(others) < num_fewshot:
            raise ValueError(
                f"num_fewshot={num_fewshot} exceeds the {len(others)} exemplars available"
            )
        shots = rng.sample(others, num_fewshot)
        prompts.append(
            fewshot_prompt(row["question"], [(r["question"], r["answer"]) for r in shots])
        )
    return prompts


def arith_train(n: int = ARITH_TRAIN, seed: int = 0) -> list[dict]:
    """arith's few-shot pool (the lm-eval task's `train` split)."""
    return generate_split("train", n, seed=seed, cfg=ArithConfig())


def arith_calibration(n: int, seed: int = 0, num_fewshot: int = 0) -> list[str]:
    rows = generate_split("calib", n, seed=seed, cfg=ArithConfig())
    pool = arith_train() if num_fewshot else []
    return _with_exemplars(rows, pool, num_fewshot, seed)


def gsm8k_dir() -> Path:
    """The GSM8K JSONL folder: `$SPIFFY_GSM8K_DIR` when set, else the copy shipped in `spiffy/tasks/data/`."""
    return Path(os.environ.get("SPIFFY_GSM8K_DIR") or GSM8K_DATA)


def gsm8k_calibration(n: int, seed: int = 0, num_fewshot: int = 0) -> list[str]:
    """`n` train problems from row `seed` on, each with `num_fewshot` other train problems as exemplars."""
    path = gsm8k_dir() / "train.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"GSM8K train split not found at {path}; set SPIFFY_GSM8K_DIR to a folder holding "
            "train.jsonl/test.jsonl"
        )
    lines = path.read_text().splitlines()
    rows = [json.loads(line) for line in lines[seed : seed + n]]
    pool = [json.loads(line) for line in lines] if num_fewshot else []
    return _with_exemplars(rows, pool, num_fewshot, seed)


TASKS: dict[str, TaskPreset] = {
    "arith": TaskPreset(
        "arith", dict(gen_length=32, block_length=8), arith_calibration, fewshot=True
    ),
    "gsm8k": TaskPreset(
        "gsm8k", dict(gen_length=256, block_length=32), gsm8k_calibration, fewshot=True
    ),
    "humaneval": TaskPreset("humaneval", dict(gen_length=256, block_length=32)),
}


def task_generation(task: str, **overrides) -> dict:
    """The task's generation preset with `overrides`, completed into every `GenerationConfig` field (`steps`
    defaults to one token per step for the rules that read it)."""
    from spiffy.decoding.build import generation_config

    if task not in TASKS:
        raise ValueError(f"task={task!r} has no preset; known: {sorted(TASKS)}")
    return generation_config(**{**TASKS[task].generation, **overrides}).to_dict()
