"""The lm-eval CLI with spiffy's model and offline tasks registered.

    python scripts/lm_eval_cli.py --model spiffy \
        --model_args pretrained=embedded,gen_length=48,block_length=16,steps=48,graph=chain:5 \
        --tasks spiffy_arith --limit 20

Any `lm_eval` flag works; `--include_path` defaults to spiffy's task folder. `--device`, `--gen_kwargs`,
`--num_fewshot` are honoured or refused by name (docs/conventions.md "lm-eval"); Spiffy's per-task numbers (nfe,
base_nfe, speedup_nfe, agreement, tokens_per_s) are added to lm-eval's results, and each `--log_samples` record gets
its requests' NFE (`spiffy`), by wrapping the `simple_evaluate` that lm-eval's CLI calls. Without `--device` it
runs on cuda:0 where CUDA exists, else on the CPU (lm-eval's own default, cuda:0, would be refused there).
"""

from __future__ import annotations

import sys

import lm_eval
import torch
from lm_eval.__main__ import cli_evaluate

from spiffy.eval.harness import (  # registers the "spiffy" model with lm-eval
    SpiffyLM,
    spiffy_metrics,
)
from spiffy.lab.pipeline import TASKS_DIR

_simple_evaluate = lm_eval.simple_evaluate


def simple_evaluate(*args, **kwargs):
    """lm-eval's `simple_evaluate`, then Spiffy's numbers added to its results (the CLI writes them)."""
    results = _simple_evaluate(*args, **kwargs)
    return spiffy_metrics(results, SpiffyLM.latest) if SpiffyLM.latest is not None else results


if __name__ == "__main__":
    if "--include_path" not in sys.argv:
        sys.argv += ["--include_path", str(TASKS_DIR)]
    if not any(a == "--device" or a.startswith("--device=") for a in sys.argv):
        # lm-eval's default is cuda:0; an explicit --device that this machine lacks is an error (SpiffyLM)
        sys.argv += ["--device", "cuda:0" if torch.cuda.is_available() else "cpu"]
    lm_eval.simple_evaluate = simple_evaluate  # the CLI imports it from `lm_eval` when it runs
    cli_evaluate()
