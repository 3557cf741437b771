"""GSM8K answer extraction shared by GSM8K and the embedded `arith` task (lm-eval's gsm8k filters).

`strict` takes the number after `#### ` (lm-eval `strict-match`); `flexible` takes the last number in the text
(lm-eval `flexible-extract`). Both normalise commas, `$` and a trailing period before comparing.
"""

from __future__ import annotations

import re

STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def _normalise(number: str) -> str:
    number = number.replace(",", "").replace("$", "").strip()
    number = number.rstrip(".")
    return number


def extract_strict(text: str) -> str | None:
    """The number after the first `#### `, or None."""
    match = STRICT_PATTERN.search(text)
    return _normalise(match.group(1)) if match else None


def extract_flexible(text: str) -> str | None:
    """The last number in `text`, or None."""
    matches = FLEXIBLE_PATTERN.findall(text)
    if not matches:
        return None
    last = [m for m in matches[-1] if m][0]
    return _normalise(last)


def target_number(answer: str) -> str:
    """The gold number of a GSM8K-format answer (`... #### n`)."""
    gold = extract_strict(answer)
    if gold is None:
        raise ValueError(f"answer has no '#### <number>' line: {answer[-60:]!r}")
    return gold


def is_correct(completion: str, gold: str, *, strict: bool = True) -> bool:
    """Whether `completion` states the gold number (strict `####` match or flexible last number)."""
    pred = extract_strict(completion) if strict else extract_flexible(completion)
    return pred is not None and pred == _normalise(gold)
