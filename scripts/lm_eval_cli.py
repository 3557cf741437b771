"""The lm-eval CLI with spiffy's model and offline tasks registered.

    python scripts/lm_eval_cli.py --model spiffy \
        --model_args pretrained=embedded,gen_length=48,block_length=16,steps=48,graph=chain:5 \
        --tasks spiffy_arith --limit 20

Any `lm_eval` flag works; `--include_path` defaults to spiffy's task folder.
"""

from __future__ import annotations

import sys

from lm_eval.__main__ import cli_evaluate

import spiffy.eval.harness  # noqa: F401 - registers the "spiffy" model with lm-eval
from spiffy.lab.pipeline import TASKS_DIR

if __name__ == "__main__":
    if "--include_path" not in sys.argv:
        sys.argv += ["--include_path", str(TASKS_DIR)]
    cli_evaluate()
