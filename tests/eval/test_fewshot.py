"""The paper's protocol: the requests lm-eval builds for each task carry the configured number of exemplars, and
the calibration prompts use the same layout (docs/conventions.md "Few-shot")."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from spiffy.lab.pipeline import TASKS_DIR, evaluate_task
from spiffy.lab.sweep import CONF_DIR
from spiffy.tasks.arith import generate_split
from spiffy.tasks.registry import (
    FEWSHOT_DELIMITER,
    arith_calibration,
    arith_train,
    fewshot_prompt,
    gsm8k_calibration,
    gsm8k_dir,
)

CONF = CONF_DIR


class RecordingLM(LM):
    """An lm-eval model that records each request's context and answers nothing."""

    def __init__(self):
        super().__init__()
        self.contexts: list[str] = []

    def generate_until(self, requests, disable_tqdm: bool = False):
        self.contexts += [r.args[0] for r in requests]
        return ["" for _ in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def contexts(task: str, num_fewshot: int | None, limit: int = 3) -> list[str]:
    """The contexts of the first `limit` requests, built by the pipeline's own lm-eval call."""
    cfg = SimpleNamespace(
        task=SimpleNamespace(
            lm_eval_task=task, num_fewshot=num_fewshot, limit=limit, allow_code_execution=False
        ),
        model=SimpleNamespace(chat_template=False),
        decoder=SimpleNamespace(temperature=0.0, top_k=None, top_p=None),
        seed=0,
    )
    lm = RecordingLM()
    evaluate_task(cfg, lm)
    assert len(lm.contexts) == limit
    return lm.contexts


def exemplars(context: str) -> tuple[list[tuple[str, str]], str]:
    """Split a GSM8K-layout context into its (question, answer) exemplars and the final question."""
    blocks = context.split(FEWSHOT_DELIMITER)
    assert all(b.startswith("Question: ") for b in blocks), context
    shots = [b.removeprefix("Question: ").split("\nAnswer: ", 1) for b in blocks[:-1]]
    final = blocks[-1].removeprefix("Question: ")
    assert final.endswith("\nAnswer:")
    return [(q, a) for q, a in shots], final.removesuffix("\nAnswer:")


def conf_fewshot(task: str) -> int:
    return yaml.safe_load((CONF / "task" / f"{task}.yaml").read_text())["num_fewshot"]


def test_gsm8k_requests_carry_the_papers_four_exemplars_from_train():
    assert conf_fewshot("gsm8k") == 4
    train = {
        json.loads(line)["question"]: json.loads(line)["answer"]
        for line in (gsm8k_dir() / "train.jsonl").read_text().splitlines()
    }
    test = [json.loads(line) for line in (gsm8k_dir() / "test.jsonl").read_text().splitlines()]
    # the configured count, and the task file's default (lm-eval's CLI without --num_fewshot)
    for shots in (4, None):
        for i, context in enumerate(contexts("spiffy_gsm8k", shots)):
            pairs, question = exemplars(context)
            assert len(pairs) == 4
            assert question == test[i]["question"]
            assert all(
                train[q] == a for q, a in pairs
            )  # exemplars are train problems with their answers
            assert fewshot_prompt(question, pairs) == context  # the layout calibration uses


def test_num_fewshot_overrides_the_task_default():
    for shots in (0, 2):
        for context in contexts("spiffy_gsm8k", shots, limit=2):
            assert len(exemplars(context)[0]) == shots


def test_arith_is_zero_shot_by_default_and_honours_num_fewshot():
    assert conf_fewshot("arith") == 0
    test = generate_split("test", 3)
    for i, context in enumerate(contexts("spiffy_arith", 0)):
        assert context == fewshot_prompt(test[i]["question"], [])
    pool = {p["question"]: p["answer"] for p in arith_train()}
    for context in contexts("spiffy_arith", 3, limit=2):
        pairs, _ = exemplars(context)
        assert len(pairs) == 3 and all(pool[q] == a for q, a in pairs)


def test_humaneval_is_zero_shot_and_refuses_exemplars():
    from spiffy.eval.tasks.spiffy_tasks import load_humaneval
    from spiffy.lab.schema import TaskConfig

    assert conf_fewshot("humaneval") == 0
    problems = load_humaneval()["test"]
    # built as simple_evaluate builds them (scoring would execute code: not needed to count exemplars)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    task = manager.load(["spiffy_humaneval"])["tasks"]["spiffy_humaneval"]
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(limit=2, rank=0, world_size=1)
    for i, instance in enumerate(task.instances):
        assert instance.args[0] == problems[i]["prompt"]
    with pytest.raises(ValueError, match="task.num_fewshot=1: task 'humaneval' has no split"):
        TaskConfig(name="humaneval", lm_eval_task="spiffy_humaneval", num_fewshot=1)
    with pytest.raises(ValueError, match="task.num_fewshot=-1"):
        TaskConfig(name="gsm8k", lm_eval_task="spiffy_gsm8k", num_fewshot=-1)


@pytest.mark.parametrize("source", [gsm8k_calibration, arith_calibration])
def test_calibration_prompts_have_the_evaluation_layout(source):
    for shots in (0, 4):
        prompts = source(3, 0, num_fewshot=shots)
        assert len(prompts) == 3
        for prompt in prompts:
            pairs, question = exemplars(prompt)
            assert len(pairs) == shots and question not in {q for q, _ in pairs}
            assert fewshot_prompt(question, pairs) == prompt
