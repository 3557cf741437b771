"""Supervise one sandboxed child process: capped output capture, a total-memory cap and a kill that reaches all.

`spiffy.eval.sandbox` starts the child; this module watches it until it ends or its wall-clock deadline passes:
- output: stdout and stderr are read as they come and kept up to a byte cap each; the rest is drained and
  counted, never held in memory;
- memory: the child and everything it starts share one cap, a memory cgroup (v1 or v2) when this process may
  create one (root, or a delegated cgroup), else a watchdog that sums the resident memory of the child's
  process tree every few milliseconds and kills the tree when it goes over (best effort: a burst between two
  samples can overshoot briefly);
- kill: every descendant of the child is killed by pid, first the direct children. In isolated mode the
  direct child of `unshare` is the PID namespace's init, and its death makes the kernel kill every process in
  the namespace, whatever its session, process group or uid (the parent-death signal `unshare --kill-child`
  arms does not survive `setpriv`'s uid change, and a program may leave the process group with `setsid`).
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

WATCH_INTERVAL_S = 0.02  # memory watchdog sampling period (fallback without a cgroup)
KILL_GRACE_S = 2.0  # after the kill, how long to wait for the pipes to close


def _parents() -> dict[int, int]:
    """pid -> parent pid of every visible process."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # field 2 (the command name) may hold spaces and parentheses: the fields after it follow the last ')'
        table[int(stat.parent.name)] = int(text[text.rfind(")") + 2 :].split()[1])
    return table


def descendants(pid: int) -> list[int]:
    """The processes below `pid`, nearest first."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, frontier = [], [pid]
    while frontier:
        level = [c for p in frontier for c in children.get(p, [])]
        found += level
        frontier = level
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL every descendant of `pid` (nearest first), then `pid`'s process group and `pid` itself."""
    for _ in range(3):  # a process may fork between the listing and the kill
        found = descendants(pid)
        if not found:
            break
        for victim in found:
            try:
                os.kill(victim, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for kill, target in ((os.killpg, pid), (os.kill, pid)):
        try:
            kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _resident_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(("VmRSS:", "VmSwap:")):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


class MemoryCap:
    """One memory limit for a child and everything it starts: a cgroup where possible, else a watchdog."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.cgroup: Path | None = None
        self.version = 0
        for version, path in _own_cgroups():
            try:
                self.cgroup = _make_cgroup(version, path, limit_bytes)
                self.version = version
                break
            except OSError:
                continue

    @property
    def procs_file(self) -> str | None:
        """The file the child writes its pid to (in its preexec hook) to join the cgroup."""
        return None if self.cgroup is None else str(self.cgroup / "cgroup.procs")

    def over(self, root_pid: int) -> bool:
        """Watchdog mode: whether the process tree of `root_pid` holds more than the limit."""
        if self.cgroup is not None:
            return False
        return _resident_bytes([root_pid, *descendants(root_pid)]) > self.limit_bytes

    def hit(self) -> bool:
        """Cgroup mode: whether the kernel killed a process of the cgroup for memory."""
        if self.cgroup is None:
            return False
        events = self.cgroup / ("memory.events" if self.version == 2 else "memory.oom_control")
        try:
            for line in events.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False

    def remove(self) -> None:
        if self.cgroup is None:
            return
        for _ in range(50):  # the last processes may still be exiting
            try:
                self.cgroup.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)


def _own_cgroups() -> list[tuple[int, Path]]:
    """(version, folder) of this process's memory cgroups that could hold a child cgroup."""
    found = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if "memory" in controllers.split(","):
            found.append((1, Path("/sys/fs/cgroup/memory", rel)))
        elif controllers == "":
            for mount in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
                if Path(mount, "cgroup.controllers").exists():
                    found.append((2, Path(mount, rel)))
                    break
    return found


def _make_cgroup(version: int, parent: Path, limit_bytes: int) -> Path:
    if version == 2 and "memory" not in (parent / "cgroup.subtree_control").read_text().split():
        raise OSError(f"{parent}: the memory controller is not delegated")
    group = parent / f"spiffy-sandbox-{uuid.uuid4().hex[:12]}"
    group.mkdir()
    try:
        if version == 2:
            (group / "memory.max").write_text(str(limit_bytes))
            swap = group / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
        else:
            (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
            swap = (
                group / "memory.memsw.limit_in_bytes"
            )  # memory + swap, where swap accounting is on
            if swap.exists():
                swap.write_text(str(limit_bytes))
    except OSError:
        group.rmdir()
        raise
    return group


def join_cgroup(procs_file: str | None) -> None:
    """preexec hook: move the child into the cgroup before it runs anything."""
    if procs_file is not None:
        with open(procs_file, "w") as f:
            f.write(str(os.getpid()))


@dataclass(frozen=True)
class Supervised:
    """How a supervised child ended, with its (capped) output."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    out_of_memory: bool


def supervise(
    proc: subprocess.Popen, stdin: bytes, *, timeout_s: float, output_bytes: int, memory: MemoryCap
) -> Supervised:
    """Feed `stdin`, collect capped output, enforce the deadline and the memory cap, then kill what is left."""
    deadline = time.monotonic() + timeout_s
    selector = selectors.DefaultSelector()
    kept = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    dropped = dict.fromkeys(kept, 0)
    for fd in kept:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    pending = memoryview(stdin)
    if pending:
        os.set_blocking(proc.stdin.fileno(), False)
        selector.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    timed_out = out_of_memory = False
    killed_at = None
    while True:
        now = time.monotonic()
        if killed_at is None and (now >= deadline or memory.over(proc.pid)):
            timed_out, out_of_memory = now >= deadline, now < deadline
            kill_tree(proc.pid)
            killed_at = now
        reading = any(key.events == selectors.EVENT_READ for key in selector.get_map().values())
        if not reading and proc.poll() is not None:
            break
        if killed_at is not None and now - killed_at > KILL_GRACE_S:
            break
        if not selector.get_map():
            time.sleep(WATCH_INTERVAL_S)
            continue
        for key, _ in selector.select(timeout=WATCH_INTERVAL_S):
            fd = key.fd
            if key.events == selectors.EVENT_WRITE:
                try:
                    pending = pending[os.write(fd, pending[: 1 << 16]) :]
                except BrokenPipeError:
                    pending = pending[:0]
                if not pending:
                    selector.unregister(fd)
                    proc.stdin.close()
                continue
            data = os.read(fd, 1 << 16)
            if not data:
                selector.unregister(fd)
                continue
            room = max(0, output_bytes - len(kept[fd]))
            kept[fd] += data[:room]
            dropped[fd] += len(data) - len(data[:room])
    kill_tree(proc.pid)  # whatever the program left behind
    returncode = proc.wait()
    selector.close()
    texts = []
    for fd, buf in kept.items():
        text = buf.decode(errors="replace")
        if dropped[fd]:
            text += (
                f"\n[sandbox: {dropped[fd]} more bytes dropped: output is capped at {output_bytes}]"
            )
        texts.append(text)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if not stream.closed:
            stream.close()
    out_of_memory = out_of_memory or memory.hit()
    return Supervised(returncode, texts[0], texts[1], timed_out, out_of_memory)
