"""Run untrusted generated programs (HumanEval completions) in an isolated, resource-limited child process.

Isolated mode (the default; util-linux `unshare` and `setpriv`, present on every mainstream Linux):
- a private mount namespace in which **every mount is remounted read-only**, with a fresh size-capped tmpfs on
  `/tmp` as the program's only writable place (its temporary directory is `/tmp/work`; the host's `/tmp` is
  hidden);
- a private PID namespace (the program is its init: when it exits, or is killed, the kernel kills every process
  it started, including daemonised ones), an empty network namespace (no network), private IPC and UTS;
- no privileges: run as root, the program runs as `nobody` (uid 65534); otherwise as the invoking user inside a
  user namespace. Either way all capabilities are dropped (bounding set included) and `no_new_privs` is set,
  so the program cannot undo the read-only mounts;
- resource limits (`resource.setrlimit`): CPU seconds, address space, file size, open files, no core files, and a
  process count (applied inside the namespace, where it counts only the sandbox's processes);
- one memory cap for the program and everything it starts (a cgroup, else a watchdog), stdout and stderr
  captured up to a byte cap, a scrubbed environment, and the whole sandbox killed after the wall-clock timeout
  by the pid of the namespace's init (`spiffy.eval.supervise`).

Unisolated mode (only when explicitly allowed) keeps the limits, the scrubbed environment, the temporary directory
and the process-group kill, but the program can read and write every file the user can, use the network and leave
daemonised processes behind. `README.md` says what remains unsafe in either mode.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from spiffy.eval.supervise import MemoryCap, join_cgroup, kill_tree, supervise

# "1" lets the HumanEval metric run code without isolation (task.allow_unisolated_execution)
UNISOLATED_ENV = "SPIFFY_ALLOW_UNISOLATED_EXECUTION"
SANDBOX_UID = 65534  # `nobody`: the program's user when spiffy runs as root
SETUP_FAILED = 125  # exit status of the in-namespace setup when it cannot isolate


@dataclass(frozen=True)
class Limits:
    """Resource limits of one program run."""

    timeout_s: float = 10.0  # wall clock; then the whole sandbox is killed
    cpu_s: int = 10  # RLIMIT_CPU per process
    memory_bytes: int = (
        2 << 30
    )  # total resident memory of all its processes; also RLIMIT_AS of each
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE
    processes: int = 32  # RLIMIT_NPROC (sandbox processes)
    open_files: int = 64  # RLIMIT_NOFILE
    tmp_bytes: int = 64 << 20  # size of the private /tmp (isolated mode)
    output_bytes: int = 1 << 20  # stdout and stderr are each kept up to this many bytes

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"Limits.{name}={value!r} must be > 0")


@dataclass(frozen=True)
class Outcome:
    """What happened to one program: `passed` (exit 0), `failed`, or `timed out`."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# Runs inside the new namespaces as (namespace) root, then replaces itself with the unprivileged program.
_SETUP = r"""
import json, os, resource, subprocess, sys
cfg = json.loads(sys.argv[1])

def die(message):
    sys.stderr.write("sandbox setup: " + message + "\n")
    os._exit(125)

def mount(*args):
    done = subprocess.run([cfg["mount"], *args], capture_output=True, text=True)
    if done.returncode:
        die("mount " + " ".join(args) + ": " + done.stderr.strip())

def unescape(path):  # /proc/self/mountinfo escapes space, tab, newline and backslash as octal
    return path.encode().decode("unicode_escape").encode("latin-1").decode()

points = []
with open("/proc/self/mountinfo") as f:
    for line in f:
        fields = line.split()
        if "ro" not in fields[5].split(","):
            points.append(unescape(fields[4]))
for point in dict.fromkeys(points):
    mount("-o", "remount,bind,ro", point)
mount("-t", "tmpfs", "-o", "size=%d,mode=1777,nosuid,nodev" % cfg["tmp_bytes"], "spiffy-sandbox", "/tmp")
os.mkdir("/tmp/.python")
mount("--bind", cfg["prefix"], "/tmp/.python")
mount("-o", "remount,bind,ro", "/tmp/.python")
os.mkdir("/tmp/work", 0o777)
os.chmod("/tmp/work", 0o777)
with open("/tmp/work/main.py", "w") as f:
    f.write(sys.stdin.read())
os.chdir("/tmp/work")
resource.setrlimit(resource.RLIMIT_NPROC, (cfg["processes"], cfg["processes"]))
os.environ["LD_LIBRARY_PATH"] = "/tmp/.python/lib"
os.execv(cfg["setpriv"], [cfg["setpriv"], *cfg["identity"], "--no-new-privs", "--inh-caps=-all",
         "--ambient-caps=-all", "--bounding-set=-all", "--", cfg["python"], "-I", "-S", "main.py"])
"""


def _interpreter() -> tuple[str, str]:
    """The base interpreter (stdlib only; not the venv) as (prefix, path relative to it)."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if os.path.commonpath([exe, prefix]) != prefix:
        raise RuntimeError(f"the interpreter {exe} is not under sys.base_prefix={prefix}")
    return prefix, os.path.relpath(exe, prefix)


def _tools() -> dict[str, str]:
    tools = {
        name: shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
        for name in ("unshare", "setpriv", "mount")
    }
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        raise FileNotFoundError(
            f"{', '.join(missing)} not found (util-linux); isolated execution needs them"
        )
    return tools


def _environment(home: str) -> dict[str, str]:
    """The only variables the program sees: no tokens, keys or proxies of the caller."""
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": home,
        "TMPDIR": home,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
    }


def _limit(limits: Limits, processes: int | None, cgroup_procs: str | None) -> None:
    """preexec: the memory cgroup and the rlimits of the child (inherited by everything it starts)."""
    join_cgroup(cgroup_procs)
    cpu = limits.cpu_s
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if processes is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))


def _user_processes() -> int:
    """Processes whose real uid is ours: RLIMIT_NPROC outside a namespace counts all of them."""
    uid, count = os.getuid(), 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            uid_line = next(x for x in status.read_text().splitlines() if x.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        count += int(uid_line.split()[1]) == uid
    return count


def _isolated_command(limits: Limits) -> list[str]:
    tools = _tools()
    prefix, relative = _interpreter()
    root = os.geteuid() == 0
    identity = (
        [f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups"] if root else []
    )
    setup_cfg = {
        "mount": tools["mount"],
        "setpriv": tools["setpriv"],
        "prefix": prefix,
        "python": f"/tmp/.python/{relative}",
        "identity": identity,
        "processes": limits.processes,
        "tmp_bytes": limits.tmp_bytes,
    }
    namespaces = [
        "--mount",
        "--pid",
        "--fork",
        "--mount-proc",
        "--net",
        "--ipc",
        "--uts",
        "--kill-child",
    ]
    if not root:
        namespaces = ["--user", "--map-root-user", *namespaces]
    return [
        tools["unshare"],
        *namespaces,
        "--",
        os.path.join(prefix, relative),
        "-I",
        "-S",
        "-c",
        _SETUP,
        json.dumps(setup_cfg),
    ]


def run_program(source: str, limits: Limits = Limits(), *, isolated: bool = True) -> Outcome:
    """Run the Python program `source`; it passes when it exits with status 0 within the limits."""
    work = tempfile.mkdtemp(prefix="spiffy-sandbox-")
    memory = MemoryCap(limits.memory_bytes)
    try:
        if isolated:
            cmd, stdin, cwd, processes = _isolated_command(limits), source, "/", None
            env = _environment("/tmp/work")
        else:
            Path(work, "main.py").write_text(source)
            os.chmod(work, 0o755)
            prefix, relative = _interpreter()
            cmd, stdin, cwd = [os.path.join(prefix, relative), "-I", "-S", "main.py"], "", work
            # outside a namespace the count covers all of the user's processes (root: not enforced)
            processes = _user_processes() + limits.processes
            env = _environment(work)
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=functools.partial(_limit, limits, processes, memory.procs_file),
        )
        try:
            run = supervise(
                proc,
                stdin.encode(),
                timeout_s=limits.timeout_s,
                output_bytes=limits.output_bytes,
                memory=memory,
            )
        except BaseException:
            kill_tree(proc.pid)
            proc.wait()
            raise
        stderr = run.stderr
        if run.out_of_memory:
            stderr += (
                f"\n[sandbox: killed: the processes used more than {limits.memory_bytes} bytes]"
            )
        status = "timed out" if run.timed_out else "passed" if run.returncode == 0 else "failed"
        if run.out_of_memory:
            status = "failed"
        return Outcome(status, run.returncode, run.stdout, stderr)
    finally:
        memory.remove()
        shutil.rmtree(work, ignore_errors=True)


# Checks, without side effects, that the namespaces took hold; exits non-zero naming the first that did not.
_PROBE = """
import os
checks = {
    "the root filesystem is read-only": os.statvfs("/").f_flag & os.ST_RDONLY,
    "the working directory is writable": not os.statvfs(".").f_flag & os.ST_RDONLY,
    "the program is alone in its PID namespace": os.getpid() == 1,
    "no network interface but lo": [line.split(":")[0].strip()
                                    for line in open("/proc/net/dev").readlines()[2:]] in ([], ["lo"]),
    "no capabilities": all(line.split()[1] == "0" * 16 for line in open("/proc/self/status")
                           if line.split(":")[0] in ("CapEff", "CapPrm", "CapBnd")),
}
failed = [name for name, ok in checks.items() if not ok]
if failed:
    raise SystemExit("isolation check failed: " + ", ".join(failed))
"""


@functools.lru_cache(maxsize=1)
def isolation_problem() -> str | None:
    """Why isolated execution does not work on this machine (None when it does); probed once."""
    probe = _PROBE
    try:
        outcome = run_program(probe, Limits(timeout_s=30))
    except (OSError, RuntimeError) as exc:
        return str(exc)
    if not outcome.passed:
        return f"the probe exited with {outcome.returncode} ({outcome.status}): {outcome.stderr.strip()[-500:]}"
    return None


def isolated_or_refuse() -> bool:
    """True when isolation works; False only where unisolated execution was explicitly allowed; else raise."""
    problem = isolation_problem()
    if problem is None:
        return True
    if os.environ.get(UNISOLATED_ENV) == "1":
        return False
    raise RuntimeError(
        f"isolated code execution does not work on this machine ({problem}). Generated code would run with "
        "your user's full access to files, network and processes. To accept that, set "
        f"task.allow_unisolated_execution=true (run.py) or {UNISOLATED_ENV}=1 (the lm-eval CLI)"
    )


def task_specs(tasks_dir: Path) -> dict[str, dict]:
    """The lm-eval task YAMLs in `tasks_dir` by task name (`!function` tags left unresolved)."""
    import yaml

    class Loader(yaml.SafeLoader):  # lm-eval's `!function` tags are irrelevant here
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    specs = {}
    for path in sorted(Path(tasks_dir).glob("*.yaml")):
        spec = yaml.load(path.read_text(), Loader=Loader) or {}
        if isinstance(spec, dict) and isinstance(spec.get("task"), str):
            specs[spec["task"]] = spec
    return specs


def task_executes_code(task: str, tasks_dir: Path) -> bool:
    """Whether the lm-eval task named `task` in `tasks_dir` runs generated code (`unsafe_code: true`)."""
    return bool(task_specs(tasks_dir).get(task, {}).get("unsafe_code", False))


def check_consent(task: str, tasks_dir: Path, *, allow: bool, allow_unisolated: bool) -> None:
    """Refuse a code-executing task without the explicit opt-in, before any model loads (ValueError)."""
    if not task_executes_code(task, tasks_dir):
        return
    if not allow:
        raise ValueError(
            f"task.lm_eval_task={task!r} scores completions by executing the generated code, and "
            "task.allow_code_execution=false. Set task.allow_code_execution=true to run each completion in a "
            "child process with a read-only filesystem, no network, a private /tmp, no privileges and "
            "CPU/memory/file/process limits (spiffy/eval/sandbox.py; README: 'Running generated code')"
        )
    problem = isolation_problem()
    if problem is not None and not allow_unisolated:
        raise ValueError(
            f"task.allow_code_execution=true but isolated execution does not work here ({problem}). "
            "Set task.allow_unisolated_execution=true as well to run generated code with only resource limits "
            "and a temporary directory: it can then read, change and delete your files and use the network"
        )
    if allow_unisolated:
        os.environ[UNISOLATED_ENV] = "1"
    else:
        os.environ.pop(UNISOLATED_ENV, None)
