"""Evaluate `spiffy_arith` through lm-eval with `SpiffyLM` built from a `--model_args` string, as every launcher runs
it, and write (rank 0) lm-eval's scores and every request's record, gathered from all ranks, to a JSON file.

    python tests/helpers/lm_eval_records.py OUT.json MODEL_ARGS LIMIT [FAIL_RANK]
    accelerate launch --multi_gpu --num_processes 2 tests/helpers/lm_eval_records.py OUT.json MODEL_ARGS LIMIT

With FAIL_RANK, that rank's decoding raises (tests/lab/test_distributed_runs.py: the job must fail, not hang).
"""

from __future__ import annotations

import json
import sys

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from spiffy.eval import distributed
from spiffy.eval.harness import SpiffyLM
from spiffy.lab.pipeline import TASKS_DIR


def main(out: str, model_args: str, limit: int, fail_rank: int | None = None) -> None:
    lm = SpiffyLM.create_from_arg_string(model_args, {"batch_size": 1})
    lm.progress = False
    if fail_rank == lm.rank:

        def fail(requests, disable_tqdm):
            raise RuntimeError(f"injected failure on rank {lm.rank}")

        lm._decode_requests = fail
    results = simple_evaluate(
        model=lm,
        tasks=["spiffy_arith"],
        limit=limit,
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        bootstrap_iters=0,
    )
    shares = lm.gather_object(lm.records)
    if lm.rank != 0:
        return
    records = distributed.merge_in_request_order(shares)
    rows = [
        {
            "request_id": r.request_id,
            "completion": r.completion,
            "tokens_sha256": r.tokens_sha256,
            "nfe": r.stats.nfe,
            "base_nfe": r.base_stats.nfe if r.base_stats is not None else None,
            "agrees": r.agrees,
        }
        for r in records
    ]
    scores = {k: v for k, v in results["results"]["spiffy_arith"].items() if k != "alias"}
    with open(out, "w") as f:
        json.dump({"world_size": lm.world_size, "scores": scores, "requests": rows}, f, indent=1)


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], args[1], int(args[2]), int(args[3]) if len(args) > 3 else None)
