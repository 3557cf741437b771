"""`arith`: a seeded generator of GSM8K-shaped multi-step word problems, the embedded model's task.

Each problem is a short story ("Ann has 12 apples. She buys 7 more. ...") whose worked answer writes one
equation per step and ends in `#### <number>`, exactly the GSM8K answer format, so the same extraction scores
both tasks (`spiffy.tasks.scoring`). Splits are disjoint by construction: a problem's split is a hash of its
question text, so no question can appear in two splits. Difficulty knobs: `max_value`, `min_steps`, `max_steps`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

NAMES = [
    ("Ann", "She"),
    ("Ben", "He"),
    ("Cara", "She"),
    ("Dan", "He"),
    ("Eve", "She"),
    ("Finn", "He"),
    ("Gia", "She"),
    ("Hugo", "He"),
    ("Ivy", "She"),
    ("Jon", "He"),
    ("Kim", "She"),
    ("Leo", "He"),
    ("Mia", "She"),
    ("Ned", "He"),
    ("Ola", "She"),
    ("Pat", "He"),
    ("Rita", "She"),
    ("Sam", "He"),
    ("Tess", "She"),
    ("Omar", "He"),
]
ITEMS = ["apples", "pens", "cards", "books", "coins", "eggs", "shells", "stamps", "cups", "toys"]
ADD_VERBS = ["buys {b} more", "finds {b} more", "gets {b} more", "makes {b} more"]
SUB_VERBS = ["gives away {b}", "loses {b}", "sells {b}", "uses {b}"]
SPLITS = {"train": range(0, 90), "calib": range(90, 95), "test": range(95, 100)}
MAX_RESULT = 99


@dataclass(frozen=True)
class ArithConfig:
    """Difficulty knobs of the generator."""

    max_value: int = 10
    min_steps: int = 1
    max_steps: int = 2

    def __post_init__(self) -> None:
        if self.max_value < 2:
            raise ValueError(f"ArithConfig.max_value must be >= 2, got {self.max_value}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(
                f"ArithConfig needs 1 <= min_steps <= max_steps, got "
                f"min_steps={self.min_steps}, max_steps={self.max_steps}"
            )


def split_of(question: str) -> str:
    """The split a question belongs to, from a stable hash of its text."""
    bucket = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") % 100
    return next(name for name, rng in SPLITS.items() if bucket in rng)


def make_problem(rng: random.Random, cfg: ArithConfig = ArithConfig()) -> dict[str, str]:
    """Draw one problem: `{"question", "answer", "target"}` with a GSM8K-format answer."""
    name, pron = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    value = rng.randint(2, cfg.max_value)
    sentences = [f"{name} has {value} {item}."]
    lines = []
    for step in range(rng.randint(cfg.min_steps, cfg.max_steps)):
        b = rng.randint(1, cfg.max_value)
        can_sub = b <= value
        if can_sub and (value + b > MAX_RESULT or rng.random() < 0.5):
            verb, new, sign = rng.choice(SUB_VERBS), value - b, "-"
        else:
            verb, new, sign = rng.choice(ADD_VERBS), value + b, "+"
            if new > MAX_RESULT:  # keep every intermediate result within two digits
                b = rng.randint(1, value)
                verb, new, sign = rng.choice(SUB_VERBS), value - b, "-"
        subject = pron if step == 0 else f"Then {pron.lower()}"
        sentences.append(f"{subject} {verb.format(b=b)}.")
        lines.append(f"{value}{sign}{b}={new}")
        value = new
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    answer = "\n".join(lines) + f"\n#### {value}"
    return {"question": question, "answer": answer, "target": str(value)}


def generate_split(
    split: str, n: int, *, seed: int = 0, cfg: ArithConfig = ArithConfig()
) -> list[dict[str, str]]:
    """`n` distinct problems of `split` ("train", "calib" or "test"), deterministic in `seed` and `cfg`."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {sorted(SPLITS)}")
    rng = random.Random(f"arith:{seed}:{split}:{cfg}")
    seen: set[str] = set()
    problems = []
    for _ in range(200 * n + 1000):
        problem = make_problem(rng, cfg)
        if split_of(problem["question"]) == split and problem["question"] not in seen:
            seen.add(problem["question"])
            problems.append(problem)
            if len(problems) == n:
                return problems
    raise ValueError(f"could not draw {n} distinct {split!r} problems with {cfg}")


def format_prompt(question: str) -> str:
    """The GSM8K zero-shot prompt format (lm-eval `doc_to_text`)."""
    return f"Question: {question}\nAnswer:"


def format_target(answer: str) -> str:
    """The completion the model is trained to produce after the prompt."""
    return f" {answer}"
