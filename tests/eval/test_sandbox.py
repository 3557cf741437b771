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
from spiffy.lab.sweep import CONF_DIR

CONF = CONF_DIR
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


def _escape_in_new_session(marker: str, *, close_stdio: bool) -> str:
    """A program that leaves the sandbox's session and process group, then sleeps with `marker` in its argv."""
    close = "for fd in (0, 1, 2):\n    os.close(fd)\n" if close_stdio else ""
    sleep = f"[sys.executable, '-c', 'import time; time.sleep(40)', '{marker}']"
    return f"import os, sys\nos.setsid()\n{close}os.execv(sys.executable, {sleep})\n"


@pytest.mark.parametrize("close_stdio", [False, True])
def test_a_program_that_leaves_the_process_group_is_killed_at_the_timeout(close_stdio):
    """setsid() escapes a process-group kill, and as root setpriv's uid change clears the parent-death signal:
    the sandbox must still end at its timeout, and nothing it started may survive it."""
    marker = f"spiffy-setsid-{uuid.uuid4().hex}"
    start = time.perf_counter()
    try:
        outcome = run_program(
            _escape_in_new_session(marker, close_stdio=close_stdio), Limits(timeout_s=2.0)
        )
        elapsed = time.perf_counter() - start
        assert outcome.status == "timed out" and elapsed < 8, (outcome, elapsed)
        time.sleep(0.2)
        assert _processes_with(marker) == []
    finally:
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)


NON_ROOT_CHECK = """
import os, sys, time, uuid
from spiffy.eval.sandbox import Limits, run_program
assert os.geteuid() != 0
marker = "spiffy-nonroot-" + uuid.uuid4().hex
start = time.perf_counter()
program = ("import os, sys\\nos.setsid()\\nos.close(1)\\nos.close(2)\\n"
           f"os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(40)', '{marker}'])\\n")
outcome = run_program(program, Limits(timeout_s=2.0))
elapsed = time.perf_counter() - start
time.sleep(0.2)
left = []
for p in os.listdir("/proc"):
    try:
        if p.isdigit() and marker.encode() in open(f"/proc/{p}/cmdline", "rb").read():
            left.append(p)
    except OSError:
        pass
print(outcome.status, round(elapsed, 1), len(left), outcome.stderr[-300:])
assert outcome.status == "timed out" and elapsed < 8 and not left
hog = run_program(sys.argv[1].format(n=3), Limits(timeout_s=10.0, memory_bytes=160 << 20))  # the watchdog
print(hog)
assert not hog.passed and "used more than 167772160 bytes" in hog.stderr
"""


def test_the_timeout_kill_holds_for_a_non_root_user():
    """The same escape and the total-memory cap (no cgroup for nobody: the watchdog), with the evaluation
    itself running as `nobody` (a user namespace instead of setpriv).

    This test's interpreter lives where `nobody` may not read it (a pyenv under /root), so the check runs on the
    system Python with a copy of the two sandbox modules, which need only the standard library."""
    import subprocess

    setpriv = shutil.which("setpriv")
    python = shutil.which("python3", path="/usr/bin:/bin")
    assert os.geteuid() == 0 and setpriv, (
        "the test switches to nobody, so it runs as root (as CI does)"
    )
    assert python, "a system python3 in /usr/bin or /bin runs the non-root check"
    package = Path(tempfile.mkdtemp(prefix="spiffy-nonroot-", dir="/tmp"))
    try:
        (package / "spiffy" / "eval").mkdir(parents=True)
        (package / "spiffy" / "__init__.py").write_text("")
        (package / "spiffy" / "eval" / "__init__.py").write_text("")
        for module in ("sandbox.py", "supervise.py"):
            shutil.copy(
                Path(sandbox.__file__).with_name(module), package / "spiffy" / "eval" / module
            )
        for path in [package, *package.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        done = subprocess.run(
            [
                setpriv,
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                python,
                "-c",
                NON_ROOT_CHECK,
                TOUCH_IN_CHILDREN,
            ],
            capture_output=True,
            text=True,
            cwd="/",
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(package), "HOME": "/tmp"},
        )
    finally:
        shutil.rmtree(package, ignore_errors=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_captured_output_is_capped():
    program = "import sys\nfor _ in range(64):\n    sys.stdout.write('x' * (1 << 20))\nsys.stderr.write('e' * (1 << 20))\n"
    outcome = run_program(program, Limits(timeout_s=10.0, output_bytes=1 << 16))
    assert outcome.passed, outcome.stderr[-300:]
    assert outcome.stdout.startswith("x" * (1 << 16)) and len(outcome.stdout) < (1 << 16) + 200
    assert "more bytes dropped: output is capped at 65536" in outcome.stdout
    assert outcome.stderr.startswith("e" * (1 << 16) + "\n[sandbox: 983040 more bytes dropped")


TOUCH_IN_CHILDREN = """
import os, time
pids = []
for _ in range({n}):
    pid = os.fork()
    if pid == 0:
        block = b"x" * (96 << 20)  # written, so resident
        time.sleep(1.5)
        os._exit(0)
    pids.append(pid)
for pid in pids:
    assert os.waitpid(pid, 0)[1] == 0, "a child died"
"""


def test_memory_is_limited_in_total_not_per_process():
    """Three children of 96 MiB each fit a 160 MiB limit per process but not 160 MiB in total."""
    limits = Limits(timeout_s=10.0, memory_bytes=160 << 20)
    assert run_program(TOUCH_IN_CHILDREN.format(n=1), limits).passed
    outcome = run_program(TOUCH_IN_CHILDREN.format(n=3), limits)
    assert not outcome.passed and "used more than 167772160 bytes" in outcome.stderr, outcome


@pytest.mark.parametrize(
    "exit_early", ["import sys\n    sys.exit(0)\n", "import os\n    os._exit(0)\n"]
)
def test_a_completion_that_exits_before_the_tests_does_not_pass(exit_early):
    problems = load_humaneval()["test"].select(range(2))
    refs = [
        json.dumps({k: p[k] for k in ("task_id", "prompt", "test", "entry_point")})
        for p in problems
    ]
    assert humaneval_pass_at_1(refs, [[p["prompt"] + "    " + exit_early] for p in problems]) == 0.0
