"""Careless and hostile input fails before any model loads, in one line naming the key and the value (or the file).

Every job here replaces `pipeline.load` with a function that raises `_Loaded`: a check that passes lets the job get
that far, and a check that is missing shows up as `_Loaded` instead of the expected error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from spiffy.graph.draft_graph import DraftGraph
from spiffy.lab import pipeline
from spiffy.lab.pipeline import ConfigError
from spiffy.lab.schema import register_configs
from spiffy.lab.sweep import CONF_DIR, plan
from spiffy.models.loading import EMBEDDED_MODEL_DIR

REPO = Path(__file__).resolve().parents[2]
CONF = CONF_DIR
register_configs()


class _Loaded(Exception):
    """Raised instead of loading a model: the job got past every pre-load check."""


def _refuse_to_load(*args, **kwargs):
    raise _Loaded()


@pytest.fixture
def job(tmp_path, monkeypatch):
    """`job(*overrides)` runs `pipeline.run` up to the model load on a small arith job."""
    monkeypatch.setattr(pipeline, "load", _refuse_to_load)

    def run(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(
                config_name="config",
                overrides=[
                    "tracking=disabled",
                    "task.limit=2",
                    f"results_dir={tmp_path}/runs",
                    f"graph.root={tmp_path}/graphs",
                    *overrides,
                ],
            )
        return pipeline.run(cfg)

    return run


def test_the_small_job_itself_gets_to_the_model_load(job):
    with pytest.raises(_Loaded):
        job("decoder=spiffy", "graph=chain", "graph.budget=5")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["+decoder.temprature=0.9"],
            r"unknown config key decoder\.temprature \(did you mean decoder\.temperature\?\)",
        ),
        (["+decoder.foo=1"], r"unknown config key decoder\.foo"),
        (["+graph.budgett=5"], r"graph\.budgett \(did you mean graph\.budget\?\)"),
        (["+seeed=1"], r"unknown config key seeed \(did you mean seed\?\)"),
    ],
)
def test_keys_added_with_plus_must_exist_in_the_schema(job, overrides, match):
    with pytest.raises(ConfigError, match=match):
        job(*overrides)
    with pytest.raises(ValueError, match=match):  # the dry run lists no job for them either
        plan(["decoder=vanilla", *overrides])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["decoder.temperature=inf"],
            re.escape("decoder.temperature=inf: must be a finite number >= 0"),
        ),
        (
            ["decoder.temperature=nan"],
            re.escape("decoder.temperature=nan: must be a finite number >= 0"),
        ),
        (["task.num_fewshot=-1"], re.escape("task.num_fewshot=-1 must be >= 0")),
        (["seed=-1"], re.escape("seed=-1 must be an integer in [0, 2**32)")),
        (
            ["decoder.draft_noise=bogus"],
            re.escape("decoder.draft_noise='bogus' must be one of ['none', 'keyed']"),
        ),
        (["graph.budget=3", "graph.prune=-1"], re.escape("graph.prune=-1 must be >= 1 or null")),
        (
            ["graph.budget=3", "graph.prune=5"],
            re.escape("graph.prune=5 keeps more nodes than graph.budget=3"),
        ),
        (
            ["task.lm_eval_task=no_such_task"],
            re.escape("task.lm_eval_task='no_such_task' is not a task"),
        ),
        (
            ["task.calibration_task=bogus"],
            re.escape("task.calibration_task='bogus' has no calibration prompts"),
        ),
        (["model.device=banana"], re.escape("model.device='banana' is not a torch device")),
        (
            ["model.device=cuda:7"],
            re.escape("model.device='cuda:7': this machine has 0 CUDA device"),
        ),
        # arith: 4 blocks of 8 positions, 8 steps each
        (
            ["graph=chain", "graph.budget=40"],
            re.escape(
                "chain:D drafts D steps ahead, and a block's steps number 8: the maximum is graph.budget=8"
            ),
        ),
        (["graph=chain", "graph.budget=100000"], re.escape("the maximum is graph.budget=8")),
        (
            ["graph.rule=greedy", "graph.budget=100000"],
            r"calibration records at most 5120 distinct draft states here \(graph.n_samples=20 prompts x 4 blocks x 8 steps x 8 later states\): the maximum is graph.budget=5120",
        ),
        (
            ["decoder.stop_ids=[999999]"],
            r"decoder.stop_ids=\[999999\]: \[999999\] outside the vocabulary of 'embedded' \(vocab_size=100",
        ),
        (
            ["task.gen_length=100000"],
            r"has max_length=512 .* task.gen_length=100000 plus its shortest prompt",
        ),
        (["task=gsm8k"], r"model 'embedded' has max_length=512 .* cannot hold task 'gsm8k'"),
        (
            ["graph.budget=10", "graph.rule=greedy", "eval.max_verify_gib=0.0001"],
            r"graph.budget=10: one verification forward of 11 rows needs an estimated .* GiB, over eval.max_verify_gib=0.0001: the maximum is graph.budget=\d+",
        ),
    ],
)
def test_bad_values_fail_before_the_model_loads_naming_key_and_value(job, overrides, message):
    with pytest.raises(ConfigError) as caught:
        job(*overrides)
    text = str(caught.value)
    assert "\n" not in text and re.search(message, text), text


def test_chain_with_cross_block_may_reach_into_later_blocks(job):
    overrides = ["decoder=spiffy", "decoder.cross_block=true", "graph=chain"]
    with pytest.raises(_Loaded):
        job(*overrides, "graph.budget=9")
    with pytest.raises(
        ConfigError, match="the job's steps .cross-block. number 32: the maximum is graph.budget=32"
    ):
        job(*overrides, "graph.budget=33")


def _graph_file(tmp_path: Path, name: str, content: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _graph_json(nodes, budget=None) -> str:
    payload = {
        "format": "spiffy.draft_graph",
        "version": 1,
        "budget": budget or len(nodes),
        "nodes": nodes,
        "parents": [[-1]] + [[n - 1] for n in range(1, len(nodes))],
    }
    return json.dumps(payload)


@pytest.mark.parametrize(
    ("name", "content", "budget", "match"),
    [
        ("missing.json", None, 2, "does not exist"),
        ("corrupt.json", b"\x89PNG\x00\xff", 2, "not UTF-8 text"),
        ("empty.json", "", 2, "not valid JSON"),
        (
            "wrong_budget.json",
            _graph_json([[[1, 1]], [[1, 1], [2, 1]]]),
            3,
            "holds a graph of budget 2",
        ),
        (
            "beyond_block.json",
            _graph_json([[[9, 1]]]),
            1,
            r"position rank 9, but a block has 8 positions",
        ),
        (
            "token_rank.json",
            _graph_json([[[1, 1000000]]]),
            1,
            r"token rank 1000000, but the vocabulary has 100 tokens",
        ),
        ("fractional.json", _graph_json([[[1.7, 1]]]), 1, r"rank 1.7 is not an integer"),
    ],
)
def test_graph_files_are_checked_before_the_model_loads(
    job, tmp_path, name, content, budget, match
):
    path = str(tmp_path / name) if content is None else _graph_file(tmp_path, name, content)
    overrides = [
        "decoder=spiffy",
        "graph.source=file",
        f"graph.path={path}",
        f"graph.budget={budget}",
    ]
    with pytest.raises(ConfigError, match=match) as caught:
        job(*overrides)
    assert name in str(caught.value)


def test_an_oversized_graph_file_fails_fast_naming_the_cap(job, tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "wb") as f:
        f.truncate(118 << 20)  # sparse: 118 MB of size, no time to write
    overrides = ["decoder=spiffy", "graph.source=file", f"graph.path={path}", "graph.budget=3"]
    with pytest.raises(
        ConfigError, match=r"huge.json'?: 123731968 bytes, over the 16777216-byte cap"
    ):
        job(*overrides)


def test_a_valid_graph_file_gets_to_the_model_load(job, tmp_path):
    path = tmp_path / "ok.json"
    DraftGraph.from_formulas([[(1, 1)], [(1, 1), (2, 1)]]).save(path)
    with pytest.raises(_Loaded):
        job("decoder=spiffy", "graph.source=file", f"graph.path={path}", "graph.budget=2")


@pytest.mark.parametrize(
    ("target", "damage", "match"),
    [
        (
            "config.json",
            b'{"model_type": "llada", ',
            r"model config file '.*/config.json' is not valid JSON",
        ),
        (
            "model.safetensors",
            b"garbage" * 3,
            r"model weights '.*/model.safetensors': not a safetensors file",
        ),
    ],
)
def test_a_broken_checkpoint_names_the_file(job, tmp_path, target, damage, match):
    model_dir = tmp_path / "model"
    shutil.copytree(EMBEDDED_MODEL_DIR, model_dir)
    (model_dir / target).write_bytes(damage)
    with pytest.raises(ConfigError, match=match):
        job(f"model.path={model_dir}")


def test_a_truncated_safetensors_file_names_the_file(job, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(EMBEDDED_MODEL_DIR, model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ConfigError, match=r"model.safetensors': truncated"):
        job(f"model.path={model_dir}")


def test_an_unwritable_result_store_fails_before_the_model_loads(job, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    with pytest.raises(ConfigError, match="is not writable"):
        job(f"results_dir={blocker}/runs")


def _run_py(*overrides: str, full_error: bool = False) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
    }
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run(
        [sys.executable, "run.py", "tracking=disabled", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_run_py_prints_a_user_error_as_one_line_and_the_traceback_on_request():
    done = _run_py("decoder.temperature=inf")
    assert done.returncode == 2
    assert done.stderr == "spiffy: decoder.temperature=inf: must be a finite number >= 0\n"
    full = _run_py("decoder.temperature=inf", full_error=True)
    assert full.returncode != 0 and "Traceback" in full.stderr
    assert "decoder.temperature=inf: must be a finite number >= 0" in full.stderr
