"""Claim files: identical jobs started together (two sweeps, a sweep's duplicate jobs) run once.

A job claims its key by creating `<experiment folder>/.claims/<job_key>.json` with `O_CREAT | O_EXCL` (atomic on
local filesystems and on NFSv3+), holding its host, pid and start time. While the job runs, a heartbeat thread
touches the file; the claim is released when the job ends, however it ends. A claim is stale, and taken over,
when its process is gone (same host) or its heartbeat stopped longer than `stale_after_s` ago (any host: a node
that died). Claims only save duplicate work: correctness never depends on them, because every row is written
atomically under its job key, so the rare race of two takers of one stale claim costs one duplicate run.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
import uuid
from pathlib import Path

STALE_AFTER_S = 600.0


class Claim:
    """A held claim: `release()` (or leaving the `with` block) removes it and stops its heartbeat."""

    def __init__(self, path: Path, token: str, heartbeat_s: float):
        self.path, self.token = path, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True)
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                os.utime(self.path)
            except OSError:
                return  # removed (taken over as stale): nothing left to keep alive

    def release(self) -> None:
        self._stop.set()
        if (
            owner(self.path).get("token") == self.token
        ):  # never remove a claim someone else took over
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_path(folder: str | Path, key: str) -> Path:
    return Path(folder) / ".claims" / f"{key}.json"


def owner(path: Path) -> dict:
    """The claim's content ({} when it is gone or unreadable, e.g. being written)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def is_stale(path: Path, *, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether the claim's holder is dead (same host, pid gone) or silent for longer than `stale_after_s`."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    info = owner(path)
    if info.get("host") == platform.node() and isinstance(info.get("pid"), int):
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
    return age > stale_after_s


def try_claim(
    folder: str | Path, key: str, *, stale_after_s: float = STALE_AFTER_S
) -> Claim | dict:
    """Claim job `key`; return the held `Claim`, or the live holder's info (host, pid, since, path) if taken."""
    path = claim_path(folder, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    info = {"host": platform.node(), "pid": os.getpid(), "since": time.time(), "token": token}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not is_stale(path, stale_after_s=stale_after_s):
                return {**owner(path), "path": str(path)}
            # move the stale claim aside (one mover wins the rename), then try once more
            try:
                os.replace(path, path.with_name(f".{path.name}.stale-{token}"))
                path.with_name(f".{path.name}.stale-{token}").unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        return Claim(path, token, heartbeat_s=max(1.0, stale_after_s / 4))
    return {**owner(path), "path": str(path)}
