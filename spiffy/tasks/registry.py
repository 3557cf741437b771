"""Task presets: generation settings and prompt sources per task (documented per task in the README).

This is the one place task lengths live: `conf/task/*.yaml` leave them unset and `spiffy.lab.schema.TaskConfig` fills
them from here. `arith` is the embedded model's task (gen 32, block 8). `gsm8k` and `humaneval` follow the paper's
LLaDA settings (gen 256, block 32); the decoder's `steps_per_token` sets steps. Calibration prompts come from a split disjoint from test.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from spiffy.tasks.arith import ArithConfig, format_prompt, generate_split

# the shipped copy (MIT): train/test JSONL of the original release
GSM8K_DATA = Path(__file__).resolve().parent / "data" / "gsm8k"


@dataclass(frozen=True)
class TaskPreset:
    """A task's standard generation settings and its calibration-prompt source."""

    name: str
    generation: dict = field(default_factory=dict)
    calibration: Callable[[int, int], list[str]] | None = None


def arith_calibration(n: int, seed: int = 0) -> list[str]:
    return [
        format_prompt(p["question"])
        for p in generate_split("calib", n, seed=seed, cfg=ArithConfig())
    ]


def gsm8k_dir() -> Path:
    """The GSM8K JSONL folder: `$SPIFFY_GSM8K_DIR` when set, else the copy shipped in `spiffy/tasks/data/`."""
    return Path(os.environ.get("SPIFFY_GSM8K_DIR") or GSM8K_DATA)


def gsm8k_calibration(n: int, seed: int = 0) -> list[str]:
    path = gsm8k_dir() / "train.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"GSM8K train split not found at {path}; set SPIFFY_GSM8K_DIR to a folder holding "
            "train.jsonl/test.jsonl"
        )
    rows = [json.loads(line) for line in path.read_text().splitlines()[seed : seed + n]]
    return [f"Question: {r['question']}\nAnswer:" for r in rows]


TASKS: dict[str, TaskPreset] = {
    "arith": TaskPreset("arith", dict(gen_length=32, block_length=8), arith_calibration),
    "gsm8k": TaskPreset(
        "gsm8k", dict(gen_length=256, block_length=32), gsm8k_calibration
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
