"""The offline task definitions score known-correct and known-wrong answers correctly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import spiffy
from spiffy.eval.tasks.spiffy_tasks import load_arith, load_gsm8k
from spiffy.tasks.arith import ArithConfig, generate_split, make_problem, split_of
from spiffy.tasks.registry import GSM8K_DATA, gsm8k_calibration, gsm8k_dir
from spiffy.tasks.scoring import extract_flexible, extract_strict, is_correct, target_number


def test_arith_splits_are_disjoint_and_answers_correct():
    splits = {s: generate_split(s, 150, seed=3) for s in ("train", "calib", "test")}
    questions = {s: {p["question"] for p in ps} for s, ps in splits.items()}
    assert not questions["train"] & questions["test"]
    assert not questions["calib"] & questions["test"]
    assert not questions["train"] & questions["calib"]
    for split, problems in splits.items():
        for p in problems:
            assert split_of(p["question"]) == split
            value = None
            for line in p["answer"].splitlines()[:-1]:  # every worked step is true arithmetic
                lhs, rhs = line.split("=")
                assert eval(lhs, {}) == int(rhs)  # noqa: S307 - digits and +/- only
                value = int(rhs)
            assert str(value) == p["target"] == target_number(p["answer"])


def test_arith_difficulty_knobs():
    rng = random.Random(0)
    hard = [
        make_problem(rng, ArithConfig(max_value=50, min_steps=4, max_steps=4)) for _ in range(50)
    ]
    assert all(len(p["answer"].splitlines()) == 5 for p in hard)
    with pytest.raises(ValueError, match="min_steps"):
        ArithConfig(min_steps=3, max_steps=2)


def test_gsm8k_extraction():
    assert extract_strict("so 3+4=7\n#### 1,234") == "1234"
    assert extract_flexible("The answer is $12.") == "12"
    assert is_correct("... #### 72", "72") and not is_correct("... #### 71", "72")
    assert not is_correct("72", "72")  # strict needs the #### line
    assert is_correct("it is 72", "72", strict=False)


def test_gsm8k_local_data_scores_its_own_answers():
    rows = [json.loads(line) for line in (gsm8k_dir() / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 1319  # the full test split ships with the package
    assert all(is_correct(r["answer"], target_number(r["answer"])) for r in rows[:50])


def test_gsm8k_loads_offline_from_the_shipped_copy(monkeypatch):
    monkeypatch.delenv("SPIFFY_GSM8K_DIR", raising=False)
    assert gsm8k_dir() == GSM8K_DATA and GSM8K_DATA.is_relative_to(Path(spiffy.__file__).parent)
    ds = load_gsm8k()
    assert (len(ds["train"]), len(ds["test"])) == (7473, 1319)
    assert len(gsm8k_calibration(3)) == 3


def test_gsm8k_dir_override_is_honoured_and_a_missing_copy_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("SPIFFY_GSM8K_DIR", str(tmp_path))
    assert gsm8k_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="SPIFFY_GSM8K_DIR"):
        load_gsm8k()


def test_arith_dataset_for_lm_eval():
    ds = load_arith(n_test=20)
    assert len(ds["test"]) == 20 and set(ds["test"][0]) == {"question", "answer", "target"}
