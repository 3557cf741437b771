"""Data-parallel evaluation end to end on this CPU (gloo, 2 processes, 1 thread each): `torchrun run.py`, lm-eval
through `accelerate launch` and through `torchrun scripts/lm_eval_cli.py` give per-request tokens, NFE and every
metric except wall-clock identical to one process, one row and one W&B run per job; a failing rank fails the job
with its error (docs/distributed.md)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL_ARGS = (
    "pretrained=embedded,gen_length=32,block_length=8,steps=32,graph=chain:5,compare_base=true"
)

pytestmark = pytest.mark.slow


def environment(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "WANDB_SILENT": "true",
        "HOME": str(tmp_path),  # offline W&B needs no login
        "PYTHONPATH": str(REPO),
    }


def launch(tmp_path: Path, cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(
        cmd, cwd=REPO, env=environment(tmp_path), capture_output=True, text=True, timeout=timeout
    )
    return done


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate(n: int) -> list[str]:
    # on a machine without GPUs accelerate starts N processes only with --multi_gpu (they run on CPU, gloo)
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        f"--num_processes={n}",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
    ]


def is_wall_clock(metric: str) -> bool:
    """Metrics measured in seconds or derived from seconds: they differ run to run, whatever the processes."""
    return metric.endswith(
        ("_s", "_share", "per_s", "ms_per_forward", "_s_max_rank")
    ) or metric in (
        "speedup_wall",
        "latency_s_p50",
    )


def run_py_rows(tmp_path: Path, name: str, prefix: list[str]) -> list[dict]:
    out = tmp_path / name
    ok(
        launch(
            tmp_path,
            [
                *prefix,
                "run.py",
                "-m",
                "decoder=kv_cache,spiffy_kv_cache",
                "graph.budget=3",
                "graph.n_samples=4",
                "task.limit=7",
                "eval.progress=false",
                "tracking=offline",
                f"tracking.dir={out}/wandb",
                f"results_dir={out}/results",
                f"graph.root={out}/graphs",
                f"hydra.sweep.dir={out}/multirun",
            ],
        )
    )
    rows = [json.loads(p.read_text()) for p in sorted((out / "results" / "default").glob("*.json"))]
    assert len(rows) == 2, [
        r["name"] for r in rows
    ]  # one row per job, whatever the number of processes
    runs = sorted((out / "wandb").glob("*/wandb/offline-run-*"))
    assert len(runs) == 2, runs  # one W&B run per job
    return sorted(rows, key=lambda r: r["config"]["decoder"]["name"])


def test_torchrun_run_py_matches_one_process(tmp_path):
    single = run_py_rows(tmp_path, "one", [sys.executable])
    double = run_py_rows(tmp_path, "two", torchrun(2))
    for one, two in zip(single, double, strict=True):
        assert one["name"] == two["name"]
        assert "world_size" not in one["env"] and one["metrics"]["world_size"] == 1
        assert two["env"]["world_size"] == 2 and two["metrics"]["world_size"] == 2
        assert two["env"]["devices"] == ["cpu", "cpu"] and len(two["env"]["device_names"]) == 2
        assert two["env"]["torch_threads"] == 1
        # 7 requests: rank 0 decodes 4, rank 1 decodes 3 and lm-eval pads it with a repeat, not recorded
        assert [r["request_id"] for r in two["requests"]] == [
            f"spiffy_arith:{i}:0" for i in range(7)
        ]
        drop = lambda r: {k: v for k, v in r.items() if k != "wall_s"}  # noqa: E731
        assert [drop(r) for r in two["requests"]] == [drop(r) for r in one["requests"]]
        same = {
            k: v for k, v in one["metrics"].items() if not is_wall_clock(k) and k != "world_size"
        }
        assert {k: two["metrics"][k] for k in same} == same
        assert set(two["metrics"]) == set(one["metrics"])
        if (
            one["graph"] is not None
        ):  # calibrated once, on rank 0, with the same result as one process
            graphs = [json.loads(row["graph"]) for row in (one, two)]
            assert [{k: v for k, v in g.items() if k != "provenance"} for g in graphs][0] == {
                k: v for k, v in graphs[1].items() if k != "provenance"
            }
    spiffy_row = double[1]
    assert spiffy_row["metrics"]["speedup_nfe"] > 1 and spiffy_row["metrics"]["agreement"] == 1.0


def test_lm_eval_under_accelerate_and_torchrun_matches_one_process(tmp_path):
    helper = "tests/helpers/lm_eval_records.py"
    ok(launch(tmp_path, [sys.executable, helper, str(tmp_path / "one.json"), MODEL_ARGS, "7"]))
    ok(launch(tmp_path, [*accelerate(2), helper, str(tmp_path / "two.json"), MODEL_ARGS, "7"]))
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["requests"] == one["requests"] and len(one["requests"]) == 7
    assert two["scores"] == one["scores"]
    assert all(r["agrees"] and r["nfe"] < r["base_nfe"] for r in one["requests"])
    # the lm-eval CLI itself, under torchrun: the same answers and scores, reported once
    done = ok(
        launch(
            tmp_path,
            [
                *torchrun(2),
                "scripts/lm_eval_cli.py",
                "--model",
                "spiffy",
                "--model_args",
                MODEL_ARGS,
                "--tasks",
                "spiffy_arith",
                "--limit",
                "7",
                "--log_samples",
                "--output_path",
                str(tmp_path / "cli"),
            ],
        )
    )
    assert done.stdout.count("|spiffy_arith|") == 1  # the table, printed by rank 0 only
    results = list((tmp_path / "cli").rglob("results_*.json"))
    samples = list((tmp_path / "cli").rglob("samples_spiffy_arith_*.jsonl"))
    assert len(results) == 1 and len(samples) == 1
    scores = json.loads(results[0].read_text())["results"]["spiffy_arith"]
    scored = {
        k: v for k, v in one["scores"].items() if "_stderr" not in k
    }  # the helper skips bootstrap
    assert {k: scores[k] for k in scored} == scored
    lines = [json.loads(line) for line in samples[0].read_text().splitlines()]
    filtered = {(s["doc_id"], s["filter"]): s["resps"][0][0] for s in lines}
    assert sorted({d for d, _ in filtered}) == list(range(7))
    assert [filtered[(i, "strict-match")] for i in range(7)] == [
        r["completion"] for r in one["requests"]
    ]


def test_a_failing_rank_fails_the_job_with_its_error(tmp_path):
    helper = "tests/helpers/lm_eval_records.py"
    done = launch(
        tmp_path,
        [*torchrun(2), helper, str(tmp_path / "x.json"), MODEL_ARGS, "4", "1"],
        timeout=600,
    )
    assert done.returncode != 0
    assert "RuntimeError: injected failure on rank 1" in done.stdout + done.stderr
    assert not (tmp_path / "x.json").exists()


def small_job(out: Path) -> list[str]:
    return [
        "task.limit=5",
        "decoder=kv_cache",
        "tracking=disabled",
        "eval.progress=false",
        f"results_dir={out}/results",
        f"graph.root={out}/graphs",
    ]


def one_row(out: Path) -> dict:
    rows = [json.loads(p.read_text()) for p in (out / "results" / "default").glob("*.json")]
    assert len(rows) == 1
    return rows[0]


def test_slurm_launchers_start_one_data_parallel_job(tmp_path):
    # Hydra's submitit launcher with 2 tasks per job (the local executor: the same submitit environment as SLURM's)
    out = tmp_path / "submitit"
    ok(
        launch(
            tmp_path,
            [
                sys.executable,
                "run.py",
                "-m",
                "hydra/launcher=submitit_local",
                "hydra.launcher.tasks_per_node=2",
                f"hydra.sweep.dir={out}/multirun",
                *small_job(out),
            ],
        )
    )
    row = one_row(out)
    assert row["env"]["world_size"] == 2 and row["metrics"]["n_requests"] == 5
    # scripts/slurm_torchrun.sbatch as two "nodes" of one process each on this machine (srun replaced by nothing)
    out = tmp_path / "sbatch"
    env = environment(tmp_path) | {
        "SRUN": "",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "test",
        "NPROC_PER_NODE": "1",
        "HEAD_NODE": "127.0.0.1",
        "HEAD_PORT": str(free_port()),
    }
    cmd = ["bash", "scripts/slurm_torchrun.sbatch", *small_job(out), f"hydra.run.dir={out}/hydra"]
    nodes = [
        subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    logs = [node.communicate(timeout=900)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    row = one_row(out)
    assert row["env"]["world_size"] == 2 and row["metrics"]["n_requests"] == 5
    assert [r["request_id"] for r in row["requests"]] == [f"spiffy_arith:{i}:0" for i in range(5)]
