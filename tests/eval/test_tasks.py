"""The offline task definitions score known-correct and known-wrong answers correctly."""

from __future__ import annotations

import json
import random

import pytest

from spiffy.eval.tasks.spiffy_tasks import humaneval_pass_at_1, load_arith, load_humaneval
from spiffy.tasks.arith import ArithConfig, generate_split, make_problem, split_of
from spiffy.tasks.registry import gsm8k_dir
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
    path = gsm8k_dir() / "test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared holds the GSM8K copy)")
    rows = [json.loads(line) for line in path.read_text().splitlines()[:50]]
    assert all(is_correct(r["answer"], target_number(r["answer"])) for r in rows)


def test_arith_dataset_for_lm_eval():
    ds = load_arith(n_test=20)
    assert len(ds["test"]) == 20 and set(ds["test"][0]) == {"question", "answer", "target"}


def test_humaneval_metric_passes_canonical_and_fails_wrong():
    problems = load_humaneval()["test"].select(range(3))
    refs = [
        json.dumps({k: p[k] for k in ("task_id", "prompt", "test", "entry_point")})
        for p in problems
    ]
    good = [[p["prompt"] + p["canonical_solution"]] for p in problems]
    bad = [[p["prompt"] + "    return None\n"] for p in problems]
    assert humaneval_pass_at_1(refs, good) == 1.0
    assert humaneval_pass_at_1(refs, bad) == 0.0
