"""Generated code runs only with explicit opt-in, and then isolated: each attack below must not reach the host.

Every attack program exits 0 when its attack worked, and the test checks the host side too (the victim file, the
process table). Victims live in a world-writable folder outside /tmp, so that only the sandbox's isolation (not
file permissions, not the private /tmp) protects them: run unisolated, every attack test here fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from spiffy.eval import sandbox
from spiffy.eval.sandbox import Limits, run_program
from spiffy.eval.tasks.spiffy_tasks import humaneval_pass_at_1, load_humaneval
from spiffy.lab.pipeline import TASKS_DIR
from spiffy.lab.schema import register_configs

CONF = Path(__file__).resolve().parents[2] / "conf"
FAST = Limits(timeout_s=5.0)


@pytest.fixture(scope="module", autouse=True)
def _isolation_works():
    problem = sandbox.isolation_problem()
    assert problem is None, f"isolated execution must work where the tests run: {problem}"


@pytest.fixture
def victim_dir():
    """A world-writable folder outside /tmp with a world-writable file in it."""
    parent = "/var/tmp" if os.path.isdir("/var/tmp") else None
    folder = Path(tempfile.mkdtemp(prefix="spiffy-victim-", dir=parent))
    folder.chmod(0o777)
    victim = folder / "victim.txt"
    victim.write_text("precious")
    victim.chmod(0o666)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_ctypes_and_os_cannot_delete_a_file_outside(victim_dir):
    victim = victim_dir / "victim.txt"
    program = f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
if libc.unlink({str(victim).encode()!r}) != 0:
    os.remove({str(victim)!r})
"""
    outcome = run_program(program, FAST)
    assert not outcome.passed and "Read-only file system" in outcome.stderr
    assert victim.read_text() == "precious"


def test_cannot_truncate_or_overwrite_a_file_outside(victim_dir):
    victim = victim_dir / "victim.txt"
    for attack in (
        f"import ctypes\nassert ctypes.CDLL(None).truncate({str(victim).encode()!r}, 0) == 0\n",
        f"open({str(victim)!r}, 'w').write('overwritten')\n",
        f"open({str(victim)!r}, 'r+').truncate(0)\n",
    ):
        outcome = run_program(attack, FAST)
        assert not outcome.passed, attack
        assert victim.read_text() == "precious", attack


def test_writes_outside_the_temporary_directory_never_reach_the_host(victim_dir):
    name = f"spiffy-escape-{uuid.uuid4().hex}"
    program = f"""
open("/tmp/{name}", "w").write("x")             # the private /tmp: allowed, and gone afterwards
open("{victim_dir}/{name}", "w").write("x")     # outside: must fail
"""
    try:
        outcome = run_program(program, FAST)
        assert not outcome.passed and "Read-only file system" in outcome.stderr
        assert not (victim_dir / name).exists() and not Path("/tmp", name).exists()
    finally:
        Path("/tmp", name).unlink(missing_ok=True)


def _processes_with(marker: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def test_no_process_outlives_scoring():
    marker = f"spiffy-survivor-{uuid.uuid4().hex}"
    program = f"""
import subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "{marker}"],
                 start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)   # a daemon in its own session, not in the sandbox's group
"""
    try:
        outcome = run_program(program, FAST)
        assert outcome.passed, outcome.stderr  # the program itself did nothing wrong
        time.sleep(0.2)
        assert _processes_with(marker) == []
    finally:
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_process_count_is_limited():
    """A bounded fork bomb: 200 sleeping children; the limit is 16."""
    program = """
import os, time
for _ in range(200):
    if os.fork() == 0:
        time.sleep(2)
        os._exit(0)
"""
    outcome = run_program(program, Limits(timeout_s=5.0, processes=16))
    assert not outcome.passed and "BlockingIOError" in outcome.stderr


def test_memory_is_limited():
    hog = run_program("b = bytearray(1 << 30)\n", Limits(timeout_s=5.0, memory_bytes=256 << 20))
    assert not hog.passed and "MemoryError" in hog.stderr


def test_file_size_is_limited():
    program = "open('big', 'wb').write(bytes(8 << 20))\n"  # 8 MiB: fits the 64 MiB private /tmp
    outcome = run_program(program, Limits(timeout_s=5.0, file_bytes=1 << 20))
    assert not outcome.passed and outcome.returncode != 0


def test_a_long_loop_is_killed_at_the_timeout():
    program = "import time\nt = time.time()\nwhile time.time() - t < 20:\n    pass\n"
    start = time.perf_counter()
    outcome = run_program(program, Limits(timeout_s=1.0))
    assert outcome.status == "timed out" and time.perf_counter() - start < 5


def test_environment_is_scrubbed_and_the_temporary_directory_is_its_own(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "secret")
    program = """
import os
assert "WANDB_API_KEY" not in os.environ and os.environ["TMPDIR"] == os.getcwd()
assert os.listdir(".") == ["main.py"]
open("scratch", "w").write("x")
"""
    outcome = run_program(program, FAST)
    assert outcome.passed, outcome.stderr


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


def test_metric_refuses_unisolated_execution_unless_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation_problem", lambda: "no namespaces here")
    monkeypatch.delenv(sandbox.UNISOLATED_ENV, raising=False)
    with pytest.raises(RuntimeError, match="allow_unisolated_execution"):
        humaneval_pass_at_1([], [])
    monkeypatch.setenv(sandbox.UNISOLATED_ENV, "1")
    assert sandbox.isolated_or_refuse() is False


def _humaneval_cfg(tmp_path, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[
                "task=humaneval",
                "tracking=disabled",
                f"results_dir={tmp_path}",
                *overrides,
            ],
        )


class _Loaded(Exception):
    """Raised instead of loading a model: the job got past every pre-load check."""


def test_humaneval_job_needs_the_opt_in_before_any_model_loads(tmp_path, monkeypatch):
    from spiffy.lab import pipeline

    monkeypatch.setattr(pipeline, "load", lambda cfg, *_: (_ for _ in ()).throw(_Loaded()))
    with pytest.raises(ValueError, match=r"task\.allow_code_execution=true to run each completion"):
        pipeline.run(_humaneval_cfg(tmp_path))
    with pytest.raises(_Loaded):
        pipeline.run(_humaneval_cfg(tmp_path, "task.allow_code_execution=true"))
    monkeypatch.setattr(sandbox, "isolation_problem", lambda: "no namespaces here")
    with pytest.raises(ValueError, match=r"task\.allow_unisolated_execution=true"):
        pipeline.run(_humaneval_cfg(tmp_path, "task.allow_code_execution=true"))
    with pytest.raises(_Loaded):
        pipeline.run(
            _humaneval_cfg(
                tmp_path, "task.allow_code_execution=true", "task.allow_unisolated_execution=true"
            )
        )
    assert os.environ.pop(sandbox.UNISOLATED_ENV) == "1"


def test_unisolated_opt_in_alone_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="allow_unisolated_execution=true needs"):
        OmegaConf.to_object(_humaneval_cfg(tmp_path, "task.allow_unisolated_execution=true"))


def test_only_humaneval_is_marked_as_executing_code():
    assert sandbox.task_executes_code("spiffy_humaneval", TASKS_DIR)
    assert not sandbox.task_executes_code("spiffy_gsm8k", TASKS_DIR)
    assert not sandbox.task_executes_code("spiffy_arith", TASKS_DIR)
